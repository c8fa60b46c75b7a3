"""Tensor transforms applied inside the training step (on batches, on the tensors' device)."""

from __future__ import annotations

from .equivariant import EquivariantTransform, TransformParams

__all__ = ["EquivariantTransform", "TransformParams"]
