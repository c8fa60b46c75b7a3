"""Up-front validation of a list of scans, so that bad input fails before any training starts.

:func:`check_entries` opens every image (and label) once and collects *every* problem it finds into one
:class:`DataCheckError`, whose message has one line per problem, ``"<path>: <problem>"``. Nothing is written and
nothing is trained while a problem remains.

Catalogue of problems reported (each has a test in ``tests/test_data_checks.py``):

- an empty list of entries (empty datalist or split);
- an entry without an ``"image"`` (or, when labels are required, ``"label"``) key; duplicated scan ids;
- a missing file, a broken or looping symbolic link, a directory, a file without read permission; a corrupt NIfTI
  file (header or voxel data cannot be decoded);
- a 2D image (or a 3D image with a single slice) where a 3D volume is expected; a multi-channel (4D) image without a
  chosen channel, or a channel index that the image does not have;
- a non-finite affine; a zero or implausible voxel spacing (outside 0.01–100 mm; outside 0.1–20 mm only a warning);
  NaN/Inf voxels;
- a constant image volume (e.g. all zeros), or constant 2D slices (along the stored slice axis, the last one);
- an image/label spatial shape mismatch, or an image/label affine mismatch;
- label values that are not integers or lie outside ``0 .. num_classes - 1``.

The acquisition slice axis is the last stored spatial axis (NIfTI axis 2), as in ACDC, the Decathlon and
PROMISE12 files; the pre-processing keeps that axis last (see :mod:`bundle.data.preprocessing`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bundle.data.preprocessing import NRRD_SUFFIXES

__all__ = ["DataCheckError", "check_entries", "check_file_exists"]

AFFINE_ATOL = 1e-3  # millimetres: tolerance between image and label affines
MAX_LISTED = 8  # at most this many slice indices or label values are listed in one message
SPACING_LIMITS_MM = (0.01, 100.0)  # voxel spacing outside: an error (a broken header, not a scan)
SPACING_USUAL_MM = (0.1, 20.0)  # outside (but within the limits): a warning

logger = logging.getLogger(__name__)


class DataCheckError(ValueError):
    """One error for all the data problems found, one line ``"<path>: <problem>"`` per problem.

    Args:
        problems: the ``"<path>: <problem>"`` lines.
        header: first line of the message.
    """

    def __init__(self, problems: Sequence[str], header: str = "data check failed") -> None:
        self.problems = list(problems)
        n = len(self.problems)
        message = f"{header}: {n} problem{'s' if n != 1 else ''} found\n" + "\n".join(self.problems)
        super().__init__(message)


def _short_list(values: Sequence[Any]) -> str:
    shown = ", ".join(str(v) for v in list(values)[:MAX_LISTED])
    return shown + (f", ... ({len(values)} in all)" if len(values) > MAX_LISTED else "")


def _format_value(v: float) -> str:
    return f"{v:g}"


def check_file_exists(path: str | Path | None, problems: list[str], what: str = "file") -> bool:
    """Append ``"<path>: missing <what>"`` to ``problems`` when ``path`` is not an existing file."""
    if path is None or str(path) == "":
        problems.append(f"<no path>: missing {what} (empty path)")
        return False
    p = Path(path)
    if not p.is_file():
        if p.is_symlink() and not p.exists():
            problems.append(f"{p}: {what} is a broken or looping symbolic link (-> {os.readlink(p)})")
        elif p.is_dir():
            problems.append(f"{p}: {what} is a directory, not a file")
        else:
            problems.append(f"{p}: missing {what} (no such file)")
        return False
    if not os.access(p, os.R_OK):
        problems.append(f"{p}: {what} is not readable (permission denied)")
        return False
    return True


def _load_nrrd(path: Path) -> nib.Nifti1Image:
    """An NRRD volume as an in-memory NIfTI image with the RAS affine MONAI's NrrdReader gives (the one training and
    inference load it with), so every check below reads both formats alike."""
    from monai.data import NrrdReader

    reader = NrrdReader()
    data, meta = reader.get_data(reader.read(str(path)))
    if data.ndim != 3:
        raise ValueError(f"{data.ndim}D NRRD (shape {data.shape}); only 3D NRRD volumes are read")
    return nib.Nifti1Image(np.asarray(data), np.asarray(meta["affine"], dtype=np.float64))


def _load_header(path: Path, problems: list[str]) -> nib.spatialimages.SpatialImage | None:
    try:
        img = _load_nrrd(path) if path.name.endswith(NRRD_SUFFIXES) else nib.load(str(path))
    except Exception as e:  # every decoding failure becomes a reported problem, nothing is swallowed
        problems.append(f"{path}: unreadable or corrupt image file ({type(e).__name__}: {e})")
        return None
    if not hasattr(img, "dataobj") or not hasattr(img, "affine"):
        problems.append(f"{path}: not a spatial image file ({type(img).__name__})")
        return None
    return img


def _read_data(img: Any, path: Path, problems: list[str], channel: int | None = None) -> np.ndarray | None:
    try:
        data = np.asanyarray(img.dataobj[..., channel] if channel is not None else img.dataobj)
    except Exception as e:
        problems.append(f"{path}: unreadable or corrupt voxel data ({type(e).__name__}: {e})")
        return None
    return data


def _image_geometry(
    img: Any, path: Path, problems: list[str], expect_3d: bool, channel: int | None
) -> tuple[tuple[int, ...], int | None] | None:
    """Validate the image's dimensionality; return (spatial shape, channel index to read) or None."""
    shape = tuple(int(s) for s in img.shape)
    read_channel: int | None = None
    if len(shape) == 4 and shape[3] == 1 and channel in (None, 0):
        spatial = shape[:3]
        read_channel = 0
    elif len(shape) == 4:
        if channel is None:
            problems.append(
                f"{path}: 4D image with {shape[3]} channels (shape {shape}); choose one with channel=<index>"
            )
            return None
        if not 0 <= channel < shape[3]:
            problems.append(f"{path}: channel {channel} requested but the image has {shape[3]} (shape {shape})")
            return None
        spatial = shape[:3]
        read_channel = channel
    elif len(shape) > 4:
        problems.append(f"{path}: {len(shape)}D image (shape {shape}); expected a 3D volume")
        return None
    else:
        if channel not in (None, 0):
            problems.append(f"{path}: channel {channel} requested but the image has a single channel (shape {shape})")
            return None
        spatial = shape
    if expect_3d:
        if len(spatial) < 3:
            problems.append(f"{path}: {len(spatial)}D image (shape {shape}) where a 3D volume is expected")
            return None
        if min(spatial) < 2:
            problems.append(f"{path}: single-slice image (shape {shape}) where a 3D volume is expected")
            return None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        problems.append(f"{path}: non-finite affine {affine.tolist()}")
        return spatial, read_channel
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[: len(spatial)]  # mm per voxel, as resampling reads it
    shown = ", ".join(f"{v:.4g}" for v in spacing)
    if np.any(spacing <= 0):
        problems.append(f"{path}: zero voxel spacing ({shown} mm; a degenerate affine)")
    elif np.any(spacing < SPACING_LIMITS_MM[0]) or np.any(spacing > SPACING_LIMITS_MM[1]):
        low, high = SPACING_LIMITS_MM
        problems.append(f"{path}: implausible voxel spacing ({shown} mm; expected {low:g} to {high:g} mm)")
    elif np.any(spacing < SPACING_USUAL_MM[0]) or np.any(spacing > SPACING_USUAL_MM[1]):
        logger.warning(f"{path}: unusual voxel spacing ({shown} mm); check the header if this is not intended")
    return spatial, read_channel


