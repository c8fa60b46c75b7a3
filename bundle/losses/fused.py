"""L_MI's joint and L_CC's entropy maps from one pass over the full-resolution cluster probabilities.

When both terms are active, :class:`bundle.losses.PretrainingObjective` scores them through
:func:`joint_and_entropy` instead of calling the two losses separately. The values and gradients are the same
(tested against the separate losses); the difference is memory traffic: the probabilities ``M,B,K,H,W`` of each view
are the largest tensors of a pre-training step, and here their gradient is written once -- the MI part by one matrix
product, the entropy part added in place -- instead of two full-size gradients that autograd then sums.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from bundle.losses.mutual_information import (
    DEFAULT_LOG_EPS,
    _batch_major,
    _check_pair,
    _fp32_region,
)

__all__ = ["joint_and_entropy"]


class _JointEntropyFunction(torch.autograd.Function):
    """Batch-major ``a``, ``b`` (``B*M,K,N``), weights ``B,N`` or None ->
    (per-image joints ``B*M,K,K`` = ``a diag(w) b^T``, entropies ``B*M,N`` of ``a`` and of ``b``)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_a = a.clamp_min(eps).log_()
        log_b = b.clamp_min(eps).log_()
        ent_a = (a * log_a).sum(dim=1).neg_()
        ent_b = (b * log_b).sum(dim=1).neg_()
        if weights is None:
            weighted_a = a
        else:
            batch = weights.shape[0]
            weighted_a = (a.view(batch, -1, *a.shape[1:]) * weights[:, None, None, :]).view_as(a)
        joint = torch.bmm(weighted_a, b.transpose(1, 2))
        # d entropy / dp = -(log max(p, eps) + 1); keep the "+1" version for the backward
        ctx.save_for_backward(weighted_a, b, weights, log_a.add_(1.0), log_b.add_(1.0))
        return joint, ent_a, ent_b

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, g_joint: torch.Tensor, g_ent_a: torch.Tensor, g_ent_b: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        weighted_a, b, weights, slope_a, slope_b = ctx.saved_tensors  # type: ignore[attr-defined]
        need_a, need_b = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        grad_a = grad_b = None
        if need_a:
            grad_a = torch.bmm(g_joint, b)
            if weights is not None:
                batch = weights.shape[0]
                grad_a.view(batch, -1, *grad_a.shape[1:]).mul_(weights[:, None, None, :])
            grad_a.addcmul_(slope_a, g_ent_a.unsqueeze(1), value=-1.0)
        if need_b:
            grad_b = torch.bmm(g_joint.transpose(1, 2), weighted_a)
            grad_b.addcmul_(slope_b, g_ent_b.unsqueeze(1), value=-1.0)
        return grad_a, grad_b, None, None


def joint_and_entropy(
    p_hat: torch.Tensor, p_tilde: torch.Tensor, mask: torch.Tensor | None = None, eps: float = DEFAULT_LOG_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The MI joint (eq. 3) and both views' per-pixel cluster entropies in one pass, in fp32.

    Args:
        p_hat, p_tilde: cluster probabilities ``B,K,H,W`` or ``M,B,K,H,W`` (same shape).
        mask: optional validity mask ``B,1,H,W`` (weights the joint; the entropy maps are returned for every pixel,
            the CC loss applies the mask itself).
        eps: floor inside the logarithms (as :func:`bundle.losses.entropy_map`).

    Returns:
        ``(joint M,K,K normalised by the valid-pixel count, count (0-d), entropy of p_hat M,B,1,H,W, entropy of
        p_tilde M,B,1,H,W, single)`` where ``single`` says the input had no head axis.

    Raises:
        ValueError: as :class:`bundle.losses.ClusterMutualInformationLoss`.
    """
    heads_hat, heads_tilde, mask, single = _check_pair(p_hat, p_tilde, mask)
    n_heads, batch, k, height, width = heads_hat.shape
    with _fp32_region(heads_hat.device):
        a, b, weights, count = _batch_major(heads_hat, heads_tilde, mask)
        joints, ent_a, ent_b = _JointEntropyFunction.apply(a, b, weights, float(eps))
        joint = joints.view(batch, n_heads, k, k).sum(dim=0) / count.clamp_min(1.0)

        def maps(ent: torch.Tensor) -> torch.Tensor:
            return ent.view(batch, n_heads, 1, height, width).transpose(0, 1)

        return joint, count, maps(ent_a), maps(ent_b), single
