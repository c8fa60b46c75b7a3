"""L_MI (eq. 3-8), the joint/cluster statistics helpers and dense IMSAT, checked against hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bundle.losses import ClusterMutualInformationLoss, IMSATLoss, cluster_statistics, joint_distribution


def _random_probs(*shape: int, seed: int = 0, k_dim: int = -3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(*shape, generator=generator)).softmax(dim=k_dim)


def _one_hot(labels: torch.Tensor, k: int) -> torch.Tensor:
    """``B,H,W`` labels -> ``B,K,H,W`` one-hot probabilities."""
    return F.one_hot(labels, k).permute(0, 3, 1, 2).float()


def _naive_joint(p_hat: torch.Tensor, p_tilde: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (3) pixel by pixel for one head ``B,K,H,W``."""
    batch, k, height, width = p_hat.shape
    joint = torch.zeros(k, k, dtype=torch.float64)
    count = 0.0
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                w = 1.0 if mask is None else float(mask[b, 0, i, j])
                joint += w * torch.outer(p_hat[b, :, i, j].double(), p_tilde[b, :, i, j].double())
                count += w
    return joint / count


def _entropy(p: torch.Tensor) -> float:
    return float(-torch.special.xlogy(p, p).sum())


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_balanced_one_hot_gives_minus_log_k(alpha: float, symmetric: bool) -> None:
    k = 4
    labels = (torch.arange(2 * 4 * 4) % k).reshape(2, 4, 4)  # every cluster holds 8 of the 32 pixels
    p = _one_hot(labels, k)
    loss = ClusterMutualInformationLoss(alpha=alpha, symmetric=symmetric)(p, p)
    # P = I/K: H'_alpha(P) = log K for every alpha, H(p_hat) = H(p_tilde) = log K
    assert loss.item() == pytest.approx(-math.log(k), abs=1e-6)


def test_hand_computed_k2_case() -> None:
    # two pixels: (p_hat, p_tilde) = ((1, 0), (1, 0)) and ((0.5, 0.5), (0.2, 0.8))
    p_hat = torch.tensor([[1.0, 0.5], [0.0, 0.5]]).reshape(1, 2, 1, 2)
    p_tilde = torch.tensor([[1.0, 0.2], [0.0, 0.8]]).reshape(1, 2, 1, 2)
    # P = ([[1, 0], [0, 0]] + [[0.1, 0.4], [0.1, 0.4]]) / 2 = [[0.55, 0.2], [0.05, 0.2]]
    # rows (p_hat marginal) = [0.75, 0.25], columns (p_tilde marginal) = [0.6, 0.4]
    h_rows = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h_cols = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    # alpha = 0.5: weights (1 - a) P + a I / 2 = [[0.525, 0.1], [0.025, 0.35]]
    h_prime = -(0.525 * math.log(0.55) + 0.1 * math.log(0.2) + 0.025 * math.log(0.05) + 0.35 * math.log(0.2))
    expected = h_prime - h_rows - h_cols
    assert expected == pytest.approx(-0.122343, abs=1e-6)
    assert ClusterMutualInformationLoss(alpha=0.5)(p_hat, p_tilde).item() == pytest.approx(expected, abs=1e-6)

    # alpha = 0 is -MI: H(P) - H(rows) - H(cols)
    h_joint = -(0.55 * math.log(0.55) + 0.2 * math.log(0.2) + 0.05 * math.log(0.05) + 0.2 * math.log(0.2))
    assert ClusterMutualInformationLoss(alpha=0.0)(p_hat, p_tilde).item() == pytest.approx(
        h_joint - h_rows - h_cols, abs=1e-6
    )
    # alpha = 1: cross-entropy to I/2 = -(log 0.55 + log 0.2) / 2
    assert ClusterMutualInformationLoss(alpha=1.0)(p_hat, p_tilde).item() == pytest.approx(
        -(math.log(0.55) + math.log(0.2)) / 2 - h_rows - h_cols, abs=1e-6
    )
    # symmetric: P = [[0.55, 0.125], [0.125, 0.2]], both marginals [0.675, 0.325]
    h_sym = -(0.55 * math.log(0.55) + 2 * 0.125 * math.log(0.125) + 0.2 * math.log(0.2))
    h_avg = -(0.675 * math.log(0.675) + 0.325 * math.log(0.325))
    assert ClusterMutualInformationLoss(alpha=0.0, symmetric=True)(p_hat, p_tilde).item() == pytest.approx(
        h_sym - 2 * h_avg, abs=1e-6
    )


