"""Every transform of the bundle.

- :mod:`bundle.transforms.volume`: per-volume MONAI dictionary transforms of the pre-processing chain
  (channel selection, slice-last orientation, spacing safe for MONAI Label's request keys).
- :mod:`bundle.transforms.equivariant`: the random transform T of pre-training, applied inside the training step
  (on batches, on the tensors' device).
"""

from __future__ import annotations

from .equivariant import EquivariantTransform, TransformParams
from .volume import KeySafeSpacingd, SelectChanneld, SliceLastOrientation, SliceLastOrientationd, slice_last_ornt

__all__ = [
    "EquivariantTransform",
    "KeySafeSpacingd",
    "SelectChanneld",
    "SliceLastOrientation",
    "SliceLastOrientationd",
    "TransformParams",
    "slice_last_ornt",
]
