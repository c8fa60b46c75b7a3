"""What the standalone configs take from ``configs/train.json``: the volume pre-processing it lists.

``configs/train.json`` lists the pre-processing chain transform by transform (``train#deterministic_transforms``);
its overlays (evaluation, Mean Teacher, multi-GPU) refer to that id directly. ``configs/pretrain.json`` and
``configs/inference.json`` run without train.json (MONAI Label reads inference.json alone), and MONAI's
``%file#id`` macros resolve file names against the working directory rather than the bundle, so they call
:func:`volume_transforms`, which instantiates the same list from the train.json of the bundle this package belongs
to (whatever the working directory or ``bundle_root``) with their values of the ids it uses. The chain has one
owner, train.json; its steps are described in :mod:`bundle.data.preprocessing`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from bundle.data.preprocessing import in_plane_pixdim, in_plane_size

__all__ = ["BUNDLE_ROOT", "PREPROCESSING_ID", "volume_transforms"]

#: the id of the listed chain in configs/train.json
PREPROCESSING_ID = "train#deterministic_transforms"
#: the root folder of the bundle this package belongs to (``<root>/bundle/configs.py``)
BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def volume_transforms(
    bundle_root: str | os.PathLike = BUNDLE_ROOT,
    pixdim: Sequence[float] = (1.0, 1.0),
    spatial_size: Sequence[int] = (384, 384),
    channel: int | None = None,
) -> list[Any]:
    """The volume pre-processing listed in ``<bundle_root>/configs/train.json``, with these values of its ids.

    Args:
        bundle_root: the root folder of the bundle whose train.json is read; default: this package's bundle.
        pixdim: in-plane spacing (mm) the volumes are resampled to; the slice axis keeps its spacing.
        spatial_size: in-plane size after symmetric pad/crop.
        channel: channel of a 4D multi-channel image to keep (``None`` for 3D images).

    Returns:
        new MONAI dictionary transforms producing ``image`` as a float32 MetaTensor ``1,H,W,D`` (and ``label`` the
        same way where the entry has one), ``H,W = spatial_size``, D the number of slices.

    Raises:
        FileNotFoundError: when ``bundle_root`` holds no ``configs/train.json``.
        ValueError: for a wrong ``pixdim`` or ``spatial_size`` (from :mod:`bundle.data.preprocessing`).

    Example:
        >>> Compose(volume_transforms(channel=0))({"image": "prostate_00.nii.gz"})  # doctest: +SKIP
    """
    in_plane_pixdim(pixdim), in_plane_size(spatial_size)  # the argument errors first, not wrapped by the parser
    config_file = Path(bundle_root) / "configs" / "train.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: bundle_root {str(bundle_root)!r} must be the bundle's root "
                                "folder, whose configs/train.json lists the pre-processing.")
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update({"pixdim": list(pixdim), "spatial_size": list(spatial_size), "channel": channel})
    return list(parser.get_parsed_content(PREPROCESSING_ID))
