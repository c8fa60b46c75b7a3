"""Patient-level, seeded, leak-free splits and the labeled subsets used for fine-tuning.

- :func:`split_by_patient` shuffles *patients* (not scans) with ``np.random.default_rng(split_seed)`` and fills
  validation, then test, with whole patients; the rest is training. So both phases of an ACDC patient always land
  in the same split, and validation/test/training are disjoint by construction (checked again by
  :func:`check_splits`).
- :func:`choose_labeled` picks, for each seed, an ordering of the training scans and takes its first ``n`` scans as
  the labeled set of size ``n``; sets are therefore nested (the 1-scan set is inside the 2-scan set, inside the
  4-scan set) and always a subset of training. The ordering visits patients in random order and takes one random
  scan per patient first, so small labeled sets come from distinct patients when possible.
- :func:`file_hash` is a sha256 over the sorted relative paths and byte sizes of every file used, and
  :func:`split_hash` a sha256 over the split assignment and labeled sets: together they name exactly which scans
  a result used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.data.checks import DataCheckError

__all__ = [
    "LABELED_STREAM",
    "check_splits",
    "choose_labeled",
    "file_hash",
    "resolve_count",
    "split_by_patient",
    "split_hash",
]

LABELED_STREAM = 0x1AB3  # second word of the labeled-subset seed, so it never reuses the split's random stream
SPLITS = ("training", "validation", "test")


def resolve_count(value: float | int, total: int, name: str) -> int:
    """Number of scans meant by ``value``: an int is a count, a float in (0, 1) a fraction of ``total`` (rounded,
    at least 1).

    Raises:
        ValueError: for a negative count or a fraction outside [0, 1).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a count or a fraction, got {value!r}.")
    if isinstance(value, float | np.floating) and not float(value).is_integer():
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} as a fraction must lie in (0, 1), got {value}.")
        return max(1, int(round(float(value) * total)))
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return int(value)


