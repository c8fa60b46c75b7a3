"""L_CC (eq. 9): Sobel edge map, entropy map and the local cross-correlation loss."""

from __future__ import annotations

import math

import pytest
import torch

import bundle.losses.boundary as boundary
from bundle.losses import BoundaryCrossCorrelationLoss, entropy_map, sobel_edge_map
from bundle.losses._kernels import box_sum_


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _random_probs(*shape: int, seed: int) -> torch.Tensor:
    return (3.0 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).softmax(dim=-3)


def _binary_probs_with_entropy(target: torch.Tensor) -> torch.Tensor:
    """``B,1,H,W`` target entropies in (0, log 2) -> ``B,2,H,W`` probabilities (q, 1 - q) with that entropy."""
    low, high = torch.zeros_like(target, dtype=torch.float64), torch.full_like(target, 0.5, dtype=torch.float64)
    for _ in range(60):  # bisection on the increasing binary entropy over [0, 1/2]
        mid = (low + high) / 2
        h = -(mid * mid.log() + (1 - mid) * (1 - mid).log())
        low, high = torch.where(h < target, mid, low), torch.where(h < target, high, mid)
    q = ((low + high) / 2).float()
    return torch.cat([q, 1 - q], dim=1)


def _naive_loss(edge: torch.Tensor, entropy: torch.Tensor, window: int, eps: float, mask=None) -> float:
    """Eq. (9) pixel by pixel for one head: edge, entropy ``B,1,H,W``; optional binary mask ``B,1,H,W``."""
    batch, _, height, width = edge.shape
    half = window // 2
    total, count = 0.0, 0
    for b in range(batch):
        if mask is None:
            valid = torch.ones(height, width, dtype=torch.bool)
        else:  # a pixel counts when its whole in-image 3x3 neighbourhood is valid
            valid = torch.zeros(height, width, dtype=torch.bool)
            for i in range(height):
                for j in range(width):
                    valid[i, j] = bool(mask[b, 0, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].all())
        maps = []
        for x in (edge[b, 0].double(), entropy[b, 0].double()):  # rescale to [0, 1] over the valid pixels
            low, high = x[valid].min(), x[valid].max()
            maps.append((x - low) / max(float(high - low), 1e-6))
        phi, psi = maps
        for i in range(height):
            for j in range(width):
                if not valid[i, j]:
                    continue
                rows, cols = slice(max(i - half, 0), i + half + 1), slice(max(j - half, 0), j + half + 1)
                keep = valid[rows, cols]
                a, c = phi[rows, cols][keep], psi[rows, cols][keep]
                cov = ((a - a.mean()) * (c - c.mean())).mean()
                var_a, var_c = ((a - a.mean()) ** 2).mean(), ((c - c.mean()) ** 2).mean()
                total += float(cov.clamp_min(0) ** 2 / (var_a.clamp_min(eps) * var_c.clamp_min(eps)))
                count += 1
    return -total / count


def test_sobel_of_ramps_equals_hand_values() -> None:
    ramp = torch.arange(6.0).expand(1, 1, 5, 6)  # intensity = column index
    # interior: (x[j+1] - x[j-1]) * (1 + 2 + 1) = 8; border columns with replicate padding: 1 * 4 = 4
    expected_row = torch.tensor([4.0, 8, 8, 8, 8, 4])
    torch.testing.assert_close(sobel_edge_map(ramp)[0, 0], expected_row.expand(5, 6))
    torch.testing.assert_close(sobel_edge_map(ramp.transpose(-1, -2))[0, 0], expected_row.expand(5, 6).T)
    # diagonal ramp x = i + j: gx = gy = 8 inside -> 8 sqrt(2)
    diagonal = (torch.arange(5.0)[:, None] + torch.arange(5.0)[None, :]).expand(1, 1, 5, 5)
    assert sobel_edge_map(diagonal)[0, 0, 2, 2].item() == pytest.approx(8 * math.sqrt(2), rel=1e-6)
    # power and channel average: channels (ramp, 0) -> mean magnitude (4, 8, ...) / 2, squared
    two = torch.cat([ramp, torch.zeros_like(ramp)], dim=1)
    torch.testing.assert_close(sobel_edge_map(two, power=2.0)[0, 0, 0], (expected_row / 2) ** 2)


def test_sobel_step_has_no_wrap_around_and_constant_is_zero() -> None:
    step = torch.zeros(1, 1, 4, 6)
    step[..., 3:] = 1.0  # vertical step between columns 2 and 3
    edge = sobel_edge_map(step)
    # columns 2 and 3 see a central difference of 1, times the [1, 2, 1] smoothing = 4; nothing elsewhere
    torch.testing.assert_close(edge[0, 0], torch.tensor([0.0, 0, 4, 4, 0, 0]).expand(4, 6))
    assert edge[..., 0].abs().max() == 0 and edge[..., -1].abs().max() == 0
    constant = torch.full((2, 3, 7, 5), 0.3)
    assert torch.count_nonzero(sobel_edge_map(constant)) == 0
    assert torch.count_nonzero(sobel_edge_map(constant, power=0.75)) == 0
    assert sobel_edge_map(constant).shape == (2, 1, 7, 5)


