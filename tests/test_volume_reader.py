"""The volumes' reader: each file read once, by the reader its suffix names, with the same RAS geometry."""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged

from bundle.data.preprocessing import VolumeReader


def _volume(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.arange(5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3)
    affine = np.array([[-1.5, 0, 0, 10.0], [0, 1.25, 0, -4.0], [0, 0, 8.0, 2.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "a.nii.gz"))
    return data, affine


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    out = LoadImaged(keys="image", reader=VolumeReader(), image_only=False)({"image": str(path)})
    return np.asarray(out["image"]), np.asarray(out["image"].affine)


def test_nifti_is_read_by_nibabel_without_trial_reads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, affine = _volume(tmp_path)
    with caplog.at_level(logging.DEBUG):
        array, got_affine = _load(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(got_affine, affine)
    assert not [r for r in caplog.records if "unable to load" in r.getMessage()]


def test_nrrd_gives_the_nifti_geometry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import nrrd

    data, affine = _volume(tmp_path)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # the same world geometry in NRRD's LPS convention
    nrrd.write(str(tmp_path / "a.nrrd"), data, {"space": "left-posterior-superior",
                                                "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]})
    with caplog.at_level(logging.DEBUG):
        array, got_affine = _load(tmp_path / "a.nrrd")
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(got_affine, affine, atol=1e-6)
    assert not [r for r in caplog.records if "unable to load" in r.getMessage()]


def test_other_suffixes_are_named(tmp_path: Path) -> None:
    path = tmp_path / "scan.mha"
    path.write_bytes(b"not read")
    reader = VolumeReader()
    assert reader.verify_suffix(tmp_path / "a.nii") and reader.verify_suffix(tmp_path / "a.nrrd")
    assert not reader.verify_suffix(path)
    with pytest.raises(ValueError, match=r"scan\.mha: not a volume this bundle reads"):
        reader.read(path)
    with pytest.raises(RuntimeError, match=r"scan\.mha: not a volume this bundle reads"):
        _load(path)
