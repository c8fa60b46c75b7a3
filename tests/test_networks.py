from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet

from bundle.networks import DenseClusterHead, DenseProjectionHead, FeatureUNet, GlobalProjectionHead

TINY = (4, 8, 8, 16, 16, 4)


def _plain(out_channels: int) -> BasicUNet:
    return BasicUNet(
        spatial_dims=2, in_channels=1, out_channels=out_channels, features=TINY, act="relu", norm="batch", bias=False
    )


def test_feature_shapes_and_single_pass_logits():
    torch.manual_seed(0)
    net = FeatureUNet(out_channels=3, features=TINY).eval()
    x = torch.rand(2, 1, 48, 32)
    out = net.forward_features(x)
    assert out["encoder"].shape == (2, 16, 3, 2)  # 1/16 resolution, bottleneck width
    assert out["decoder"].shape == (2, 4, 48, 32)  # full resolution, last decoder width
    assert out["logits"].shape == (2, 3, 48, 32)
    torch.testing.assert_close(out["logits"], net(x))
    assert "logits" not in net.forward_features(x, with_logits=False)


def test_decoder_features_feed_final_conv():
    net = FeatureUNet(out_channels=2, features=TINY).eval()
    x = torch.rand(1, 1, 32, 32)
    out = net.forward_features(x)
    torch.testing.assert_close(net.final_conv(out["decoder"]), out["logits"])


def test_state_dict_loads_strictly_into_plain_basic_unet():
    net = FeatureUNet(out_channels=4, features=TINY)
    plain = _plain(4)
    assert list(net.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(net.state_dict(), strict=True)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(plain.eval()(x), net.eval()(x))


def test_pretrained_weights_load_into_other_class_count_except_final_conv():
    from monai.networks.utils import copy_model_state

    src = FeatureUNet(out_channels=4, features=TINY)
    dst = _plain(2)
    _, updated, unchanged = copy_model_state(dst, src.state_dict(), inplace=True)
    assert set(unchanged) == {"final_conv.weight", "final_conv.bias"}
    assert len(updated) == len(dst.state_dict()) - 2


def test_paper_defaults_batchnorm_relu_no_bias():
    net = FeatureUNet()
    assert isinstance(net.conv_0.conv_0.adn.N, torch.nn.BatchNorm2d)
    assert isinstance(net.conv_0.conv_0.adn.A, torch.nn.ReLU)
    assert net.conv_0.conv_0.conv.bias is None
    assert net.down_4.convs.conv_1.conv.out_channels == 512


def test_bad_inputs_raise():
    net = FeatureUNet(features=TINY)
    with pytest.raises(ValueError, match=r"\(B,1,H,W\)"):
        net.forward_features(torch.rand(1, 2, 32, 32))
    with pytest.raises(ValueError, match="at least 16x16"):
        net.forward_features(torch.rand(1, 1, 8, 32))
    with pytest.raises(ValueError, match="six positive widths"):
        FeatureUNet(features=(4, 8, 16))


def test_dense_cluster_head_is_several_independent_softmaxes():
    torch.manual_seed(0)
    head = DenseClusterHead(in_channels=4, num_clusters=5, num_heads=3)
    x = torch.randn(2, 4, 6, 7)
    p = head(x)
    assert p.shape == (3, 2, 5, 6, 7)
    torch.testing.assert_close(p.sum(dim=2), torch.ones(3, 2, 6, 7))
    # head m equals its own 1x1 conv slice followed by a softmax
    w, b = head.proj.weight, head.proj.bias
    for m in range(3):
        ref = torch.softmax(torch.nn.functional.conv2d(x, w[m * 5 : (m + 1) * 5], b[m * 5 : (m + 1) * 5]), dim=1)
        torch.testing.assert_close(p[m], ref)
    with pytest.raises(ValueError, match="num_clusters"):
        DenseClusterHead(4, num_clusters=1)
    with pytest.raises(ValueError, match=r"\(B,4,H,W\)"):
        head(torch.randn(2, 3, 6, 7))


def test_dense_cluster_head_temperature_divides_the_logits():
    torch.manual_seed(0)
    head = DenseClusterHead(in_channels=4, num_clusters=5, num_heads=2, temperature=0.3)
    x = torch.randn(2, 4, 6, 7)
    w, b = head.proj.weight, head.proj.bias
    ref = torch.softmax(torch.nn.functional.conv2d(x, w[5:], b[5:]) / 0.3, dim=1)
    torch.testing.assert_close(head(x)[1], ref)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            DenseClusterHead(4, temperature=bad)


def test_global_head_masked_pooling_and_unit_norm():
    torch.manual_seed(0)
    head = GlobalProjectionHead(in_channels=3, hidden_dim=8, out_dim=5)
    x = torch.randn(2, 3, 4, 4)
    z = head(x)
    assert z.shape == (2, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1  # only the top half is valid
    x_changed = x.clone()
    x_changed[:, :, 2:] = 100.0  # invalid region changes must not matter
    torch.testing.assert_close(head(x, mask), head(x_changed, mask))
    torch.testing.assert_close(head(x, mask), head(x[:, :, :2]))


def test_dense_projection_head_shape():
    head = DenseProjectionHead(in_channels=4, hidden_dim=8, out_dim=6, grid=5)
    e = head(torch.randn(2, 4, 20, 20))
    assert e.shape == (2, 6, 5, 5)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2, 5, 5))