def test_hand_computed_k3_joint_and_statistics() -> None:
    # three pixels, one-hot: (0, 0), (1, 1), (2, 1) -> P = [[1,0,0],[0,1,0],[0,1,0]] / 3
    p_hat = _one_hot(torch.tensor([[[0, 1, 2]]]), 3)
    p_tilde = _one_hot(torch.tensor([[[0, 1, 1]]]), 3)
    joint = joint_distribution(p_hat, p_tilde)
    expected = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 1, 0]]]) / 3
    torch.testing.assert_close(joint, expected)
    stats = cluster_statistics(joint[0])
    # H(rows) = log 3, H(cols) = H(1/3, 2/3), H(P) = log 3  ->  I = H(1/3, 2/3)
    h_cols = -(math.log(1 / 3) / 3 + 2 / 3 * math.log(2 / 3))
    assert stats["mutual_information"].item() == pytest.approx(h_cols, abs=1e-6)
    # average marginal = (rows + cols) / 2 = [1/3, 1/2, 1/6]
    assert stats["marginal_entropy"].item() == pytest.approx(
        -(math.log(1 / 3) / 3 + math.log(1 / 2) / 2 + math.log(1 / 6) / 6), abs=1e-6
    )
    assert stats["dead_clusters"].item() == 0
    # alpha = 0.5 loss with exact zeros in P: 0.5 H(P) + 0.5 * -(log(1/3) + log(1/3) + log(0 -> eps)) / 3
    eps = 1e-8
    h_prime = 0.5 * math.log(3) - 0.5 * (2 * math.log(1 / 3) + math.log(eps)) / 3
    loss = ClusterMutualInformationLoss(alpha=0.5, eps=eps)(p_hat, p_tilde)
    assert loss.item() == pytest.approx(h_prime - math.log(3) - h_cols, abs=1e-5)


def test_cluster_statistics_mi_of_independent_views_is_zero_never_negative() -> None:
    # P = a b^T (the views independent): I = 0 exactly; in float32 the three entropies round to about -1e-7 for
    # many such joints, which the log would print as "MI=-0.000" (and log readers would miss)
    generator = torch.Generator().manual_seed(0)
    a = torch.softmax(0.01 * torch.randn(64, 6, generator=generator), dim=1)
    b = torch.softmax(0.01 * torch.randn(64, 6, generator=generator), dim=1)
    mi = cluster_statistics(a[:, :, None] * b[:, None, :])["mutual_information"]
    assert mi.shape == (64,) and bool((mi >= 0).all()) and mi.max().item() < 1e-6


def test_cluster_statistics_dead_clusters_and_shapes() -> None:
    k = 4
    joint = torch.diag(torch.tensor([0.5, 0.3, 0.19, 0.01]))  # 0.01 < 0.1 / 4 -> one dead cluster
    stats = cluster_statistics(torch.stack([joint, torch.eye(k) / k]))
    assert stats["dead_clusters"].tolist() == [1, 0]
    torch.testing.assert_close(stats["mutual_information"][1], torch.tensor(math.log(k)))
    assert stats["mutual_information"][0].item() == pytest.approx(_entropy(torch.diagonal(joint)), abs=1e-6)
    assert stats["mutual_information"].shape == (2,)
    joint_grad = (torch.eye(k) / k).requires_grad_()
    assert not cluster_statistics(joint_grad)["mutual_information"].requires_grad
    with pytest.raises(ValueError, match="square"):
        cluster_statistics(torch.rand(3, 4))


