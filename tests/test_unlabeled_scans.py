"""Unlabeled scans: found in every source, kept to the pre-training pool, checked like any scan, and an
unlabeled-only folder pre-trains end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from bundle.data.checks import DataCheckError
from bundle.data.datalist import DatalistOptions, build_datalist, load_split, prepare_datalist, pretraining_entries
from bundle.data.sources import find_folder, find_images, find_msd
from tests.test_data_sources import write_folder, write_msd
from tests.test_evaluate_inference import write_nrrd_copy


def _images_only(root: Path, names: list[str], source: Path) -> Path:
    """A folder of copies of one real NIfTI image under the given relative names (no masks)."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / name)
    return root


def test_a_folder_without_masks_is_a_folder_of_unlabeled_scans(tmp_path: Path) -> None:
    pairs = write_folder(tmp_path / "pairs", n_cases=2)
    one = pairs / "images" / "Case00.nii.gz"
    root = _images_only(tmp_path / "raw", ["a/scan.nii.gz", "b/scan.nii.gz", "c.nii.gz"], one)
    (root / "notes.txt").write_text("not an image")
    src = find_folder(root)
    assert src.entries == [] and [e["scan_id"] for e in src.unlabeled] == ["a/scan", "b/scan", "c"]
    dl = build_datalist(root, DatalistOptions(kind="folder"))
    assert dl["training"] == dl["validation"] == dl["test"] == [] and dl["labeled"] == {}
    assert [Path(e["image"]).relative_to(root).as_posix() for e in dl["unlabeled"]] == [
        "a/scan.nii.gz", "b/scan.nii.gz", "c.nii.gz"]
    assert all("label" not in e for e in dl["unlabeled"])


def test_a_folder_with_pairs_still_reports_a_missing_mask(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_cases=3)
    (root / "masks" / "Case01_Segmentation.nii.gz").unlink()
    with pytest.raises(DataCheckError, match="Case01_Segmentation.nii.gz: missing file"):
        find_folder(root)


def test_msd_test_images_are_unlabeled(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task05", n_cases=6)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "imagesTs").mkdir()
    shutil.copy(root / meta["training"][0]["image"], root / "imagesTs" / "prostate_99.nii.gz")
    meta["test"] = ["./imagesTs/prostate_99.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    src = find_msd(root)
    assert [e["scan_id"] for e in src.unlabeled] == ["prostate_99"] and len(src.entries) == 6
    dl = build_datalist(root, DatalistOptions(kind="msd", num_val=1, num_test=1, labeled_counts=(1,), seeds=(0,)))
    assert [e["scan_id"] for e in dl["unlabeled"]] == ["prostate_99"]
    assert all("prostate_99" not in (e["scan_id"] for e in dl[k]) for k in ("training", "validation", "test"))


def test_msd_listed_test_images_not_downloaded_are_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_msd(tmp_path / "Task05", n_cases=6)  # lists ./imagesTs/prostate_99.nii.gz, which is absent
    with caplog.at_level("WARNING", logger="bundle.data.sources"):
        src = find_msd(root)
    assert len(src.entries) == 6 and src.unlabeled == []
    assert "1 listed test images missing" in caplog.text and "prostate_99.nii.gz" in caplog.text


def test_datalist_entries_without_label_join_pretraining_only(tmp_path: Path) -> None:
    write_folder(tmp_path / "data", n_cases=7)
    labeled = [{"image": f"data/images/Case0{i}.nii.gz", "label": f"data/masks/Case0{i}_Segmentation.nii.gz"}
               for i in range(5)]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"training": [*labeled, {"image": "data/images/Case05.nii.gz"}],
                                "unlabeled": ["data/images/Case06.nii.gz"]}))
    out = Path(prepare_datalist(path, tmp_path / "dl.json", num_val=1, num_test=1, labeled_counts=(1, 2),
                               seeds=(0, 1)))
    assert [e["scan_id"] for e in load_split(out, "unlabeled")] == ["Case06", "Case05"]  # listed, then label-less
    training = [e["scan_id"] for e in load_split(out, "training")]
    assert "Case05" not in training and "Case06" not in training and len(training) == 3
    recorded = json.loads(out.read_text())["labeled"]
    assert all(set(ids) <= set(training) for by_count in recorded.values() for ids in by_count.values())
    pool = pretraining_entries(out)
    assert [e["scan_id"] for e in pool] == [*training, "Case06", "Case05"] and all("label" not in e for e in pool)