def _check_image_values(data: np.ndarray, path: Path, problems: list[str]) -> None:
    if not np.issubdtype(data.dtype, np.number):
        problems.append(f"{path}: non-numeric voxel type {data.dtype}")
        return
    finite = np.isfinite(data)
    n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad:
        problems.append(f"{path}: {n_bad} NaN/Inf voxels")
        return
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        problems.append(f"{path}: constant volume (every voxel = {_format_value(lo)})")
        return
    if data.ndim == 3:
        flat = data.reshape(-1, data.shape[2])
        const = np.flatnonzero(flat.min(axis=0) == flat.max(axis=0)).tolist()
        if const:
            problems.append(
                f"{path}: constant slice(s) along the slice axis (last axis) at index {_short_list(const)}"
                f" of {data.shape[2]}"
            )


def _check_label_values(data: np.ndarray, path: Path, problems: list[str], num_classes: int) -> None:
    if not np.issubdtype(data.dtype, np.number):
        problems.append(f"{path}: non-numeric label type {data.dtype}")
        return
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            problems.append(f"{path}: {int(finite.size - np.count_nonzero(finite))} NaN/Inf label voxels")
            return
        values = np.unique(data)
        non_int = values[values != np.round(values)]
        if non_int.size:
            problems.append(f"{path}: non-integer label values {_short_list(non_int.tolist())}")
            return
    else:
        values = np.unique(data)
    outside = values[(values < 0) | (values >= num_classes)]
    if outside.size:
        shown = [int(v) for v in outside.tolist()]
        problems.append(
            f"{path}: label values {_short_list(shown)} outside the declared classes 0..{num_classes - 1}"
            f" (num_classes={num_classes})"
        )


