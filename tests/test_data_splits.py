"""Patient-level, leak-free, seeded splits; nested labeled subsets; hashes that name the exact file list."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundle.data.checks import DataCheckError
from bundle.data.datalist import DatalistOptions, build_datalist, load_split, prepare_datalist, write_datalist
from bundle.data.splits import check_splits, choose_labeled, file_hash, resolve_count, split_by_patient

SPLITS = ("training", "validation", "test")


def acdc_like_entries(n_patients: int) -> list[dict[str, str]]:
    """Two scans (ED, ES) per patient, like ACDC."""
    return [
        {"image": f"/d/p{p:03d}_{ph}.nii.gz", "scan_id": f"p{p:03d}_{ph}", "patient_id": f"p{p:03d}"}
        for p in range(n_patients)
        for ph in ("ED", "ES")
    ]


def _ids(split: list[dict]) -> set[str]:
    return {e["scan_id"] for e in split}


@pytest.mark.parametrize("seed", range(8))
def test_both_phases_of_a_patient_in_the_same_split(seed: int) -> None:
    splits = split_by_patient(acdc_like_entries(20), num_val=4, num_test=6, seed=seed)
    owner: dict[str, set[str]] = {}
    for key in SPLITS:
        for e in splits[key]:
            owner.setdefault(e["patient_id"], set()).add(key)
    assert all(len(keys) == 1 for keys in owner.values())
    assert (len(splits["validation"]), len(splits["test"]), len(splits["training"])) == (4, 6, 30)


def test_splits_disjoint_and_cover_everything() -> None:
    entries = acdc_like_entries(15)
    splits = split_by_patient(entries, num_val=0.1, num_test=0.2, seed=3)
    tr, va, te = (_ids(splits[k]) for k in SPLITS)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == _ids(entries)
    # 10% of 30 scans = 3 -> rounded up to whole patients = 4; 20% = 6
    assert (len(va), len(te)) == (4, 6)
    check_splits(splits)  # raises on any leak


def test_odd_count_rounds_up_to_whole_patients() -> None:
    splits = split_by_patient(acdc_like_entries(10), num_val=3, num_test=1, seed=0)
    assert (len(splits["validation"]), len(splits["test"])) == (4, 2)


def test_split_deterministic_per_seed_and_seeds_differ() -> None:
    entries = acdc_like_entries(30)
    a = split_by_patient(entries, 6, 10, seed=1)
    b = split_by_patient(list(reversed(entries)), 6, 10, seed=1)  # input order does not matter
    c = split_by_patient(entries, 6, 10, seed=2)
    assert all(_ids(a[k]) == _ids(b[k]) for k in SPLITS)
    assert _ids(a["test"]) != _ids(c["test"])


def test_split_too_small_raises() -> None:
    with pytest.raises(DataCheckError, match="cannot give"):
        split_by_patient(acdc_like_entries(2), num_val=2, num_test=2, seed=0)
    with pytest.raises(DataCheckError, match="empty datalist"):
        split_by_patient([], 1, 1)
    with pytest.raises(DataCheckError, match="duplicated scan_id"):
        split_by_patient(acdc_like_entries(3) + acdc_like_entries(1), 1, 1)


def test_resolve_count() -> None:
    assert resolve_count(3, 100, "n") == 3
    assert resolve_count(0.25, 10, "n") == 2  # round(2.5) -> 2 (banker's rounding)
    assert resolve_count(0.01, 10, "n") == 1  # at least one
    assert resolve_count(2.0, 10, "n") == 2
    with pytest.raises(ValueError, match="fraction"):
        resolve_count(1.5, 10, "n")
    with pytest.raises(ValueError, match=">= 0"):
        resolve_count(-1, 10, "n")


def test_labeled_subsets_nested_inside_training_and_seeded() -> None:
    splits = split_by_patient(acdc_like_entries(20), 4, 6, seed=0)
    train = splits["training"]
    labeled = choose_labeled(train, seeds=[0, 1, 2], counts=[1, 2, 4])
    train_ids = _ids(train)
    for by_count in labeled.values():
        one, two, four = by_count["1"], by_count["2"], by_count["4"]
        assert (len(one), len(two), len(four)) == (1, 2, 4)
        assert set(one) <= set(two) <= set(four) <= train_ids
        assert len({s.split("_")[0] for s in four}) == 4  # one scan per patient first: 4 distinct patients
    assert labeled == choose_labeled(train, seeds=[0, 1, 2], counts=[4, 2, 1])  # deterministic
    assert labeled["0"]["4"] != labeled["1"]["4"] or labeled["0"]["4"] != labeled["2"]["4"]
    check_splits(splits, labeled)


def test_more_labeled_than_training_raises() -> None:
    train = acdc_like_entries(1)
    with pytest.raises(DataCheckError, match="4 labeled scans requested but the training split has 2"):
        choose_labeled(train, seeds=[0], counts=[1, 4])


def test_check_splits_reports_every_leak() -> None:
    entries = acdc_like_entries(4)
    leaky = {"training": entries[:5], "validation": entries[4:6], "test": entries[6:]}  # p002_ED in two splits
    with pytest.raises(DataCheckError) as err:
        check_splits(leaky, {"0": {"1": ["p003_ES"]}})
    msg = str(err.value)
    assert "scan_id 'p002_ED' is in both 'training' and 'validation'" in msg
    assert "patient_id 'p002' is in both 'training' and 'validation'" in msg
    assert "labeled[0][1] has scans not in training: ['p003_ES']" in msg


# ------------------------------------------------------------------------------------- datalist on real files
def _write_pairs(root: Path, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        for sub, name, dtype in (
            ("images", f"Case{i:02d}", np.float32),
            ("masks", f"Case{i:02d}_Segmentation", np.uint8),
        ):
            (root / sub).mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(i)
            data = rng.uniform(1, 10, (12, 10, 4)) if dtype == np.float32 else rng.integers(0, 2, (12, 10, 4))
            nib.save(nib.Nifti1Image(data.astype(dtype), np.eye(4)), str(root / sub / f"{name}.nii.gz"))


def test_file_hash_recorded_and_changes_with_the_file_list(tmp_path: Path) -> None:
    _write_pairs(tmp_path, 6)
    kw = {"num_val": 1, "num_test": 1, "labeled_counts": (1, 2)}
    a = build_datalist(tmp_path, DatalistOptions(kind="folder", **kw))
    b = build_datalist(tmp_path, DatalistOptions(kind="folder", **kw))
    entries = [e for k in SPLITS for e in a[k]]
    assert a["file_hash"] == b["file_hash"] == file_hash(entries, tmp_path)
    lines = sorted(
        f"{sub}/{name}.nii.gz\t{(tmp_path / sub / f'{name}.nii.gz').stat().st_size}"
        for i in range(6)
        for sub, name in (("images", f"Case{i:02d}"), ("masks", f"Case{i:02d}_Segmentation"))
    )
    assert a["file_hash"] == hashlib.sha256("\n".join(lines).encode()).hexdigest()  # reference written out here
    assert a["split_hash"] == b["split_hash"]
    _write_pairs(tmp_path, 1, start=6)  # one more scan
    c = build_datalist(tmp_path, DatalistOptions(kind="folder", **kw))
    assert c["file_hash"] != a["file_hash"]
    assert build_datalist(tmp_path, DatalistOptions(kind="folder", split_seed=1, **kw))["split_hash"] != c["split_hash"]
    # the hash is over paths relative to the dataset root + sizes: a copy of the dataset elsewhere hashes the same
    shutil.copytree(tmp_path / "images", tmp_path / "copy" / "images")
    shutil.copytree(tmp_path / "masks", tmp_path / "copy" / "masks")
    assert build_datalist(tmp_path / "copy", DatalistOptions(kind="folder", **kw))["file_hash"] == c["file_hash"]
    # a datalist of ours passes straight through: same splits, labeled subsets and hashes
    again = build_datalist(write_datalist(c, tmp_path / "out" / "dl.json"), DatalistOptions(kind="datalist", **kw))
    assert all(again[k] == c[k] for k in ("training", "validation", "test", "labeled", "file_hash", "split_hash"))


def test_load_split_labeled_and_pretraining_views(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "ds", 10)
    path = prepare_datalist(tmp_path / "ds", tmp_path / "dl.json", num_val=2, num_test=2, seeds=(0, 1))
    raw = json.loads(Path(path).read_text())
    train = load_split(path, "training")
    assert len(train) == 6 and all(Path(e["image"]).is_absolute() and "label" in e for e in train)
    two = load_split(path, "training", labeled_seed=1, num_labeled=2)
    assert [e["scan_id"] for e in two] == raw["labeled"]["1"]["2"]
    assert {e["scan_id"] for e in two} <= {e["scan_id"] for e in train}
    assert len(load_split(path, "training", labeled_seed=0, num_labeled=6)) == 6  # all training: always allowed
    pre = load_split(path, "training", with_labels=False)
    assert all("label" not in e for e in pre)
    held_out = {e["scan_id"] for k in ("validation", "test") for e in load_split(path, k)}
    assert not held_out & {e["scan_id"] for e in pre}  # pre-training never sees validation or test
    with pytest.raises(ValueError, match="3 labeled scans for seed 0 were not recorded"):
        load_split(path, "training", labeled_seed=0, num_labeled=3)
    with pytest.raises(ValueError, match="training split has 6"):
        load_split(path, "training", labeled_seed=0, num_labeled=8)
    with pytest.raises(ValueError, match="labeled_seed is required"):
        load_split(path, "training", num_labeled=2)
    with pytest.raises(ValueError, match="no labeled subsets recorded for seed 5"):
        load_split(path, "training", labeled_seed=5, num_labeled=2)
    with pytest.raises(ValueError, match="Unsupported split"):
        load_split(path, "train")


def test_load_split_rejects_a_hand_edited_leak(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "ds", 6)
    dl = build_datalist(tmp_path / "ds", DatalistOptions(kind="folder", num_val=1, num_test=1, labeled_counts=(1,)))
    dl["test"].append(dl["training"][0])
    path = write_datalist(dl, tmp_path / "dl.json")
    with pytest.raises(DataCheckError, match="is in both 'training' and 'test'"):
        load_split(path, "training")
