"""Per-scan, per-class 3D segmentation metrics on integer label maps: Dice, HD95 and ASD in millimetres.

The paper scores methods by the 3D Dice of each scan (the 2D slice predictions are stacked back into a volume),
averaged over scans and then over foreground classes. Surface distances are added here as secondary figures; they
use the voxel spacing, which is strongly anisotropic for these data (e.g. 0.6 x 0.6 x 4 mm prostate, ~1.5 x 1.5 x
5-10 mm ACDC), so a one-slice error costs several millimetres.

Conventions for empty structures (a class absent from the prediction and/or the ground truth of a scan):

============================  ==========  =================
case                          Dice        HD95 / ASD
============================  ==========  =================
both empty                    1.0         0.0
only one of the two empty     0.0         nan
============================  ==========  =================

Dice 1.0 for "both empty" follows the authors' evaluation (``(2I + 1e-16) / (U + 1e-16)``). A surface distance
to an empty set is undefined, hence nan; :func:`summarize` ignores nan values and reports how many scans counted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

__all__ = ["dice_per_class", "foreground_metrics", "scan_metrics", "summarize", "surface_distances"]


def _as_label_map(array: np.ndarray | torch.Tensor, name: str, num_classes: int) -> np.ndarray:
    """Return ``array`` as an int64 numpy label map, checking that its values are integers in [0, num_classes)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be a numeric label map, got dtype {array.dtype}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}).")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{name} must hold integer class indices; found non-integer values.")
    low, high = array.min(), array.max()
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} values must lie in [0, {num_classes - 1}], found range [{low}, {high}].")
    return array.astype(np.int64, copy=False)