def check_entries(
    entries: Sequence[Mapping[str, Any]],
    num_classes: int | None,
    require_label: bool = True,
    expect_3d: bool = True,
    channel: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    name: str = "entries",
) -> None:
    """Check every scan of ``entries`` and raise one :class:`DataCheckError` listing every problem.

    Each file's header is read with nibabel and its voxel data decoded once. Entries are dicts with absolute (or
    working-directory relative) paths, as returned by :func:`bundle.data.datalist.load_split`.

    Args:
        entries: ``[{"image": path, "label": path, "scan_id": ...}, ...]``.
        num_classes: number of label classes C; label values must lie in ``0..C-1``. Required when labels are
            checked.
        require_label: whether every entry must have a label (fine-tuning, evaluation) or not (pre-training).
            Labels that are present are checked either way.
        expect_3d: whether each image must be a 3D volume with at least 2 voxels along each axis.
        channel: channel of a 4D (multi-channel) image to use; ``None`` for 3D images.
        image_key: key of the image path.
        label_key: key of the label path.
        name: what ``entries`` is, used in the message of an empty list.

    Raises:
        DataCheckError: listing every problem found, one ``"<path>: <problem>"`` line each.
        ValueError: when labels are to be checked but ``num_classes`` is not a positive integer.

    Example:
        >>> check_entries([{"image": "a.nii.gz", "label": "a_gt.nii.gz"}], num_classes=4)  # doctest: +SKIP
    """
    problems: list[str] = []
    if len(entries) == 0:
        raise DataCheckError([f"<{name}>: no entries (empty datalist or split)"])
    if num_classes is not None and (not isinstance(num_classes, int | np.integer) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    seen_ids: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            problems.append(f"<{name}[{i}]>: entry is a {type(entry).__name__}, expected a dict with '{image_key}'")
            continue
        image_path = entry.get(image_key)
        label_path = entry.get(label_key)
        scan_id = entry.get("scan_id")
        if scan_id is not None:
            if str(scan_id) in seen_ids:
                problems.append(f"{image_path}: duplicated scan_id {scan_id!r} (also {seen_ids[str(scan_id)]})")
            seen_ids[str(scan_id)] = str(image_path)
        if image_path is None:
            problems.append(f"<{name}[{i}]>: entry has no '{image_key}' key ({dict(entry)})")
            continue
        if label_path is None and require_label:
            problems.append(f"{image_path}: entry has no '{label_key}' (label file required)")
        if label_path is not None and num_classes is None:
            raise ValueError("num_classes is required to check label files.")

        image_ok = check_file_exists(image_path, problems, "image file")
        label_ok = label_path is not None and check_file_exists(label_path, problems, "label file")

        spatial: tuple[int, ...] | None = None
        image_affine: np.ndarray | None = None
        if image_ok:
            ipath = Path(image_path)
            img = _load_header(ipath, problems)
            if img is not None:
                geometry = _image_geometry(img, ipath, problems, expect_3d, channel)
                if geometry is not None:
                    spatial, read_channel = geometry
                    image_affine = np.asarray(img.affine, dtype=np.float64)
                    data = _read_data(img, ipath, problems, read_channel)
                    if data is not None:
                        _check_image_values(data, ipath, problems)
                    del data
        if label_ok:
            lpath = Path(label_path)
            lab = _load_header(lpath, problems)
            if lab is not None:
                lshape = tuple(int(s) for s in lab.shape)
                if len(lshape) == 4 and lshape[3] == 1:
                    lshape = lshape[:3]
                if spatial is not None and lshape != tuple(spatial):
                    problems.append(f"{lpath}: label shape {lshape} differs from image shape {tuple(spatial)}")
                elif spatial is not None and image_affine is not None:
                    laff = np.asarray(lab.affine, dtype=np.float64)
                    if not np.allclose(laff, image_affine, atol=AFFINE_ATOL, rtol=0.0):
                        diff = float(np.max(np.abs(laff - image_affine)))
                        problems.append(
                            f"{lpath}: label affine differs from the image affine (max difference {diff:.4g})"
                        )
                if expect_3d and len(lshape) < 3:
                    problems.append(f"{lpath}: {len(lshape)}D label (shape {lshape}) where a 3D volume is expected")
                ldata = _read_data(lab, lpath, problems, 0 if len(lab.shape) == 4 else None)
                if ldata is not None and num_classes is not None:
                    _check_label_values(ldata, lpath, problems, int(num_classes))
    if problems:
        raise DataCheckError(problems, header=f"data check of {len(entries)} {name} failed")