def test_sobel_matches_naive_convolution_and_is_gradient_safe() -> None:
    image = _random(2, 1, 6, 7, seed=0)
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1), mode="replicate")[:, 0]
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    expected = torch.zeros(2, 6, 7)
    for b in range(2):
        for i in range(6):
            for j in range(7):
                patch = padded[b, i : i + 3, j : j + 3]
                expected[b, i, j] = torch.sqrt((patch * kx).sum() ** 2 + (patch * kx.T).sum() ** 2)
    torch.testing.assert_close(sobel_edge_map(image)[:, 0], expected)
    flat = torch.zeros(1, 1, 5, 5)
    flat[..., 2, 2] = 1.0
    flat.requires_grad_()
    sobel_edge_map(flat, power=0.5).sum().backward()
    assert torch.isfinite(flat.grad).all()


def test_entropy_map_values_shapes_and_zero_safety() -> None:
    k = 5
    uniform = torch.full((3, 2, k, 4, 4), 1.0 / k)
    assert entropy_map(uniform).shape == (3, 2, 1, 4, 4)
    torch.testing.assert_close(entropy_map(uniform), torch.full((3, 2, 1, 4, 4), math.log(k)))
    one_hot = torch.zeros(2, k, 4, 4)
    one_hot[:, 1] = 1.0
    one_hot.requires_grad_()
    ent = entropy_map(one_hot)
    assert ent.shape == (2, 1, 4, 4) and torch.count_nonzero(ent) == 0
    ent.sum().backward()
    assert torch.isfinite(one_hot.grad).all()
    probs = _random_probs(2, k, 3, 3, seed=1).requires_grad_()
    entropy_map(probs).sum().backward()
    # d/dp (-sum p log p) = -(log p + 1)
    torch.testing.assert_close(probs.grad, -(probs.detach().log() + 1))


def test_matches_naive_reference() -> None:
    edge, entropy = _random(2, 1, 7, 6, seed=2), _random(2, 1, 7, 6, seed=3)
    loss = BoundaryCrossCorrelationLoss(window=3, eps=1e-4)
    assert loss.forward_maps(edge, entropy).item() == pytest.approx(_naive_loss(edge, entropy, 3, 1e-4), abs=1e-5)
    mask = torch.ones(2, 1, 7, 6)
    mask[0, :, :, 4:] = 0
    mask[1, :, 0] = 0
    expected = _naive_loss(edge, entropy, 3, 1e-4, mask)
    assert loss.forward_maps(edge, entropy, mask).item() == pytest.approx(expected, abs=1e-5)
    five = BoundaryCrossCorrelationLoss(window=5, eps=1e-4)
    assert five.forward_maps(edge, entropy, mask).item() == pytest.approx(
        _naive_loss(edge, entropy, 5, 1e-4, mask), abs=1e-5
    )


def test_entropy_aligned_with_edges_scores_best() -> None:
    image = _random(2, 1, 16, 16, seed=4)  # textured: every window has edge variance
    edge = sobel_edge_map(image)
    target = 0.05 + 0.6 * edge / edge.amax(dim=(-2, -1), keepdim=True)  # entropy = positive affine copy of edges
    aligned = _binary_probs_with_entropy(target)
    torch.testing.assert_close(entropy_map(aligned), target, atol=1e-5, rtol=0)
    loss = BoundaryCrossCorrelationLoss(window=5)
    best = loss(aligned, image).item()
    assert -1.0 - 1e-5 <= best < -0.99
    permutation = torch.randperm(256, generator=torch.Generator().manual_seed(5))
    shuffled = aligned.flatten(2)[..., permutation].view_as(aligned)
    assert loss(shuffled, image).item() > best + 0.5
    # anti-correlated entropy: rewarded by the literal square of eq. (9) but not by the positive-only loss
    anti = _binary_probs_with_entropy(0.65 - 0.6 * edge / edge.amax(dim=(-2, -1), keepdim=True))
    assert loss(anti, image).item() > -0.05
    assert BoundaryCrossCorrelationLoss(window=5, positive_only=False)(anti, image).item() < -0.99


