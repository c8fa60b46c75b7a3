"""Ignite/MONAI handlers and training helpers that plug into MONAI engines."""

from __future__ import annotations

from .mean_teacher import (
    ConsistencyWeight,
    EMATeacher,
    MeanTeacherHandler,
    sigmoid_rampup,
    softmax_mse_consistency,
)

__all__ = ["ConsistencyWeight", "EMATeacher", "MeanTeacherHandler", "sigmoid_rampup", "softmax_mse_consistency"]
