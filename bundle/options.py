"""Validation of the bundle configs' user-facing options, run in ``initialize`` before anything is built.

A bad override (``--num_clusters 1``, ``--alpha 2``, ``--variant foo``, a crop larger than the pre-processed
slices, ...) is reported as one ``ValueError`` listing every problem, before data is read or a network built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["check_pretrain_options", "check_finetune_options", "flag"]

logger = logging.getLogger(__name__)

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _fail(message: str) -> ValueError:
    """Log ``message`` at ERROR (the first thing a command-line user reads, above MONAI's chained tracebacks) and
    return the ``ValueError`` to raise."""
    logger.error(message)
    return ValueError(message)


def flag(value: Any, name: str) -> bool:
    """A boolean option as the user typed it: ``True``/``False``, or the strings and numbers people write on a
    command line (``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``, any case). The command line
    hands ``--resume false`` over as the string ``"false"``, which Python would take as true.

    Raises:
        ValueError: for anything else, naming the option and the accepted values.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail(f"{name} must be a boolean: true/false, yes/no, on/off or 1/0 (any case); got {value!r}")


def _pair(value: Sequence[int] | int, name: str, problems: list[str]) -> tuple[int, ...] | None:
    vals = (value, value) if isinstance(value, int) else tuple(value)
    if len(vals) != 2 or not all(isinstance(v, int) and v > 0 for v in vals):
        problems.append(f"{name} must be two positive integers, got {value!r}")
        return None
    return vals


def check_pretrain_options(
    *,
    variant: str,
    num_clusters: int,
    num_heads: int,
    alpha: float,
    weights: dict[str, float],
    crop_size: Sequence[int],
    spatial_size: Sequence[int],
    features: Sequence[int],
    scans_per_batch: int,
    num_partitions: int,
    epochs: int,
    iterations: int,
    warmup_epochs: int,
) -> None:
    """Raise one ``ValueError`` naming every invalid pre-training option.

    Raises:
        ValueError: unknown ``variant``, ``num_clusters < 2``, ``alpha`` outside [0, 1], negative weights,
            a crop larger than the pre-processed in-plane size, crop sizes not divisible by 16, bad widths,
            non-positive batch / epoch / iteration counts, or warm-up longer than training.
    """
    from bundle.losses import VARIANTS as variants

    problems: list[str] = []
    if variant not in variants:
        problems.append(f"variant {variant!r} is unknown; valid variants: {', '.join(sorted(variants))}")
    if not isinstance(num_clusters, int) or num_clusters < 2:
        problems.append(f"num_clusters (K) must be an integer >= 2, got {num_clusters!r}")
    if not isinstance(num_heads, int) or num_heads < 1:
        problems.append(f"num_heads must be an integer >= 1, got {num_heads!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        problems.append(f"alpha must lie in [0, 1], got {alpha!r}")
    for name, w in weights.items():
        if float(w) < 0:
            problems.append(f"{name} must be >= 0, got {w!r}")
    crop = _pair(crop_size, "crop_size", problems)
    size = _pair(spatial_size, "spatial_size", problems)
    if crop and size and (crop[0] > size[0] or crop[1] > size[1]):
        problems.append(f"crop_size {list(crop)} is larger than the pre-processed slices spatial_size {list(size)}")
    if crop and (crop[0] % 16 or crop[1] % 16):
        problems.append(f"crop_size {list(crop)} must be divisible by 16 (four 2x poolings of the U-Net)")
    if len(features) != 6 or not all(int(f) > 0 for f in features):
        problems.append(f"features must be six positive widths, got {list(features)!r}")
    for name, v in (
        ("scans_per_batch", scans_per_batch),
        ("num_partitions", num_partitions),
        ("epochs", epochs),
        ("iterations", iterations),
    ):
        if not isinstance(v, int) or v < 1:
            problems.append(f"{name} must be a positive integer, got {v!r}")
    if isinstance(warmup_epochs, int) and isinstance(epochs, int) and not 0 <= warmup_epochs <= epochs:
        problems.append(f"warmup_epochs must lie in [0, epochs={epochs}], got {warmup_epochs!r}")
    if problems:
        raise _fail("invalid pre-training options:\n  - " + "\n  - ".join(problems))


def check_finetune_options(
    *,
    num_classes: int,
    num_labeled: int,
    crop_size: Sequence[int],
    spatial_size: Sequence[int],
    lr: float,
    epochs: int,
    iterations: int,
) -> None:
    """Raise one ``ValueError`` naming every invalid fine-tuning option."""
    problems: list[str] = []
    if not isinstance(num_classes, int) or num_classes < 2:
        problems.append(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(num_labeled, int) or num_labeled < 1:
        problems.append(f"num_labeled must be a positive integer, got {num_labeled!r}")
    crop = _pair(crop_size, "crop_size", problems)
    size = _pair(spatial_size, "spatial_size", problems)
    if crop and size and (crop[0] > size[0] or crop[1] > size[1]):
        problems.append(f"crop_size {list(crop)} is larger than the pre-processed slices spatial_size {list(size)}")
    if not float(lr) > 0:
        problems.append(f"lr must be > 0, got {lr!r}")
    for name, v in (("epochs", epochs), ("iterations", iterations)):
        if not isinstance(v, int) or v < 1:
            problems.append(f"{name} must be a positive integer, got {v!r}")
    if problems:
        raise _fail("invalid fine-tuning options:\n  - " + "\n  - ".join(problems))
