"""The four dataset sources (ACDC, Decathlon, folder of pairs, MONAI datalist) and the datalist tool, on tiny files
written in each exact layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from bundle.data.checks import DataCheckError
from bundle.data.datalist import DatalistOptions, build_datalist, load_datalist, load_split, prepare_datalist
from bundle.data.sources import detect_source_kind, find_acdc, find_datalist, find_folder, find_msd, parse_acdc_info
from scripts.make_datalist import main as make_datalist_main

SHAPE = (24, 20, 5)
AFFINE = np.diag([1.5, 1.5, 10.0, 1.0])


def _volume(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1.0, 100.0, shape).astype(np.float32)


def _label(seed: int, num_classes: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, shape).astype(np.uint8)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_acdc(root: Path, n_patients: int = 4, wrap_training: bool = True) -> Path:
    """ACDC native layout: patientNNN/{Info.cfg, patientNNN_frameXX[_gt].nii.gz, patientNNN_4d.nii.gz}."""
    base = root / "training" if wrap_training else root
    for p in range(1, n_patients + 1):
        pid = f"patient{p:03d}"
        d = base / pid
        ed, es = 1, 7 + p
        d.mkdir(parents=True)
        (d / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 170.0\nNbFrame: 20\nWeight: 70.0\n")
        for frame in (ed, es, 3):  # frame 3 is not listed in Info.cfg: not a scan
            _save(d / f"{pid}_frame{frame:02d}.nii.gz", _volume(100 * p + frame))
            _save(d / f"{pid}_frame{frame:02d}_gt.nii.gz", _label(100 * p + frame, 4))
        _save(d / f"{pid}_4d.nii.gz", _volume(p, (*SHAPE, 3)))
    return root


def write_msd(root: Path, n_cases: int = 6, channels: int = 2) -> Path:
    """Decathlon task folder with 4D multi-channel images: channel c holds values in [100c + 1, 100c + 100]."""
    training = []
    for i in range(n_cases):
        img = np.stack([_volume(i) + 100.0 * c for c in range(channels)], axis=-1)
        _save(root / "imagesTr" / f"prostate_{i:02d}.nii.gz", img)
        _save(root / "labelsTr" / f"prostate_{i:02d}.nii.gz", _label(i, 3))
        training.append(
            {"image": f"./imagesTr/prostate_{i:02d}.nii.gz", "label": f"./labelsTr/prostate_{i:02d}.nii.gz"}
        )
    meta = {
        "name": "Prostate",
        "modality": {str(c): ("T2" if c == 0 else f"M{c}") for c in range(channels)},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": n_cases,
        "training": training,
        "test": ["./imagesTs/prostate_99.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def write_folder(root: Path, n_cases: int = 6, num_classes: int = 3) -> Path:
    """Plain folder like ../shared/data/prostate: images/CaseNN.nii.gz + masks/CaseNN_Segmentation.nii.gz."""
    for i in range(n_cases):
        _save(root / "images" / f"Case{i:02d}.nii.gz", _volume(i))
        lab = _label(i, num_classes)
        lab[0, 0, 0] = num_classes - 1  # every class present somewhere, so num_classes can be inferred
        _save(root / "masks" / f"Case{i:02d}_Segmentation.nii.gz", lab)
    return root


# ------------------------------------------------------------------------------------------------------ ACDC
@pytest.mark.parametrize("wrap_training", [True, False])
def test_acdc_finds_only_ed_es_frames(tmp_path: Path, wrap_training: bool) -> None:
    write_acdc(tmp_path, n_patients=3, wrap_training=wrap_training)
    src = find_acdc(tmp_path)
    assert src.kind == "acdc" and src.num_classes == 4
    assert src.label_names == {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}
    ids = sorted(e["scan_id"] for e in src.entries)
    assert ids == [
        "patient001_frame01",
        "patient001_frame08",
        "patient002_frame01",
        "patient002_frame09",
        "patient003_frame01",
        "patient003_frame10",
    ]
    for e in src.entries:
        assert e["patient_id"] == e["scan_id"].split("_")[0]
        assert e["label"].endswith(e["scan_id"] + "_gt.nii.gz") and Path(e["image"]).is_file()
        assert e["phase"] == ("ED" if e["frame"] == 1 else "ES")
        assert "_4d" not in e["image"]
    assert detect_source_kind(tmp_path) == "acdc"


def test_acdc_info_cfg_parsing(tmp_path: Path) -> None:
    cfg = tmp_path / "Info.cfg"
    cfg.write_text("ED: 1\nES: 12\nGroup: DCM\n")
    assert parse_acdc_info(cfg) == {"ED": "1", "ES": "12", "Group": "DCM"}


def test_acdc_missing_files_are_all_named(tmp_path: Path) -> None:
    write_acdc(tmp_path, n_patients=3)
    (tmp_path / "training" / "patient001" / "Info.cfg").unlink()
    (tmp_path / "training" / "patient002" / "patient002_frame09_gt.nii.gz").unlink()
    with pytest.raises(DataCheckError) as err:
        find_acdc(tmp_path)
    msg = str(err.value)
    assert "patient001/Info.cfg: missing file" in msg
    assert "patient002_frame09_gt.nii.gz: missing file" in msg
    assert len(err.value.problems) == 2


def test_acdc_datalist_keeps_patients_together(tmp_path: Path) -> None:
    write_acdc(tmp_path / "acdc", n_patients=6)
    dl = build_datalist(tmp_path / "acdc", DatalistOptions(kind="acdc", num_val=2, num_test=2, labeled_counts=(1, 2)))
    assert (len(dl["training"]), len(dl["validation"]), len(dl["test"])) == (8, 2, 2)
    for split in ("validation", "test"):
        assert len({e["patient_id"] for e in dl[split]}) == 1  # both phases of one patient


# ------------------------------------------------------------------------------------------------------- MSD
def test_msd_multichannel_default_channel_zero(tmp_path: Path) -> None:
    write_msd(tmp_path)
    assert detect_source_kind(tmp_path) == "msd"
    src = find_msd(tmp_path)
    assert src.channel == 0 and src.num_classes == 3 and len(src.entries) == 6
    assert src.extra["channel_name"] == "T2"
    dl = build_datalist(tmp_path, DatalistOptions(kind="msd", num_val=1, num_test=1))
    assert dl["channel"] == 0 and dl["label_names"]["1"] == "PZ"
    assert build_datalist(tmp_path, DatalistOptions(kind="msd", num_val=1, num_test=1, channel=1))["channel"] == 1


def test_msd_channel_out_of_range(tmp_path: Path) -> None:
    write_msd(tmp_path, n_cases=3)
    with pytest.raises(DataCheckError, match="channel 2 requested but the task has 2 modalities"):
        find_msd(tmp_path, channel=2)


def test_msd_missing_case_named(tmp_path: Path) -> None:
    write_msd(tmp_path, n_cases=3)
    (tmp_path / "labelsTr" / "prostate_01.nii.gz").unlink()
    with pytest.raises(DataCheckError, match=r"labelsTr/prostate_01.nii.gz: missing file"):
        find_msd(tmp_path)


# ---------------------------------------------------------------------------------------------------- folder
def test_folder_pattern_and_autodetect(tmp_path: Path) -> None:
    write_folder(tmp_path, n_cases=4)
    explicit = find_folder(tmp_path, "images/{id}.nii.gz", "masks/{id}_Segmentation.nii.gz")
    auto = find_folder(tmp_path)
    assert [e["scan_id"] for e in explicit.entries] == ["Case00", "Case01", "Case02", "Case03"]
    assert explicit.entries == auto.entries
    assert auto.extra["label_pattern"] == "masks/{id}_Segmentation.nii.gz"
    assert detect_source_kind(tmp_path) == "folder"
    dl = build_datalist(tmp_path, DatalistOptions(kind="folder", num_val=1, num_test=1, labeled_counts=(1, 2)))
    assert dl["num_classes"] == 3  # inferred: max label value + 1


def test_folder_same_directory_pattern_excludes_labels(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / f"s{i}.nii.gz", _volume(i))
        _save(tmp_path / f"s{i}_seg.nii.gz", _label(i, 2))
    src = find_folder(tmp_path, "{id}.nii.gz", "{id}_seg.nii.gz")
    assert [e["scan_id"] for e in src.entries] == ["s0", "s1", "s2"]


def test_folder_patient_regex_groups_scans(tmp_path: Path) -> None:
    for name in ("p1_a", "p1_b", "p2_a"):
        _save(tmp_path / "images" / f"{name}.nii.gz", _volume(1))
        _save(tmp_path / "labels" / f"{name}.nii.gz", _label(1, 2))
    src = find_folder(tmp_path, "images/{id}.nii.gz", "labels/{id}.nii.gz", patient_regex=r"^(p\d+)_")
    assert [e["patient_id"] for e in src.entries] == ["p1", "p1", "p2"]


def test_folder_missing_mask_named(tmp_path: Path) -> None:
    write_folder(tmp_path, n_cases=3)
    (tmp_path / "masks" / "Case01_Segmentation.nii.gz").unlink()
    with pytest.raises(DataCheckError, match=r"masks/Case01_Segmentation.nii.gz: missing file"):
        find_folder(tmp_path, "images/{id}.nii.gz", "masks/{id}_Segmentation.nii.gz")


# -------------------------------------------------------------------------------------------------- datalist
def test_monai_datalist_passes_through(tmp_path: Path) -> None:
    write_folder(tmp_path / "data", n_cases=6)
    monai_list = {
        "training": [
            {"image": f"data/images/Case0{i}.nii.gz", "label": f"data/masks/Case0{i}_Segmentation.nii.gz"}
            for i in range(5)
        ],
        "validation": [{"image": "data/images/Case05.nii.gz", "label": "data/masks/Case05_Segmentation.nii.gz"}],
    }
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(monai_list))
    assert detect_source_kind(path) == "datalist"
    src = find_datalist(path)
    assert src.splits is not None and [e["scan_id"] for e in src.splits["validation"]] == ["Case05"]
    dl = build_datalist(path, DatalistOptions(kind="datalist", num_test=1, labeled_counts=(1, 2), num_classes=3))
    assert [e["scan_id"] for e in dl["validation"]] == ["Case05"]  # the given validation split is kept
    assert len(dl["test"]) == 1 and len(dl["training"]) == 4  # the missing test split is carved from training
    assert all(Path(e["image"]).is_absolute() for e in dl["training"])


def test_prepare_datalist_builds_once_and_monai_reads_it(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_cases=6)
    out = root / "datalist.json"  # inside the dataset folder: relative paths
    path = prepare_datalist(root, out, num_val=1, num_test=1, labeled_counts=(1, 2), seeds=(0, 1))
    raw = json.loads(Path(path).read_text())
    assert raw["training"][0]["image"].startswith("images/")
    assert raw["source"]["kind"] == "folder" and raw["created_by"] and len(raw["file_hash"]) == 64
    assert set(raw["labeled"]) == {"0", "1"} and set(raw["labeled"]["0"]) == {"1", "2"}
    mtime = out.stat().st_mtime_ns
    assert prepare_datalist(root, out) == str(out) and out.stat().st_mtime_ns == mtime  # existing: used as is
    monai_entries = load_decathlon_datalist(str(out), data_list_key="training")
    assert [e["image"] for e in monai_entries] == [e["image"] for e in load_split(out, "training")]
    assert detect_source_kind(root) == "datalist"  # a folder holding datalist.json is passed through


@pytest.mark.parametrize("given", ["acdc_with_training", "datalist_json"])
def test_an_existing_datalist_is_reused_for_the_dataset_dir_it_was_built_from(tmp_path: Path, given: str) -> None:
    """Resume, fine-tuning and evaluation pass the same --dataset_dir as the first command: an ACDC folder whose
    scans are in training/, or a datalist JSON, must be recognised as the recorded source."""
    if given == "acdc_with_training":
        dataset_dir = write_acdc(tmp_path / "acdc", n_patients=4, wrap_training=True)
    else:
        write_folder(tmp_path / "data", n_cases=6)
        dataset_dir = tmp_path / "mine.json"
        entries = [{"image": f"data/images/Case0{i}.nii.gz", "label": f"data/masks/Case0{i}_Segmentation.nii.gz"}
                   for i in range(6)]
        dataset_dir.write_text(json.dumps({"training": entries}))
    out = tmp_path / "runs" / "dl.json"
    prepare_datalist(dataset_dir, out, num_val=1, num_test=1, labeled_counts=(1,), seeds=(0,))
    assert prepare_datalist(dataset_dir, out) == str(out)  # the second command: same source, accepted
    other = write_folder(tmp_path / "other", n_cases=4)
    with pytest.raises(DataCheckError, match="another dataset"):
        prepare_datalist(other, out)


def test_datalist_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    import os

    root = write_folder(tmp_path / "ds", n_cases=4)
    old = os.umask(0o022)
    try:
        out = Path(prepare_datalist(root, tmp_path / "dl.json", num_val=1, num_test=1, labeled_counts=(1,)))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_datalist_outside_dataset_folder_uses_absolute_paths(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_cases=4)
    out = tmp_path / "elsewhere" / "dl.json"
    prepare_datalist(root, out, num_val=1, num_test=1, labeled_counts=(1,))
    raw = json.loads(out.read_text())
    assert all(Path(e["image"]).is_absolute() for e in raw["training"])


# ------------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("kind", ["acdc", "msd", "folder", "auto"])
def test_make_datalist_cli_each_kind(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "ds"
    if kind == "acdc":
        write_acdc(root, n_patients=5)
    elif kind == "msd":
        write_msd(root, n_cases=5, channels=2)
    else:
        write_folder(root, n_cases=5)
    out = tmp_path / "out.json"
    argv = [kind, "--root", str(root), "--output", str(out), "--seeds", "[0,1,2]", "--labeled_counts", "[1,2]"]
    assert make_datalist_main([*argv, "--num_val", "1", "--num_test", "1"]) == 0
    dl = load_datalist(out)
    assert set(dl["labeled"]) == {"0", "1", "2"}
    assert len(dl["training"]) + len(dl["validation"]) + len(dl["test"]) == 5 * (2 if kind == "acdc" else 1)
    if kind == "msd":
        assert dl["channel"] == 0


def test_make_datalist_cli_bad_data_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "ds", n_cases=4)
    _save(root / "images" / "Case02.nii.gz", np.zeros(SHAPE, np.float32))  # constant volume
    out = tmp_path / "out.json"
    argv = ["folder", "--root", str(root), "--output", str(out), "--num_val", "1", "--num_test", "1"]
    assert make_datalist_main([*argv, "--labeled_counts", "[1]"]) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.json*"))
    assert "Case02.nii.gz: constant volume" in capsys.readouterr().err


def test_make_datalist_cli_label_names_name_the_evaluation_columns(tmp_path: Path) -> None:
    from bundle.evaluation import class_names_from_datalist

    root = write_folder(tmp_path / "ds", n_cases=4)
    out = tmp_path / "out.json"
    argv = ["folder", "--root", str(root), "--output", str(out), "--num_val", "1", "--num_test", "1"]
    assert make_datalist_main([*argv, "--labeled_counts", "[1]", "--label_names", "[background,PZ,TZ]"]) == 0
    assert load_datalist(out)["label_names"] == {"0": "background", "1": "PZ", "2": "TZ"}
    assert class_names_from_datalist(out, 3) == ["PZ", "TZ"]
    # without the option a folder of pairs declares no names: the columns are the class indices
    plain = tmp_path / "plain.json"
    assert make_datalist_main(["folder", "--root", str(root), "--output", str(plain), "--num_val", "1",
                               "--num_test", "1", "--labeled_counts", "[1]"]) == 0
    assert load_datalist(plain)["label_names"] is None and class_names_from_datalist(plain, 3) == ["1", "2"]


def test_label_names_as_list_mapping_or_json_text_agree() -> None:
    want = {"0": "background", "1": "PZ", "2": "TZ"}
    assert DatalistOptions(label_names=["background", "PZ", "TZ"]).label_names == want
    assert DatalistOptions(label_names={2: "TZ", 0: "background", 1: "PZ"}).label_names == want
    assert DatalistOptions(label_names='{"0": "background", "1": "PZ", "2": "TZ"}').label_names == want
    with pytest.raises(ValueError, match="class index 'one' is not an integer"):
        DatalistOptions(label_names={"0": "background", "one": "PZ"})
    with pytest.raises(ValueError, match="non-empty name"):
        DatalistOptions(label_names=["background", " "])
    with pytest.raises(ValueError, match="list or a mapping"):
        DatalistOptions(label_names=3)  # type: ignore[arg-type]


def test_label_names_for_the_wrong_classes_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "ds", n_cases=4)  # labels 0, 1, 2
    out = tmp_path / "out.json"
    argv = ["folder", "--root", str(root), "--output", str(out), "--num_val", "1", "--num_test", "1"]
    assert make_datalist_main([*argv, "--labeled_counts", "[1]", "--label_names", "[background,gland]"]) == 1
    assert not out.exists()
    err = capsys.readouterr().err
    assert "label_names name the classes ['0', '1']" in err and "3 classes ['0', '1', '2']" in err
    assert str(root) in err


def test_an_existing_datalist_with_other_label_names_is_refused(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_cases=4)
    out = tmp_path / "dl.json"
    prepare_datalist(root, out, num_val=1, num_test=1, labeled_counts=(1,), label_names=["background", "PZ", "TZ"])
    prepare_datalist(root, out, num_val=1, num_test=1, labeled_counts=(1,), label_names=["background", "PZ", "TZ"])
    prepare_datalist(root, out, num_val=1, num_test=1, labeled_counts=(1,))  # no names asked: the recorded ones
    with pytest.raises(DataCheckError, match="recorded label_names .* differ from the requested"):
        prepare_datalist(root, out, num_val=1, num_test=1, labeled_counts=(1,), label_names=["bg", "a", "b"])


@pytest.mark.parametrize("config", ["pretrain.json", "train.json"])
def test_a_mistyped_dataset_dir_is_an_error_not_a_synthetic_dataset(tmp_path: Path, config: str) -> None:
    from monai.bundle import ConfigParser

    repo = Path(__file__).resolve().parents[1]

    def parser(**overrides: object) -> ConfigParser:
        p = ConfigParser()
        p.read_config(repo / "configs" / config)
        p.update({"bundle_root": str(tmp_path), **overrides})
        return p

    assert parser().get_parsed_content("generate_if_missing") is True  # the bundle's own data folder
    typo = tmp_path / "dtaa" / "acdc"
    mistyped = parser(dataset_dir=str(typo))
    assert mistyped.get_parsed_content("generate_if_missing") is False
    with pytest.raises(Exception) as caught:
        mistyped.get_parsed_content("prepared_datalist")
    error: BaseException | None = caught.value
    while error is not None and not isinstance(error, FileNotFoundError):
        error = error.__cause__
    assert error is not None and str(typo) in str(error)
    assert not (tmp_path / "dtaa").exists()  # nothing generated, nothing written


@pytest.mark.parametrize("config", ["pretrain.json", "train.json"])
def test_the_configs_label_names_id_reaches_the_datalist(tmp_path: Path, config: str) -> None:
    from monai.bundle import ConfigParser

    root = write_folder(tmp_path / "ds", n_cases=8)  # 5 training scans: room for the recorded 4 labeled
    p = ConfigParser()
    p.read_config(Path(__file__).resolve().parents[1] / "configs" / config)
    p.update({"bundle_root": str(tmp_path), "dataset_dir": str(root), "datalist": str(tmp_path / "dl.json"),
              "num_classes": 3, "label_names": ["background", "PZ", "TZ"]})
    written = p.get_parsed_content("prepared_datalist")
    assert load_datalist(written)["label_names"] == {"0": "background", "1": "PZ", "2": "TZ"}