def test_joint_matches_naive_and_sums_to_one() -> None:
    p_hat, p_tilde = _random_probs(2, 3, 4, 5, seed=1), _random_probs(2, 3, 4, 5, seed=2)
    mask = (torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    joint = joint_distribution(p_hat, p_tilde, mask)
    assert joint.shape == (1, 3, 3) and joint.dtype == torch.float32
    torch.testing.assert_close(joint[0].double(), _naive_joint(p_hat, p_tilde, mask), atol=1e-6, rtol=1e-5)
    assert joint.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proposition_2_1_bounds_for_alpha_one(seed: int) -> None:
    k = 5
    p_hat, p_tilde = _random_probs(2, k, 4, 4, seed=seed), _random_probs(2, k, 4, 4, seed=seed + 10)
    joint = _naive_joint(p_hat, p_tilde)
    h_marginals = _entropy(joint.sum(1)) + _entropy(joint.sum(0))
    cross_entropy = ClusterMutualInformationLoss(alpha=1.0)(p_hat, p_tilde).item() + h_marginals
    assert cross_entropy == pytest.approx(-sum(math.log(joint[j, j]) for j in range(k)) / k, rel=1e-5)
    assert cross_entropy >= math.log(k) - 1e-6  # lower bound of eq. (7)
    # upper bound of eq. (7): mean over pixels of H(u, p_hat_i) + H(u, p_tilde_i)
    upper = (-(p_hat.double().log().mean(1)) - p_tilde.double().log().mean(1)).mean().item()
    assert cross_entropy <= upper + 1e-6


def test_mask_removes_pixels() -> None:
    p_hat, p_tilde = _random_probs(3, 2, 4, 5, 6, seed=4), _random_probs(3, 2, 4, 5, 6, seed=5)
    mask = torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(6)) > 0.5
    loss = ClusterMutualInformationLoss(alpha=0.5, reduction="none")
    masked = loss(p_hat, p_tilde, mask.float())
    # the same heads on only the valid pixels, gathered into a 1 x n image
    keep = mask[:, 0]  # B,H,W
    only_hat = p_hat.permute(0, 1, 3, 4, 2)[:, keep].permute(0, 2, 1)[:, None, :, None, :]  # M,1,K,1,n
    only_tilde = p_tilde.permute(0, 1, 3, 4, 2)[:, keep].permute(0, 2, 1)[:, None, :, None, :]
    torch.testing.assert_close(masked, loss(only_hat, only_tilde))
    # garbage in masked-out pixels does not matter
    noisy_hat = torch.where(mask, p_hat, _random_probs(3, 2, 4, 5, 6, seed=7))
    torch.testing.assert_close(loss(noisy_hat, p_tilde, mask.float()), masked)
    # an all-ones mask is no mask
    torch.testing.assert_close(loss(p_hat, p_tilde, torch.ones(2, 1, 5, 6)), loss(p_hat, p_tilde))


def test_all_masked_is_zero_with_zero_gradient() -> None:
    p_hat = _random_probs(2, 3, 4, 4, seed=8).requires_grad_()
    loss = ClusterMutualInformationLoss()(p_hat, p_hat.detach(), torch.zeros(2, 1, 4, 4))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(p_hat.grad) == 0


#: a hand-made 3 x 3 joint (sums to 1) with an exact zero off the diagonal
_HAND_JOINT = [[0.30, 0.05, 0.00], [0.10, 0.20, 0.05], [0.02, 0.08, 0.20]]


def _plain_mi_loss(joint: list[list[float]], alpha: float) -> float:
    """L = H'_alpha(P) - H(rows) - H(cols) of eq. (6)-(8), term by term in Python floats (0 log 0 = 0)."""
    k = len(joint)
    h_prime = -sum(
        ((1 - alpha) * joint[j][c] + alpha * (j == c) / k) * math.log(joint[j][c])
        for j in range(k)
        for c in range(k)
        if joint[j][c] > 0
    )
    rows = [sum(joint[j]) for j in range(k)]
    cols = [sum(joint[j][c] for j in range(k)) for c in range(k)]
    return h_prime + sum(x * math.log(x) for x in rows) + sum(x * math.log(x) for x in cols)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_joint_equals_the_plain_formula_on_a_hand_made_joint(alpha: float, symmetric: bool) -> None:
    plain = _HAND_JOINT
    if symmetric:
        plain = [[(plain[j][c] + plain[c][j]) / 2 for c in range(3)] for j in range(3)]
    expected = _plain_mi_loss(plain, alpha)
    joint = torch.tensor(_HAND_JOINT, dtype=torch.float64)
    count = torch.tensor(7.0)
    loss = ClusterMutualInformationLoss(alpha=alpha, symmetric=symmetric, reduction="none")
    value = loss.forward_joint(joint, count)
    assert value.shape == () and value.item() == pytest.approx(expected, abs=1e-12)
    # M,K,K: one value per head; a second head P = I/K scores -log K; "mean"/"sum" reduce over heads
    heads = torch.stack([joint, torch.eye(3, dtype=torch.float64) / 3])
    per_head = torch.tensor([expected, -math.log(3)], dtype=torch.float64)
    torch.testing.assert_close(loss.forward_joint(heads, count), per_head)
    mean = ClusterMutualInformationLoss(alpha=alpha, symmetric=symmetric).forward_joint(heads, count)
    assert mean.item() == pytest.approx((expected - math.log(3)) / 2, abs=1e-12)
    # no valid pixel: 0 with a zero gradient
    empty = joint.clone().requires_grad_()
    loss.forward_joint(empty, torch.tensor(0.0)).backward()
    assert torch.count_nonzero(empty.grad) == 0