def _group(entries: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for e in entries:
        groups.setdefault(str(e.get("patient_id", e["scan_id"])), []).append(e)
    return dict(sorted(groups.items()))


def split_by_patient(
    entries: Sequence[Mapping[str, Any]],
    num_val: float | int,
    num_test: float | int,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Split scans into training/validation/test at patient level, deterministically for ``seed``.

    Patients are shuffled with ``np.random.default_rng(seed)``; whole patients go to validation until it holds at
    least ``num_val`` scans, then to test until it holds at least ``num_test`` scans (so with two scans per patient
    an odd count is rounded up); every remaining patient is training. Within a split, entries are sorted by
    ``scan_id``.

    Args:
        entries: scans with ``"scan_id"`` and ``"patient_id"``.
        num_val: validation scans: a count, or a fraction of all scans.
        num_test: test scans: a count, or a fraction of all scans.
        seed: the split seed.

    Raises:
        DataCheckError: when there are no entries, duplicate scan ids, or too few patients for the requested
            validation/test sizes to leave a non-empty training split.
    """
    if not entries:
        raise DataCheckError(["<entries>: no scans to split (empty datalist)"])
    ids = [str(e["scan_id"]) for e in entries]
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise DataCheckError([f"<entries>: duplicated scan_id {d!r}" for d in dup])
    total = len(entries)
    n_val = resolve_count(num_val, total, "num_val")
    n_test = resolve_count(num_test, total, "num_test")
    groups = _group(entries)
    order = [list(groups)[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in SPLITS}
    for pid in order:
        if len(out["validation"]) < n_val:
            key = "validation"
        elif len(out["test"]) < n_test:
            key = "test"
        else:
            key = "training"
        out[key].extend(dict(e) for e in groups[pid])
    if not out["training"] or len(out["validation"]) < n_val or len(out["test"]) < n_test:
        raise DataCheckError(
            [
                f"<entries>: {total} scans of {len(groups)} patients cannot give {n_val} validation and {n_test} test"
                f" scans and a non-empty training split (got {len(out['training'])} training)"
            ]
        )
    for key in SPLITS:
        out[key].sort(key=lambda e: str(e["scan_id"]))
    return out


def choose_labeled(
    training: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    counts: Sequence[int],
) -> dict[str, dict[str, list[str]]]:
    """For each seed, which training scans are labeled for each count: ``{"<seed>": {"<count>": [scan_id]}}``.

    For each seed an ordering of the training scans is drawn with ``np.random.default_rng([seed, LABELED_STREAM])``:
    patients in random order, one random scan of each patient first, then their remaining scans (again patient by
    patient). The labeled set of size ``n`` is the first ``n`` scans of that ordering, so sets are nested.

    Raises:
        DataCheckError: when a count exceeds the number of training scans (or is not positive), or training is empty.
    """
    n_train = len(training)
    problems = []
    if n_train == 0:
        problems.append("<training>: empty training split, no scan can be labeled")
    for c in counts:
        if int(c) < 1:
            problems.append(f"<labeled_counts>: {c} labeled scans requested; counts must be >= 1")
        elif int(c) > n_train:
            problems.append(f"<labeled_counts>: {c} labeled scans requested but the training split has {n_train}")
    if problems:
        raise DataCheckError(problems)
    groups = _group(training)
    pids = list(groups)
    out: dict[str, dict[str, list[str]]] = {}
    for seed in seeds:
        rng = np.random.default_rng([int(seed), LABELED_STREAM])
        patient_order = [pids[i] for i in rng.permutation(len(pids))]
        queues = {}
        for pid in patient_order:
            scans = sorted(str(e["scan_id"]) for e in groups[pid])
            queues[pid] = [scans[i] for i in rng.permutation(len(scans))]
        ordering: list[str] = []
        while len(ordering) < n_train:
            for pid in patient_order:
                if queues[pid]:
                    ordering.append(queues[pid].pop(0))
        out[str(int(seed))] = {str(int(c)): ordering[: int(c)] for c in sorted(set(int(c) for c in counts))}
    return out


def check_splits(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    labeled: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    name: str = "datalist",
) -> None:
    """Prove the splits leak-free: no scan id, patient id or file shared between two splits, something to train on
    (training or, for pre-training only, unlabeled scans), and every labeled scan inside training.

    The ``"unlabeled"`` pool (images only) may share patients with training (other frames of a training patient),
    never with validation or test, and never a scan id or file with any split.

    Raises:
        DataCheckError: listing every overlap, missing scan or empty split.
    """
    problems: list[str] = []
    if not splits.get("training") and not splits.get("unlabeled"):
        problems.append(f"{name}: empty training split (and no unlabeled scans)")
    keys = [k for k in (*SPLITS, "unlabeled") if k in splits]
    for field in ("scan_id", "patient_id", "image"):
        owner: dict[str, str] = {}
        for key in keys:
            for e in splits[key]:
                value = str(e.get(field, e.get("scan_id")))
                first = owner.get(value)
                if first is not None and first != key and not (field == "patient_id" and {first, key} == {
                        "training", "unlabeled"}):
                    problems.append(f"{name}: {field} {value!r} is in both '{first}' and '{key}'")
                owner.setdefault(value, key)
    train_ids = {str(e["scan_id"]) for e in splits.get("training", [])}
    for seed, by_count in (labeled or {}).items():
        for count, ids in by_count.items():
            outside = [s for s in ids if s not in train_ids]
            if outside:
                problems.append(f"{name}: labeled[{seed}][{count}] has scans not in training: {outside}")
            if len(ids) != int(count) or len(set(ids)) != len(ids):
                problems.append(f"{name}: labeled[{seed}][{count}] lists {len(set(ids))} distinct scans, not {count}")
    if problems:
        raise DataCheckError(problems, header=f"split check of {name} failed")


def file_hash(entries: Sequence[Mapping[str, Any]], root: str | Path | None = None) -> str:
    """sha256 over the sorted lines ``"<path relative to root>\t<size in bytes>"`` of every image and label file.

    ``root`` defaults to the deepest folder holding every file, so the hash does not depend on where the dataset
    (or the datalist) lives; paths outside an explicit ``root`` are hashed as absolute paths. Sizes come from
    ``os.stat`` (no file is read): the hash changes when a file is added, removed, renamed or changes size.
    """
    paths = [Path(e[key]).resolve() for e in entries for key in ("image", "label") if key in e]
    if root is None:
        root = Path(os.path.commonpath([p.parent for p in paths])) if paths else Path("/")
    root = Path(root).resolve()
    lines = set()
    for p in paths:
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.as_posix()
        size = os.stat(p).st_size if p.exists() else -1
        lines.add(f"{rel}\t{size}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def split_hash(
    splits: Mapping[str, Sequence[Mapping[str, Any]]], labeled: Mapping[str, Mapping[str, Sequence[str]]]
) -> str:
    """sha256 of the scan ids per split and the labeled sets (a canonical JSON dump)."""
    payload = {k: sorted(str(e["scan_id"]) for e in splits.get(k, [])) for k in SPLITS}
    payload["labeled"] = {s: {c: sorted(v) for c, v in d.items()} for s, d in labeled.items()}  # type: ignore[assignment]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
