"""The fine-tuning augmentation of configs/train.json (``train#random_transforms``): image and label move together,
labels keep their class values, intensity steps touch the image only, and every step can be switched off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from monai.utils import set_determinism

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4


def _random_transforms(**overrides: Any) -> Compose:
    parser = ConfigParser()
    parser.read_config(REPO / "configs" / "train.json")
    parser.update({"crop_size": [48, 48], "slices_per_volume": 1, **overrides})
    return Compose(parser.get_parsed_content("train#random_transforms"))


def _slice(transforms: Compose, volume: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one augmented slice of ``slices_per_volume=1`` (the crop step returns a list of samples)."""
    (out,) = transforms(volume)
    return {key: torch.as_tensor(out[key]) for key in ("image", "label")}


def _volume() -> dict[str, torch.Tensor]:
    """A 1 x 64 x 64 x 3 volume of nested rectangles whose image intensity is ``(class + 1) / 4``, so the label
    can be read back from the image wherever the image was only moved, not re-scaled."""
    label = torch.zeros(1, 64, 64, 3)
    label[:, 8:56, 10:54] = 1
    label[:, 16:46, 18:44] = 2
    label[:, 24:36, 26:34] = 3
    return {"image": (label + 1) / NUM_CLASSES, "label": label.clone()}


@pytest.mark.parametrize("seed", range(6))
def test_geometric_steps_move_image_and_label_together(seed: int) -> None:
    set_determinism(seed)
    out = _slice(_random_transforms(intensity_prob=0.0, affine_prob=1.0, elastic_prob=1.0), _volume())
    set_determinism(None)
    image, label = out["image"], out["label"]
    assert image.shape == label.shape == (1, 48, 48)
    assert set(torch.unique(label).tolist()) <= set(range(NUM_CLASSES))  # nearest: no blended class values
    inside = image > 0  # zero padding marks pixels moved in from outside the crop; class 0 has intensity 1/4
    # bilinear image vs nearest label differ only on class borders (0.95-0.98 agree here; an image-only affine: <0.89)
    image_class = torch.round(image * NUM_CLASSES - 1).clamp(0, NUM_CLASSES - 1)
    agree = (image_class[inside] == label[inside]).float().mean().item()
    assert agree > 0.93, f"image and label moved apart (agreement {agree:.3f})"


def test_intensity_steps_change_the_image_and_leave_the_label() -> None:
    set_determinism(0)
    still = _random_transforms(flip_prob=0.0, affine_prob=0.0, elastic_prob=0.0, intensity_prob=0.0)
    jitter = _random_transforms(flip_prob=0.0, affine_prob=0.0, elastic_prob=0.0, intensity_prob=1.0)
    set_determinism(0)
    plain = _slice(still, _volume())
    set_determinism(0)
    moved = _slice(jitter, _volume())
    set_determinism(None)
    torch.testing.assert_close(moved["label"], plain["label"])
    assert not torch.allclose(moved["image"], plain["image"])


def test_all_steps_off_leaves_the_values_of_the_volume() -> None:
    set_determinism(0)
    out = _slice(_random_transforms(flip_prob=0.0, affine_prob=0.0, elastic_prob=0.0, intensity_prob=0.0), _volume())
    set_determinism(None)
    torch.testing.assert_close(out["image"], (out["label"] + 1) / NUM_CLASSES)  # no interpolation, no jitter
