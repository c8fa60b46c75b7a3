"""Tests of the embedded synthetic ACDC-layout dataset (bundle.data.synthetic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

import bundle.data.synthetic as synthetic
import bundle.data.synthetic.writing as synthetic_writing
from bundle.data.synthetic import (
    GROUPS,
    LABELS,
    MANIFEST_NAME,
    TISSUES,
    generate_patient,
    generate_synthetic_acdc,
    patient_name,
)

NUM_PATIENTS = 3
SEED = 0
RV, MYO, LV = LABELS["rv"], LABELS["myocardium"], LABELS["lv"]


def _read_info(path: Path) -> dict[str, str]:
    """Naive ACDC Info.cfg reader: 'Key: value' per line."""
    info = {}
    for line in path.read_text().splitlines():
        key, value = line.split(":", 1)
        info[key.strip()] = value.strip()
    return info


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine, tuple(float(z) for z in image.header.get_zooms())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_acdc(tmp_path_factory.mktemp("synthetic") / "acdc", NUM_PATIENTS, SEED, num_workers=1)


@pytest.fixture(scope="module")
def volumes(dataset: Path) -> list[dict[str, Any]]:
    """Per patient: Info.cfg fields and the ED / ES images and labels read back from disk."""
    out = []
    for index in range(1, NUM_PATIENTS + 1):
        name = patient_name(index)
        info = _read_info(dataset / name / "Info.cfg")
        entry: dict[str, Any] = {"name": name, "info": info}
        for phase in ("ED", "ES"):
            stem = dataset / name / f"{name}_frame{int(info[phase]):02d}"
            entry[f"image_{phase}"], entry[f"image_affine_{phase}"], entry[f"zooms_{phase}"] = _load(
                Path(f"{stem}.nii.gz"))
            entry[f"label_{phase}"], entry[f"label_affine_{phase}"], _ = _load(Path(f"{stem}_gt.nii.gz"))
        out.append(entry)
    return out


def _all_files(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------- layout


def test_acdc_layout_and_info(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == [MANIFEST_NAME, "patient001", "patient002", "patient003"]
    for index in range(1, NUM_PATIENTS + 1):
        name = f"patient{index:03d}"
        info = _read_info(dataset / name / "Info.cfg")
        assert list(info) == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
        ed, es, nb = int(info["ED"]), int(info["ES"]), int(info["NbFrame"])
        assert ed == 1 and ed != es and 1 < es <= nb
        assert info["Group"] == GROUPS[(index - 1) % len(GROUPS)]
        assert 100.0 < float(info["Height"]) < 220.0 and 30.0 < float(info["Weight"]) < 150.0
        expected = {"Info.cfg"} | {f"{name}_frame{f:02d}{s}.nii.gz" for f in (ed, es) for s in ("", "_gt")}
        assert {p.name for p in (dataset / name).iterdir()} == expected
    manifest = json.loads((dataset / MANIFEST_NAME).read_text())
    assert (manifest["seed"], manifest["num_patients"]) == (SEED, NUM_PATIENTS)
    assert manifest["version"] == synthetic.SYNTHETIC_VERSION
    listed = {p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(manifest["files"]) == listed


def test_geometry_dtypes_and_spacing(volumes: list[dict[str, Any]]) -> None:
    shapes = set()
    for v in volumes:
        for phase in ("ED", "ES"):
            image, label = v[f"image_{phase}"], v[f"label_{phase}"]
            assert image.dtype == np.int16 and label.dtype == np.uint8
            assert image.shape == label.shape
            np.testing.assert_array_equal(v[f"image_affine_{phase}"], v[f"label_affine_{phase}"])
            nx, ny, nz = image.shape
            assert 192 <= nx <= 256 and 192 <= ny <= 256 and 6 <= nz <= 16  # slice axis last
            affine = v[f"image_affine_{phase}"]
            spacing = np.diag(affine)[:3]
            np.testing.assert_allclose(affine[:3, :3], np.diag(spacing))  # diagonal spacing, origin free
            np.testing.assert_allclose(v[f"zooms_{phase}"], spacing, rtol=1e-6)
            eps = 1e-4  # NIfTI stores float32
            assert spacing[0] == spacing[1] and 1.3 - eps <= spacing[0] <= 1.8 + eps
            assert 5.0 - eps <= spacing[2] <= 10.0 + eps and spacing[2] >= 3.0 * spacing[0] - eps
            assert image.min() >= 0 and 100 < np.percentile(image, 99) < 2000  # magnitudes in the hundreds
        assert v["image_ED"].shape == v["image_ES"].shape
        shapes.add(v["image_ED"].shape)
    assert len(shapes) == NUM_PATIENTS  # matrix and slice count vary per patient


# ---------------------------------------------------------------------------------------------------- anatomy


def test_label_values_and_classes_in_mid_slices(volumes: list[dict[str, Any]]) -> None:
    for v in volumes:
        for phase in ("ED", "ES"):
            label = v[f"label_{phase}"]
            assert set(np.unique(label)) <= {0, 1, 2, 3}
            nz = label.shape[2]
            for k in (nz // 2 - 1, nz // 2):  # the two slices around the middle
                present = set(np.unique(label[:, :, k]))
                assert {RV, MYO, LV} <= present, (v["name"], phase, k, present)


def test_lv_shrinks_toward_apex_and_rv_vanishes(volumes: list[dict[str, Any]]) -> None:
    for v in volumes:
        for phase in ("ED", "ES"):
            label = v[f"label_{phase}"]
            lv_area = (label == LV).sum(axis=(0, 1))
            rv_area = (label == RV).sum(axis=(0, 1))
            half = label.shape[2] // 2
            assert lv_area[:half].mean() > lv_area[-half:].mean()
            assert lv_area[-1] < 0.5 * lv_area.max()
            assert rv_area[-1] <= 0.05 * rv_area.max()
            # the heart is there on every slice: myocardium at least
            assert ((label == MYO).sum(axis=(0, 1)) > 0).all()


def test_systole_smaller_cavities_thicker_wall(volumes: list[dict[str, Any]]) -> None:
    for v in volumes:
        ed, es = v["label_ED"], v["label_ES"]
        assert (es == LV).sum() < (ed == LV).sum()
        assert (es == RV).sum() < (ed == RV).sum()
        # mean wall thickness of the mid slice as the difference of equivalent-disc radii (epicardium - cavity)
        k = ed.shape[2] // 2
        thickness = [np.sqrt(((lab[:, :, k] == MYO) | (lab[:, :, k] == LV)).sum() / np.pi)
                     - np.sqrt((lab[:, :, k] == LV).sum() / np.pi) for lab in (ed, es)]
        assert thickness[1] > thickness[0]


# ---------------------------------------------------------------------------------------------------- difficulty


def _overlap(a: np.ndarray, b: np.ndarray, bins: int = 40) -> float:
    """Histogram intersection of two intensity samples (1 = identical distributions, 0 = disjoint)."""
    edges = np.linspace(0.0, float(max(a.max(), b.max())), bins + 1)
    return float(np.minimum(np.histogram(a, edges)[0] / a.size, np.histogram(b, edges)[0] / b.size).sum())


def test_intensities_of_heart_and_other_structures_overlap() -> None:
    patient = generate_patient(2, SEED)
    image, tissue = patient["image_ed"].astype(np.float64), patient["tissue_ed"]
    blood = image[tissue == TISSUES["lv_blood"]]
    bright = image[np.isin(tissue, [TISSUES["descending_aorta"], TISSUES["great_vessel"],
                                    TISSUES["subcutaneous_fat"]])]
    myocardium = image[tissue == TISSUES["myocardium"]]
    grey = image[np.isin(tissue, [TISSUES["liver"], TISSUES["chest_wall"], TISSUES["mediastinum"]])]
    assert _overlap(blood, bright) > 0.3
    assert _overlap(myocardium, grey) > 0.3


def test_no_global_threshold_segments_the_lv(volumes: list[dict[str, Any]]) -> None:
    for v in volumes:
        image, lv = v["image_ED"].astype(np.float64), v["label_ED"] == LV
        best = 0.0
        for threshold in np.quantile(image, np.linspace(0.5, 0.999, 100)):
            pred = image > threshold
            best = max(best, 2.0 * (pred & lv).sum() / (pred.sum() + lv.sum()))
        assert best < 0.8, (v["name"], best)


def test_patients_differ_in_contrast_and_pose(volumes: list[dict[str, Any]]) -> None:
    ratios, centres = [], []
    for v in volumes:
        image, label = v["image_ED"].astype(np.float64), v["label_ED"]
        ratios.append(np.median(image[label == MYO]) / np.median(image[label == LV]))
        centres.append(np.argwhere(label == LV).mean(axis=0)[:2] / np.array(label.shape[:2]))
        assert ratios[-1] < 0.8  # myocardium darker than blood
    assert max(ratios) - min(ratios) > 0.02
    assert max(np.abs(c - centres[0]).max() for c in centres) > 0.01


# ---------------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_arrays_and_patient_alone_matches_dataset(volumes: list[dict[str, Any]]) -> None:
    first, again = generate_patient(2, SEED), generate_patient(2, SEED)
    for key in ("image_ed", "label_ed", "image_es", "label_es", "tissue_ed"):
        np.testing.assert_array_equal(first[key], again[key])
    np.testing.assert_array_equal(first["image_ed"], volumes[1]["image_ED"])  # written inside a 3-patient run
    np.testing.assert_array_equal(first["label_es"], volumes[1]["label_ES"])
    other = generate_patient(2, SEED + 1)
    assert other["image_ed"].shape != first["image_ed"].shape or not np.array_equal(other["image_ed"],
                                                                                   first["image_ed"])


def test_parallel_generation_writes_identical_files(dataset: Path, tmp_path: Path) -> None:
    parallel = generate_synthetic_acdc(tmp_path / "parallel", 2, SEED, num_workers=2)
    files = sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    assert len(files) == 10
    for rel in files:  # byte-identical to the serial 3-patient run (gzip without timestamps)
        assert (dataset / rel).read_bytes() == (parallel / rel).read_bytes(), rel


# ---------------------------------------------------------------------------------------------------- idempotence


def test_complete_dataset_is_not_regenerated(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _all_files(dataset)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic_writing, "generate_patient", fail)
    assert generate_synthetic_acdc(dataset, NUM_PATIENTS, SEED) == dataset
    assert _all_files(dataset) == before


@pytest.mark.parametrize("damage", ["delete", "truncate", "no_manifest"])
def test_partial_folder_is_regenerated(tmp_path: Path, damage: str) -> None:
    root = generate_synthetic_acdc(tmp_path / "acdc", 1, SEED)
    reference = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    victim = root / "patient001" / "patient001_frame01.nii.gz"
    if damage == "delete":
        victim.unlink()
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:1000])
    else:
        (root / MANIFEST_NAME).unlink()
    generate_synthetic_acdc(root, 1, SEED)
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == reference
    assert [p.name for p in tmp_path.iterdir()] == ["acdc"]  # no staging or trash folders left behind


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def explode(patient: dict[str, Any], folder: Any) -> list[Path]:
        calls.append(patient["name"])
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic_writing, "write_patient", explode)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_acdc(tmp_path / "acdc", 1, SEED)
    assert calls == ["patient001"]
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_other_data(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="other parameters"):
        generate_synthetic_acdc(dataset, NUM_PATIENTS, SEED + 1)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not part of a synthetic"):
        generate_synthetic_acdc(foreign, 1, SEED)
    assert (foreign / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        generate_synthetic_acdc(a_file, 1, SEED)


def test_older_version_is_regenerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_synthetic_acdc(tmp_path / "acdc", 1, SEED)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest["version"] = synthetic.SYNTHETIC_VERSION - 1
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    generate_synthetic_acdc(root, 1, SEED)
    assert json.loads((root / MANIFEST_NAME).read_text())["version"] == synthetic.SYNTHETIC_VERSION


def test_overwrite_replaces(tmp_path: Path) -> None:
    root = tmp_path / "acdc"
    root.mkdir()
    (root / "stray.txt").write_text("x")
    generate_synthetic_acdc(root, 1, SEED, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST_NAME, "patient001"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_patients": 0}, "num_patients"), ({"seed": -1}, "seed"), ({"num_workers": 0}, "num_workers"),
     ({"num_patients": 1.5}, "num_patients")],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synthetic_acdc(tmp_path / "acdc", **{"num_patients": 1, **kwargs})
    assert not (tmp_path / "acdc").exists()


def test_generate_patient_rejects_bad_index() -> None:
    with pytest.raises(ValueError, match="index"):
        generate_patient(0)
    with pytest.raises(ValueError, match="seed"):
        generate_patient(1, seed=-3)


def test_cli_and_picture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from scripts.make_synthetic_data import main
    from scripts.render_synthetic_examples import render

    monkeypatch.chdir(tmp_path)
    main(output="out", num_patients=1, seed=SEED)
    assert "ready" in capsys.readouterr().out
    assert (tmp_path / "out" / "patient001" / "Info.cfg").is_file()
    picture = render([1], seed=SEED, tile=32)
    assert picture.mode == "P" and picture.size == (6 * 32 + 5 * 4, 2 * 32)