def test_unlabeled_dir_adds_to_a_labeled_dataset_and_must_match_later(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_cases=6)
    extra = _images_only(tmp_path / "extra", ["u1.nii.gz", "deep/u2.nii.gz"], root / "images" / "Case00.nii.gz")
    out = tmp_path / "dl.json"
    prepare_datalist(root, out, num_val=1, num_test=1, labeled_counts=(1,), seeds=(0,), unlabeled_dir=extra)
    assert [e["scan_id"] for e in load_split(out, "unlabeled")] == ["deep/u2", "u1"]
    assert len(pretraining_entries(out)) == 4 + 2
    assert prepare_datalist(root, out) == str(out)  # fine-tuning passes no unlabeled_dir: accepted
    with pytest.raises(DataCheckError, match="other unlabeled scans"):
        prepare_datalist(root, out, unlabeled_dir=tmp_path)  # another folder: refused, named


def test_an_unlabeled_copy_of_an_evaluation_scan_is_a_leak(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_cases=6)
    options = DatalistOptions(kind="folder", num_val=1, num_test=1, labeled_counts=(1,), seeds=(0,))
    dl = build_datalist(root, options)
    test_image = Path(dl["test"][0]["image"])
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / test_image.name).symlink_to(test_image)  # the same file reached through another folder
    with pytest.raises(DataCheckError, match=r"scan_id .* is in both 'test' and 'unlabeled'"):
        build_datalist(root, dataclasses.replace(options, unlabeled_dir=extra))


def test_bad_unlabeled_files_are_named(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_cases=4)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "broken.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DataCheckError, match=r"broken.nii.gz: unreadable or corrupt"):
        build_datalist(root, DatalistOptions(kind="folder", num_val=1, num_test=1, labeled_counts=(1,), seeds=(0,),
                                             unlabeled_dir=extra))
    with pytest.raises(DataCheckError, match="missing folder of unlabeled images"):
        find_images(tmp_path / "absent")


def test_unlabeled_dir_reads_nrrd_as_it_reads_nifti(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_cases=4)
    extra = tmp_path / "extra"
    extra.mkdir()
    write_nrrd_copy(root / "images" / "Case00.nii.gz", extra / "other.nrrd")
    (extra / "other_seg.nrrd").write_bytes(b"a label file by its name: left out, never read")
    dl = build_datalist(root, DatalistOptions(kind="folder", num_val=1, num_test=1, labeled_counts=(1,), seeds=(0,),
                                              unlabeled_dir=extra))
    assert [(e["scan_id"], Path(e["image"]).name) for e in dl["unlabeled"]] == [("other", "other.nrrd")]
    assert str(extra / "other.nrrd") in [e["image"] for e in pretraining_entries(dl)]


def test_an_unlabeled_dir_without_images_is_an_error(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_cases=4)
    extra = tmp_path / "dicom"
    (extra / "series").mkdir(parents=True)
    (extra / "series" / "IM0001.dcm").write_bytes(b"DICM")
    (extra / "notes.txt").write_text("not an image")
    with pytest.raises(DataCheckError, match=r"dicom: unlabeled_dir holds no NIfTI or NRRD image \(suffixes \.nii, "):
        build_datalist(root, DatalistOptions(kind="folder", num_val=1, num_test=1, labeled_counts=(1,), seeds=(0,),
                                             unlabeled_dir=extra))


def test_fine_tuning_on_an_unlabeled_only_dataset_says_why(tmp_path: Path) -> None:
    pairs = write_folder(tmp_path / "pairs", n_cases=2)
    root = _images_only(tmp_path / "raw", ["a.nii.gz", "b.nii.gz"], pairs / "images" / "Case00.nii.gz")
    out = Path(prepare_datalist(root, tmp_path / "dl.json"))
    with pytest.raises(DataCheckError, match="empty 'training' split \\(it holds 2 unlabeled scans only\\)"):
        load_split(out, "training", labeled_seed=0, num_labeled=1)


def test_pretraining_runs_on_unlabeled_scans_only(bundle_workflow, tiny_overrides: dict[str, Any], tiny_acdc: Path,
                                                  tmp_path: Path) -> None:
    images = sorted(tiny_acdc.glob("patient00*/patient00*_frame01.nii.gz"))[:3]
    root = tmp_path / "unlabeled"
    root.mkdir()
    for image in images:
        shutil.copy(image, root / image.name)
    over = {**tiny_overrides, "bundle_root": str(tmp_path), "dataset_dir": str(root),
            "datalist": str(tmp_path / "dl.json"), "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path / "runs" / "pretrain"), "num_clusters": 6, "num_heads": 1,
            "num_partitions": 2, "log_interval": 1, "image_interval": 2}
    over["pretrained_path"] = str(tmp_path / "models" / "pretrained" / "unet_ssl.pt")
    over["state_path"] = str(tmp_path / "runs" / "pretrain" / "state.pt")
    wf = bundle_workflow(["pretrain"], **over)
    wf.initialize()
    wf.run()
    wf.finalize()
    assert torch.load(over["pretrained_path"], weights_only=True)  # weights written
    assert len(json.loads((tmp_path / "dl.json").read_text())["unlabeled"]) == 3
