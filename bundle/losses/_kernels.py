"""Hand-written autograd kernels of the dense losses (private): the same values and gradients as plain PyTorch
expressions, written for memory traffic.

- :class:`EntropyFunction`: per-position entropy ``-sum_k p log max(p, eps)`` (behind
  :func:`bundle.losses.utils.pixel_entropy`).
- :class:`WeightedJointFunction`: per-image joints ``a diag(w) b^T`` (behind :func:`bundle.losses.joint_distribution`).
- :class:`LocalCorrelationFunction` with :class:`CorrelationGeometry`: the local squared correlation of L_CC (behind
  :class:`bundle.losses.BoundaryCrossCorrelationLoss`).
- :class:`JointEntropyFunction`: the MI joints and both views' entropies in one pass (behind
  :func:`bundle.losses.objective.joint_and_entropy`).
- :func:`box_sum_`: the in-place zero-padded ``window x window`` box sum.

Each docstring names the plain reference the kernel is tested against.  Operands are fp32 or fp64 (the callers
cast and disable autocast).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "CorrelationGeometry",
    "EntropyFunction",
    "JointEntropyFunction",
    "LocalCorrelationFunction",
    "WeightedJointFunction",
    "box_sum_",
]


class _Context(Protocol):
    """The autograd context PyTorch hands to ``forward``/``backward``, as far as these kernels use it."""

    needs_input_grad: tuple[bool, ...]

    def save_for_backward(self, *tensors: torch.Tensor | None) -> None:
        """Keep tensors (None allowed) for the backward; they come back as ``saved_tensors``."""


class _EntropyContext(_Context, Protocol):
    saved_tensors: tuple[torch.Tensor]  # log max(p, eps)
    dim: int
    keepdim: bool


class _WeightedJointContext(_Context, Protocol):
    saved_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # a, b, weights


class _LocalCorrelationContext(_Context, Protocol):
    saved_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    geo: CorrelationGeometry
    work: torch.Tensor | None  # the forward's box-sum buffer, reused (then released) by the first backward


class _JointEntropyContext(_Context, Protocol):
    saved_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]
    eps: float
    logs: list[torch.Tensor | None]  # log max(p, eps) of a and b, consumed (overwritten) by the first backward


class EntropyFunction(torch.autograd.Function):
    """``-sum(p log max(p, eps))`` along ``dim``; the backward reuses the forward's ``log max(p, eps)`` instead of
    recomputing it (one logarithm per element in all, the dominant cost; for one saved full-size tensor).

    Tested against the plain formula and its gradient ``-(log p + 1)`` in
    ``tests/test_losses_cc.py::test_entropy_map_values_shapes_and_zero_safety``, and against finite differences in
    ``tests/test_losses_mi.py::test_gradients_match_finite_differences`` (IMSAT).
    """

    @staticmethod
    def forward(ctx: _EntropyContext, probs: torch.Tensor, dim: int, eps: float, keepdim: bool) -> torch.Tensor:
        logp = probs.clamp_min(eps).log_()
        ctx.dim, ctx.keepdim = dim, keepdim
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logp)
        return (probs * logp).sum(dim=dim, keepdim=keepdim).neg_()

    @staticmethod
    @once_differentiable
    def backward(ctx: _EntropyContext, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (logp,) = ctx.saved_tensors
        if not ctx.keepdim:
            grad = grad.unsqueeze(ctx.dim)
        # d/dp [-p log max(p, eps)] = -(log max(p, eps) + 1) (the slope is clipped below eps)
        return (logp + 1.0).mul_(grad.neg()), None, None, None


class WeightedJointFunction(torch.autograd.Function):
    """``a diag(w) b^T`` per (image, head): ``a``, ``b`` ``B*M,K,N`` (batch-major), ``w`` ``B,N`` or None.

    Returns ``B*M,K,K``.

    Same value and gradient as autograd on ``bmm(a * w, b^T)``, but the weighted copy of ``a`` is freed
    right after the forward and the backward writes each gradient once (weights applied in place).

    Tested against the pixel-by-pixel joint ``_naive_joint`` in
    ``tests/test_losses_mi.py::test_joint_matches_naive_and_sums_to_one`` and against finite differences in
    ``tests/test_losses_mi.py::test_gradients_match_finite_differences``.
    """

    @staticmethod
    def forward(
        ctx: _WeightedJointContext, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(a, b, weights)
        if weights is None:
            return torch.bmm(a, b.transpose(1, 2))
        batch = weights.shape[0]
        weighted = (a.view(batch, -1, *a.shape[1:]) * weights[:, None, None, :]).view_as(a)
        return torch.bmm(weighted, b.transpose(1, 2))

    @staticmethod
    @once_differentiable
    def backward(
        ctx: _WeightedJointContext, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        a, b, weights = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        grad_a = torch.bmm(grad, b) if need_a else None
        grad_b = torch.bmm(grad.transpose(1, 2), a) if need_b else None
        if weights is not None:
            batch = weights.shape[0]
            for g in (grad_a, grad_b):
                if g is not None:
                    g.view(batch, -1, *g.shape[1:]).mul_(weights[:, None, None, :])
        return grad_a, grad_b, None


class CorrelationGeometry(NamedTuple):
    """What :class:`LocalCorrelationFunction` needs besides the entropy maps (all data, no gradient)."""

    phi: torch.Tensor  # B,1,H,W rescaled edge map
    phi_mean: torch.Tensor  # B,1,H,W local mean of phi
    phi_var: torch.Tensor  # B,1,H,W local variance of phi, floored at eps
    mask: torch.Tensor | None  # B,1,H,W eroded validity mask
    norm: torch.Tensor  # B,1,H,W or 1,1,H,W: window moments are box_sum(mask * x) / norm
    window: int
    eps: float
    positive_only: bool


class LocalCorrelationFunction(torch.autograd.Function):
    """Entropy maps ``M,B,1,H,W`` -> per-head ``-mean_i r_i^2`` ``(M,)``, with a hand-written backward.

    Inputs: ``entropy`` ``M,B,1,H,W``, its per-slice ``low`` and ``scale`` (broadcastable, detached: psi =
    ``(entropy - low) / scale``) and the :class:`CorrelationGeometry`.  The arithmetic is that of the docstring of
    :class:`bundle.losses.BoundaryCrossCorrelationLoss`; the point of the custom function is memory traffic.  With
    ``psi`` the rescaled entropy, ``w`` the mask and ``S = box_sum(.) / norm``:

        mu = S(w psi), sq = S(w psi^2), X = S(w psi phi),
        c = X - mu S(w phi) (clamped at 0 when positive_only), v = max(sq - mu^2, eps),
        r^2 = c^2 / (var_phi v),  loss = -sum_i w_i r_i^2 / sum_i w_i.

    The three moments are box-filtered in place in one ``M*B,3,H,W`` buffer (three such buffers in all, forward
    and backward); the backward is the adjoint: per pixel ``g_X = 2 c k``, ``g_sq = -c^2 k / v [sq - mu^2 > eps]``,
    ``g_mu = -S(w phi) g_X - 2 mu g_sq`` with ``k = -g w / (count var_phi v)``, then (the zero-padded box sum is
    self-adjoint) ``G = box_sum(g / norm)`` and ``d loss / d psi = w (G_mu + 2 psi G_sq + phi G_X)``.

    Tested against the pixel-by-pixel loop ``_naive_loss`` in ``tests/test_losses_cc.py::test_matches_naive_reference``
    and against finite differences in ``tests/test_losses_cc.py::test_gradients_match_finite_differences`` and
    ``test_gradients_match_finite_differences_without_mask_and_signed``.
    """

    @staticmethod
    def forward(
        ctx: _LocalCorrelationContext,
        entropy: torch.Tensor,
        low: torch.Tensor,
        scale: torch.Tensor,
        geo: CorrelationGeometry,
    ) -> torch.Tensor:
        n_heads, batch, _, height, width = entropy.shape
        psi = (entropy - low).div_(scale)
        if geo.mask is not None:  # invalid pixels may hold anything (even inf): give them 0
            psi = torch.where(geo.mask > 0, psi, torch.zeros((), dtype=psi.dtype, device=psi.device))
        stack = torch.empty(n_heads, batch, 3, height, width, dtype=psi.dtype, device=psi.device)
        weighted = stack[:, :, 0:1]
        if geo.mask is None:
            weighted.copy_(psi)
        else:
            torch.mul(psi, geo.mask, out=weighted)
        torch.mul(weighted, psi, out=stack[:, :, 1:2])
        torch.mul(weighted, geo.phi, out=stack[:, :, 2:3])
        # box sums in place: the stack becomes the window moments; the row buffer is kept for the backward
        _, work = box_sum_(stack.view(n_heads * batch, 3, height, width), geo.window)
        moments = stack.div_(geo.norm)
        mu, var, cov = moments[:, :, 0:1], moments[:, :, 1:2], moments[:, :, 2:3]
        cov.addcmul_(geo.phi_mean, mu, value=-1.0)
        if geo.positive_only:
            cov.clamp_min_(0.0)
        var.addcmul_(mu, mu, value=-1.0)
        above = var > geo.eps  # where the variance floor does not act
        var.clamp_min_(geo.eps)
        r2 = cov * cov
        r2.div_(var).div_(geo.phi_var)
        if geo.mask is None:
            count = torch.full((), batch * height * width, dtype=r2.dtype, device=r2.device)
            values = r2.sum(dim=(1, 2, 3, 4))
        else:
            count = geo.mask.sum()
            values = (r2 * geo.mask).sum(dim=(1, 2, 3, 4))
        values = values.div_(count.clamp_min(1.0)).neg_()
        ctx.save_for_backward(psi, moments, above, count, scale)
        ctx.geo = geo
        ctx.work = work.view_as(stack)  # reused by the backward
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx: _LocalCorrelationContext, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        psi, moments, above, count, scale = ctx.saved_tensors
        geo = ctx.geo
        n_heads, batch, _, height, width = psi.shape
        mu, var, cov = moments[:, :, 0:1], moments[:, :, 1:2], moments[:, :, 2:3]
        # k = d loss / d r^2 / (var_phi v) = -g w / (count var_phi v)
        k = (-grad / count.clamp_min(1.0)).view(n_heads, 1, 1, 1, 1) / geo.phi_var
        k = k / var if geo.mask is None else (k * geo.mask).div_(var)
        stack = ctx.work
        ctx.work = None
        if stack is None:  # a second backward through the same graph
            stack = torch.empty_like(moments)
        g_mu, g_sq, g_cov = stack[:, :, 0:1], stack[:, :, 1:2], stack[:, :, 2:3]
        torch.mul(cov, k, out=g_cov).mul_(2.0)  # d r^2 / d cov
        torch.mul(cov, cov, out=g_sq).mul_(k).div_(var).mul_(above).neg_()  # d r^2 / d v (0 where floored)
        torch.mul(g_cov, geo.phi_mean, out=g_mu).neg_().addcmul_(mu, g_sq, value=-2.0)
        stack.div_(geo.norm)
        box_sum_(stack.view(n_heads * batch, 3, height, width), geo.window)  # the adjoint G, in place
        grad_psi = stack[:, :, 0:1].addcmul(psi, stack[:, :, 1:2], value=2.0)
        grad_psi.addcmul_(geo.phi, stack[:, :, 2:3])
        if geo.mask is not None:
            grad_psi.mul_(geo.mask)
        return grad_psi.div_(scale), None, None, None


class JointEntropyFunction(torch.autograd.Function):
    """Batch-major ``a``, ``b`` (``B*M,K,N``), weights ``B,N`` or None, ``eps`` ->
    (per-image joints ``B*M,K,K`` = ``a diag(w) b^T``, entropies ``B*M,N`` of ``a`` and of ``b``).

    Written for memory traffic (fresh full-size allocations are the dominant cost on CPU): the forward allocates two
    full-size buffers per view -- ``log max(p, eps)``, kept for the backward, and one work buffer that first holds
    ``p log p`` and then the weighted ``p diag(w)`` -- and the backward allocates none: each gradient
    ``-(log max(p, eps) + 1) g_ent + G (q diag(w))`` is written into the log buffer it consumes.  A second backward
    through the same graph (``retain_graph=True``, gradcheck) recomputes the logarithms, so it stays exact.

    Tested against :func:`bundle.losses.joint_distribution` and :func:`bundle.losses.entropy_map` and finite
    differences in ``tests/test_losses_fused.py::test_joint_and_entropies_equal_their_definitions_and_gradcheck``,
    against the separate losses in ``tests/test_losses_fused.py::test_fused_objective_matches_separate_losses`` and
    for a second backward in ``tests/test_losses_fused.py::test_second_backward_through_the_same_graph_is_exact``.
    """

    @staticmethod
    def forward(
        ctx: _JointEntropyContext, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_a, ent_a, weighted_a = _log_entropy_weighted(a, weights, eps)
        log_b, ent_b, weighted_b = _log_entropy_weighted(b, weights, eps)
        joint = torch.bmm(weighted_a, b.transpose(1, 2))
        ctx.save_for_backward(a, b, weights, weighted_a, weighted_b)
        ctx.eps = eps
        ctx.logs = [log_a, log_b]
        return joint, ent_a, ent_b

    @staticmethod
    @once_differentiable
    def backward(
        ctx: _JointEntropyContext, g_joint: torch.Tensor, g_ent_a: torch.Tensor, g_ent_b: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        a, b, _, weighted_a, weighted_b = ctx.saved_tensors
        logs = ctx.logs
        ctx.logs = [None, None]
        need_a, need_b = ctx.needs_input_grad[:2]
        grads: list[torch.Tensor | None] = [None, None]
        operands = ((a, g_ent_a, g_joint, weighted_b), (b, g_ent_b, g_joint.transpose(1, 2), weighted_a))
        for index, (need, (p, g_ent, g_mat, other)) in enumerate(zip((need_a, need_b), operands, strict=True)):
            if not need:
                continue
            saved_log = logs[index]
            log_p = saved_log if saved_log is not None else p.clamp_min(ctx.eps).log_()
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


def box_sum_(x: torch.Tensor, window: int, work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over the in-image part of each ``window x window`` neighbourhood of ``...,H,W`` maps (zero padding),
    **in place** in ``x``; returns ``(x, work)``.

    Separable shifted in-place adds (rows into ``work``, a buffer shaped as ``x`` that is allocated when not given,
    then columns back into ``x``): ``2 (window - 1)`` adds, about twice as fast on CPU as ``avg_pool2d``.  The
    zero-padded box sum is self-adjoint.

    Tested against an explicit window loop in ``tests/test_losses_cc.py::test_box_sum_counts_in_image_neighbours``.
    """
    half = window // 2
    rows = torch.empty_like(x) if work is None else work
    rows.copy_(x)
    for shift in range(1, half + 1):
        rows[..., shift:, :] += x[..., :-shift, :]
        rows[..., :-shift, :] += x[..., shift:, :]
    x.copy_(rows)
    for shift in range(1, half + 1):
        x[..., shift:] += rows[..., :-shift]
        x[..., :-shift] += rows[..., shift:]
    return x, rows
