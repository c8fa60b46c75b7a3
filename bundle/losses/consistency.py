"""Mean Teacher consistency loss and its ramp-up (Tarvainen & Valpola 2017; Laine & Aila 2017).

The paper under implementation (Peng et al. 2024, Appendix E) uses Mean Teacher as a semi-supervised baseline: the
student is pulled towards the teacher's predictions on unlabeled images by a squared error between softmax maps
(Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017), weighted by a coefficient ramped up
with the sigmoid-shaped schedule of Laine & Aila ("Temporal ensembling for semi-supervised learning", ICLR 2017).

- :func:`softmax_mse_consistency`: the (optionally masked) softmax mean squared error.
- :func:`sigmoid_rampup`: the ramp ``exp(-5 (1 - t)^2)``.
- :class:`ConsistencyWeight`: the consistency coefficient per iteration.

``softmax_mse_consistency`` stays a function rather than a MONAI ``_Loss``: its only reduction is a weighted mean
whose normaliser is ``C * sum(mask)``, which none of MONAI's ``reduction`` modes expresses. Nothing here depends on
this bundle: the terms take plain logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ConsistencyWeight", "sigmoid_rampup", "softmax_mse_consistency"]


def softmax_mse_consistency(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """
    Mean Teacher consistency (Tarvainen & Valpola 2017): mean squared difference between
    ``softmax(student_logits)`` and ``softmax(teacher_logits)`` over classes and pixels (the teacher side is
    detached), computed in fp32 even under autocast.

    The mean runs over every element ``B,C,H,W`` like ``torch.nn.MSELoss`` and the authors' code; the paper's
    L_MT (Appendix E) sums over classes instead, i.e. it is ``C`` times this value.

    Args:
        student_logits: ``B,C,H,W[,D]`` logits of the student, ``C >= 2``.
        teacher_logits: the teacher's logits, same shape.
        mask: optional ``B,1,H,W[,D]`` bool or non-negative float weights; pixels with weight 0 are left out and
            the result is ``sum(w * (p_s - p_t)^2) / (C * sum(w))``. An all-zero mask gives 0 (not nan).

    Returns:
        A scalar fp32 tensor.

    Raises:
        ValueError: on mismatched shapes, fewer than 3 dimensions, a single channel, or a bad/negative mask.

    Example::

        loss = sup_loss + weight(iteration) * softmax_mse_consistency(student(x_u), teacher(x_u))
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape."
        )
    if student_logits.ndim < 3:
        raise ValueError(f"logits must be B,C,H,W[,D], got shape {tuple(student_logits.shape)}.")
    num_classes = student_logits.shape[1]
    if num_classes < 2:
        raise ValueError(
            f"softmax over a single channel is constant (logits shape {tuple(student_logits.shape)}); need C >= 2."
        )
    if mask is not None:
        expected = (student_logits.shape[0], 1, *student_logits.shape[2:])
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape {expected} (B,1,spatial), got {tuple(mask.shape)}.")
        if mask.dtype != torch.bool and bool((mask < 0).any()):
            raise ValueError("mask weights must be non-negative.")

    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        p_student = F.softmax(student_logits.float(), dim=1)
        p_teacher = F.softmax(teacher_logits.detach().float(), dim=1)
        squared = (p_student - p_teacher).pow(2)
        if mask is None:
            return squared.mean()
        weights = mask.to(device=squared.device, dtype=torch.float32)
        numerator = (squared * weights).sum()
        denominator = weights.sum() * num_classes
        return numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny)


def sigmoid_rampup(step: float, rampup_length: float) -> float:
    """
    Sigmoid-shaped ramp-up of Laine & Aila (2017): ``exp(-5 (1 - t)^2)`` with ``t = clip(step / rampup_length,
    0, 1)``; rises from exp(-5) ~ 0.0067 at ``step = 0`` to 1 at ``step >= rampup_length``. A zero length gives 1.

    Args:
        step: the current step (iteration), >= 0.
        rampup_length: steps until the ramp reaches 1, >= 0.

    Raises:
        ValueError: when ``step`` or ``rampup_length`` is negative.

    Example::

        >>> sigmoid_rampup(10, 10)
        1.0
    """
    if rampup_length < 0:
        raise ValueError(f"rampup_length must be >= 0, got {rampup_length}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if rampup_length == 0:
        return 1.0
    t = min(float(step) / float(rampup_length), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class ConsistencyWeight:
    """
    ``weight(iteration) = max_weight * sigmoid_rampup(iteration, rampup_iterations)``: the consistency
    coefficient of Mean Teacher, ramped up over the first ``rampup_iterations`` iterations.

    Args:
        max_weight: the weight reached at the end of the ramp-up (grid-searched in the paper, 1e-4 .. 10).
        rampup_iterations: length of the ramp-up; 0 means the full weight from the start.

    Raises:
        ValueError: when ``max_weight`` or ``rampup_iterations`` is negative.

    Example::

        weight = ConsistencyWeight(max_weight=1.0, rampup_iterations=4000)
        loss = sup + weight(engine.state.iteration) * softmax_mse_consistency(s_logits, t_logits)
    """

    def __init__(self, max_weight: float, rampup_iterations: int) -> None:
        if max_weight < 0:
            raise ValueError(f"max_weight must be >= 0, got {max_weight}.")
        if rampup_iterations < 0:
            raise ValueError(f"rampup_iterations must be >= 0, got {rampup_iterations}.")
        self.max_weight = float(max_weight)
        self.rampup_iterations = rampup_iterations

    def __call__(self, iteration: float) -> float:
        return self.max_weight * sigmoid_rampup(iteration, self.rampup_iterations)
