"""The fused MI + CC path of PretrainingObjective equals the two separate losses, in value and in gradient."""

from __future__ import annotations

import pytest
import torch

from bundle.losses import (
    BoundaryCrossCorrelationLoss,
    ClusterMutualInformationLoss,
    PretrainingObjective,
    entropy_map,
    joint_distribution,
)
from bundle.losses.objective import joint_and_entropy


def _probs(shape, seed, sharpness=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(shape, generator=g, dtype=torch.float64), dim=-3)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("heads", [None, 3])
def test_fused_objective_matches_separate_losses(with_mask, heads):
    b, k, s = 2, 5, 12
    shape = (b, k, s, s) if heads is None else (heads, b, k, s, s)
    p_hat, p_tilde = _probs(shape, 0).float(), _probs(shape, 1).float()
    image = torch.rand(b, 1, s, s, generator=torch.Generator().manual_seed(2))
    mask = None
    if with_mask:
        mask = torch.ones(b, 1, s, s)
        mask[0, :, :3] = 0
        mask[1, :, :, -4:] = 0

    objective = PretrainingObjective.from_variant("mi_cc", alpha=0.3, cc_weight=0.7)
    a1, b1 = p_hat.clone().requires_grad_(True), p_tilde.clone().requires_grad_(True)
    fused = objective(p_hat=a1, p_tilde=b1, image=image, mask=mask)
    fused["loss"].backward()

    mi, cc = ClusterMutualInformationLoss(alpha=0.3), BoundaryCrossCorrelationLoss()
    a2, b2 = p_hat.clone().requires_grad_(True), p_tilde.clone().requires_grad_(True)
    ref_mi, ref_cc = mi(a2, b2, mask), cc((a2, b2), image, mask)
    (ref_mi + 0.7 * ref_cc).backward()

    torch.testing.assert_close(fused["mi"], ref_mi)
    torch.testing.assert_close(fused["cc"], ref_cc)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-4, atol=1e-6)


def test_joint_and_entropies_equal_their_definitions_and_gradcheck():
    # moderate probabilities (>= 1e-3): finite differences of log p are inaccurate next to p ~ 1e-6
    p_hat, p_tilde = _probs((2, 2, 3, 4, 5), 3, 1.0), _probs((2, 2, 3, 4, 5), 4, 1.0)
    mask = torch.ones(2, 1, 4, 5, dtype=torch.float64)
    mask[1, :, 0] = 0
    joint, count, ent_hat, ent_tilde, single = joint_and_entropy(p_hat, p_tilde, mask)
    assert not single and count.item() == 2 * 4 * 5 - 5
    torch.testing.assert_close(joint, joint_distribution(p_hat, p_tilde, mask))
    torch.testing.assert_close(ent_hat, entropy_map(p_hat))
    torch.testing.assert_close(ent_tilde, entropy_map(p_tilde))
    # hand-written backward against finite differences, through all three outputs
    w = torch.rand(3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def f(a, b):
        j, _, ea, eb, _ = joint_and_entropy(a, b, mask)
        return w[0] * (j * j).sum() + w[1] * (ea * ea).sum() + w[2] * eb.sum()

    assert torch.autograd.gradcheck(f, (p_hat.requires_grad_(True), p_tilde.requires_grad_(True)))


def test_fused_path_is_finite_on_one_hot_input():
    k, s = 4, 8
    one_hot = torch.zeros(1, 2, k, s, s)
    one_hot[:, :, 0] = 1.0
    a, b = one_hot.clone().requires_grad_(True), one_hot.clone().requires_grad_(True)
    out = PretrainingObjective.from_variant("mi_cc")(p_hat=a, p_tilde=b, image=torch.rand(2, 1, s, s))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_second_backward_through_the_same_graph_is_exact() -> None:
    # the first backward overwrites the saved logarithms with the gradient; a retained graph recomputes them
    p_hat, p_tilde = _probs((3, 2, 4, 6, 6), 6).float(), _probs((3, 2, 4, 6, 6), 7).float()
    mask = torch.ones(2, 1, 6, 6)
    mask[0, :, :2] = 0
    a, b = p_hat.requires_grad_(True), p_tilde.requires_grad_(True)
    out = PretrainingObjective.from_variant("mi_cc")(p_hat=a, p_tilde=b, image=torch.rand(2, 1, 6, 6), mask=mask)
    first = torch.autograd.grad(out["loss"], (a, b), retain_graph=True)
    second = torch.autograd.grad(out["loss"], (a, b))
    for g1, g2 in zip(first, second, strict=True):
        torch.testing.assert_close(g1, g2)
        assert g1.abs().sum() > 0
