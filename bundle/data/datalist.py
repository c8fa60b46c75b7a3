"""The one datalist JSON the configs consume, built from any source, and the splits read back from it.

File format (MONAI decathlon-compatible: ``monai.data.load_decathlon_datalist(path, data_list_key="training")``
reads it as is)::

    {
      "training":   [{"image": ..., "label": ..., "scan_id": ..., "patient_id": ..., ...}, ...],
      "validation": [...],
      "test":       [...],
      "labeled":    {"<seed>": {"<count>": [scan_id, ...]}},   # fine-tuning's labeled scans, nested per seed
      "num_classes": C, "label_names": {"0": "background", ...} | null, "channel": int | null,
      "source": {"kind": "acdc|msd|folder|datalist", "root": "<absolute path>", ...},
      "file_hash": sha256 over sorted (path relative to the files' common folder, size) of every file,
      "split_hash": sha256 over the split assignment and labeled sets,
      "split_seed": int, "seeds": [...], "labeled_counts": [...], "created_by": "..."
    }

Paths are stored relative to the datalist file's folder when the file lies inside that folder (so a dataset folder
that carries its datalist can be moved), and absolute otherwise. :func:`load_split` always returns absolute paths.
Writing is atomic (a temporary file renamed into place), and every check runs before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bundle.data.checks import DataCheckError, check_entries
from bundle.data.preprocessing import IMAGE_SUFFIXES
from bundle.data.sources import SourceScans, find_images, find_scans, nifti_stem
from bundle.data.splits import check_splits, choose_labeled, file_hash, split_by_patient, split_hash
from bundle.files import atomic_path

__all__ = [
    "DATALIST_VERSION",
    "DatalistOptions",
    "build_datalist",
    "infer_num_classes",
    "labeled_subset",
    "load_datalist",
    "load_split",
    "prepare_datalist",
    "pretraining_entries",
    "write_datalist",
]

DATALIST_VERSION = 1
SPLITS = ("training", "validation", "test")
POOLS = (*SPLITS, "unlabeled")  # unlabeled: images only, pre-training only
CREATED_BY = "bundle.data.datalist (scripts/make_datalist.py)"


def infer_num_classes(entries: Sequence[Mapping[str, Any]]) -> int:
    """``max label value + 1`` over every label file (each decoded once); used when the layout declares none."""
    top = 0
    for e in entries:
        if "label" in e:
            top = max(top, int(np.nanmax(np.asanyarray(nib.load(str(e["label"])).dataobj))))
    return top + 1


def _as_int_list(values: Sequence[int] | int | str, name: str) -> list[int]:
    if isinstance(values, str):
        values = json.loads(values)
    if isinstance(values, int | np.integer):
        values = [int(values)]
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a list of integers, got {values!r}.") from e
    return out


def _as_label_names(names: Mapping[Any, Any] | Sequence[str] | str) -> dict[str, str]:
    """``{"0": "background", "1": ...}`` from a mapping (class index -> name), a list (names in class order) or
    either written as JSON."""
    if isinstance(names, str):
        try:
            names = json.loads(names)
        except json.JSONDecodeError as e:
            raise ValueError(f"label_names must be a JSON list or mapping of class names, got {names!r}.") from e
    if isinstance(names, Mapping):
        items = list(names.items())
    elif isinstance(names, list | tuple):
        items = list(enumerate(names))
    else:
        raise ValueError(f"label_names must be a list or a mapping of class names, got {names!r}.")
    out: dict[str, str] = {}
    for key, name in items:
        try:
            index = int(key)
        except (TypeError, ValueError) as e:
            raise ValueError(f"label_names: class index {key!r} is not an integer.") from e
        if index < 0 or not str(name).strip():
            raise ValueError(f"label_names: class {key!r} -> {name!r} needs an index >= 0 and a non-empty name.")
        out[str(index)] = str(name).strip()
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


@dataclass(frozen=True)
class DatalistOptions:
    """How a dataset on disk becomes a datalist: its layout, the split and the labeled subsets recorded.

    The one set of datalist settings, shared by :func:`build_datalist`, :func:`prepare_datalist` (the configs' entry
    point) and ``scripts/make_datalist.py`` (the command line).

    Args:
        kind: ``"acdc"``, ``"msd"``, ``"folder"``, ``"datalist"`` or ``"auto"`` (see :mod:`bundle.data.sources`).
        seeds: seeds for which labeled subsets are recorded.
        labeled_counts: numbers of labeled scans recorded per seed (nested sets).
        num_val: validation scans (count, or fraction of all scans); ignored when the source has a validation split.
        num_test: test scans (count or fraction); ignored when the source has a test split.
        split_seed: seed of the patient-level train/validation/test split.
        num_classes: number of classes C; default: declared by the layout, else max label value + 1.
        channel: channel of 4D multi-channel images (MSD default 0).
        image_pattern: folder sources: image pattern with ``{id}``.
        label_pattern: folder sources: label pattern with ``{id}``.
        patient_regex: folder sources: regex giving the patient id from the scan id.
        check: run :func:`~bundle.data.checks.check_entries` on every scan (recommended; reads every file once).
        unlabeled_dir: a folder of unlabeled images (NIfTI or NRRD files at any depth) added to the pre-training pool;
            a folder without any is an error.
        label_names: names of the classes, background included: a list in class order or a mapping from class index
            to name (JSON text of either is read); they name the columns of every evaluation. Default: the names the
            layout declares (ACDC's RV / Myo / LV, a Decathlon ``dataset.json``'s ``labels``), else the indices.

    Raises:
        ValueError: when ``seeds`` or ``labeled_counts`` is not a list of integers (a JSON string of one is read), or
            ``label_names`` is neither a list nor a mapping of non-empty names.

    Example:
        >>> build_datalist("/data/prostate", DatalistOptions(kind="folder", num_val=2, seeds=(0,)))  # doctest: +SKIP
    """

    kind: str = "auto"
    seeds: Sequence[int] = (0, 1, 2)
    labeled_counts: Sequence[int] = (1, 2, 4)
    num_val: float | int = 0.1
    num_test: float | int = 0.2
    split_seed: int = 0
    num_classes: int | None = None
    channel: int | None = None
    image_pattern: str | None = None
    label_pattern: str | None = None
    patient_regex: str | None = None
    check: bool = True
    unlabeled_dir: str | os.PathLike | None = None
    label_names: Mapping[str, str] | Sequence[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(_as_int_list(self.seeds, "seeds")))
        object.__setattr__(self, "labeled_counts", tuple(_as_int_list(self.labeled_counts, "labeled_counts")))
        if self.label_names is not None:
            object.__setattr__(self, "label_names", _as_label_names(self.label_names))


def build_datalist(root: str | Path, options: DatalistOptions = DatalistOptions()) -> dict[str, Any]:
    """Find the scans of a dataset, split them, choose the labeled subsets, check everything; absolute paths.

    Unlabeled scans (those the source has without labels, and every image below ``options.unlabeled_dir``) go to the
    ``"unlabeled"`` pool: pre-training reads them with the training split; they never join a labeled subset or an
    evaluation split. A source with unlabeled scans only gives empty splits (pre-training only).

    Args:
        root: dataset folder (or datalist JSON file).
        options: the layout, split and labeled-subset settings (see :class:`DatalistOptions`).

    Raises:
        DataCheckError: for any problem in the layout, the files, the split sizes or the labeled counts.
    """
    src: SourceScans = find_scans(
        options.kind, root, options.channel, options.image_pattern, options.label_pattern, options.patient_regex
    )
    channel = src.channel if options.channel is None else options.channel
    unlabeled_dir = options.unlabeled_dir
    unlabeled = [dict(e) for e in src.unlabeled]
    if unlabeled_dir is not None:
        found = find_images(unlabeled_dir)
        if not found:
            raise DataCheckError([f"{Path(unlabeled_dir).expanduser().resolve()}: unlabeled_dir holds no NIfTI or NRRD "
                                  f"image (suffixes {', '.join(IMAGE_SUFFIXES)}, at any depth; label files left out)"])
        unlabeled += found
    intact = bool(src.splits and src.splits.get("validation") and src.splits.get("test"))
    if not src.entries:  # unlabeled scans only: pre-training, nothing to fine-tune or evaluate
        splits = {k: [] for k in SPLITS}
    elif intact and src.splits:
        splits = {k: [dict(e) for e in src.splits.get(k, [])] for k in SPLITS}
    elif src.splits:
        # datalist without validation and/or test: carve what is missing out of its training list
        given = {k: v for k, v in src.splits.items() if v}
        carved = split_by_patient(
            given["training"],
            num_val=0 if "validation" in given else options.num_val,
            num_test=0 if "test" in given else options.num_test,
            seed=options.split_seed,
        )
        splits = {k: given.get(k) or carved[k] for k in SPLITS}
        splits["training"] = carved["training"]
    else:
        splits = split_by_patient(src.entries, options.num_val, options.num_test, options.split_seed)
    all_entries = [e for k in SPLITS for e in splits[k]]
    num_classes = options.num_classes
    if num_classes is None:
        num_classes = src.num_classes if src.num_classes is not None or not all_entries else infer_num_classes(
            all_entries)
    if not all_entries:
        labeled: dict[str, dict[str, list[str]]] = {}
    elif intact and src.labeled and _same_recorded(src.labeled, options.seeds, options.labeled_counts):
        labeled = src.labeled  # a datalist of ours passes straight through, its labeled subsets included
    else:
        labeled = choose_labeled(splits["training"], options.seeds, options.labeled_counts)
    check_splits({**splits, "unlabeled": unlabeled}, labeled, name=str(root))
    label_names = src.label_names
    if options.label_names is not None:
        label_names = dict(options.label_names)
        wanted = [str(c) for c in range(int(num_classes))] if num_classes is not None else None
        if wanted is not None and list(label_names) != wanted:
            raise DataCheckError(
                [f"{root}: label_names name the classes {list(label_names)}, but the labels have {num_classes} classes"
                 f" {wanted}; give one name per class, background included"],
                header="label_names do not match the classes",
            )
    if options.check and all_entries:
        check_entries(all_entries, num_classes=int(num_classes), require_label=True, channel=channel, name="scans")
    if options.check and unlabeled:
        check_entries(unlabeled, num_classes=None, require_label=False, channel=channel, name="unlabeled scans")
    # root: where the scans were found (an ACDC folder's training/, a datalist JSON's folder); dataset_dir: what the
    # user passed, the value a later command compares against
    dataset_dir = str(Path(root).expanduser().resolve())
    source: dict[str, Any] = {"kind": src.kind, "root": str(src.root), "dataset_dir": dataset_dir}
    if unlabeled_dir is not None:
        source["unlabeled_dir"] = str(Path(unlabeled_dir).expanduser().resolve())
    source.update({k: v for k, v in src.extra.items() if v is not None})
    return {
        "training": splits["training"],
        "validation": splits["validation"],
        "test": splits["test"],
        "unlabeled": unlabeled,
        "labeled": labeled,
        "num_classes": int(num_classes) if num_classes is not None else None,
        "label_names": label_names,
        "channel": channel,
        "source": source,
        "file_hash": file_hash(all_entries + unlabeled),
        "split_hash": split_hash(splits, labeled),
        "split_seed": int(options.split_seed),
        "seeds": sorted(int(s) for s in labeled),
        "labeled_counts": sorted({int(c) for d in labeled.values() for c in d}),
        "version": DATALIST_VERSION,
        "created_by": CREATED_BY,
    }


def _same_recorded(labeled: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], counts: Sequence[int]) -> bool:
    return all(str(s) in labeled and all(str(c) in labeled[str(s)] for c in counts) for s in seeds)


def _relative(path: str, folder: Path) -> str:
    p = Path(path).resolve()
    try:
        return p.relative_to(folder).as_posix()
    except ValueError:
        return str(p)


def write_datalist(datalist: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``datalist`` atomically to ``path`` (paths inside its folder made relative to it); return the path."""
    path = Path(path).expanduser().resolve()
    out = dict(datalist)
    for key in POOLS:
        out[key] = []
        for e in datalist.get(key, []):
            rel = {k: _relative(e[k], path.parent) for k in ("image", "label") if isinstance(e.get(k), str)}
            out[key].append({**e, **rel})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(out, indent=4) + "\n")
    return path