@pytest.mark.parametrize(("alpha", "symmetric"), [(0.0, False), (0.5, False), (1.0, True)])
@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_joint_on_joint_distribution_equals_forward(alpha, symmetric, heads, with_mask) -> None:
    shape = (2, 4, 5, 6) if heads is None else (heads, 2, 4, 5, 6)
    p_hat, p_tilde = _random_probs(*shape, seed=20), _random_probs(*shape, seed=21)
    mask = (torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(22)) > 0.3).float() if with_mask else None
    count = mask.sum() if with_mask else torch.tensor(2.0 * 5 * 6)
    for reduction in ("none", "mean"):
        loss = ClusterMutualInformationLoss(alpha=alpha, symmetric=symmetric, reduction=reduction)
        a1, b1 = p_hat.clone().requires_grad_(), p_tilde.clone().requires_grad_()
        direct = loss(a1, b1, mask)
        a2, b2 = p_hat.clone().requires_grad_(), p_tilde.clone().requires_grad_()
        joint = joint_distribution(a2, b2, mask)
        scored = loss.forward_joint(joint[0] if heads is None else joint, count)
        assert scored.shape == direct.shape
        torch.testing.assert_close(scored, direct)
        weights = torch.linspace(0.5, 1.5, direct.numel()).view_as(direct)
        (weights * direct).sum().backward()
        (weights * scored).sum().backward()
        torch.testing.assert_close(a2.grad, a1.grad)
        torch.testing.assert_close(b2.grad, b1.grad)


def test_forward_joint_rejects_bad_inputs_naming_them() -> None:
    loss = ClusterMutualInformationLoss()
    count = torch.tensor(10.0)
    for bad in (torch.rand(3, 4), torch.rand(2, 3, 4), torch.rand(3), torch.rand(1, 2, 3, 3)):
        with pytest.raises(ValueError, match=r"joint must be K,K or M,K,K \(square\), got shape"):
            loss.forward_joint(bad, count)
    with pytest.raises(ValueError, match="count must be a 0-d tensor"):
        loss.forward_joint(torch.eye(3) / 3, torch.tensor([10.0]))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradients_finite_at_exact_zeros(alpha: float, symmetric: bool) -> None:
    k = 4
    balanced = _one_hot((torch.arange(32) % k).reshape(2, 4, 4), k)
    collapsed = _one_hot(torch.zeros(2, 4, 4, dtype=torch.long), k)  # every pixel in cluster 0
    for p_hat, p_tilde in [(balanced, balanced), (collapsed, collapsed), (balanced, collapsed)]:
        a, b = p_hat.clone().requires_grad_(), p_tilde.clone().requires_grad_()
        loss = ClusterMutualInformationLoss(alpha=alpha, symmetric=symmetric)(a, b)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_multi_head_equals_per_head() -> None:
    p_hat, p_tilde = _random_probs(3, 2, 5, 4, 4, seed=9), _random_probs(3, 2, 5, 4, 4, seed=10)
    mask = (torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(11)) > 0.2).float()
    for reduction in ("none", "mean", "sum"):
        loss = ClusterMutualInformationLoss(alpha=0.25, reduction=reduction)
        per_head = torch.stack([loss(p_hat[m], p_tilde[m], mask) for m in range(3)])
        assert per_head.shape == (3,)  # "none" on B,K,H,W input is 0-d
        expected = {"none": per_head, "mean": per_head.mean(), "sum": per_head.sum()}[reduction]
        torch.testing.assert_close(loss(p_hat, p_tilde, mask), expected)


def test_fp32_under_bf16_autocast() -> None:
    p_hat = _random_probs(2, 2, 5, 6, 6, seed=12).bfloat16()
    p_tilde = _random_probs(2, 2, 5, 6, 6, seed=13).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ClusterMutualInformationLoss()(p_hat, p_tilde)
        joint = joint_distribution(p_hat, p_tilde)
    assert value.dtype == torch.float32 and joint.dtype == torch.float32
    reference = ClusterMutualInformationLoss()(p_hat.float(), p_tilde.float())
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(joint[0].double(), _naive_joint(p_hat[0], p_tilde[0]), atol=1e-6, rtol=1e-5)


