"""Mutual-information clustering losses on dense cluster probabilities, and their shared input checks.

- :class:`ClusterMutualInformationLoss`: the paper's improved IIC loss L_MI (eq. 3-8); ``alpha=0`` is IIC.
- :class:`IMSATLoss`: dense IMSAT (Hu et al. 2017), the paper's "IMSAT (Dec)" baseline.
- :func:`joint_distribution` / :func:`cluster_statistics`: the K x K joint of eq. (3) and detached logging
  statistics (mutual information, marginal entropy, dead clusters).

Probability maps are ``B,K,H,W`` (one head) or ``M,B,K,H,W`` (``M`` independent heads, scored at once without
a Python loop); an optional validity mask ``B,1,H,W`` (1 = valid, 0 = moved out of view by the random transform)
removes pixels from every statistic.  All maths runs in fp32 (fp64 inputs stay fp64) with autocast disabled.

The private helpers at the bottom (input checks, fp32 region, reductions, a memory-lean pixel entropy) are
shared with :mod:`bundle.losses.boundary`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from monai.utils import LossReduction
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.loss import _Loss

__all__ = ["ClusterMutualInformationLoss", "IMSATLoss", "joint_distribution", "cluster_statistics"]

#: floor inside the logarithms of the MI / IMSAT losses (see ClusterMutualInformationLoss, ``eps``).
DEFAULT_LOG_EPS = 1e-8
#: a cluster is "dead" when its marginal mass is below ``DEAD_CLUSTER_FRACTION / K``.
DEAD_CLUSTER_FRACTION = 0.1


class ClusterMutualInformationLoss(_Loss):
    """Improved IIC loss on dense cluster assignments, L_MI of

        Peng et al., "Boundary-aware Information Maximization for Self-supervised Medical Image Segmentation",
        Medical Image Analysis 2024, eq. (3)-(8).

    With ``P`` the K x K joint of eq. (3) (see :func:`joint_distribution`; it pools **all valid pixels of the
    batch**, one matmul for all heads) and ``p_hat``/``p_tilde`` its row/column sums (the cluster marginals),

        L_MI = H'_alpha(P) - H(p_hat) - H(p_tilde),
        H'_alpha(P) = -sum_jk ((1 - alpha) P_jk + alpha [j == k] / K) log P_jk          (eq. 6).

    ``alpha=0`` gives H(P) - H(p_hat) - H(p_tilde) = -I, i.e. IIC (Ji et al. 2019); ``alpha=1`` replaces the
    joint entropy by the cross-entropy to the diagonal pseudo-joint I/K, which is >= log K (Proposition 2.1).
    A balanced, confident and consistent assignment (P = I/K) scores -log K for every alpha.

    Design choices:

    - ``eps`` is a **floor inside the logarithms only**: ``log(max(P, eps))`` and ``log(max(p, eps))``.  ``P``
      itself is never altered, so exact zeros contribute exactly 0 to ``P log P`` and values above ``eps``
      are unbiased (the authors add 1e-5 inside every log, which biases every term).  Why: one-hot or
      collapsed assignments give exact zeros in P and in the marginals, where ``log`` is -inf and
      ``d log P / dP = 1/P`` is infinite; the floor bounds both (|log| <= -log eps, slope <= 1/eps).  The
      default 1e-8 is far below the smallest non-zero mass a paper-size batch produces (1/(36*224*224) ~ 5e-7).
    - ``symmetric=False`` (default) follows eq. (3)-(8) literally: P is not symmetrised and the two marginals
      stay distinct.  ``symmetric=True`` uses ``(P + P^T) / 2`` as IIC and the authors' code do; both
      marginals then equal the average marginal, so the marginal term becomes 2 H(average marginal).
    - A head whose pixels are all masked out has no joint; its loss is defined as 0 (zero gradient).
    - Inputs are checked for shape and dtype on every call; their values (finite, in [0, 1], summing to 1 over K)
      only under PyTorch's debug mode, ``torch.autograd.set_detect_anomaly(True)`` (a full pass over the tensor),
      as for every dense loss of this package.

    Args:
        alpha: mixing weight of the diagonal pseudo-joint in eq. (6), in [0, 1]. Defaults to 0.5 (the paper).
        eps: floor inside the logarithms, > 0. Defaults to 1e-8.
        symmetric: symmetrise the joint as IIC does. Defaults to False (the paper's equations).
        reduction: ``"none"``: per-head losses ``(M,)`` for ``M,B,K,H,W`` input and a 0-d tensor for ``B,K,H,W``
            input; ``"mean"``/``"sum"``: mean/sum over heads (0-d).  Defaults to ``"mean"``.

    Raises:
        ValueError: alpha outside [0, 1], eps <= 0, or an unsupported reduction.

    Example::

        >>> loss = ClusterMutualInformationLoss(alpha=0.5)
        >>> p_hat = torch.rand(3, 2, 10, 32, 32).softmax(2)   # M,B,K,H,W
        >>> p_tilde = torch.rand(3, 2, 10, 32, 32).softmax(2)
        >>> loss(p_hat, p_tilde).shape
        torch.Size([])
    """

    def __init__(
        self,
        alpha: float = 0.5,
        eps: float = DEFAULT_LOG_EPS,
        symmetric: bool = False,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=_check_reduction(reduction))
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}.")
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.symmetric = bool(symmetric)

    def forward(self, p_hat: torch.Tensor, p_tilde: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            p_hat: cluster probabilities of g(s(T(x))), ``B,K,H,W`` or ``M,B,K,H,W`` (softmax over K).
            p_tilde: cluster probabilities of g(T(s(x))), same shape as ``p_hat``.
            mask: optional validity mask ``B,1,H,W`` (1 = valid; fractional values act as pixel weights).

        Raises:
            ValueError: when shapes are not ``B,K,H,W``/``M,B,K,H,W``, differ, K < 2, or the mask shape is wrong.
        """
        heads_hat, heads_tilde, mask, single = _check_pair(p_hat, p_tilde, mask)
        with _fp32_region(heads_hat.device):
            joint, count = _joint(heads_hat, heads_tilde, mask)
            values = _mi_loss_from_joint(joint, self.alpha, self.eps, self.symmetric)
            values = torch.where(count > 0, values, torch.zeros_like(values))
        return _reduce_heads(values, self.reduction, single)


class IMSATLoss(_Loss):
    """Dense IMSAT loss (information maximisation without the self-augmentation term) of

        Hu et al., "Learning Discrete Representations via Information Maximizing Self-Augmented Training",
        ICML 2017, eq. (6)-(7); applied per pixel as the "IMSAT (Dec)" baseline of Peng et al. 2024 (Appendix E).

        L = mean_i H(p_i) - lambda * H(mean_i p_i)

    over the valid pixels ``i`` of the whole batch, per head.  Minimising it makes each pixel's assignment
    confident (low conditional entropy) while keeping the clusters balanced (high marginal entropy).
    ``log`` uses the same floor ``max(p, eps)`` as :class:`ClusterMutualInformationLoss`; a fully masked
    head scores 0 with a zero gradient.

    Args:
        weight: lambda, the weight of the marginal entropy, >= 0. Defaults to 1.
        eps: floor inside the logarithms, > 0. Defaults to 1e-8.
        reduction: ``"none"``: per-head losses ``(M,)`` (0-d for ``B,K,H,W`` input); ``"mean"``/``"sum"`` over
            heads.  Defaults to ``"mean"``.

    Raises:
        ValueError: weight < 0, eps <= 0, or an unsupported reduction.

    Example::

        >>> IMSATLoss(weight=1.0)(torch.rand(2, 5, 16, 16).softmax(1)).shape
        torch.Size([])
    """

    def __init__(
        self, weight: float = 1.0, eps: float = DEFAULT_LOG_EPS, reduction: LossReduction | str = LossReduction.MEAN
    ) -> None:
        super().__init__(reduction=_check_reduction(reduction))
        if not float(weight) >= 0.0:
            raise ValueError(f"weight (lambda) must be >= 0, got {weight}.")
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}.")
        self.weight = float(weight)
        self.eps = float(eps)

    def forward(self, probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            probs: cluster probabilities ``B,K,H,W`` or ``M,B,K,H,W``.
            mask: optional validity mask ``B,1,H,W``.

        Raises:
            ValueError: bad probability or mask shape, K < 2.
        """
        heads, single = _as_heads(probs, "probs")
        mask = _check_mask(mask, heads)
        with _fp32_region(heads.device):
            p = _at_least_fp32(heads)
            n_heads, batch, k, height, width = p.shape
            ent = pixel_entropy(p, dim=2, eps=self.eps)  # M,B,H,W
            flat = p.reshape(n_heads, batch, k, height * width)
            if mask is None:
                count = torch.full((), batch * height * width, dtype=torch.float32, device=p.device)
                cond = ent.sum(dim=(1, 2, 3))
                marginal = flat.sum(dim=-1).sum(dim=1)  # M,K
            else:
                weights = mask.reshape(1, batch, height, width)
                count = mask.sum()
                cond = (ent * weights).sum(dim=(1, 2, 3))
                marginal = torch.matmul(flat, weights.reshape(1, batch, height * width, 1)).sum(dim=(1, 3))
            denom = count.clamp_min(1.0)
            marginal = marginal / denom
            marginal_entropy = -(marginal * marginal.clamp_min(self.eps).log()).sum(dim=-1)
            values = cond / denom - self.weight * marginal_entropy
            values = torch.where(count > 0, values, torch.zeros_like(values))
        return _reduce_heads(values, self.reduction, single)


def joint_distribution(p_hat: torch.Tensor, p_tilde: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The joint cluster distribution of eq. (3), pooled over all valid pixels of the batch.

    ``P[m] = sum_{b,i} w_bi p_hat[m,b,:,i] p_tilde[m,b,:,i]^T / sum_{b,i} w_bi`` with ``w`` the mask (all ones
    without one), computed in fp32 with one batched matmul for all heads and images.  Rows index ``p_hat``'s
    cluster, columns ``p_tilde``'s.  Differentiable; ``.detach()`` the inputs for logging.

    Args:
        p_hat: ``B,K,H,W`` or ``M,B,K,H,W`` probabilities.
        p_tilde: same shape as ``p_hat``.
        mask: optional validity mask ``B,1,H,W``.

    Returns:
        ``M,K,K`` fp32 joint (``M = 1`` for ``B,K,H,W`` input); all zeros when every pixel is masked.

    Raises:
        ValueError: bad or different shapes, K < 2, bad mask shape.
    """
    heads_hat, heads_tilde, mask, _ = _check_pair(p_hat, p_tilde, mask)
    with _fp32_region(heads_hat.device):
        joint, _ = _joint(heads_hat, heads_tilde, mask)
    return joint


def cluster_statistics(
    joint: torch.Tensor, dead_fraction: float = DEAD_CLUSTER_FRACTION
) -> dict[str, torch.Tensor]:
    """Detached logging statistics of joint distributions (no gradient is recorded).

    Args:
        joint: ``K,K`` or ``M,K,K`` joint distributions (as from :func:`joint_distribution`).
        dead_fraction: a cluster is dead when its average marginal mass ``(row + column marginal) / 2`` is
            below ``dead_fraction / K``. Defaults to 0.1.

    Returns:
        dict with, per head (shape ``(M,)``, or 0-d for a ``K,K`` input):
        ``mutual_information`` I = H(rows) + H(cols) - H(P) in nats (exact zeros contribute 0);
        ``marginal_entropy`` H of the average marginal in nats (log K when balanced);
        ``dead_clusters`` the number of dead clusters (int64).

    Raises:
        ValueError: when ``joint`` is not ``K,K``/``M,K,K`` square or ``dead_fraction`` < 0.
    """
    if joint.ndim not in (2, 3) or joint.shape[-1] != joint.shape[-2]:
        raise ValueError(f"joint must be K,K or M,K,K (square), got shape {tuple(joint.shape)}.")
    if not float(dead_fraction) >= 0.0:
        raise ValueError(f"dead_fraction must be >= 0, got {dead_fraction}.")
    single = joint.ndim == 2
    with torch.no_grad(), _fp32_region(joint.device):
        p = _at_least_fp32(joint.detach())
        if single:
            p = p.unsqueeze(0)
        k = p.shape[-1]
        rows, cols = p.sum(dim=2), p.sum(dim=1)

        def entropy(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
            return -torch.special.xlogy(x, x).sum(dim=tuple(dims))

        mutual_information = entropy(rows, (1,)) + entropy(cols, (1,)) - entropy(p, (1, 2))
        average = (rows + cols) / 2
        stats = {
            "mutual_information": mutual_information,
            "marginal_entropy": entropy(average, (1,)),
            "dead_clusters": (average < float(dead_fraction) / k).sum(dim=1),
        }
    if single:
        stats = {name: value[0] for name, value in stats.items()}
    return stats


def pixel_entropy(probs: torch.Tensor, dim: int, eps: float = DEFAULT_LOG_EPS, keepdim: bool = False) -> torch.Tensor:
    """Per-position entropy ``-sum_k p_k log max(p_k, eps)`` along ``dim``, gradient-safe and lean in memory.

    The gradient is ``-(log max(p, eps) + 1)``: exact for ``p >= eps``; below ``eps`` the slope is clipped to its
    value at ``eps`` (finite, ``-log eps - 1``, at exact zeros).  Autograd keeps only ``probs`` (no full-size
    temporaries between forward and backward).  No dtype change: call it on fp32/fp64 tensors.
    """
    return _EntropyFunction.apply(probs, dim, float(eps), bool(keepdim))


class _EntropyFunction(torch.autograd.Function):
    """``-sum(p log max(p, eps))`` along ``dim``; the backward reuses the forward's ``log max(p, eps)`` instead of
    recomputing it (one logarithm per element in all, the dominant cost; for one saved full-size tensor)."""

    @staticmethod
    def forward(ctx: FunctionCtx, probs: torch.Tensor, dim: int, eps: float, keepdim: bool) -> torch.Tensor:
        logp = probs.clamp_min(eps).log_()
        ctx.dim, ctx.keepdim = dim, keepdim  # type: ignore[attr-defined]
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logp)
        return (probs * logp).sum(dim=dim, keepdim=keepdim).neg_()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (logp,) = ctx.saved_tensors  # type: ignore[attr-defined]
        if not ctx.keepdim:  # type: ignore[attr-defined]
            grad = grad.unsqueeze(ctx.dim)  # type: ignore[attr-defined]
        # d/dp [-p log max(p, eps)] = -(log max(p, eps) + 1) (the slope is clipped below eps)
        return (logp + 1.0).mul_(grad.neg()), None, None, None


class _WeightedJointFunction(torch.autograd.Function):
    """``a diag(w) b^T`` per (image, head): ``a``, ``b`` ``B*M,K,N`` (batch-major), ``w`` ``B,N`` or None.

    Returns ``B*M,K,K``.

    Same value and gradient as autograd on ``bmm(a * w, b^T)``, but the weighted copy of ``a`` is freed
    right after the forward and the backward writes each gradient once (weights applied in place).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(a, b, weights)
        if weights is None:
            return torch.bmm(a, b.transpose(1, 2))
        batch = weights.shape[0]
        weighted = (a.view(batch, -1, *a.shape[1:]) * weights[:, None, None, :]).view_as(a)
        return torch.bmm(weighted, b.transpose(1, 2))

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        a, b, weights = ctx.saved_tensors  # type: ignore[attr-defined]
        need_a, need_b = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        grad_a = torch.bmm(grad, b) if need_a else None
        grad_b = torch.bmm(grad.transpose(1, 2), a) if need_b else None
        if weights is not None:
            batch = weights.shape[0]
            for g in (grad_a, grad_b):
                if g is not None:
                    g.view(batch, -1, *g.shape[1:]).mul_(weights[:, None, None, :])
        return grad_a, grad_b, None


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by the dense losses


def _check_reduction(reduction: LossReduction | str) -> str:
    value = reduction.value if isinstance(reduction, LossReduction) else str(reduction)
    if value not in {r.value for r in LossReduction}:
        raise ValueError(f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].')
    return value


def _reduce_heads(values: torch.Tensor, reduction: str, single: bool) -> torch.Tensor:
    """Reduce per-head values ``(M,)``; "none" drops the head axis when the input had none."""
    if reduction == LossReduction.MEAN.value:
        return values.mean()
    if reduction == LossReduction.SUM.value:
        return values.sum()
    if reduction == LossReduction.NONE.value:
        return values[0] if single else values
    raise ValueError(f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].')


def _fp32_region(device: torch.device) -> AbstractContextManager:
    """Disable autocast on ``device`` (callers also cast inputs with ``_at_least_fp32``)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Promote half/bfloat16 (and integer) tensors to fp32; fp32 and fp64 pass through unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _as_heads(probs: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """Validate ``B,K,H,W`` / ``M,B,K,H,W`` probabilities; return the 5-D view and whether a head axis was added."""
    if not isinstance(probs, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(probs).__name__}.")
    if probs.ndim not in (4, 5):
        raise ValueError(f"{name} must be B,K,H,W or M,B,K,H,W probabilities, got shape {tuple(probs.shape)}.")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {probs.dtype}.")
    if probs.shape[-3] < 2:
        raise ValueError(f"{name} needs K >= 2 clusters (dim -3), got shape {tuple(probs.shape)}.")
    if probs.numel() == 0:
        raise ValueError(f"{name} is empty, got shape {tuple(probs.shape)}.")
    if torch.is_anomaly_enabled():  # PyTorch's debug mode: also check the values (a full pass over the tensor)
        _check_probability_values(probs, name)
    single = probs.ndim == 4
    return (probs.unsqueeze(0) if single else probs), single


def _check_probability_values(probs: torch.Tensor, name: str) -> None:
    """Raise when ``probs`` holds NaN/Inf, values outside [0, 1], or pixels whose K values do not sum to 1."""
    with torch.no_grad():
        x = probs.detach().float()
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{name} holds {bad} NaN/Inf values (shape {tuple(probs.shape)}).")
        low, high = float(x.min()), float(x.max())
        if low < -1e-6 or high > 1 + 1e-6:
            raise ValueError(f"{name} must hold probabilities in [0, 1], got values in [{low:.4g}, {high:.4g}].")
        tol = 1e-2 if probs.dtype in (torch.float16, torch.bfloat16) else 1e-4
        worst = float((x.sum(dim=-3) - 1).abs().max())
        if worst > tol:
            raise ValueError(f"{name} must sum to 1 over the K clusters (dim -3) at every pixel; the largest "
                             f"deviation is {worst:.4g} (softmax missing?).")


def _check_mask(mask: torch.Tensor | None, heads: torch.Tensor, name: str = "mask") -> torch.Tensor | None:
    """Validate a ``B,1,H,W`` mask against ``M,B,K,H,W`` heads; return it detached in the compute dtype, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}.")
    _, batch, _, height, width = heads.shape
    if tuple(mask.shape) != (batch, 1, height, width):
        raise ValueError(f"{name} must have shape B,1,H,W = {(batch, 1, height, width)}, got {tuple(mask.shape)}.")
    dtype = torch.float64 if heads.dtype == torch.float64 else torch.float32
    return mask.detach().to(device=heads.device, dtype=dtype)


def _check_pair(
    p_hat: torch.Tensor, p_tilde: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """Validate the two views' probabilities and the mask; return both 5-D views, the mask, and "single head"."""
    heads_hat, single = _as_heads(p_hat, "p_hat")
    heads_tilde, _ = _as_heads(p_tilde, "p_tilde")
    if heads_hat.shape != heads_tilde.shape:
        raise ValueError(f"p_hat and p_tilde must have the same shape, got {tuple(p_hat.shape)} and "
                         f"{tuple(p_tilde.shape)}.")
    return heads_hat, heads_tilde, _check_mask(mask, heads_hat), single


def _joint(
    heads_hat: torch.Tensor, heads_tilde: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint ``M,K,K`` (fp32) and the number of valid pixels (0-d); one bmm over all heads and images."""
    n_heads, batch, k = heads_hat.shape[:3]
    a, b, weights, count = _batch_major(heads_hat, heads_tilde, mask)
    joint = _WeightedJointFunction.apply(a, b, weights).view(batch, n_heads, k, k).sum(dim=0)
    return joint / count.clamp_min(1.0), count


def _batch_major(
    heads_hat: torch.Tensor, heads_tilde: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``M,B,K,H,W`` views -> batch-major ``B*M,K,N`` operands (fp32 at least), pixel weights ``B,N`` (or None) and
    the number of valid pixels (0-d).

    Batch-major is a free view of the dense head's output layout (``B,M,K,H,W`` in memory, handed over as an
    ``M,B,K,H,W`` transposed view); a contiguous ``M,B,K,H,W`` input costs one copy either way.
    """
    n_heads, batch, k, height, width = heads_hat.shape
    a = _at_least_fp32(heads_hat).transpose(0, 1).reshape(batch * n_heads, k, height * width)
    b = _at_least_fp32(heads_tilde).transpose(0, 1).reshape(batch * n_heads, k, height * width)
    if mask is None:
        return a, b, None, torch.full((), batch * height * width, dtype=a.dtype, device=a.device)
    return a, b, mask.reshape(batch, height * width), mask.sum()


def _mi_loss_from_joint(joint: torch.Tensor, alpha: float, eps: float, symmetric: bool) -> torch.Tensor:
    """Eq. (8) per head from an ``M,K,K`` joint."""
    if symmetric:
        joint = (joint + joint.transpose(1, 2)) / 2
    k = joint.shape[-1]
    log_joint = joint.clamp_min(eps).log()
    rows, cols = joint.sum(dim=2), joint.sum(dim=1)
    # H'_alpha(P) = -(1 - alpha) sum P log P - alpha / K sum_j log P_jj
    joint_term = -(1.0 - alpha) * (joint * log_joint).sum(dim=(1, 2))
    joint_term = joint_term - (alpha / k) * torch.diagonal(log_joint, dim1=1, dim2=2).sum(dim=1)
    row_entropy = -(rows * rows.clamp_min(eps).log()).sum(dim=1)
    col_entropy = -(cols * cols.clamp_min(eps).log()).sum(dim=1)
    return joint_term - row_entropy - col_entropy