def load_datalist(datalist: str | Path | Mapping[str, Any], base_dir: str | Path | None = None) -> dict[str, Any]:
    """Read a datalist (file or already-loaded dict) with every path made absolute and its splits checked.

    Args:
        datalist: path of the JSON file, or its content.
        base_dir: folder relative paths are relative to (default: the file's folder, or the working directory for
            a dict).

    Raises:
        DataCheckError: for a missing/unreadable file, a missing training split, or leaking splits.
    """
    if isinstance(datalist, Mapping):
        data = dict(datalist)
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        name = "datalist"
    else:
        p = Path(datalist).expanduser()
        if not p.is_file():
            raise DataCheckError([f"{p}: missing file (datalist JSON)"])
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataCheckError([f"{p}: unreadable JSON ({e})"]) from e
        base = Path(base_dir) if base_dir is not None else p.resolve().parent
        name = str(p)
    if not isinstance(data, Mapping) or not isinstance(data.get("training"), list):
        raise DataCheckError([f"{name}: no 'training' list (not a datalist)"])
    for key in POOLS:
        items = data.get(key) or []
        resolved = []
        for e in items:
            e = {"image": e} if isinstance(e, str) else dict(e)
            for k in ("image", "label"):
                if isinstance(e.get(k), str):
                    e[k] = str((base / e[k]).resolve())
            e.setdefault("scan_id", nifti_stem(e["image"]))
            resolved.append(e)
        data[key] = resolved
    data.setdefault("labeled", {})
    check_splits({k: data[k] for k in POOLS}, data["labeled"], name=name)
    data["_path"] = name
    return data


