"""Deterministic per-volume pre-processing (files -> cached ``1,H,W,D`` volumes), built from MONAI transforms.

Chain returned by :func:`volume_transforms` (paper, section D: resample in-plane to 1.0 x 1.0 mm, per-scan 1%/99%
percentile normalisation, 384 x 384 in-plane; random 224 x 224 crops are taken later, per slice):

1. ``LoadImaged`` (nibabel; meta data kept, image ``float32``),
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

The acquisition slice axis is the last stored spatial axis of the file (NIfTI axis 2, as in ACDC, the Decathlon and
PROMISE12). :class:`SliceLastOrientation` keeps it last and points it along the positive direction of the world
axis it is closest to; the two in-plane axes are ordered by their closest world axes (R-L before A-P before S-I)
and pointed positive (R, A, S for nibabel's RAS+ world). E.g. an axial volume stored as LPS becomes RAS, a volume
stored as PLS becomes RAS too; a coronal one (in-plane L-R and S-I, slices along A-P) becomes RSA.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    InvertibleTransform,
    LoadImaged,
    MapTransform,
    Orientation,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.transforms.spatial.functional import orientation
from monai.utils import convert_data_type

__all__ = [
    "KeySafeSpacingd",
    "SelectChanneld",
    "SliceLastOrientation",
    "SliceLastOrientationd",
    "make_volume_dataset",
    "slice_last_ornt",
    "volume_transforms",
]


def slice_last_ornt(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform (``ornt_transform``) taking a 3D volume with ``affine`` to the canonical
    slice-last orientation described in the module docstring."""
    src = nib.io_orientation(to_affine_nd(3, np.asarray(affine, dtype=np.float64)))
    if np.isnan(src).any():
        raise ValueError(f"affine has no valid orientation (degenerate axes):\n{np.asarray(affine)}")
    in_plane = sorted(src[:2, 0].tolist())
    dst = np.array([[in_plane[0], 1.0], [in_plane[1], 1.0], [src[2, 0], 1.0]])
    return nib.orientations.ornt_transform(src, dst)


class SliceLastOrientation(Orientation):
    """MONAI ``Orientation`` whose target axis codes are computed per volume: in-plane axes canonical, the
    acquisition slice axis (last stored axis) kept last. Inverted by MONAI's ``Orientation.inverse``.

    Args:
        lazy: whether to execute lazily (MONAI lazy resampling).

    Raises:
        ValueError: when the input does not have exactly 3 spatial dimensions (``C,H,W,D``).

    Example:
        >>> SliceLastOrientation()(image)  # image: MetaTensor 1,H,W,D  # doctest: +SKIP
    """

    def __init__(self, lazy: bool = False) -> None:
        super().__init__(axcodes=None, as_closest_canonical=True, labels=None, lazy=lazy)

    def __call__(self, data_array: torch.Tensor, lazy: bool | None = None) -> torch.Tensor:
        spatial_shape = data_array.peek_pending_shape() if isinstance(data_array, MetaTensor) else data_array.shape[1:]
        if len(spatial_shape) != 3:
            raise ValueError(f"expected a channel-first 3D volume C,H,W,D, got shape {tuple(data_array.shape)}.")
        if not isinstance(data_array, MetaTensor):
            raise ValueError("SliceLastOrientation needs a MetaTensor with an affine (load with LoadImaged).")
        affine_np, *_ = convert_data_type(data_array.peek_pending_affine(), np.ndarray)
        spatial_ornt = slice_last_ornt(affine_np)
        lazy_ = self.lazy if lazy is None else lazy
        return orientation(data_array, affine_np, spatial_ornt, lazy=lazy_, transform_info=self.get_transform_info())


class SliceLastOrientationd(MapTransform, InvertibleTransform):
    """Dictionary wrapper of :class:`SliceLastOrientation` (each key reoriented from its own affine; image and
    label affines agree after :func:`~bundle.data.checks.check_entries`)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ornt_transform = SliceLastOrientation()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.ornt_transform(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.ornt_transform.inverse(d[key])
        return d


class SelectChanneld(MapTransform):
    """Keep one channel of channel-first images (``C,H,W,D -> 1,H,W,D``), e.g. T2 of a multi-parametric MRI.

    Args:
        keys: keys of the images.
        channel: channel index to keep; ``None`` requires single-channel input (and passes it through).
        allow_missing_keys: don't raise for missing keys.

    Raises:
        ValueError: when ``channel`` is out of range, or is ``None`` for a multi-channel image.
    """

    def __init__(self, keys: KeysCollection, channel: int | None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channel = channel

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            n = img.shape[0]
            name = img.meta.get("filename_or_obj", key) if isinstance(img, MetaTensor) else key
            if self.channel is None:
                if n != 1:
                    raise ValueError(f"{name}: {n}-channel image (shape {tuple(img.shape)}); choose one with channel=")
                continue
            if not 0 <= self.channel < n:
                raise ValueError(f"{name}: channel {self.channel} requested but the image has {n} channel(s).")
            d[key] = img[self.channel : self.channel + 1]
        return d


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
        LoadImaged(keys=keys, reader="NibabelReader", image_only=False, dtype=np.float32, allow_missing_keys=amk),
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


class KeySafeSpacingd(Spacingd):
    """:class:`monai.transforms.Spacingd` that leaves alone the items named ``<key>_*`` that are not meta dicts.

    After resampling, MONAI 1.6's ``Spacingd`` updates *every* item whose name starts with ``<key>_`` as if it were
    a meta dict; MONAI Label puts the input's path as the string ``image_path`` into the data, and the update fails
    (``'str' object has no attribute 'update'``). Such items are set aside during the call and put back unchanged.
    Same arguments, same result and the same inverse as ``Spacingd``.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        prefixes = tuple(f"{key}_" for key in self.keys)
        aside = {k: v for k, v in data.items() if isinstance(k, str) and k.startswith(prefixes)
                 and not isinstance(v, Mapping)}
        out = super().__call__({k: v for k, v in data.items() if k not in aside}, lazy=lazy)
        out.update(aside)
        return out


def make_volume_dataset(
    entries: Sequence[Mapping[str, Any]],
    keys: Sequence[str] = ("image",),
    cache_rate: float = 1.0,
    num_workers: int | None = 1,
    progress: bool = False,
    **transform_kwargs: Any,
) -> CacheDataset:
    """MONAI ``CacheDataset`` of pre-processed volumes: each file is decoded and pre-processed once per run.

    Args:
        entries: datalist entries (absolute paths), e.g. from :func:`bundle.data.datalist.load_split`.
        keys: keys to load (``("image",)`` for pre-training, ``("image", "label")`` for fine-tuning/evaluation).
        cache_rate: fraction of the volumes cached (1.0: all).
        num_workers: threads used to fill the cache.
        progress: show a progress bar while caching.
        **transform_kwargs: forwarded to :func:`volume_transforms` (``pixdim``, ``spatial_size``, ``channel``, ...).
    """
    transform = Compose(volume_transforms(keys=tuple(keys), **transform_kwargs))
    return CacheDataset(
        data=[dict(e) for e in entries],
        transform=transform,
        cache_rate=cache_rate,
        num_workers=num_workers,
        progress=progress,
        copy_cache=False,
    )
