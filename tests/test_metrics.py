"""3D per-scan metrics on hand-made label maps with answers worked out by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

from bundle.metrics import dice_per_class, foreground_metrics, scan_metrics, summarize, surface_distances

# ------------------------------------------------------------------------------------------------------------ Dice


def _two_cube_scan() -> tuple[np.ndarray, np.ndarray]:
    pred = np.zeros((10, 10, 10), dtype=np.int64)
    label = np.zeros_like(pred)
    pred[0:4, 0:4, 0:4] = 1  # 64 voxels
    label[2:6, 0:4, 0:4] = 1  # 64 voxels, overlap [2:4] x 4 x 4 = 32
    pred[6:9, 6:9, 6:9] = 2  # 27 voxels
    label[6:9, 6:9, 6:8] = 2  # 18 voxels, all inside the prediction
    return pred, label  # class 3 absent from both


def test_dice_two_cubes_exact() -> None:
    pred, label = _two_cube_scan()
    # class 1: 2*32/(64+64) = 0.5 ; class 2: 2*18/(27+18) = 0.8 ; class 3: both empty -> 1
    np.testing.assert_allclose(dice_per_class(pred, label, num_classes=4), [0.5, 0.8, 1.0], rtol=0, atol=1e-12)
    # background: |P0| = 1000-91 = 909, |G0| = 1000-82 = 918, foreground union = 96 + 27 -> |P0 & G0| = 877
    with_bg = dice_per_class(torch.from_numpy(pred), torch.from_numpy(label), 4, include_background=True)
    np.testing.assert_allclose(with_bg, [2 * 877 / (909 + 918), 0.5, 0.8, 1.0], rtol=0, atol=1e-12)
    assert with_bg.dtype == np.float64


def test_dice_one_empty_and_float_labels() -> None:
    pred = np.zeros((4, 4, 3), dtype=np.float32)  # nibabel-style float label map
    label = np.zeros((4, 4, 3), dtype=np.uint8)
    pred[1, 1, 1] = 1.0  # class 1 only predicted, class 2 only in the ground truth
    label[2, 2, 2] = 2
    np.testing.assert_array_equal(dice_per_class(pred, label, num_classes=3), [0.0, 0.0])


def test_dice_bad_input() -> None:
    good = np.zeros((4, 4, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="same shape"):
        dice_per_class(good, np.zeros((4, 4, 2), dtype=np.int64), 3)
    with pytest.raises(ValueError, match=r"label values must lie in \[0, 2\]"):
        dice_per_class(good, good + 3, 3)
    with pytest.raises(ValueError, match="integer class indices"):
        dice_per_class(good + 0.5, good, 3)
    with pytest.raises(ValueError, match="num_classes"):
        dice_per_class(good, good, 0)


# ------------------------------------------------------------------------------------------- surface distances


def _voxels(shape: tuple[int, ...], *points: tuple[int, ...]) -> np.ndarray:
    volume = np.zeros(shape, dtype=np.int64)
    for point in points:
        volume[point] = 1
    return volume


@pytest.mark.parametrize("k", [1, 2, 3])
def test_single_voxel_shift_along_slice_axis(k: int) -> None:
    # one voxel each, k slices apart on the last (slice) axis at 5 mm: every surface distance is 5k in both directions
    pred = _voxels((5, 5, 8), (2, 2, 1))
    label = _voxels((5, 5, 8), (2, 2, 1 + k))
    out = surface_distances(pred, label, num_classes=2, spacing=(0.7, 0.7, 5.0))
    assert out["hd95"][0] == pytest.approx(5.0 * k)
    assert out["asd"][0] == pytest.approx(5.0 * k)
    swapped = surface_distances(label, pred, num_classes=2, spacing=(0.7, 0.7, 5.0))
    assert swapped["hd95"][0] == pytest.approx(5.0 * k) and swapped["asd"][0] == pytest.approx(5.0 * k)


def test_spacing_is_anisotropic() -> None:
    shape = (6, 6, 6)
    in_plane = surface_distances(_voxels(shape, (1, 2, 2)), _voxels(shape, (3, 2, 2)), 2, spacing=(0.5, 1.0, 5.0))
    assert in_plane["hd95"][0] == pytest.approx(1.0)  # 2 voxels * 0.5 mm
    through = surface_distances(_voxels(shape, (2, 2, 1)), _voxels(shape, (2, 2, 3)), 2, spacing=(0.5, 1.0, 5.0))
    assert through["hd95"][0] == pytest.approx(10.0)  # 2 slices * 5 mm
    diagonal = surface_distances(_voxels(shape, (1, 2, 1)), _voxels(shape, (2, 2, 2)), 2, spacing=(3.0, 1.0, 4.0))
    assert diagonal["asd"][0] == pytest.approx(5.0)  # sqrt(3^2 + 4^2)
    isotropic = surface_distances(_voxels(shape, (2, 2, 1)), _voxels(shape, (2, 2, 3)), 2, spacing=1.0)
    assert isotropic["hd95"][0] == pytest.approx(2.0)


def test_percentile_and_pooled_mean_conventions() -> None:
    # pred: one voxel at slice 1; label: slices 3 and 5 (10 and 20 mm away at 5 mm spacing)
    pred = _voxels((5, 5, 8), (2, 2, 1))
    label = _voxels((5, 5, 8), (2, 2, 3), (2, 2, 5))
    out = surface_distances(pred, label, 2, spacing=(1.0, 1.0, 5.0))
    # pred->gt: [10]; gt->pred: [10, 20] -> P95 = 10 + 0.95 * 10 = 19.5; hd95 = max(10, 19.5)
    assert out["hd95"][0] == pytest.approx(19.5)
    # pooled mean over both surfaces: (10 + 10 + 20) / 3 (not the mean of the two directed means, 12.5)
    assert out["asd"][0] == pytest.approx(40.0 / 3.0)


def test_cubes_shifted_through_slices() -> None:
    # 3x3x3 cubes, the label 3 slices further. Surface = 26 voxels per cube (all but the centre): per direction,
    # 9 voxels at 3 slices (the far face), 8 at 2 (the ring), 9 at 1 (the near face) from the other cube's face.
    pred = np.zeros((5, 5, 10), dtype=np.int64)
    label = np.zeros_like(pred)
    pred[1:4, 1:4, 1:4] = 1
    label[1:4, 1:4, 4:7] = 1
    out = surface_distances(pred, label, 2, spacing=(0.6, 0.6, 5.0))
    assert out["asd"][0] == pytest.approx((9 * 15 + 8 * 10 + 9 * 5) / 26)  # = 10 mm
    assert out["hd95"][0] == pytest.approx(15.0)  # positions 23..25 of 26 sorted values are all 15
    unit = surface_distances(pred, label, 2, spacing=1.0)
    assert unit["asd"][0] == pytest.approx(2.0) and unit["hd95"][0] == pytest.approx(3.0)


def test_surface_distance_empty_cases() -> None:
    shape = (4, 4, 4)
    empty = np.zeros(shape, dtype=np.int64)
    one = _voxels(shape, (1, 1, 1))
    both_empty = surface_distances(empty, empty, 2, spacing=(1.0, 1.0, 5.0))
    assert both_empty["hd95"][0] == 0.0 and both_empty["asd"][0] == 0.0
    for pred, label in ((empty, one), (one, empty)):
        out = surface_distances(pred, label, 2, spacing=(1.0, 1.0, 5.0))
        assert math.isnan(out["hd95"][0]) and math.isnan(out["asd"][0])
    identical = surface_distances(np.ones(shape, dtype=np.int64), np.ones(shape, dtype=np.int64), 2, spacing=2.0)
    assert identical["hd95"][0] == 0.0 and identical["asd"][0] == 0.0


def test_surface_distance_bad_spacing() -> None:
    one = _voxels((4, 4, 4), (1, 1, 1))
    with pytest.raises(ValueError, match="one entry per image axis"):
        surface_distances(one, one, 2, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        surface_distances(one, one, 2, spacing=(1.0, 0.0, 1.0))


def test_matches_monai_on_random_blobs() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, size=(12, 12, 6))
    label = np.where(rng.random((12, 12, 6)) < 0.7, pred, rng.integers(0, 3, size=(12, 12, 6)))
    spacing = (0.7, 0.7, 4.0)
    ours = surface_distances(pred, label, 3, spacing=spacing)
    one_hot_pred = torch.nn.functional.one_hot(torch.from_numpy(pred), 3).permute(3, 0, 1, 2)[None].float()
    one_hot_label = torch.nn.functional.one_hot(torch.from_numpy(label), 3).permute(3, 0, 1, 2)[None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(one_hot_pred, one_hot_label, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(one_hot_pred, one_hot_label, symmetric=True, spacing=spacing)
    np.testing.assert_allclose(ours["hd95"], hd95[0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours["asd"], asd[0].numpy(), rtol=1e-5)


def test_scan_metrics_row() -> None:
    pred, label = _two_cube_scan()
    row = scan_metrics(pred, label, 4, spacing=(1.0, 1.0, 1.0))
    assert set(row) == {"dice", "hd95", "asd"} and all(v.shape == (3,) for v in row.values())
    np.testing.assert_allclose(row["dice"], [0.5, 0.8, 1.0])
    assert row["hd95"][2] == 0.0  # class 3 empty in both


def test_foreground_metrics_score_the_union_of_the_classes() -> None:
    pred, label = _two_cube_scan()
    # union: pred 64 + 27 = 91 voxels, label 64 + 18 = 82, overlap 32 + 18 = 50 -> 2*50/173
    row = foreground_metrics(pred, label, 4, spacing=1.0)
    assert set(row) == {"dice", "hd95", "asd"} and all(v.shape == (1,) for v in row.values())
    np.testing.assert_allclose(row["dice"], [100 / 173])


def test_foreground_metrics_ignore_which_foreground_class_was_given() -> None:
    label = np.zeros((8, 8, 4), dtype=np.int64)
    label[1:4, 1:6, :] = 1  # a "peripheral zone"
    label[4:7, 1:6, :] = 2  # the "transition zone" beside it
    swapped = np.where(label > 0, 3 - label, 0)  # every zone voxel found, each given the other zone
    np.testing.assert_allclose(dice_per_class(swapped, label, 3), [0.0, 0.0])
    row = foreground_metrics(swapped, label, 3, spacing=(0.6, 0.6, 4.0))
    np.testing.assert_allclose(row["dice"], [1.0])
    np.testing.assert_allclose(row["hd95"], [0.0])
    with pytest.raises(ValueError, match="values must lie in"):
        foreground_metrics(swapped, label, 2, spacing=1.0)


# ------------------------------------------------------------------------------------------------------ summary


def test_summarize_nan_aware() -> None:
    nan = float("nan")
    rows = [
        {"scan": "a", "dice": [1.0, 0.5], "hd95": [nan, 2.0]},
        {"scan": "b", "dice": [0.5, 0.5], "hd95": [4.0, 6.0]},
        {"scan": "c", "dice": np.array([0.0, 0.5]), "hd95": np.array([nan, nan])},
    ]
    out = summarize(rows, class_names=["PZ", "TZ"])
    assert set(out) == {"dice", "hd95"}
    dice = out["dice"]
    assert dice["per_class"]["PZ"] == pytest.approx({"mean": 0.5, "std": math.sqrt(1 / 6), "n": 3})
    assert dice["per_class"]["TZ"] == pytest.approx({"mean": 0.5, "std": 0.0, "n": 3})
    # scan class-means 0.75, 0.5, 0.25
    assert dice["mean"] == pytest.approx(0.5) and dice["std"] == pytest.approx(math.sqrt(1 / 24)) and dice["n"] == 3
    hd95 = out["hd95"]
    assert hd95["per_class"]["PZ"] == pytest.approx({"mean": 4.0, "std": 0.0, "n": 1})
    assert hd95["per_class"]["TZ"] == pytest.approx({"mean": 4.0, "std": 2.0, "n": 2})
    # scan class-means 2 (a, PZ nan), 5 (b), nan (c)
    assert hd95["mean"] == pytest.approx(4.0) and hd95["std"] == pytest.approx(1.5) and hd95["n"] == 2
    assert set(summarize(rows)["dice"]["per_class"]) == {"0", "1"}


def test_summarize_all_nan_and_errors() -> None:
    out = summarize([{"asd": [float("nan")]}])
    assert math.isnan(out["asd"]["mean"]) and out["asd"]["n"] == 0
    with pytest.raises(ValueError, match="empty"):
        summarize([])
    with pytest.raises(ValueError, match="same length"):
        summarize([{"dice": [1.0, 0.5]}, {"dice": [1.0]}])
    with pytest.raises(ValueError, match="has no 'dice'"):
        summarize([{"dice": [1.0]}, {"asd": [1.0]}])
    with pytest.raises(ValueError, match="class_names"):
        summarize([{"dice": [1.0]}], class_names=["a", "b"])