def load_split(
    datalist: str | Path | Mapping[str, Any],
    split: str,
    labeled_seed: int | None = None,
    num_labeled: int | None = None,
    with_labels: bool = True,
    allow_empty: bool = False,
) -> list[dict[str, Any]]:
    """Entries of one split with absolute paths.

    Args:
        datalist: datalist JSON path (or its loaded content, see :func:`load_datalist`).
        split: ``"training"``, ``"validation"``, ``"test"`` or ``"unlabeled"`` (images only).
        labeled_seed: seed whose labeled subset to use; may be omitted when only one seed is recorded.
        num_labeled: ``"training"`` only: return only the labeled scans of that seed and count. Asking for every
            training scan (``num_labeled == len(training)``) returns all of them even if not recorded.
        with_labels: ``False`` drops ``"label"`` from every entry (pre-training sees no labels).
        allow_empty: return ``[]`` for an empty split instead of raising.

    Raises:
        ValueError: for an unknown split, ``num_labeled`` with a split other than training, or a seed/count that
            was not recorded (more labeled scans requested than exist included).
        DataCheckError: when the split is empty, or the datalist is missing/malformed/leaking.

    Example:
        >>> load_split("datalist.json", "training", labeled_seed=0, num_labeled=2)  # doctest: +SKIP
    """
    if split not in POOLS:
        raise ValueError(f"Unsupported split: {split!r}; expected one of {POOLS}.")
    data = load_datalist(datalist)
    entries = data[split]
    if not entries and not allow_empty:
        unlabeled = f" (it holds {len(data['unlabeled'])} unlabeled scans only)" if data["unlabeled"] else ""
        raise DataCheckError([f"{data['_path']}: empty '{split}' split{unlabeled}"])
    if num_labeled is not None:
        if split != "training":
            raise ValueError(f"num_labeled applies to the 'training' split only, not {split!r}.")
        n_train = len(entries)
        if int(num_labeled) == n_train and n_train > 0:
            pass
        else:
            labeled = data.get("labeled") or {}
            if labeled_seed is None:
                if len(labeled) != 1:
                    raise ValueError(f"labeled_seed is required: seeds recorded in {data['_path']}: {sorted(labeled)}.")
                labeled_seed = int(next(iter(labeled)))
            by_count = labeled.get(str(int(labeled_seed)))
            if by_count is None:
                raise ValueError(
                    f"{data['_path']}: no labeled subsets recorded for seed {labeled_seed} (seeds: {sorted(labeled)})."
                )
            ids = by_count.get(str(int(num_labeled)))
            if ids is None:
                more = f" (the training split has {n_train} scans)" if int(num_labeled) > n_train else ""
                raise ValueError(
                    f"{data['_path']}: {num_labeled} labeled scans for seed {labeled_seed} were not recorded"
                    f"{more}; recorded counts: {sorted(by_count, key=int)}."
                )
            by_id = {str(e["scan_id"]): e for e in entries}
            entries = [by_id[s] for s in ids]
    if not with_labels:
        entries = [{k: v for k, v in e.items() if k != "label"} for e in entries]
    return [dict(e) for e in entries]