def test_invariant_to_affine_intensity_changes() -> None:
    image = _random(2, 1, 12, 12, seed=6)
    probs = _random_probs(3, 2, 4, 12, 12, seed=7)
    loss = BoundaryCrossCorrelationLoss(window=5, edge_power=0.75, reduction="none")
    reference = loss(probs, image)
    torch.testing.assert_close(loss(probs, 3.0 * image + 2.0), reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss(probs, 0.2 * image - 7.0), reference, atol=1e-5, rtol=1e-4)
    edge, entropy = sobel_edge_map(image, power=0.75), entropy_map(probs)
    maps = loss.forward_maps(edge, entropy)
    torch.testing.assert_close(maps, reference)
    torch.testing.assert_close(loss.forward_maps(edge, 2.5 * entropy + 0.7), maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss.forward_maps(4.0 * edge + 1.0, entropy), maps, atol=1e-5, rtol=1e-4)


def test_constant_inputs_are_finite_with_finite_gradients() -> None:
    loss = BoundaryCrossCorrelationLoss()
    k = 4
    cases = {
        "constant image": (_random_probs(2, k, 8, 8, seed=8), torch.full((2, 1, 8, 8), 0.5)),
        "uniform probabilities": (torch.full((2, k, 8, 8), 1.0 / k), _random(2, 1, 8, 8, seed=9)),
        "one-hot probabilities": (torch.nn.functional.one_hot(torch.zeros(2, 8, 8).long(), k).permute(0, 3, 1, 2)
                                  .float(), _random(2, 1, 8, 8, seed=10)),
        "both constant": (torch.full((2, k, 8, 8), 1.0 / k), torch.zeros(2, 1, 8, 8)),
    }
    for name, (probs, image) in cases.items():
        probs = probs.clone().requires_grad_()
        value = loss(probs, image)
        value.backward()
        assert torch.isfinite(value), name
        assert torch.isfinite(probs.grad).all(), name
        if name != "constant image":  # a constant entropy or edge map has no local correlation at all
            assert value.item() == 0.0, name
    value = loss(_random_probs(2, k, 8, 8, seed=8), torch.full((2, 1, 8, 8), 0.5))
    assert value.item() == 0.0  # flat edges: zero correlation


def test_edge_map_computed_once_for_all_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = boundary.sobel_edge_map

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(boundary, "sobel_edge_map", counting)
    image = _random(2, 1, 8, 8, seed=11)
    probs = _random_probs(6, 2, 3, 8, 8, seed=12)
    loss = BoundaryCrossCorrelationLoss(reduction="none")
    values = loss(probs, image)
    assert values.shape == (6,) and len(calls) == 1
    # a sequence of tensors is scored as their concatenation along the head axis, still with one edge map
    torch.testing.assert_close(loss((probs[:3], probs[3:]), image), values)
    assert len(calls) == 2


def test_multi_head_equals_per_head_and_reductions() -> None:
    image = _random(2, 1, 9, 9, seed=13)
    probs = _random_probs(3, 2, 4, 9, 9, seed=14)
    mask = torch.ones(2, 1, 9, 9)
    mask[:, :, :2] = 0
    per_head = torch.stack([BoundaryCrossCorrelationLoss()(probs[m], image, mask) for m in range(3)])
    torch.testing.assert_close(BoundaryCrossCorrelationLoss(reduction="none")(probs, image, mask), per_head)
    torch.testing.assert_close(BoundaryCrossCorrelationLoss(reduction="sum")(probs, image, mask), per_head.sum())
    torch.testing.assert_close(BoundaryCrossCorrelationLoss()(probs, image, mask), per_head.mean())
    assert BoundaryCrossCorrelationLoss(reduction="none")(probs[0], image).shape == ()
    assert ((per_head >= -1.0) & (per_head <= 0.0)).all()


def test_mask_removes_pixels() -> None:
    image = _random(2, 1, 10, 10, seed=15)
    probs = _random_probs(2, 3, 10, 10, seed=16)
    mask = torch.ones(2, 1, 10, 10)
    mask[0, :, :, 6:] = 0
    mask[1, :, 7:] = 0
    loss = BoundaryCrossCorrelationLoss()
    reference = loss(probs, image, mask)
    invalid = mask == 0
    noisy_image = torch.where(invalid, 100.0 * _random(2, 1, 10, 10, seed=17), image)
    noisy_probs = torch.where(invalid, _random_probs(2, 3, 10, 10, seed=18), probs)
    torch.testing.assert_close(loss(noisy_probs, noisy_image, mask), reference)
    assert abs(loss(probs, image).item() - reference.item()) > 1e-4  # the mask does change the value
    torch.testing.assert_close(loss(probs, image, torch.ones(2, 1, 10, 10)), loss(probs, image))
    grad_probs = probs.clone().requires_grad_()
    empty = loss(grad_probs, image, torch.zeros(2, 1, 10, 10))
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(grad_probs.grad) == 0


