"""Per-volume MONAI dictionary transforms of the pre-processing chain (:mod:`bundle.data.preprocessing`).

- :class:`SelectChanneld`: one channel of a multi-channel image (e.g. T2 of the Decathlon prostate task).
- :class:`SliceLastOrientation` / :class:`SliceLastOrientationd` (with :func:`slice_last_ornt`): canonical
  in-plane orientation with the acquisition slice axis kept last.
- :class:`KeySafeSpacingd`: MONAI's ``Spacingd``, safe with non-dict ``<key>_*`` items (MONAI Label's
  ``image_path``).

The acquisition slice axis is the last stored spatial axis of the file (NIfTI axis 2, as in ACDC, the Decathlon and
PROMISE12). :class:`SliceLastOrientation` keeps it last and points it along the positive direction of the world
axis it is closest to; the two in-plane axes are ordered by their closest world axes (R-L before A-P before S-I)
and pointed positive (R, A, S for nibabel's RAS+ world). E.g. an axial volume stored as LPS becomes RAS, a volume
stored as PLS becomes RAS too; a coronal one (in-plane L-R and S-I, slices along A-P) becomes RSA.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import InvertibleTransform, MapTransform, Orientation, Spacingd
from monai.transforms.spatial.functional import orientation
from monai.utils import convert_data_type

__all__ = ["KeySafeSpacingd", "SelectChanneld", "SliceLastOrientation", "SliceLastOrientationd", "slice_last_ornt"]


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
