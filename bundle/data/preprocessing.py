"""Deterministic per-volume pre-processing (files -> ``1,H,W,D`` volumes): the readers and the in-plane arguments.

The chain itself is listed transform by transform in ``configs/train.json`` (``train#deterministic_transforms``,
the zoo's layout); the configs that run without train.json read it through :func:`bundle.configs.volume_transforms`.
Paper, section D: resample in-plane to 1.0 x 1.0 mm, per-scan 1%/99% percentile normalisation, 384 x 384 in-plane;
random 224 x 224 crops are taken later, per slice. The steps:

1. ``LoadImaged`` with a :class:`VolumeReader` (NIfTI with nibabel, NRRD with pynrrd, chosen by suffix, both with
   RAS affines; meta data kept, ``float32``); the image, and the label map where the entry has one,
2. ``EnsureChannelFirstd`` (``1,H,W,D``; a 4D multi-channel image becomes ``C,H,W,D``),
3. :class:`~bundle.transforms.SelectChanneld` (one channel of a 4D image, e.g. T2 = channel 0 of the Decathlon
   prostate task; label maps must be single-channel),
4. :class:`~bundle.transforms.SliceLastOrientationd`: canonical in-plane orientation with the acquisition slice
   axis kept last,
5. :class:`~bundle.transforms.KeySafeSpacingd`: in-plane ``pixdim`` (image bilinear, label nearest); the slice axis
   keeps its spacing (:func:`in_plane_pixdim`), so the number of slices is unchanged,
6. ``ScaleIntensityRangePercentilesd`` (image only): the 1st/99th percentiles of the scan map to 0/1, no clipping,
7. ``ResizeWithPadOrCropd``: symmetric zero-pad / centre-crop in-plane to ``spatial_size`` (:func:`in_plane_size`),
   slice axis untouched.

Orientation, spacing and pad/crop are invertible, so ``monai.transforms.Invertd`` maps a prediction made on the
pre-processed grid back to the original file's grid (shape and affine).
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
from monai.data import ImageReader, NibabelReader, NrrdReader
from monai.data.image_reader import NrrdImage
from monai.utils import ensure_tuple

__all__ = ["IMAGE_SUFFIXES", "NIFTI_SUFFIXES", "NRRD_SUFFIXES", "VolumeReader", "in_plane_pixdim", "in_plane_size"]

#: the file suffixes :class:`VolumeReader` reads: NIfTI, then NRRD
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd",)
IMAGE_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES


class VolumeReader(ImageReader):
    """The volumes' reader: NIfTI with MONAI's ``NibabelReader``, NRRD (as MONAI Label datastores also hold) with its
    ``NrrdReader``, chosen by the file's suffix.

    ``NrrdReader`` turns the LPS header into the RAS affine ``NibabelReader`` gives, so both formats take the same
    path. Given the two readers by name, ``LoadImaged`` would try them in turn on every file, logging "unable to
    load" for each file the first one cannot read and, for a broken file, reporting both readers' failures; this
    reader reads each file once, with the one reader its suffix names.

    Raises:
        ValueError: from :meth:`read`, naming the file, when its suffix is none of :data:`IMAGE_SUFFIXES`.

    Example::

        LoadImaged(keys=["image", "label"], reader=VolumeReader(), image_only=False)
    """

    def __init__(self) -> None:
        super().__init__()
        self._nifti = NibabelReader()
        self._nrrd = NrrdReader()

    def _reader_for(self, filename: Sequence[PathLike | str] | PathLike | str) -> ImageReader:
        names = [str(f) for f in ensure_tuple(filename)]
        for suffixes, reader in ((NIFTI_SUFFIXES, self._nifti), (NRRD_SUFFIXES, self._nrrd)):
            if all(n.endswith(suffixes) for n in names):
                return reader
        raise ValueError(f"{', '.join(names)}: not a volume this bundle reads; expected one of {IMAGE_SUFFIXES}.")

    def verify_suffix(self, filename: Sequence[PathLike | str] | PathLike | str) -> bool:
        try:
            self._reader_for(filename)
        except ValueError:
            return False
        return True

    def read(self, data: Sequence[PathLike | str] | PathLike | str, **kwargs: Any) -> Any:
        return self._reader_for(data).read(data, **kwargs)

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        first = img[0] if isinstance(img, (list, tuple)) else img
        return (self._nrrd if isinstance(first, NrrdImage) else self._nifti).get_data(img)


def in_plane_pixdim(pixdim: Sequence[float]) -> tuple[float, float, float]:
    """``Spacingd``'s ``pixdim`` for an in-plane spacing: ``(x, y, -1.0)``, the slice axis keeping its spacing.

    Raises:
        ValueError: unless ``pixdim`` is two positive spacings (mm).
    """
    if len(pixdim) != 2 or min(float(p) for p in pixdim) <= 0:
        raise ValueError(f"pixdim must be two positive in-plane spacings, got {pixdim}.")
    return float(pixdim[0]), float(pixdim[1]), -1.0


def in_plane_size(spatial_size: Sequence[int]) -> tuple[int, int, int]:
    """``ResizeWithPadOrCropd``'s ``spatial_size`` for an in-plane size: ``(h, w, -1)``, the slice axis untouched.

    Raises:
        ValueError: unless ``spatial_size`` is two positive sizes.
    """
    if len(spatial_size) != 2 or min(int(s) for s in spatial_size) <= 0:
        raise ValueError(f"spatial_size must be two positive in-plane sizes, got {spatial_size}.")
    return int(spatial_size[0]), int(spatial_size[1]), -1