def test_imsat_hand_value_and_naive_reference() -> None:
    # two pixels (1, 0) and (0.5, 0.5): mean conditional entropy = log(2) / 2, marginal = (0.75, 0.25)
    probs = torch.tensor([[1.0, 0.5], [0.0, 0.5]]).reshape(1, 2, 1, 2)
    h_marginal = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert IMSATLoss(weight=1.0)(probs).item() == pytest.approx(math.log(2) / 2 - h_marginal, abs=1e-6)
    assert IMSATLoss(weight=0.5)(probs).item() == pytest.approx(math.log(2) / 2 - 0.5 * h_marginal, abs=1e-6)

    heads = _random_probs(2, 2, 4, 3, 5, seed=14)
    mask = (torch.rand(2, 1, 3, 5, generator=torch.Generator().manual_seed(15)) > 0.4).float()
    values = IMSATLoss(weight=1.5, reduction="none")(heads, mask)
    for m in range(2):
        entropies, marginal, count = 0.0, torch.zeros(4, dtype=torch.float64), 0.0
        for b in range(2):
            for i in range(3):
                for j in range(5):
                    if mask[b, 0, i, j] > 0:
                        pixel = heads[m, b, :, i, j].double()
                        entropies += _entropy(pixel)
                        marginal += pixel
                        count += 1
        expected = entropies / count - 1.5 * _entropy(marginal / count)
        assert values[m].item() == pytest.approx(expected, abs=1e-5)


def test_imsat_degenerate_inputs() -> None:
    one_hot = _one_hot(torch.zeros(2, 3, 3, dtype=torch.long), 3).requires_grad_()
    loss = IMSATLoss()(one_hot)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # confident (0) and collapsed (marginal entropy 0)
    assert torch.isfinite(one_hot.grad).all()
    probs = _random_probs(2, 3, 3, 3, seed=16).requires_grad_()
    masked = IMSATLoss()(probs, torch.zeros(2, 1, 3, 3))
    masked.backward()
    assert masked.item() == 0.0 and torch.count_nonzero(probs.grad) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert IMSATLoss()(probs.detach().bfloat16()).dtype == torch.float32


def test_bad_inputs_raise() -> None:
    p = _random_probs(2, 3, 4, 4)
    loss = ClusterMutualInformationLoss()
    with pytest.raises(ValueError, match="same shape"):
        loss(p, p[:, :, :3])
    with pytest.raises(ValueError, match="B,K,H,W"):
        loss(p[0], p[0])
    with pytest.raises(ValueError, match="K >= 2"):
        loss(p[:, :1], p[:, :1])
    with pytest.raises(ValueError, match="mask"):
        loss(p, p, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="alpha"):
        ClusterMutualInformationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="eps"):
        ClusterMutualInformationLoss(eps=0.0)
    with pytest.raises(ValueError, match="Unsupported reduction"):
        ClusterMutualInformationLoss(reduction="max")
    with pytest.raises(ValueError, match="weight"):
        IMSATLoss(weight=-1.0)
    with pytest.raises(ValueError, match="probs"):
        IMSATLoss()(p[0])


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradients_match_finite_differences(symmetric: bool) -> None:
    p_hat = _random_probs(2, 2, 3, 3, 4, seed=17).double().requires_grad_()
    p_tilde = _random_probs(2, 2, 3, 3, 4, seed=18).double().requires_grad_()
    mask = (torch.rand(2, 1, 3, 4, generator=torch.Generator().manual_seed(19)) > 0.3).double()
    loss = ClusterMutualInformationLoss(alpha=0.5, symmetric=symmetric, reduction="none")
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, mask), (p_hat, p_tilde), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b), (p_hat, p_tilde), fast_mode=True)
    imsat = IMSATLoss(weight=0.7, reduction="none")
    assert torch.autograd.gradcheck(lambda a: imsat(a, mask), (p_hat,))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: p.index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), "NaN/Inf"),
        (lambda p: p.mul_(3.0), "in \\[0, 1\\]"),
        (lambda p: p.mul_(0.5), "sum to 1 over the K clusters"),
    ],
)
def test_probability_values_checked_in_debug_mode_only(corrupt, message) -> None:
    from bundle.losses import BoundaryCrossCorrelationLoss

    good = torch.rand(2, 5, 8, 8, generator=torch.Generator().manual_seed(0)).softmax(1)
    bad = good.clone()
    corrupt(bad.view(-1))
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ClusterMutualInformationLoss()(bad, good)  # no value check by default: no full pass over the tensors
    with torch.autograd.set_detect_anomaly(True):
        ClusterMutualInformationLoss()(good, good)  # valid probabilities pass
        with pytest.raises(ValueError, match=f"p_tilde.*{message}|p_tilde holds"):
            ClusterMutualInformationLoss()(good, bad)
        with pytest.raises(ValueError, match=message):
            BoundaryCrossCorrelationLoss()(bad, image)
