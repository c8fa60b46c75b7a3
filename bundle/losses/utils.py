"""Helpers shared by the losses of this package: input checks, the fp32 region, head reductions, the batch-major
layout of two views, and a memory-lean per-pixel entropy.

Probability maps are ``B,K,H,W`` (one head) or ``M,B,K,H,W`` (``M`` independent heads); a validity mask is
``B,1,H,W`` (1 = valid, 0 = moved out of view by the random transform).  Shapes are checked on every call; the values
of probability maps only under PyTorch's debug mode, ``torch.autograd.set_detect_anomaly(True)`` (a full pass over
the tensor).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from monai.utils import LossReduction

from bundle.losses._kernels import EntropyFunction

__all__ = [
    "DEFAULT_LOG_EPS",
    "as_heads",
    "at_least_fp32",
    "batch_major",
    "broadcast_from_rank_zero",
    "check_aligned",
    "check_mask",
    "check_pair",
    "check_positive",
    "check_probability_values",
    "check_reduction",
    "fp32_region",
    "gather_over_processes",
    "is_distributed",
    "pixel_entropy",
    "pool_joints",
    "reduce_heads",
    "share_of_processes",
    "sum_over_processes",
]

#: floor inside the logarithms of the dense losses: ``log(max(p, eps))`` (see ClusterMutualInformationLoss, ``eps``).
DEFAULT_LOG_EPS = 1e-8

_REDUCTION_ERROR = 'Unsupported reduction: {}, available options are ["mean", "sum", "none"].'


def check_reduction(reduction: LossReduction | str) -> str:
    """The value (``"none"``, ``"mean"`` or ``"sum"``) of a reduction given as a :class:`monai.utils.LossReduction`
    or its string.

    Raises:
        ValueError: an unsupported reduction.
    """
    try:
        return LossReduction(reduction).value
    except ValueError:
        raise ValueError(_REDUCTION_ERROR.format(reduction)) from None


def check_positive(value: float, name: str, allow_zero: bool = False) -> float:
    """``float(value)``, checked to be > 0 (>= 0 with ``allow_zero``; NaN fails both).

    Raises:
        ValueError: ``"{name} must be > 0"`` (``>= 0``), with the value.
    """
    number = float(value)
    if not (number >= 0.0 if allow_zero else number > 0.0):
        raise ValueError(f"{name} must be {'>=' if allow_zero else '>'} 0, got {value}.")
    return number


def reduce_heads(values: torch.Tensor, reduction: str, single: bool) -> torch.Tensor:
    """Reduce per-head values ``(M,)``: ``"mean"``/``"sum"`` over heads (0-d); ``"none"`` keeps ``(M,)``, or gives
    the 0-d value of the only head when the input had no head axis (``single``).

    Raises:
        ValueError: an unsupported reduction.
    """
    if reduction == LossReduction.MEAN.value:
        return values.mean()
    if reduction == LossReduction.SUM.value:
        return values.sum()
    if reduction == LossReduction.NONE.value:
        return values[0] if single else values
    raise ValueError(_REDUCTION_ERROR.format(reduction))


def fp32_region(device: torch.device) -> AbstractContextManager:
    """Disable autocast on ``device`` (callers also cast inputs with :func:`at_least_fp32`)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Promote half/bfloat16 (and integer) tensors to fp32; fp32 and fp64 pass through unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def as_heads(probs: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """Validate ``B,K,H,W`` / ``M,B,K,H,W`` probabilities; return the ``M,B,K,H,W`` view and whether a head axis
    was added (``single``).

    Raises:
        ValueError: not a floating-point ``B,K,H,W``/``M,B,K,H,W`` tensor, K < 2 or empty (names ``name``); in debug
            mode also bad values (:func:`check_probability_values`).
    """
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
        check_probability_values(probs, name)
    single = probs.ndim == 4
    return (probs.unsqueeze(0) if single else probs), single


def check_probability_values(probs: torch.Tensor, name: str) -> None:
    """Check that ``probs`` (K along dim -3) holds finite probabilities in [0, 1] summing to 1 over K.

    Raises:
        ValueError: NaN/Inf values, values outside [0, 1], or pixels whose K values do not sum to 1 (names ``name``).
    """
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


def check_mask(mask: torch.Tensor | None, heads: torch.Tensor, name: str = "mask") -> torch.Tensor | None:
    """Validate a ``B,1,H,W`` mask against ``M,B,K,H,W`` heads; return it detached in the compute dtype (fp64 for
    fp64 heads, else fp32) on the heads' device, or None.

    Raises:
        ValueError: ``mask`` is not a tensor of shape ``B,1,H,W`` (names ``name``).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}.")
    _, batch, _, height, width = heads.shape
    if tuple(mask.shape) != (batch, 1, height, width):
        raise ValueError(f"{name} must have shape B,1,H,W = {(batch, 1, height, width)}, got {tuple(mask.shape)}.")
    dtype = torch.float64 if heads.dtype == torch.float64 else torch.float32
    return mask.detach().to(device=heads.device, dtype=dtype)


def check_pair(
    p_hat: torch.Tensor, p_tilde: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """Validate the two views' probabilities and the mask; return both ``M,B,K,H,W`` views, the checked mask and
    ``single`` (the input had no head axis).

    Raises:
        ValueError: as :func:`as_heads` and :func:`check_mask`, or ``p_hat`` and ``p_tilde`` differ in shape.
    """
    heads_hat, single = as_heads(p_hat, "p_hat")
    heads_tilde, _ = as_heads(p_tilde, "p_tilde")
    if heads_hat.shape != heads_tilde.shape:
        raise ValueError(f"p_hat and p_tilde must have the same shape, got {tuple(p_hat.shape)} and "
                         f"{tuple(p_tilde.shape)}.")
    return heads_hat, heads_tilde, check_mask(mask, heads_hat), single


def check_aligned(probs: torch.Tensor, image: torch.Tensor, name: str) -> None:
    """Check that ``B,K,H,W``/``M,B,K,H,W`` probabilities and a ``B,C,H,W`` image share B, H and W.

    Raises:
        ValueError: B, H or W differ (names ``name``).
    """
    if probs.shape[-4] != image.shape[0] or probs.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"{name} (shape {tuple(probs.shape)}) and image (shape {tuple(image.shape)}) "
                         "must share B, H and W.")


def batch_major(
    heads_hat: torch.Tensor, heads_tilde: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``M,B,K,H,W`` views -> batch-major ``B*M,K,N`` operands (fp32 at least), pixel weights ``B,N`` (or None) and
    the number of valid pixels (0-d).

    Batch-major is a free view of the dense head's output layout (``B,M,K,H,W`` in memory, handed over as an
    ``M,B,K,H,W`` transposed view); a contiguous ``M,B,K,H,W`` input costs one copy either way.
    """
    n_heads, batch, k, height, width = heads_hat.shape
    a = at_least_fp32(heads_hat).transpose(0, 1).reshape(batch * n_heads, k, height * width)
    b = at_least_fp32(heads_tilde).transpose(0, 1).reshape(batch * n_heads, k, height * width)
    if mask is None:
        return a, b, None, torch.full((), batch * height * width, dtype=a.dtype, device=a.device)
    return a, b, mask.reshape(batch, height * width), mask.sum()


def pool_joints(per_image: torch.Tensor, n_heads: int, count: torch.Tensor) -> torch.Tensor:
    """Per-image joints ``B*M,K,K`` (batch-major, as from :func:`batch_major` operands) -> the ``M,K,K`` joint of
    eq. (3): summed over the images and divided by the number of valid pixels ``count`` (at least 1)."""
    k = per_image.shape[-1]
    return per_image.view(-1, n_heads, k, k).sum(dim=0) / count.clamp_min(1.0)


def pixel_entropy(probs: torch.Tensor, dim: int, eps: float = DEFAULT_LOG_EPS, keepdim: bool = False) -> torch.Tensor:
    """Per-position entropy ``-sum_k p_k log max(p_k, eps)`` along ``dim``, gradient-safe and lean in memory.

    The gradient is ``-(log max(p, eps) + 1)``: exact for ``p >= eps``; below ``eps`` the slope is clipped to its
    value at ``eps`` (finite, ``-log eps - 1``, at exact zeros).  Autograd keeps only ``log max(p, eps)`` (no other
    full-size temporary between forward and backward).  No dtype change: call it on fp32/fp64 tensors.

    Args:
        probs: probabilities, e.g. ``M,B,K,H,W`` with K along ``dim``.
        dim: the class axis.
        eps: floor inside the logarithm, > 0. Defaults to 1e-8.
        keepdim: keep ``dim`` with size 1. Defaults to False.
    """
    return EntropyFunction.apply(probs, dim, float(eps), bool(keepdim))


@torch.no_grad()
def broadcast_from_rank_zero(tensors: list[torch.Tensor]) -> None:
    """Copy rank 0's values of ``tensors`` (e.g. a module's BatchNorm buffers) into every process's, in place, with
    one broadcast per dtype; every process passes tensors of the same shapes and dtypes in the same order."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def is_distributed() -> bool:
    """Whether a default process group with more than one process is initialised (a torchrun launch)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_processes(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the processes of the default group, differentiably (``torch.distributed.nn`` all-reduce,
    whose backward sums the gradients over the processes); the caller divides where it needs a mean."""
    return dist_nn.all_reduce(x, op=dist.ReduceOp.SUM)


def gather_over_processes(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every process concatenated along dim 0 in rank order, differentiably (the backward hands each process
    the gradient of its own rows, summed over the processes). Every process passes the same shape (the pre-training
    batch sampler draws equal batches); the collective itself fails otherwise."""
    return torch.cat(dist_nn.all_gather(x), dim=0)


def share_of_processes(count: torch.Tensor) -> torch.Tensor:
    """``N x count / (sum of count over the N processes)``, no gradient: the factor that turns a process's mean over
    its ``count`` items into its part of the mean over every process's items, once DDP averages the processes."""
    total = count.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return count.detach() * dist.get_world_size() / total.clamp_min(1.0)
