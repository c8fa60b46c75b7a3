"""Deterministic per-volume pre-processing (files -> ``1,H,W,D`` volumes), built from MONAI transforms.

Chain returned by :func:`volume_transforms` (paper, section D: resample in-plane to 1.0 x 1.0 mm, per-scan 1%/99%
percentile normalisation, 384 x 384 in-plane; random 224 x 224 crops are taken later, per slice):

1. ``LoadImaged`` (NIfTI with nibabel, NRRD with pynrrd, both with RAS affines; meta data kept, image
   ``float32``),
2. ``EnsureChannelFirstd`` (``1,H,W,D``; a 4D multi-channel image becomes ``C,H,W,D``),
3. :class:`SelectChanneld` (one channel of a 4D image, e.g. T2 = channel 0 of the Decathlon prostate task),
4. :class:`SliceLastOrientationd`: canonical in-plane orientation with the acquisition slice axis kept last,
5. ``Spacingd``: in-plane ``pixdim`` (image bilinear, label nearest); the slice axis keeps its spacing, so the
   number of slices is unchanged,
6. ``ScaleIntensityRangePercentilesd`` (image only): ``lower``/``upper`` percentiles of the scan map to 0/1,
   no clipping,
7. ``ResizeWithPadOrCropd``: symmetric zero-pad / centre-crop in-plane to ``spatial_size``, slice axis untouched.

Orientation, spacing and pad/crop are invertible, so ``monai.transforms.Invertd`` maps a prediction made on the
pre-processed grid back to the original file's grid (shape and affine).

The custom steps (3-5) are in :mod:`bundle.transforms.volume`, which also says how the slice axis is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
)

from bundle.transforms.volume import KeySafeSpacingd, SelectChanneld, SliceLastOrientationd

__all__ = ["IMAGE_READERS", "IMAGE_SUFFIXES", "volume_transforms"]

#: MONAI readers of the volumes, chosen by file suffix: NIfTI, and NRRD as MONAI Label datastores also hold (MONAI's
#: NrrdReader turns the LPS header into the RAS affine NibabelReader gives, so both formats take the same path)
IMAGE_READERS = ("NibabelReader", "NrrdReader")
#: the file suffixes those readers read
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd")


def volume_transforms(
    keys: Sequence[str] = ("image", "label"),
    pixdim: Sequence[float] = (1.0, 1.0),
    spatial_size: Sequence[int] = (384, 384),
    channel: int | None = None,
    lower: float = 1.0,
    upper: float = 99.0,
    image_key: str = "image",
    allow_missing_keys: bool = False,
) -> list[MapTransform]:
    """The deterministic pre-processing chain (see the module docstring), as a list usable from configs and Python.

    Args:
        keys: keys to load; ``image_key`` is the image, any other key is a label map (nearest interpolation,
            not normalised).
        pixdim: target in-plane spacing (mm) of the two in-plane axes; the slice axis keeps its spacing.
        spatial_size: in-plane size after symmetric pad/crop.
        channel: channel of a 4D multi-channel image to keep (``None`` for 3D images).
        lower: lower intensity percentile mapped to 0.
        upper: upper intensity percentile mapped to 1.
        image_key: which key is the image.
        allow_missing_keys: let entries lack some keys (e.g. unlabeled scans).

    Returns:
        transforms producing ``image`` as a float32 MetaTensor ``1,H,W,D`` with ``H,W = spatial_size`` and D the
        number of slices, and each label as ``1,H,W,D``.

    Raises:
        ValueError: for a wrong ``pixdim``/``spatial_size`` length or non-positive value, or percentiles outside
            ``0 <= lower < upper <= 100``.

    Example:
        >>> Compose(volume_transforms(keys=("image",), channel=0))({"image": "prostate_00.nii.gz"})  # doctest: +SKIP
    """
    keys = tuple(keys)
    if image_key not in keys:
        raise ValueError(f"image_key {image_key!r} must be one of keys {keys}.")
    if len(pixdim) != 2 or min(float(p) for p in pixdim) <= 0:
        raise ValueError(f"pixdim must be two positive in-plane spacings, got {pixdim}.")
    if len(spatial_size) != 2 or min(int(s) for s in spatial_size) <= 0:
        raise ValueError(f"spatial_size must be two positive in-plane sizes, got {spatial_size}.")
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}.")
    label_keys = tuple(k for k in keys if k != image_key)
    modes = tuple("bilinear" if k == image_key else "nearest" for k in keys)
    amk = allow_missing_keys
    select: list[MapTransform] = [SelectChanneld(keys=image_key, channel=channel, allow_missing_keys=amk)]
    if label_keys:  # label maps must be single-channel
        select.append(SelectChanneld(keys=label_keys, channel=None, allow_missing_keys=True))
    return [
        LoadImaged(keys=keys, reader=IMAGE_READERS, image_only=False, dtype=np.float32, allow_missing_keys=amk),
        EnsureChannelFirstd(keys=keys, allow_missing_keys=amk),
        *select,
        SliceLastOrientationd(keys=keys, allow_missing_keys=amk),
        KeySafeSpacingd(
            keys=keys,
            pixdim=(float(pixdim[0]), float(pixdim[1]), -1.0),  # non-positive: keep the slice spacing
            mode=modes,
            padding_mode="zeros",
            dtype=np.float32,
            allow_missing_keys=amk,
        ),
        ScaleIntensityRangePercentilesd(
            keys=image_key, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=False, relative=False
        ),
        ResizeWithPadOrCropd(
            keys=keys, spatial_size=(int(spatial_size[0]), int(spatial_size[1]), -1), allow_missing_keys=amk
        ),
    ]
