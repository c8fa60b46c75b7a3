"""Boundary-aware information maximization pre-training for 2D medical image segmentation, as a MONAI bundle.

Submodules are imported on first attribute access (``bundle.losses``, ``bundle.networks``, ...), so
``import bundle`` has no side effects and stays cheap.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.3.1"

_SUBMODULES = (
    "data",
    "distributed",
    "engines",
    "evaluation",
    "files",
    "finetune",
    "handlers",
    "losses",
    "metrics",
    "networks",
    "options",
    "transforms",
)


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