def _check_pair(
    pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    pred_np = _as_label_map(pred, "pred", num_classes)
    label_np = _as_label_map(label, "label", num_classes)
    if pred_np.shape != label_np.shape:
        raise ValueError(f"pred {pred_np.shape} and label {label_np.shape} must have the same shape.")
    return pred_np, label_np


def _classes(num_classes: int, include_background: bool) -> range:
    return range(0 if include_background else 1, num_classes)


def dice_per_class(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    num_classes: int,
    include_background: bool = False,
) -> np.ndarray:
    """
    3D Dice ``2|P∩G| / (|P| + |G|)`` of each class over a whole scan.

    Args:
        pred: integer label map of the scan, e.g. ``H,W,D`` (any number of dimensions; no channel axis).
        label: ground-truth label map, same shape.
        num_classes: number of classes including background (label values lie in ``[0, num_classes)``).
        include_background: also score class 0.

    Returns:
        float64 array of shape ``(C',)``, ``C' = num_classes - 1`` (or ``num_classes`` with background),
        in class order. A class absent from both maps scores 1.0; absent from only one, 0.0.

    Raises:
        ValueError: on mismatched shapes, non-integer values or values outside ``[0, num_classes)``.

    Example::

        dice_per_class(pred, label, num_classes=4)  # -> array([dice_RV, dice_Myo, dice_LV])
    """
    pred_np, label_np = _check_pair(pred, label, num_classes)
    scores = []
    for c in _classes(num_classes, include_background):
        p, g = pred_np == c, label_np == c
        total = int(p.sum()) + int(g.sum())
        scores.append(1.0 if total == 0 else 2.0 * int(np.logical_and(p, g).sum()) / total)
    return np.asarray(scores, dtype=np.float64)


def _check_spacing(spacing: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    values = np.asarray(spacing, dtype=np.float64)
    if values.ndim == 0:
        values = np.full(ndim, float(values))
    if values.shape != (ndim,):
        raise ValueError(f"spacing must have one entry per image axis ({ndim}), got {values.tolist()}.")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be positive and finite, got {values.tolist()}.")
    return tuple(float(v) for v in values)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face-neighbour outside it (voxels on the image border count)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _directed_distances(from_surface: np.ndarray, to_surface: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from every voxel of ``from_surface`` to the nearest voxel of ``to_surface``."""
    distance_map = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return distance_map[from_surface]


def surface_distances(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: float | Sequence[float],
    include_background: bool = False,
) -> dict[str, np.ndarray]:
    """
    Symmetric 95th-percentile Hausdorff distance and average surface distance of each class, in millimetres.

    Surfaces are the voxels of a class with a face-neighbour outside it (image-border voxels included); distances
    are exact Euclidean distances between voxel centres at the given anisotropic ``spacing`` (scipy's
    ``distance_transform_edt(sampling=spacing)``). The conventions match MONAI's ``compute_hausdorff_distance
    (percentile=95)`` and ``compute_average_surface_distance(symmetric=True)``:

    - ``hd95 = max(P95(d(S_pred -> S_gt)), P95(d(S_gt -> S_pred)))`` (``np.percentile``, linear interpolation);
    - ``asd`` = mean of all distances of both directions pooled together (each surface voxel counts once).

    MONAI 1.6.1's functions accept ``spacing`` too, but emit a FutureWarning on every call and return inf/nan
    for empty masks, hence this direct implementation.

    Args:
        pred: integer label map of the scan (e.g. ``H,W,D``).
        label: ground-truth label map, same shape.
        num_classes: number of classes including background.
        spacing: voxel size in mm per axis of ``pred`` (a single number means isotropic).
        include_background: also score class 0.

    Returns:
        ``{"hd95": array (C',), "asd": array (C',)}`` (float64). Both empty -> 0.0; one empty -> nan.

    Raises:
        ValueError: on bad label maps (see :func:`dice_per_class`) or a spacing of the wrong length or <= 0.
    """
    pred_np, label_np = _check_pair(pred, label, num_classes)
    spacing_mm = _check_spacing(spacing, pred_np.ndim)
    hd95, asd = [], []
    for c in _classes(num_classes, include_background):
        p, g = pred_np == c, label_np == c
        if not p.any() and not g.any():
            hd95.append(0.0)
            asd.append(0.0)
            continue
        if not p.any() or not g.any():
            hd95.append(np.nan)
            asd.append(np.nan)
            continue
        # crop to the bounding box of both masks: every surface voxel lies inside it, so distances are unchanged
        box = ndimage.find_objects((p | g).astype(np.int8))[0]
        s_pred, s_gt = _surface(p[box]), _surface(g[box])
        d_pred_to_gt = _directed_distances(s_pred, s_gt, spacing_mm)
        d_gt_to_pred = _directed_distances(s_gt, s_pred, spacing_mm)
        hd95.append(float(max(np.percentile(d_pred_to_gt, 95), np.percentile(d_gt_to_pred, 95))))
        asd.append(float(np.concatenate([d_pred_to_gt, d_gt_to_pred]).mean()))
    return {"hd95": np.asarray(hd95, dtype=np.float64), "asd": np.asarray(asd, dtype=np.float64)}


def scan_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: float | Sequence[float],
    include_background: bool = False,
) -> dict[str, np.ndarray]:
    """``{"dice", "hd95", "asd"}`` per class for one scan: one row for :func:`summarize`."""
    row = {"dice": dice_per_class(pred, label, num_classes, include_background)}
    row.update(surface_distances(pred, label, num_classes, spacing, include_background))
    return row


def foreground_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: float | Sequence[float],
) -> dict[str, np.ndarray]:
    """``{"dice", "hd95", "asd"}`` (one value each) of the union of the foreground classes, ``label > 0``.

    The figure of the whole structure made of several labeled parts: the whole prostate gland of a zonal mask
    (peripheral + transition zone), the whole heart of an ACDC mask. A voxel given the wrong foreground class still
    counts as found here, so it separates finding the structure from telling its parts apart.

    Args:
        pred: integer label map of the scan (values in ``[0, num_classes)``).
        label: ground-truth label map, same shape.
        num_classes: number of classes including background.
        spacing: voxel spacing in mm, one value per axis (or one for all).

    Raises:
        ValueError: as :func:`dice_per_class` and :func:`surface_distances`.
    """
    pred_np, label_np = _check_pair(pred, label, num_classes)
    return scan_metrics((pred_np > 0).astype(np.int64), (label_np > 0).astype(np.int64), 2, spacing)


def summarize(rows: Iterable[Mapping[str, Any]], class_names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """
    Mean and standard deviation over scans, per class and overall, ignoring nan (and inf).

    Args:
        rows: one mapping per scan, metric name -> per-class values (1-D, same length for every scan), e.g. the
            output of :func:`scan_metrics`. Entries that are strings (such as ``"scan": "Case00"``) are ignored.
        class_names: names for the columns; default ``"0", "1", ...`` (column positions).

    Returns:
        ``{metric: {"per_class": {name: {"mean", "std", "n"}}, "mean": float, "std": float, "n": int}}`` with
        plain Python floats (JSON-ready). Per class: nan-aware mean / population std (ddof=0) over scans, ``n`` =
        scans with a finite value. Overall: ``mean`` is the mean of the per-class means (the paper's "DSC mean
        over foreground classes"), ``std`` the std over scans of each scan's class-mean, ``n`` the number of scans
        with at least one finite value. Statistics over no finite value are nan.

    Raises:
        ValueError: when ``rows`` is empty, a metric is missing from a row, or the class counts disagree.

    Example::

        summary = summarize([scan_metrics(p, g, 4, spacing) for p, g, spacing in scans], ["RV", "Myo", "LV"])
        summary["dice"]["mean"], summary["dice"]["per_class"]["LV"]["mean"]
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty: nothing to summarize.")
    metrics = [key for key, value in rows[0].items() if not isinstance(value, str)]
    summary: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        values = []
        for index, row in enumerate(rows):
            if metric not in row:
                raise ValueError(f"row {index} has no {metric!r} (keys: {sorted(row)}).")
            values.append(np.atleast_1d(np.asarray(row[metric], dtype=np.float64)))
        widths = {v.shape for v in values}
        if len(widths) != 1 or len(values[0].shape) != 1:
            raise ValueError(f"{metric!r} must be a 1-D array of the same length in every row, got shapes {widths}.")
        table = np.stack(values)  # scans x classes
        names = list(class_names) if class_names is not None else [str(i) for i in range(table.shape[1])]
        if len(names) != table.shape[1]:
            raise ValueError(f"class_names has {len(names)} entries but {metric!r} has {table.shape[1]} classes.")
        finite = np.isfinite(table)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # all-nan columns -> nan, on purpose
            class_mean = np.nanmean(np.where(finite, table, np.nan), axis=0)
            class_std = np.nanstd(np.where(finite, table, np.nan), axis=0)
            scan_mean = np.nanmean(np.where(finite, table, np.nan), axis=1)
            overall_mean = float(np.nanmean(class_mean))
            overall_std = float(np.nanstd(scan_mean))
        summary[metric] = {
            "per_class": {
                name: {"mean": float(class_mean[i]), "std": float(class_std[i]), "n": int(finite[:, i].sum())}
                for i, name in enumerate(names)
            },
            "mean": overall_mean,
            "std": overall_std,
            "n": int(np.isfinite(scan_mean).sum()),
        }
    return summary
