"""The bad-input catalogue: every case gives one DataCheckError whose message names the file and the problem."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundle.data.checks import DataCheckError, check_entries
from bundle.data.datalist import DatalistOptions, build_datalist, load_split, prepare_datalist
from bundle.data.splits import choose_labeled

SHAPE = (16, 12, 4)
AFFINE = np.diag([1.25, 1.25, 8.0, 1.0])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _pair(tmp_path: Path, name: str = "a", image: np.ndarray | None = None, label: np.ndarray | None = None) -> dict:
    rng = np.random.default_rng(0)
    img = rng.uniform(1.0, 50.0, SHAPE).astype(np.float32) if image is None else image
    lab = rng.integers(0, 3, SHAPE).astype(np.uint8) if label is None else label
    return {
        "image": _save(tmp_path / f"{name}.nii.gz", img),
        "label": _save(tmp_path / f"{name}_gt.nii.gz", lab),
        "scan_id": name,
    }


def _problems(entries: list[dict], **kwargs) -> list[str]:
    with pytest.raises(DataCheckError) as err:
        check_entries(entries, **{"num_classes": 3, **kwargs})
    assert isinstance(err.value, ValueError)
    return err.value.problems


def test_clean_data_passes(tmp_path: Path) -> None:
    check_entries([_pair(tmp_path, "a"), _pair(tmp_path, "b")], num_classes=3)


def test_missing_file(tmp_path: Path) -> None:
    e = _pair(tmp_path)
    Path(e["label"]).unlink()
    assert _problems([e]) == [f"{e['label']}: missing label file (no such file)"]
    e2 = {"image": str(tmp_path / "nope.nii.gz"), "label": e["image"], "scan_id": "n"}
    assert _problems([e2])[0] == f"{e2['image']}: missing image file (no such file)"


def test_symlink_loop_directory_and_unreadable_file_are_named_as_such(tmp_path: Path, monkeypatch) -> None:
    import os

    e = _pair(tmp_path)
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    assert _problems([{**e, "image": str(loop)}])[0] == (
        f"{loop}: image file is a broken or looping symbolic link (-> {loop})")
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    assert _problems([{**e, "image": str(folder)}])[0] == f"{folder}: image file is a directory, not a file"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == e["label"] else real_access(p, mode))
    assert _problems([e]) == [f"{e['label']}: label file is not readable (permission denied)"]  # root reads all


def test_corrupt_gzip_and_truncated_file(tmp_path: Path) -> None:
    e = _pair(tmp_path, "a")
    Path(e["image"]).write_bytes(b"this is not a nifti file at all")
    (problem,) = _problems([e])
    assert problem.startswith(f"{e['image']}: unreadable or corrupt")
    f = _pair(tmp_path, "b")
    raw = gzip.decompress(Path(f["image"]).read_bytes())
    Path(f["image"]).write_bytes(gzip.compress(raw[: len(raw) // 2]))  # valid header, half the voxels
    (problem,) = _problems([f])
    assert problem.startswith(f"{f['image']}: unreadable or corrupt voxel data")


def test_shape_mismatch(tmp_path: Path) -> None:
    e = _pair(tmp_path, label=np.zeros((16, 12, 5), np.uint8))
    assert _problems([e]) == [f"{e['label']}: label shape (16, 12, 5) differs from image shape (16, 12, 4)"]


def test_affine_mismatch(tmp_path: Path) -> None:
    e = _pair(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0
    _save(Path(e["label"]), np.zeros(SHAPE, np.uint8), shifted)
    (problem,) = _problems([e])
    assert problem.startswith(f"{e['label']}: label affine differs from the image affine (max difference 2")


def test_label_values_outside_classes(tmp_path: Path) -> None:
    lab = np.zeros(SHAPE, np.int16)
    lab[0, 0, 0], lab[1, 0, 0], lab[2, 0, 0] = 5, -1, 2
    e = _pair(tmp_path, label=lab)
    assert _problems([e]) == [f"{e['label']}: label values -1, 5 outside the declared classes 0..2 (num_classes=3)"]
    frac = np.zeros(SHAPE, np.float32)
    frac[0, 0, 0] = 0.5
    f = _pair(tmp_path, "b", label=frac)
    assert _problems([f]) == [f"{f['label']}: non-integer label values 0.5"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_voxels(tmp_path: Path, bad: float) -> None:
    img = np.random.default_rng(1).uniform(1, 2, SHAPE).astype(np.float32)
    img[3, 4, 1] = bad
    img[5, 4, 2] = bad
    e = _pair(tmp_path, image=img)
    assert _problems([e]) == [f"{e['image']}: 2 NaN/Inf voxels"]


@pytest.mark.parametrize(
    ("diagonal", "expected"),
    [
        ((1.25, 0.0, 8.0), "zero voxel spacing (1.25, 0, 8 mm; a degenerate affine)"),
        ((1.25, 1.25, 1e6), "implausible voxel spacing (1.25, 1.25, 1e+06 mm; expected 0.01 to 100 mm)"),
        ((1e-4, 1.25, 8.0), "implausible voxel spacing (0.0001, 1.25, 8 mm; expected 0.01 to 100 mm)"),
    ],
)
def test_zero_and_implausible_spacing(tmp_path: Path, diagonal: tuple[float, ...], expected: str) -> None:
    e = _pair(tmp_path)
    # written through the header's sform as a broken file has it (nibabel would not build such an image itself)
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header.set_sform(AFFINE, code=2)
    for row, value in zip(("srow_x", "srow_y", "srow_z"), diagonal, strict=True):
        srow = np.zeros(4)
        srow["xyz".index(row[-1])] = value
        header[row] = srow
    img = np.random.default_rng(0).uniform(1.0, 50.0, SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(img, None, header=header), e["image"])
    del e["label"]  # the image's own header is what is checked
    assert _problems([e], require_label=False) == [f"{e['image']}: {expected}"]


def test_unusual_spacing_is_a_warning_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    e = _pair(tmp_path)
    _save(Path(e["image"]), np.random.default_rng(0).uniform(1.0, 50.0, SHAPE).astype(np.float32),
          np.diag([1.25, 1.25, 30.0, 1.0]))
    del e["label"]
    with caplog.at_level("WARNING", logger="bundle.data.checks"):
        check_entries([e], num_classes=3, require_label=False)
    assert f"{e['image']}: unusual voxel spacing (1.25, 1.25, 30 mm)" in caplog.text


def test_2d_file_where_3d_expected(tmp_path: Path) -> None:
    e = _pair(tmp_path)
    _save(Path(e["image"]), np.random.default_rng(0).uniform(1, 2, (16, 12)).astype(np.float32))
    problems = _problems([e])
    assert problems[0] == f"{e['image']}: 2D image (shape (16, 12)) where a 3D volume is expected"
    single = _pair(tmp_path, "s", image=np.random.default_rng(0).uniform(1, 2, (16, 12, 1)).astype(np.float32))
    assert _problems([single], require_label=False)[0] == (
        f"{single['image']}: single-slice image (shape (16, 12, 1)) where a 3D volume is expected"
    )


def test_4d_image_needs_a_channel(tmp_path: Path) -> None:
    img4 = np.random.default_rng(0).uniform(1, 2, (*SHAPE, 2)).astype(np.float32)
    e = _pair(tmp_path, image=img4)
    assert _problems([e])[0].startswith(f"{e['image']}: 4D image with 2 channels")
    assert (
        _problems([e], channel=3)[0] == f"{e['image']}: channel 3 requested but the image has 2 (shape (16, 12, 4, 2))"
    )
    check_entries([e], num_classes=3, channel=1)


def test_constant_volume_and_constant_slice(tmp_path: Path) -> None:
    zero = _pair(tmp_path, "zero", image=np.zeros(SHAPE, np.float32))
    assert _problems([zero]) == [f"{zero['image']}: constant volume (every voxel = 0)"]
    img = np.random.default_rng(2).uniform(1, 2, SHAPE).astype(np.float32)
    img[..., 0] = 0.0
    img[..., 3] = 7.0
    sl = _pair(tmp_path, "slice", image=img)
    assert _problems([sl]) == [f"{sl['image']}: constant slice(s) along the slice axis (last axis) at index 0, 3 of 4"]


def test_empty_datalist_and_empty_split(tmp_path: Path) -> None:
    with pytest.raises(DataCheckError, match="no entries"):
        check_entries([], num_classes=3)
    root = tmp_path / "ds"
    for i in range(3):
        _pair(root / "images", f"c{i}")
    (root / "labels").mkdir()
    for i in range(3):
        Path(root / "images" / f"c{i}_gt.nii.gz").rename(root / "labels" / f"c{i}.nii.gz")
    path = prepare_datalist(root, tmp_path / "dl.json", num_val=1, num_test=0, labeled_counts=(1,), seeds=(0,))
    with pytest.raises(DataCheckError, match="empty 'test' split"):
        load_split(path, "test")
    empty = tmp_path / "empty.json"
    empty.write_text('{"training": []}')
    with pytest.raises(DataCheckError, match="empty datalist"):
        build_datalist(empty, DatalistOptions(kind="datalist"))


def test_more_labeled_scans_than_exist(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for i in range(4):
        e = _pair(root / "images", f"c{i}")
        Path(e["label"]).rename(root / "images" / f"c{i}_seg.nii.gz")
    with pytest.raises(DataCheckError, match="4 labeled scans requested but the training split has 2"):
        build_datalist(root / "images", DatalistOptions(kind="folder", num_val=1, num_test=1, labeled_counts=(1, 4)))
    with pytest.raises(DataCheckError, match="counts must be >= 1"):
        choose_labeled([{"scan_id": "a"}], seeds=[0], counts=[0])


def test_every_problem_is_listed_once_each(tmp_path: Path) -> None:
    good = _pair(tmp_path, "good")
    missing = {"image": str(tmp_path / "gone.nii.gz"), "label": good["label"], "scan_id": "gone"}
    zero = _pair(tmp_path, "zero", image=np.zeros(SHAPE, np.float32))
    bad_lab = _pair(tmp_path, "lab", label=np.full(SHAPE, 9, np.uint8))
    nolab = {"image": good["image"], "scan_id": "nolabel"}
    dup = dict(good)
    problems = _problems([good, missing, zero, bad_lab, nolab, dup])
    assert len(problems) == 5
    text = "\n".join(problems)
    for needle in (
        "gone.nii.gz: missing image file",
        "zero.nii.gz: constant volume",
        "lab_gt.nii.gz: label values 9",
        "entry has no 'label'",
        "duplicated scan_id 'good'",
    ):
        assert needle in text
    check_entries([nolab], num_classes=3, require_label=False)  # pre-training: labels optional


def test_label_check_needs_num_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        check_entries([_pair(tmp_path)], num_classes=None)
    with pytest.raises(ValueError, match="positive integer"):
        check_entries([_pair(tmp_path)], num_classes=0)


def test_existing_datalist_with_a_missing_file(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for i in range(4):
        e = _pair(root / "images", f"c{i}")
        Path(e["label"]).rename(root / "images" / f"c{i}_seg.nii.gz")
    out = prepare_datalist(root / "images", tmp_path / "dl.json", num_val=1, num_test=1, labeled_counts=(1,))
    (root / "images" / "c2_seg.nii.gz").unlink()
    with pytest.raises(DataCheckError, match=r"c2_seg.nii.gz: missing file \(listed in"):
        prepare_datalist(root / "images", out)