def pretraining_entries(datalist: str | Path | Mapping[str, Any]) -> list[dict[str, Any]]:
    """What pre-training reads: the training split with its labels dropped, then the unlabeled pool.

    Raises:
        DataCheckError: when both are empty.
    """
    data = load_datalist(datalist)
    entries = load_split(data, "training", with_labels=False, allow_empty=True) + load_split(
        data, "unlabeled", allow_empty=True)
    if not entries:
        raise DataCheckError([f"{data['_path']}: no scan to pre-train on (empty 'training' and 'unlabeled')"])
    return entries


def labeled_subset(entries: Sequence[Mapping[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """The entries that carry a ``"label"``, in order, at most ``limit`` of them (``None``: all); may be empty.

    Used for figures that need labels where a split may hold unlabeled scans (pre-training's cluster health).

    Raises:
        ValueError: when ``limit`` is below 1.
    """
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}.")
    out = [dict(e) for e in entries if e.get("label")]
    return out if limit is None else out[: int(limit)]


def _check_existing(path: Path, dataset_dir: str | os.PathLike, options: DatalistOptions) -> None:
    """Refuse an existing datalist built from another dataset, other unlabeled scans or another split seed, or one
    that lists missing files (files are not re-read)."""
    data = load_datalist(path)
    source = data.get("source") or {}
    recorded = source.get("dataset_dir", source.get("root"))
    accepted = {Path(p).resolve() for p in (source.get("dataset_dir"), source.get("root")) if p is not None}
    if recorded is not None and Path(dataset_dir).expanduser().resolve() not in accepted:
        raise DataCheckError(
            [
                f"{path}: built from {recorded}, not from dataset_dir {dataset_dir}; pass --datalist <new file> "
                "for this dataset (or delete the old datalist)"
            ],
            header="datalist belongs to another dataset",
        )
    if options.unlabeled_dir is not None:
        wanted = str(Path(options.unlabeled_dir).expanduser().resolve())
        if source.get("unlabeled_dir") != wanted:
            built = f"with unlabeled_dir {source['unlabeled_dir']}" if source.get("unlabeled_dir") else (
                "without unlabeled_dir")
            raise DataCheckError(
                [f"{path}: built {built}, not with {wanted}; pass --datalist <new file> (or delete the old one)"],
                header="datalist was built with other unlabeled scans",
            )
    if int(data.get("split_seed", options.split_seed)) != int(options.split_seed):
        raise DataCheckError(
            [f"{path}: recorded split_seed {data.get('split_seed')} differs from the requested {options.split_seed}"],
            header="datalist was split with another seed",
        )
    if options.label_names is not None and data.get("label_names") != options.label_names:
        raise DataCheckError(
            [f"{path}: recorded label_names {data.get('label_names')} differ from the requested {options.label_names};"
             " pass --datalist <new file> (or delete the old one)"],
            header="datalist names its classes otherwise",
        )
    missing = [
        f"{e[k]}: missing file (listed in {path}, split '{split}')"
        for split in POOLS
        for e in data[split]
        for k in ("image", "label")
        if k in e and not Path(e[k]).is_file()
    ]
    if missing:
        raise DataCheckError(missing, header=f"datalist {path} lists missing files")


def prepare_datalist(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike,
    generate_if_missing: bool = False,
    synthetic_patients: int = 100,
    synthetic_seed: int = 0,
    **options: Any,
) -> str:
    """Return the path of the datalist shared by every config, creating the data and the datalist if needed.

    An existing datalist file is used as it is, so pre-training, fine-tuning and evaluation see the same split: its
    splits must be leak-free, every file it lists must exist (files are not re-read), and it must have been built
    from ``dataset_dir`` with the same ``split_seed`` (and the same ``unlabeled_dir``, when one is given; ``None``
    accepts whatever it holds: fine-tuning and evaluation do not read the unlabeled pool).

    Otherwise, when ``dataset_dir`` does not exist and ``generate_if_missing`` is set, the synthetic ACDC dataset is
    written there first (:func:`bundle.data.synthetic.generate_synthetic_acdc`); then the datalist is built from
    ``dataset_dir`` with :func:`build_datalist` (``kind="auto"`` detects MSD / ACDC / datalist JSON / folder of pairs;
    every file checked) and written atomically.

    Meant for a config: ``"$bundle.data.datalist.prepare_datalist(@dataset_dir, @datalist, split_seed=@split_seed)"``.

    Args:
        dataset_dir: dataset folder (ACDC / Decathlon / folder of pairs / datalist JSON).
        datalist: path of the shared datalist JSON (``runs/datalist.json``).
        generate_if_missing: write the synthetic ACDC dataset into a missing ``dataset_dir``.
        synthetic_patients: number of synthetic patients.
        synthetic_seed: seed of the synthetic dataset (independent of the training seed).
        options: fields of :class:`DatalistOptions` (``num_classes``, ``split_seed``, ``channel``,
            ``unlabeled_dir``, ``seeds``, ``labeled_counts``, ...).

    Raises:
        FileNotFoundError: when ``dataset_dir`` does not exist, no datalist exists yet and nothing may be generated.
        DataCheckError: for any problem in the data or the datalist.
    """
    settings = DatalistOptions(**options)
    path = Path(datalist).expanduser()
    if path.is_file():
        _check_existing(path, dataset_dir, settings)
        return str(path)
    if not os.path.exists(dataset_dir):
        if not generate_if_missing:
            raise FileNotFoundError(
                f"dataset_dir {str(dataset_dir)!r} does not exist and no datalist {str(datalist)!r} was built yet; "
                "check the path, or pass --generate_if_missing True to write the synthetic ACDC data there."
            )
        from bundle.data.synthetic import generate_synthetic_acdc

        msg = f"generating {synthetic_patients} synthetic ACDC patients (seed {synthetic_seed}) in {dataset_dir}"
        logging.getLogger(__name__).info(msg)
        generate_synthetic_acdc(dataset_dir, num_patients=int(synthetic_patients), seed=int(synthetic_seed))
    return str(write_datalist(build_datalist(dataset_dir, settings), path))
