"""L_con (eq. 10) and the dense local contrastive baseline, against naive loop references."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import ContrastiveLoss

from bundle.losses import DenseContrastiveLoss, MetaLabelContrastiveLoss


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _naive_supcon(z_a: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor, tau: float) -> list[float]:
    """Eq. (10) anchor by anchor with plain Python loops."""
    z = [v / v.norm() for v in torch.cat([z_a, z_b]).double()]
    lab = labels.tolist() * 2
    losses = []
    for i in range(len(z)):
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(len(z)) if a != i)
        positives = [j for j in range(len(z)) if j != i and lab[j] == lab[i]]
        terms = [math.log(math.exp(float(z[i] @ z[j]) / tau) / denominator) for j in positives]
        losses.append(-sum(terms) / len(terms))
    return losses


def _naive_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, tau: float) -> float:
    """SimCLR NT-Xent: the positive of item i is the other view of the same image."""
    z = [v / v.norm() for v in torch.cat([z_a, z_b]).double()]
    n = z_a.shape[0]
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(2 * n) if a != i)
        total += -math.log(math.exp(float(z[i] @ z[partner]) / tau) / denominator)
    return total / (2 * n)


def test_meta_label_loss_matches_naive_double_loop() -> None:
    z_a, z_b = _randn(6, 5, seed=0), _randn(6, 5, seed=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    expected = torch.tensor(_naive_supcon(z_a, z_b, labels, 0.5), dtype=torch.float32)
    torch.testing.assert_close(MetaLabelContrastiveLoss(0.5, reduction="none")(z_a, z_b, labels), expected)
    torch.testing.assert_close(MetaLabelContrastiveLoss(0.5)(z_a, z_b, labels), expected.mean())
    torch.testing.assert_close(MetaLabelContrastiveLoss(0.5, reduction="sum")(z_a, z_b, labels), expected.sum())
    # the paper's temperature, fewer items (large logits: checks the log-sum-exp)
    labels = torch.tensor([3, 3, 7, 7])
    expected = sum(_naive_supcon(z_a[:4], z_b[:4], labels, 0.07)) / 8
    assert MetaLabelContrastiveLoss()(z_a[:4], z_b[:4], labels).item() == pytest.approx(expected, rel=1e-5)


def test_distinct_labels_reduce_to_nt_xent() -> None:
    z_a, z_b = _randn(5, 8, seed=2), _randn(5, 8, seed=3)
    value = MetaLabelContrastiveLoss(temperature=0.2)(z_a, z_b, torch.arange(5) * 10)
    assert value.item() == pytest.approx(_naive_nt_xent(z_a, z_b, 0.2), rel=1e-5)
    assert value.item() == pytest.approx(ContrastiveLoss(temperature=0.2)(z_a, z_b).item(), rel=1e-5)


def test_meta_label_loss_normalises_and_is_finite() -> None:
    z_a, z_b = _randn(4, 3, seed=4), _randn(4, 3, seed=5)
    labels = torch.tensor([0, 0, 1, 1])
    loss = MetaLabelContrastiveLoss()
    torch.testing.assert_close(loss(3.0 * z_a, 0.1 * z_b, labels), loss(z_a, z_b, labels))
    same = z_a[:1].repeat(4, 1).requires_grad_()  # identical embeddings: all logits equal
    value = loss(same, same, labels)
    value.backward()
    # 2N = 8 items; each anchor's 7 candidates are equally likely -> -log(1/7) for every positive
    assert value.item() == pytest.approx(math.log(7), rel=1e-5)
    assert torch.isfinite(same.grad).all()
    zero = torch.zeros(4, 3, requires_grad=True)
    loss(zero, z_b, labels).backward()
    assert torch.isfinite(zero.grad).all()
    single = loss(z_a[:1], z_b[:1], labels[:1])  # one image: the only candidate is the positive
    assert single.item() == pytest.approx(0.0, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss(z_a.bfloat16(), z_b.bfloat16(), labels).dtype == torch.float32


def test_meta_label_bad_inputs() -> None:
    z = _randn(4, 3, seed=6)
    loss = MetaLabelContrastiveLoss()
    with pytest.raises(ValueError, match="z_a and z_b"):
        loss(z, z[:3], torch.arange(4))
    with pytest.raises(ValueError, match="z_a and z_b"):
        loss(z[None], z[None], torch.arange(4))
    with pytest.raises(ValueError, match="length B=4"):
        loss(z, z, torch.arange(3))
    with pytest.raises(ValueError, match="integer"):
        loss(z, z, torch.zeros(4))
    with pytest.raises(ValueError, match="temperature"):
        MetaLabelContrastiveLoss(temperature=0.0)
    with pytest.raises(ValueError, match="Unsupported reduction"):
        MetaLabelContrastiveLoss(reduction="batch")


def _naive_dense(e_a: torch.Tensor, e_b: torch.Tensor, mask: torch.Tensor | None, tau: float) -> tuple[list, float]:
    """Anchor by anchor: positive = same position in the other view, negatives = other valid positions of the
    same image in both views.  Returns per-anchor losses (b, view, i, j) and their mean."""
    batch, _, g_h, g_w = e_a.shape
    losses = {}
    for b in range(batch):
        cells = [(i, j) for i in range(g_h) for j in range(g_w) if mask is None or mask[b, 0, i, j] > 0]
        views = [e_a[b].double(), e_b[b].double()]
        for v in range(2):
            for i, j in cells:
                anchor = views[v][:, i, j] / views[v][:, i, j].norm()
                denominator = 0.0
                for u in range(2):
                    for q in cells:
                        if (u, q) == (v, (i, j)):
                            continue
                        other = views[u][:, q[0], q[1]] / views[u][:, q[0], q[1]].norm()
                        denominator += math.exp(float(anchor @ other) / tau)
                partner = views[1 - v][:, i, j] / views[1 - v][:, i, j].norm()
                losses[(b, v, i, j)] = -math.log(math.exp(float(anchor @ partner) / tau) / denominator)
    return losses, sum(losses.values()) / len(losses)


def test_dense_loss_matches_naive_loop() -> None:
    e_a, e_b = _randn(2, 4, 3, 3, seed=7), _randn(2, 4, 3, 3, seed=8)
    mask = torch.ones(2, 1, 3, 3)
    mask[0, 0, 0, :] = 0
    mask[1, 0, :, 2] = 0
    mask[1, 0, 1, 1] = 0
    for m in (None, mask):
        per_anchor, mean = _naive_dense(e_a, e_b, m, 0.3)
        loss = DenseContrastiveLoss(temperature=0.3)
        assert loss(e_a, e_b, m).item() == pytest.approx(mean, rel=1e-5)
        none = DenseContrastiveLoss(temperature=0.3, reduction="none")(e_a, e_b, m)
        assert none.shape == (2, 2, 3, 3)
        expected = torch.zeros(2, 2, 3, 3)
        for (b, v, i, j), value in per_anchor.items():
            expected[b, v, i, j] = value
        torch.testing.assert_close(none, expected)


def test_dense_loss_degenerate_cases() -> None:
    e_a = _randn(2, 4, 3, 3, seed=9).requires_grad_()
    e_b = _randn(2, 4, 3, 3, seed=10)
    empty = DenseContrastiveLoss()(e_a, e_b, torch.zeros(2, 1, 3, 3))
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(e_a.grad) == 0
    lone = torch.zeros(2, 1, 3, 3)
    lone[:, :, 1, 1] = 1  # one valid cell per image: the positive is the only candidate
    assert DenseContrastiveLoss()(e_a, e_b, lone).item() == pytest.approx(0.0, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert DenseContrastiveLoss()(e_a.bfloat16(), e_b.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="e_a and e_b"):
        DenseContrastiveLoss()(e_a, e_b[:, :, :2])
    with pytest.raises(ValueError, match="mask"):
        DenseContrastiveLoss()(e_a, e_b, torch.ones(2, 3, 3))


def test_gradients_match_finite_differences() -> None:
    z_a, z_b = _randn(4, 3, seed=11).double().requires_grad_(), _randn(4, 3, seed=12).double().requires_grad_()
    labels = torch.tensor([0, 1, 1, 0])
    loss = MetaLabelContrastiveLoss(temperature=0.5, reduction="none")
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, labels), (z_a, z_b))
    e_a, e_b = _randn(2, 3, 2, 2, seed=13).double().requires_grad_(), _randn(2, 3, 2, 2, seed=14).double()
    mask = torch.ones(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 0
    dense = DenseContrastiveLoss(temperature=0.5, reduction="none")
    assert torch.autograd.gradcheck(lambda a: dense(a, e_b, mask), (e_a,))
