"""Render docs/synthetic_examples.png: base / mid / apex slices of a few synthetic patients, ED and ES.

Layout: one row pair per patient (ED on top, ES below); columns base, mid, apex as acquired, then the same three
with the ACDC label contours (red LV cavity, green myocardium, blue RV cavity). Each tile is the whole field of
view, padded to a square, grey levels from the patient's ED 0.5-99.7th percentiles. The default patients are one
each of the NOR, DCM, HCM and RV groups. No matplotlib: the grid is
composed with numpy and scikit-image and written as a palette PNG with Pillow (a scikit-image dependency).

Usage::

    python -m scripts.render_synthetic_examples --output docs/synthetic_examples.png --patients "[1,2,3,5]"
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries
from skimage.transform import resize

from bundle.data.synthetic import LABELS, generate_patient
from scripts.fire_cli import fire_main

_GREY_LEVELS = 248
_COLOURS = {LABELS["lv"]: (230, 40, 40), LABELS["myocardium"]: (40, 220, 60), LABELS["rv"]: (60, 120, 255)}
_GAP = 4


def _tile(image: np.ndarray, label: np.ndarray | None, lo: float, hi: float, size: int) -> np.ndarray:
    """Palette-index tile (size x size): grey levels 0.._GREY_LEVELS-1, label contours above them."""
    grey = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    side = max(image.shape)
    pad = [((side - n) // 2, side - n - (side - n) // 2) for n in image.shape]
    grey = np.pad(grey, pad)
    out = np.rint(resize(grey, (size, size), order=1, anti_aliasing=True) * (_GREY_LEVELS - 1)).astype(np.uint8)
    if label is not None:
        lab = resize(np.pad(label, pad), (size, size), order=0, preserve_range=True, anti_aliasing=False)
        for index, value in enumerate(_COLOURS):
            edge = find_boundaries(lab == value, mode="inner")
            out[edge] = _GREY_LEVELS + index
    return out


def render(patients: Sequence[int], seed: int = 0, tile: int = 136) -> Image.Image:
    """Compose the example grid for the given 1-based patient numbers."""
    rows = []
    for index in patients:
        patient = generate_patient(int(index), seed)
        lo, hi = np.percentile(patient["image_ed"], [0.5, 99.7])
        nz = patient["image_ed"].shape[2]
        slices = (0, nz // 2, nz - 1)
        for phase in ("ed", "es"):
            image, label = patient[f"image_{phase}"], patient[f"label_{phase}"]
            tiles = [_tile(image[:, :, k], None, lo, hi, tile) for k in slices]
            tiles += [_tile(image[:, :, k], label[:, :, k], lo, hi, tile) for k in slices]
            row = np.full((tile, len(tiles) * (tile + _GAP) - _GAP), _GREY_LEVELS + len(_COLOURS), np.uint8)
            for column, t in enumerate(tiles):
                row[:, column * (tile + _GAP): column * (tile + _GAP) + tile] = t
            rows.append(row)
        rows.append(np.full((_GAP, rows[-1].shape[1]), _GREY_LEVELS + len(_COLOURS), np.uint8))
    grid = np.concatenate(rows[:-1], axis=0)
    palette = [c for g in np.linspace(0, 255, _GREY_LEVELS).round().astype(int) for c in (g, g, g)]
    for colour in _COLOURS.values():
        palette += list(colour)
    palette += [255, 255, 255]  # separators
    picture = Image.fromarray(grid, mode="P")
    picture.putpalette(palette)
    return picture


def main(output: str = "docs/synthetic_examples.png", patients: Sequence[int] = (1, 2, 3, 5), seed: int = 0,
         tile: int = 136) -> None:
    """Write the example figure to ``output`` (PNG).

    Args:
        output: PNG file to write.
        patients: synthetic patient indices shown, one row each.
        seed: seed of the synthetic dataset.
        tile: size in pixels of each picture.
    """
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    render(patients, seed, tile).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    fire_main(main)
