"""L_MI's joint and L_CC's entropy maps from one pass over the full-resolution cluster probabilities.

When both terms are active, :class:`bundle.losses.PretrainingObjective` scores them through
:func:`joint_and_entropy` instead of calling the two losses separately. The values and gradients are the same
(tested against the separate losses); the difference is memory traffic: the probabilities ``M,B,K,H,W`` of each view
are the largest tensors of a pre-training step, and here each view's gradient is written once, over the forward's saved
logarithm (the entropy part, then the MI part added by one matrix product), instead of two full-size gradients that
autograd then sums.
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
    (per-image joints ``B*M,K,K`` = ``a diag(w) b^T``, entropies ``B*M,N`` of ``a`` and of ``b``).

    Written for memory traffic (fresh full-size allocations are the dominant cost on CPU): the forward allocates two
    full-size buffers per view -- ``log max(p, eps)``, kept for the backward, and one work buffer that first holds
    ``p log p`` and then the weighted ``p diag(w)`` -- and the backward allocates none: each gradient
    ``-(log max(p, eps) + 1) g_ent + G (q diag(w))`` is written into the log buffer it consumes.  A second backward
    through the same graph (``retain_graph=True``, gradcheck) recomputes the logarithms, so it stays exact.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_a, ent_a, weighted_a = _log_entropy_weighted(a, weights, eps)
        log_b, ent_b, weighted_b = _log_entropy_weighted(b, weights, eps)
        joint = torch.bmm(weighted_a, b.transpose(1, 2))
        ctx.save_for_backward(a, b, weights, weighted_a, weighted_b)
        ctx.eps = eps  # type: ignore[attr-defined]
        ctx.logs = [log_a, log_b]  # type: ignore[attr-defined]  # consumed (overwritten) by the first backward
        return joint, ent_a, ent_b

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, g_joint: torch.Tensor, g_ent_a: torch.Tensor, g_ent_b: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        a, b, _, weighted_a, weighted_b = ctx.saved_tensors  # type: ignore[attr-defined]
        logs = ctx.logs  # type: ignore[attr-defined]
        ctx.logs = [None, None]  # type: ignore[attr-defined]
        need_a, need_b = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        grads: list[torch.Tensor | None] = [None, None]
        operands = ((a, g_ent_a, g_joint, weighted_b), (b, g_ent_b, g_joint.transpose(1, 2), weighted_a))
        for index, (need, (p, g_ent, g_mat, other)) in enumerate(zip((need_a, need_b), operands, strict=True)):
            if not need:
                continue
            log_p = logs[index] if logs[index] is not None else p.clamp_min(ctx.eps).log_()  # type: ignore[attr-defined]
            # d H / dp = -(log max(p, eps) + 1): -(log p + 1) g = -g + log p * (-g), written over log p
            neg_g = g_ent.neg().unsqueeze(1)
            grad = torch.addcmul(neg_g, log_p, neg_g, out=log_p)
            grads[index] = grad.baddbmm_(g_mat, other)
        return grads[0], grads[1], None, None


def _log_entropy_weighted(
    p: torch.Tensor, weights: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log max(p, eps)``, the entropy ``-sum_k p log max(p, eps)`` (``B*M,N``) and ``p diag(w)`` (``p`` itself
    without weights) of a batch-major ``B*M,K,N`` operand; two full-size allocations."""
    log_p = torch.clamp_min(p, eps).log_()
    work = torch.mul(p, log_p)
    entropy = work.sum(dim=1).neg_()
    if weights is None:
        return log_p, entropy, p
    per_image = (weights.shape[0], -1, *p.shape[1:])  # B,M,K,N
    torch.mul(p.view(per_image), weights[:, None, None, :], out=work.view(per_image))
    return log_p, entropy, work


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
