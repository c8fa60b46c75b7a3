"""Export and verification of the network as the model zoo does it: ``python -m monai.bundle ckpt_export`` gives a
TorchScript module whose output equals the eager network's, ``verify_net_in_out`` passes with the metadata's
input shape, and the configs agree with each other and with the metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

from bundle.networks import FeatureUNet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = [4, 8, 8, 16, 16, 4]


def test_ckpt_export_torchscript_equals_eager(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = FeatureUNet(features=TINY)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for module in eager.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    torch.save(eager.state_dict(), tmp_path / "model.pt")
    # the function `python -m monai.bundle ckpt_export ...` dispatches to, with the same arguments (run in-process:
    # a subprocess would spend ~10 s importing MONAI on a small machine)
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        **{"network_def#features": TINY},
    )
    scripted = torch.jit.load(str(tmp_path / "model.ts"), map_location="cpu")
    eager.eval()
    x = torch.rand(2, 1, 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = eager(x)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
    assert expected.shape == (2, 4, 64, 48)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.ts"]  # wrote only the export


def test_verify_net_in_out_with_metadata_shape() -> None:
    # the full-size network of the configs (the zoo CI runs exactly this, with n = p = 1)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        n=1,
        any=1,
    )


def test_configs_agree_with_each_other_and_the_metadata() -> None:
    train = ConfigParser.load_config_file(CONFIGS / "train.json")
    infer = ConfigParser.load_config_file(CONFIGS / "inference.json")
    pretrain = ConfigParser.load_config_file(CONFIGS / "pretrain.json")
    meta = ConfigParser.load_config_file(CONFIGS / "metadata.json")
    for key in ("features", "num_classes", "pixdim", "spatial_size", "channel"):
        assert train[key] == infer[key], key
    for key in ("features", "pixdim", "spatial_size", "crop_size", "num_classes"):
        assert train[key] == pretrain[key], key
    assert train["network_def"] == infer["network_def"]
    assert train["datalist"] == pretrain["datalist"] and train["pretrained_path"] == pretrain["pretrained_path"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == train["num_classes"] == len(pred["channel_def"])
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == train["crop_size"]