def test_no_gradient_into_image_and_fp32_under_autocast() -> None:
    image = _random(2, 1, 8, 8, seed=19).requires_grad_()
    probs = _random_probs(2, 2, 3, 8, 8, seed=20).requires_grad_()
    BoundaryCrossCorrelationLoss()(probs, image).backward()
    assert image.grad is None
    assert torch.isfinite(probs.grad).all() and torch.count_nonzero(probs.grad) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = BoundaryCrossCorrelationLoss()(probs.detach().bfloat16(), image.detach().bfloat16())
    assert value.dtype == torch.float32
    reference = BoundaryCrossCorrelationLoss()(probs.detach().bfloat16().float(), image.detach().bfloat16().float())
    torch.testing.assert_close(value, reference)


def test_bad_inputs_raise() -> None:
    image = torch.rand(2, 1, 8, 8)
    probs = torch.rand(2, 3, 8, 8).softmax(1)
    loss = BoundaryCrossCorrelationLoss()
    with pytest.raises(ValueError, match="window"):
        BoundaryCrossCorrelationLoss(window=4)
    with pytest.raises(ValueError, match="window"):
        BoundaryCrossCorrelationLoss(window=1)
    with pytest.raises(ValueError, match="edge_power"):
        BoundaryCrossCorrelationLoss(edge_power=0.0)
    with pytest.raises(ValueError, match="Unsupported reduction"):
        BoundaryCrossCorrelationLoss(reduction="avg")
    with pytest.raises(ValueError, match="share B, H and W"):
        loss(probs, torch.rand(2, 1, 8, 9))
    with pytest.raises(ValueError, match="share B, H and W"):
        loss(probs, torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="image"):
        loss(probs, torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="probs"):
        loss(probs[0], image)
    with pytest.raises(ValueError, match=r"probs\[1\]"):
        loss((probs, probs[:, :1]), image)
    with pytest.raises(ValueError, match="mask"):
        loss(probs, image, torch.ones(2, 2, 8, 8))
    with pytest.raises(ValueError, match="power"):
        sobel_edge_map(image, power=-1.0)


def test_gradients_match_finite_differences() -> None:
    probs = _random_probs(2, 2, 2, 5, 5, seed=21).double().requires_grad_()
    image = _random(2, 1, 5, 5, seed=22).double()
    mask = torch.ones(2, 1, 5, 5, dtype=torch.float64)
    mask[1, :, :, 4] = 0
    loss = BoundaryCrossCorrelationLoss(window=3, reduction="none")
    assert torch.autograd.gradcheck(lambda p: loss(p, image, mask), (probs,), fast_mode=True)


def test_box_sum_counts_in_image_neighbours() -> None:
    # the window sum of ones is the number of in-image pixels in each window: 3x3 = 9 at a corner of a 5x5
    # window, 3x5 = 15 along an edge, 25 inside
    ones = torch.ones(1, 1, 7, 8)
    sums, _ = box_sum_(ones.clone(), 5)
    assert sums[0, 0, 0, 0] == 9 and sums[0, 0, 0, 3] == 15 and sums[0, 0, 3, 3] == 25 and sums[0, 0, 6, 7] == 9
    x = _random(2, 3, 6, 7, seed=30)
    naive = torch.zeros_like(x)
    for i in range(6):
        for j in range(7):
            naive[..., i, j] = x[..., max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].sum(dim=(-2, -1))
    torch.testing.assert_close(box_sum_(x.clone(), 3)[0], naive)


@pytest.mark.parametrize(("window", "positive_only", "with_mask"), [(5, True, False), (3, False, True)])
def test_gradients_match_finite_differences_without_mask_and_signed(window, positive_only, with_mask) -> None:
    probs = _random_probs(2, 2, 3, 7, 6, seed=23).double().requires_grad_()
    image = _random(2, 1, 7, 6, seed=24).double()
    mask = None
    if with_mask:
        mask = torch.ones(2, 1, 7, 6, dtype=torch.float64)
        mask[0, :, 5:] = 0
    loss = BoundaryCrossCorrelationLoss(window=window, positive_only=positive_only, reduction="none")
    assert torch.autograd.gradcheck(lambda p: loss(p, image, mask), (probs,), fast_mode=True)


def test_second_backward_through_the_same_graph_is_exact() -> None:
    # the backward writes into buffers of the forward; a retained graph must still give the same gradient twice
    probs = _random_probs(2, 2, 4, 9, 9, seed=25).requires_grad_()
    image, mask = _random(2, 1, 9, 9, seed=26), torch.ones(2, 1, 9, 9)
    mask[1, :, :, :2] = 0
    value = BoundaryCrossCorrelationLoss()(probs, image, mask)
    (first,) = torch.autograd.grad(value, probs, retain_graph=True)
    (second,) = torch.autograd.grad(value, probs)
    torch.testing.assert_close(first, second)
    assert first.abs().sum() > 0
