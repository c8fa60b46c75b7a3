"""Mutual-information clustering losses on dense cluster probabilities.

- :class:`ClusterMutualInformationLoss`: the paper's improved IIC loss L_MI (eq. 3-8); ``alpha=0`` is IIC.
- :class:`IMSATLoss`: dense IMSAT (Hu et al. 2017), the paper's "IMSAT (Dec)" baseline.
- :func:`joint_distribution` / :func:`cluster_statistics`: the K x K joint of eq. (3) and detached logging
  statistics (mutual information, marginal entropy, dead clusters).

Probability maps are ``B,K,H,W`` (one head) or ``M,B,K,H,W`` (``M`` independent heads, scored at once without
a Python loop); an optional validity mask ``B,1,H,W`` (1 = valid, 0 = moved out of view by the random transform)
removes pixels from every statistic.  All maths runs in fp32 (fp64 inputs stay fp64) with autocast disabled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from bundle.losses._kernels import WeightedJointFunction
from bundle.losses.utils import (
    DEFAULT_LOG_EPS,
    as_heads,
    at_least_fp32,
    batch_major,
    check_mask,
    check_pair,
    check_positive,
    check_reduction,
    fp32_region,
    is_distributed,
    pixel_entropy,
    pool_joints,
    reduce_heads,
    sum_over_processes,
)

__all__ = ["ClusterMutualInformationLoss", "IMSATLoss", "joint_distribution", "cluster_statistics"]

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
        global_statistics: under ``torchrun`` (a process group of several processes), pool the joint over the
            pixels of every process, with gradients (all-reduce of the pixel-weighted joints and counts), so that N
            processes with batch b compute the loss of one process with batch N x b; every process then holds the
            same loss, and DDP's gradient averaging gives the single-process gradient. ``False`` keeps each
            process's own joint (the method would change with the number of processes; for comparison only).
            Without a process group both are the same. Defaults to True.

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
        global_statistics: bool = True,
    ) -> None:
        super().__init__(reduction=check_reduction(reduction))
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        self.alpha = float(alpha)
        self.eps = check_positive(eps, "eps")
        self.symmetric = bool(symmetric)
        self.global_statistics = bool(global_statistics)

    def forward(self, p_hat: torch.Tensor, p_tilde: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            p_hat: cluster probabilities of g(s(T(x))), ``B,K,H,W`` or ``M,B,K,H,W`` (softmax over K).
            p_tilde: cluster probabilities of g(T(s(x))), same shape as ``p_hat``.
            mask: optional validity mask ``B,1,H,W`` (1 = valid; fractional values act as pixel weights).

        Raises:
            ValueError: when shapes are not ``B,K,H,W``/``M,B,K,H,W``, differ, K < 2, or the mask shape is wrong.
        """
        heads_hat, heads_tilde, mask, single = check_pair(p_hat, p_tilde, mask)
        with fp32_region(heads_hat.device):
            joint, count = _joint(heads_hat, heads_tilde, mask)
        return self.forward_joint(joint[0] if single else joint, count)

    def forward_joint(self, joint: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Score precomputed joint distributions: eq. (8) per head, reduced as :meth:`forward`.

        ``forward(p_hat, p_tilde, mask)`` is ``forward_joint(joint_distribution(p_hat, p_tilde, mask)[0], count)``
        for ``B,K,H,W`` input and ``forward_joint(joint_distribution(p_hat, p_tilde, mask), count)`` for
        ``M,B,K,H,W`` input, with ``count`` the number of valid pixels (``mask.sum()``, or ``B*H*W`` without mask).

        Args:
            joint: the K x K joint of eq. (3), ``K,K`` (one head) or ``M,K,K`` (rows: ``p_hat``'s clusters, columns:
                ``p_tilde``'s; as from :func:`joint_distribution`, all zeros for a head without valid pixels).
            count: 0-d tensor, the (mask-weighted) number of pixels the joint pools; where it is 0 the loss is 0
                with a zero gradient.

        Returns:
            ``"none"``: per-head losses ``(M,)`` for an ``M,K,K`` joint, a 0-d tensor for ``K,K``; ``"mean"``/``"sum"``:
            mean/sum over heads (0-d).  fp32 (fp64 kept).

        Raises:
            ValueError: ``joint`` is not ``K,K``/``M,K,K`` square, or ``count`` is not a 0-d tensor.
        """
        _check_joint(joint)
        if not isinstance(count, torch.Tensor) or count.ndim != 0:
            shape = tuple(count.shape) if isinstance(count, torch.Tensor) else type(count).__name__
            raise ValueError(f"count must be a 0-d tensor (the number of valid pixels), got {shape}.")
        single = joint.ndim == 2
        with fp32_region(joint.device):
            p = at_least_fp32(joint.unsqueeze(0) if single else joint)
            if self.global_statistics and is_distributed():  # pool the joint over every process's pixels
                total = sum_over_processes(count.to(p.dtype))
                p = sum_over_processes(p * count.to(p.dtype)) / total.clamp_min(1.0)
                count = total
            if self.symmetric:
                p = (p + p.transpose(1, 2)) / 2
            k = p.shape[-1]
            log_p = p.clamp_min(self.eps).log()
            rows, cols = p.sum(dim=2), p.sum(dim=1)
            # H'_alpha(P) = -(1 - alpha) sum P log P - alpha / K sum_j log P_jj   (eq. 6)
            joint_term = -(1.0 - self.alpha) * (p * log_p).sum(dim=(1, 2))
            joint_term = joint_term - (self.alpha / k) * torch.diagonal(log_p, dim1=1, dim2=2).sum(dim=1)
            row_entropy = -(rows * rows.clamp_min(self.eps).log()).sum(dim=1)
            col_entropy = -(cols * cols.clamp_min(self.eps).log()).sum(dim=1)
            values = joint_term - row_entropy - col_entropy
            values = torch.where(count > 0, values, torch.zeros_like(values))
        return reduce_heads(values, self.reduction, single)


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
        super().__init__(reduction=check_reduction(reduction))
        self.weight = check_positive(weight, "weight (lambda)", allow_zero=True)
        self.eps = check_positive(eps, "eps")

    def forward(self, probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            probs: cluster probabilities ``B,K,H,W`` or ``M,B,K,H,W``.
            mask: optional validity mask ``B,1,H,W``.

        Raises:
            ValueError: bad probability or mask shape, K < 2.
        """
        heads, single = as_heads(probs, "probs")
        mask = check_mask(mask, heads)
        with fp32_region(heads.device):
            p = at_least_fp32(heads)
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
        return reduce_heads(values, self.reduction, single)


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
    heads_hat, heads_tilde, mask, _ = check_pair(p_hat, p_tilde, mask)
    with fp32_region(heads_hat.device):
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
        ``mutual_information`` I = H(rows) + H(cols) - H(P) in nats (exact zeros contribute 0; clamped at 0,
        where float rounding of the three entropies leaves about -1e-7 for independent rows and columns);
        ``marginal_entropy`` H of the average marginal in nats (log K when balanced);
        ``dead_clusters`` the number of dead clusters (int64).

    Raises:
        ValueError: when ``joint`` is not ``K,K``/``M,K,K`` square or ``dead_fraction`` < 0.
    """
    _check_joint(joint)
    dead_fraction = check_positive(dead_fraction, "dead_fraction", allow_zero=True)
    single = joint.ndim == 2
    with torch.no_grad(), fp32_region(joint.device):
        p = at_least_fp32(joint.detach())
        if single:
            p = p.unsqueeze(0)
        k = p.shape[-1]
        rows, cols = p.sum(dim=2), p.sum(dim=1)

        def entropy(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
            return -torch.special.xlogy(x, x).sum(dim=tuple(dims))

        mutual_information = (entropy(rows, (1,)) + entropy(cols, (1,)) - entropy(p, (1, 2))).clamp_min(0.0)
        average = (rows + cols) / 2
        stats = {
            "mutual_information": mutual_information,
            "marginal_entropy": entropy(average, (1,)),
            "dead_clusters": (average < dead_fraction / k).sum(dim=1),
        }
    if single:
        stats = {name: value[0] for name, value in stats.items()}
    return stats


def _check_joint(joint: torch.Tensor) -> None:
    if joint.ndim not in (2, 3) or joint.shape[-1] != joint.shape[-2]:
        raise ValueError(f"joint must be K,K or M,K,K (square), got shape {tuple(joint.shape)}.")


def _joint(
    heads_hat: torch.Tensor, heads_tilde: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint ``M,K,K`` (fp32) and the number of valid pixels (0-d); one bmm over all heads and images."""
    a, b, weights, count = batch_major(heads_hat, heads_tilde, mask)
    return pool_joints(WeightedJointFunction.apply(a, b, weights), heads_hat.shape[0], count), count
