"""Find the scans of a dataset on disk, in any of the four layouts users bring.

Each ``find_*`` function returns a :class:`SourceScans`: the labeled 3D scans found (absolute paths, one dict per
scan with ``"image"``, ``"label"``, ``"scan_id"`` and ``"patient_id"``), the unlabeled ones (images only: they join
pre-training, never a labeled pool or an evaluation split) and what the layout says about the classes.
Missing files and malformed layouts are collected and raised as one
:class:`~bundle.data.checks.DataCheckError` naming every file and problem.

Layouts (``kind``):

- ``"acdc"``: ACDC native layout ``patientNNN/patientNNN_frameXX.nii.gz`` + ``..._gt.nii.gz`` + ``Info.cfg``.
  Only the ED and ES frames listed in ``Info.cfg`` are scans (``patientNNN_4d.nii.gz`` is ignored); ``root`` is the
  folder of patient folders or a folder holding ``training/`` (only ``training/`` is used then). Scan id is the
  frame file's stem (``patient001_frame01``), patient id the folder name; both phases share the patient id, which
  keeps them in the same split.
- ``"msd"``: Medical Segmentation Decathlon task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``). The
  labeled ``"training"`` cases are the scans; the ``"test"`` images (``imagesTs``, no labels) are unlabeled.
  Multi-channel (4D) images keep their channel axis; the channel to use (default 0, T2 for the prostate task) is
  recorded.
- ``"folder"``: a folder of image/mask pairs matched by patterns with an ``{id}`` placeholder, e.g.
  ``images/{id}.nii.gz`` and ``masks/{id}_Segmentation.nii.gz``. Without patterns, common pairs are tried; a
  folder with no pair at all is a folder of unlabeled images (every NIfTI file below it). In a folder with pairs,
  an image without its mask is an error (a mask gone missing, not an unlabeled scan).
- ``"datalist"``: an existing MONAI datalist JSON (decathlon format, ``"training"`` and optionally
  ``"validation"``/``"test"`` lists); paths are resolved against the JSON's folder, as MONAI's
  ``load_decathlon_datalist`` does, and its splits (and ``"labeled"`` subsets, when present) are kept. Entries
  without ``"label"`` (in any list, or in an ``"unlabeled"`` list) are unlabeled.

:func:`nifti_stem` (a NIfTI file's name without its extension) serves every reader and writer of the bundle.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundle.data.checks import DataCheckError
from bundle.data.preprocessing import IMAGE_SUFFIXES

__all__ = [
    "ACDC_LABEL_NAMES",
    "FOLDER_PATTERNS",
    "SOURCE_KINDS",
    "SourceScans",
    "detect_source_kind",
    "find_acdc",
    "find_datalist",
    "find_folder",
    "find_images",
    "find_msd",
    "find_scans",
    "nifti_stem",
    "parse_acdc_info",
]

SOURCE_KINDS = ("acdc", "msd", "folder", "datalist")
logger = logging.getLogger(__name__)
ACDC_LABEL_NAMES = {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}
SPLIT_KEYS = ("training", "validation", "test")
# (image pattern, label pattern) pairs tried, in order, when a folder source is given no patterns
FOLDER_PATTERNS: tuple[tuple[str, str], ...] = (
    ("images/{id}.nii.gz", "masks/{id}_Segmentation.nii.gz"),
    ("images/{id}.nii.gz", "masks/{id}.nii.gz"),
    ("images/{id}.nii.gz", "labels/{id}.nii.gz"),
    ("image/{id}.nii.gz", "label/{id}.nii.gz"),
    ("imagesTr/{id}.nii.gz", "labelsTr/{id}.nii.gz"),
    ("{id}.nii.gz", "{id}_Segmentation.nii.gz"),
    ("{id}.nii.gz", "{id}_seg.nii.gz"),
    ("{id}.nii.gz", "{id}_gt.nii.gz"),
    ("{id}.nii.gz", "{id}_label.nii.gz"),
)
_ACDC_PATIENT = re.compile(r"^patient\d+$")


@dataclass
class SourceScans:
    """The labeled scans found in one dataset and what its layout says about them.

    Attributes:
        kind: one of :data:`SOURCE_KINDS`.
        root: the folder (or datalist file) the scans were found in; hashes use paths relative to its folder.
        entries: one dict per scan, absolute ``"image"``/``"label"`` paths, ``"scan_id"``, ``"patient_id"`` and
            layout extras (ACDC: ``"phase"``, ``"frame"``).
        num_classes: number of classes declared by the layout (``None`` when it declares none).
        label_names: ``{"0": "background", ...}`` when known.
        channel: the channel of multi-channel images to use (``None`` for 3D images).
        splits: predefined ``{"training": [...], "validation": [...], "test": [...]}`` (datalist sources only).
        labeled: predefined ``{"<seed>": {"<count>": [scan_id, ...]}}`` (datalist sources only).
        unlabeled: images without labels (``"image"``, ``"scan_id"``, ``"patient_id"``): pre-training only.
    """

    kind: str
    root: Path
    entries: list[dict[str, Any]]
    num_classes: int | None = None
    label_names: dict[str, str] | None = None
    channel: int | None = None
    splits: dict[str, list[dict[str, Any]]] | None = None
    labeled: dict[str, dict[str, list[str]]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    unlabeled: list[dict[str, Any]] = field(default_factory=list)


def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (or any other single suffix)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _nifti_file(base: Path) -> Path:
    """``base`` + ``.nii.gz``, or ``.nii`` when only the uncompressed file exists."""
    gz = base.with_name(base.name + ".nii.gz")
    plain = base.with_name(base.name + ".nii")
    return plain if (not gz.exists() and plain.exists()) else gz


# ----------------------------------------------------------------------------------------------------- ACDC
def parse_acdc_info(path: str | Path) -> dict[str, str]:
    """Parse an ACDC ``Info.cfg`` (``"ED: 1"``, ``"ES: 12"``, ``"Group: DCM"``, ... one per line) into a dict."""
    info: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def _acdc_patient_root(root: Path) -> Path:
    def has_patients(p: Path) -> bool:
        return p.is_dir() and any(c.is_dir() and _ACDC_PATIENT.match(c.name) for c in p.iterdir())

    if has_patients(root / "training"):
        return root / "training"
    if has_patients(root):
        return root
    raise DataCheckError([f"{root}: no ACDC patient folders (patientNNN/) here or in {root / 'training'}"])


def find_acdc(root: str | Path) -> SourceScans:
    """Find the ED and ES scans of an ACDC training folder.

    Args:
        root: the folder of ``patientNNN`` folders, or a folder holding ``training/``.

    Raises:
        DataCheckError: naming every missing ``Info.cfg``/frame/ground-truth file and malformed ``Info.cfg``.
    """
    root = Path(root).expanduser().resolve()
    patient_root = _acdc_patient_root(root)
    problems: list[str] = []
    entries: list[dict[str, Any]] = []
    for pdir in sorted(c for c in patient_root.iterdir() if c.is_dir() and _ACDC_PATIENT.match(c.name)):
        pid = pdir.name
        cfg = pdir / "Info.cfg"
        if not cfg.is_file():
            problems.append(f"{cfg}: missing file (Info.cfg with the ED/ES frames)")
            continue
        info = parse_acdc_info(cfg)
        frames: dict[str, int] = {}
        for phase in ("ED", "ES"):
            try:
                frames[phase] = int(info[phase])
            except (KeyError, ValueError):
                problems.append(f"{cfg}: no valid '{phase}: <frame number>' line (found {info.get(phase)!r})")
        seen: set[int] = set()
        for phase, frame in frames.items():
            if frame in seen:  # ED == ES: one scan only
                continue
            seen.add(frame)
            image = _nifti_file(pdir / f"{pid}_frame{frame:02d}")
            label = _nifti_file(pdir / f"{pid}_frame{frame:02d}_gt")
            ok = True
            for path, what in ((image, "image"), (label, "ground truth")):
                if not path.is_file():
                    problems.append(f"{path}: missing file ({phase} {what} listed in {cfg.name})")
                    ok = False
            if ok:
                entries.append(
                    {
                        "image": str(image),
                        "label": str(label),
                        "scan_id": nifti_stem(image),
                        "patient_id": pid,
                        "phase": phase,
                        "frame": frame,
                    }
                )
    if problems:
        raise DataCheckError(problems, header=f"ACDC layout under {patient_root} is incomplete")
    if not entries:
        raise DataCheckError([f"{patient_root}: no ACDC scans found"])
    return SourceScans("acdc", patient_root, entries, num_classes=4, label_names=dict(ACDC_LABEL_NAMES))


# ------------------------------------------------------------------------------------------------------ MSD
def find_msd(root: str | Path, channel: int | None = 0) -> SourceScans:
    """Find the labeled training cases of a Medical Segmentation Decathlon task folder.

    Args:
        root: the task folder (holding ``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        channel: channel of multi-modality images to use (default 0: T2 for the prostate task); ignored (recorded
            as ``None``) for single-modality tasks.

    Raises:
        DataCheckError: for a missing/invalid ``dataset.json``, missing files, or an out-of-range channel.
    """
    root = Path(root).expanduser().resolve()
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DataCheckError([f"{meta_path}: missing file (Decathlon dataset.json)"])
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataCheckError([f"{meta_path}: unreadable JSON ({e})"]) from e
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise DataCheckError([f"{meta_path}: no 'training' cases listed"])
    modalities = meta.get("modality") or {"0": "unknown"}
    n_mod = len(modalities)
    problems: list[str] = []
    if n_mod > 1:
        channel = 0 if channel is None else int(channel)
        if not 0 <= channel < n_mod:
            problems.append(f"{meta_path}: channel {channel} requested but the task has {n_mod} modalities")
    else:
        if channel not in (None, 0):
            problems.append(f"{meta_path}: channel {channel} requested but the task has a single modality")
        channel = None
    entries: list[dict[str, Any]] = []
    for i, case in enumerate(training):
        if not isinstance(case, Mapping) or "image" not in case or "label" not in case:
            problems.append(f"{meta_path}: training case {i} lacks 'image'/'label' ({case!r})")
            continue
        image = (root / case["image"]).resolve()
        label = (root / case["label"]).resolve()
        ok = True
        for path, what in ((image, "image"), (label, "label")):
            if not path.is_file():
                problems.append(f"{path}: missing file ({what} listed in {meta_path.name})")
                ok = False
        if ok:
            sid = nifti_stem(image)
            entries.append({"image": str(image), "label": str(label), "scan_id": sid, "patient_id": sid})
    unlabeled: list[dict[str, Any]] = []
    absent: list[str] = []
    for i, case in enumerate(meta.get("test") or []):
        rel = case.get("image") if isinstance(case, Mapping) else case
        if not isinstance(rel, str):
            problems.append(f"{meta_path}: test case {i} has no image path ({case!r})")
            continue
        image = (root / rel).resolve()
        if not image.is_file():
            absent.append(str(image))
            continue
        sid = nifti_stem(image)
        unlabeled.append({"image": str(image), "scan_id": sid, "patient_id": sid})
    if absent:  # optional extras (often not downloaded): the labeled cases are still usable
        logger.warning(f"{meta_path}: {len(absent)} listed test images missing, pre-training goes without them: "
                       f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
    if problems:
        raise DataCheckError(problems, header=f"Decathlon folder {root} is incomplete")
    labels = meta.get("labels")
    label_names = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else None
    extra = {"modality": {str(k): str(v) for k, v in modalities.items()}, "name": meta.get("name")}
    if channel is not None:
        extra["channel_name"] = str(modalities.get(str(channel), channel))
    return SourceScans(
        "msd",
        root,
        entries,
        num_classes=len(label_names) if label_names else None,
        label_names=label_names,
        channel=channel,
        extra=extra,
        unlabeled=unlabeled,
    )


# --------------------------------------------------------------------------------------------------- folder
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    if pattern.count("{id}") != 1:
        raise ValueError(f"pattern {pattern!r} must contain '{{id}}' exactly once.")
    head, tail = pattern.split("{id}")
    return re.compile("^" + re.escape(head) + r"(?P<id>[^/]+?)" + re.escape(tail) + "$")


def _match_pairs(root: Path, image_pattern: str, label_pattern: str) -> tuple[list[tuple[str, Path]], list[Path]]:
    """Return ([(id, image path)], [label paths]) for images matching ``image_pattern`` that are not labels."""
    img_re, lab_re = _pattern_regex(image_pattern), _pattern_regex(label_pattern)
    glob = image_pattern.replace("{id}", "*")
    images: list[tuple[str, Path]] = []
    for path in sorted(root.glob(glob)):
        rel = path.relative_to(root).as_posix()
        m = img_re.match(rel)
        if m is None or lab_re.match(rel) is not None or not path.is_file():
            continue
        images.append((m.group("id"), path))
    labels = [root / label_pattern.format(id=sid) for sid, _ in images]
    return images, labels


def find_folder(
    root: str | Path,
    image_pattern: str | None = None,
    label_pattern: str | None = None,
    patient_regex: str | None = None,
) -> SourceScans:
    """Find image/mask pairs in a plain folder.

    Args:
        root: the folder.
        image_pattern: image path relative to ``root`` with one ``{id}`` placeholder, e.g. ``images/{id}.nii.gz``.
        label_pattern: label path relative to ``root`` with the same placeholder, e.g.
            ``masks/{id}_Segmentation.nii.gz``. Without patterns, the pairs of :data:`FOLDER_PATTERNS` are tried
            and the one matching the most pairs is used.
        patient_regex: optional regex applied to the scan id whose first group (or whole match) is the patient id,
            so scans of one patient stay in one split; default: each scan is its own patient.

    Raises:
        DataCheckError: when no image matches, or when an image has no label file.
        ValueError: when only one of the two patterns is given, or a pattern lacks ``{id}``.
    """
    root = Path(root).expanduser().resolve()
    if (image_pattern is None) != (label_pattern is None):
        raise ValueError("give both image_pattern and label_pattern, or neither (autodetect).")
    if image_pattern is None or label_pattern is None:
        best: tuple[int, str, str] | None = None
        for ip, lp in FOLDER_PATTERNS:
            images, labels = _match_pairs(root, ip, lp)
            n_pairs = sum(1 for lab in labels if lab.is_file())
            if n_pairs and (best is None or n_pairs > best[0]):
                best = (n_pairs, ip, lp)
        if best is None:
            unlabeled = find_images(root)
            if unlabeled:  # no pair at all: a folder of unlabeled images
                return SourceScans("folder", root, [], unlabeled=unlabeled, extra={"unlabeled_only": True})
            tried = "; ".join(f"{ip} + {lp}" for ip, lp in FOLDER_PATTERNS)
            raise DataCheckError([f"{root}: no image/label pairs and no NIfTI or NRRD image found "
                                  f"(patterns tried: {tried})"])
        _, image_pattern, label_pattern = best
    images, labels = _match_pairs(root, image_pattern, label_pattern)
    if not images:
        raise DataCheckError([f"{root}: no file matches image_pattern {image_pattern!r}"])
    pre = re.compile(patient_regex) if patient_regex else None
    problems: list[str] = []
    entries: list[dict[str, Any]] = []
    for (sid, image), label in zip(images, labels, strict=True):
        if not label.is_file():
            problems.append(f"{label}: missing file (label of {image.name}, pattern {label_pattern!r})")
            continue
        pid = sid
        if pre is not None:
            m = pre.search(sid)
            if m is None:
                problems.append(f"{image}: patient_regex {patient_regex!r} does not match scan id {sid!r}")
                continue
            pid = m.group(1) if m.groups() else m.group(0)
        entries.append({"image": str(image), "label": str(label), "scan_id": sid, "patient_id": pid})
    if problems:
        raise DataCheckError(problems, header=f"folder {root} is incomplete")
    return SourceScans("folder", root, entries, extra={"image_pattern": image_pattern, "label_pattern": label_pattern})


def find_images(root: str | Path, exclude_suffixes: Sequence[str] = ("_gt", "_seg", "_Segmentation", "_label")
                ) -> list[dict[str, Any]]:
    """Every NIfTI or NRRD image below ``root`` (sub-folders included, sorted), as unlabeled entries; files whose stem
    ends with a label suffix are left out. Scan ids are the paths relative to ``root`` without the extension, so equal
    file names in different sub-folders stay distinct.

    Raises:
        DataCheckError: when ``root`` is not a folder.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataCheckError([f"{root}: missing folder of unlabeled images (no such directory)"])
    entries = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not path.name.endswith(IMAGE_SUFFIXES):
            continue
        if nifti_stem(path).endswith(tuple(exclude_suffixes)) or path.name.startswith("."):
            continue
        sid = (path.parent.relative_to(root) / nifti_stem(path)).as_posix()
        entries.append({"image": str(path), "scan_id": sid, "patient_id": sid})
    return entries


# ------------------------------------------------------------------------------------------------- datalist
def _resolve_entry(item: Any, base: Path, where: str, problems: list[str]) -> dict[str, Any] | None:
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, Mapping) or "image" not in item:
        problems.append(f"{where}: entry without an 'image' path ({item!r})")
        return None
    entry = dict(item)
    for key in ("image", "label"):
        if key in entry and isinstance(entry[key], str):
            entry[key] = str((base / entry[key]).resolve())
    entry.setdefault("scan_id", nifti_stem(entry["image"]))
    entry["scan_id"] = str(entry["scan_id"])
    entry.setdefault("patient_id", entry["scan_id"])
    entry["patient_id"] = str(entry["patient_id"])
    return entry


def find_datalist(path: str | Path) -> SourceScans:
    """Read an existing MONAI (decathlon-format) datalist JSON; its splits are kept as they are.

    Args:
        path: the JSON file; relative paths in it are relative to its folder.

    Raises:
        DataCheckError: for an unreadable file, no ``"training"`` (or ``"unlabeled"``) entries, or entries without
            ``"image"``.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataCheckError([f"{path}: missing file (datalist JSON)"])
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataCheckError([f"{path}: unreadable JSON ({e})"]) from e
    if not isinstance(data, Mapping) or not (data.get("training") or data.get("unlabeled")):
        raise DataCheckError([f"{path}: no 'training' (or 'unlabeled') entries (empty datalist)"])
    base = path.parent
    problems: list[str] = []
    splits: dict[str, list[dict[str, Any]]] = {}
    for key in (*SPLIT_KEYS, "unlabeled"):
        items = data.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            problems.append(f"{path}: '{key}' is a {type(items).__name__}, expected a list")
            continue
        resolved = [_resolve_entry(it, base, f"{path} [{key}][{i}]", problems) for i, it in enumerate(items)]
        splits[key] = [e for e in resolved if e is not None]
    if problems:
        raise DataCheckError(problems, header=f"datalist {path} is malformed")
    unlabeled = [{k: v for k, v in e.items() if k != "label"} for e in splits.pop("unlabeled", [])]
    for key in SPLIT_KEYS:  # entries without a label (e.g. MSD-style test lists) are unlabeled scans
        unlabeled += [e for e in splits.get(key, []) if "label" not in e]
        if key in splits:
            splits[key] = [e for e in splits[key] if "label" in e]
    for key in ("validation", "test"):  # an emptied evaluation split is carved again from training
        if key in splits and not splits[key]:
            splits.pop(key)
    entries = [e for key in SPLIT_KEYS for e in splits.get(key, [])]
    labeled = data.get("labeled")
    num_classes = data.get("num_classes")
    label_names = data.get("label_names") or data.get("labels")
    return SourceScans(
        "datalist",
        path.parent,
        entries,
        num_classes=int(num_classes) if num_classes is not None else (len(label_names) if label_names else None),
        label_names={str(k): str(v) for k, v in label_names.items()} if isinstance(label_names, Mapping) else None,
        channel=data.get("channel"),
        splits=splits,
        labeled={str(s): {str(c): list(v) for c, v in d.items()} for s, d in labeled.items()} if labeled else None,
        extra={"datalist": str(path)},
        unlabeled=unlabeled,
    )


# --------------------------------------------------------------------------------------------------- detect
def detect_source_kind(root: str | Path) -> str:
    """Guess the layout of ``root``: ``"datalist"`` (a JSON file, or a folder holding ``datalist.json``),
    ``"msd"`` (``dataset.json`` + ``imagesTr/``), ``"acdc"`` (``patientNNN/`` folders here or in ``training/``),
    else ``"folder"``.

    Raises:
        DataCheckError: when ``root`` does not exist.
    """
    root = Path(root).expanduser()
    if root.is_file() and root.suffix == ".json":
        return "datalist"
    if not root.is_dir():
        raise DataCheckError([f"{root}: missing dataset folder (no such file or directory)"])
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "msd"
    for cand in (root, root / "training"):
        if cand.is_dir() and any(c.is_dir() and _ACDC_PATIENT.match(c.name) for c in cand.iterdir()):
            return "acdc"
    if (root / "datalist.json").is_file():
        return "datalist"
    return "folder"


def find_scans(
    kind: str,
    root: str | Path,
    channel: int | None = None,
    image_pattern: str | None = None,
    label_pattern: str | None = None,
    patient_regex: str | None = None,
) -> SourceScans:
    """Dispatch to the ``find_*`` function of ``kind`` (``"auto"`` detects it, see :func:`detect_source_kind`).

    Raises:
        ValueError: for an unknown ``kind``.
    """
    if kind == "auto":
        kind = detect_source_kind(root)
    if kind == "acdc":
        return find_acdc(root)
    if kind == "msd":
        return find_msd(root, channel=0 if channel is None else channel)
    if kind == "folder":
        return find_folder(root, image_pattern, label_pattern, patient_regex)
    if kind == "datalist":
        path = Path(root)
        return find_datalist(path / "datalist.json" if path.is_dir() else path)
    raise ValueError(f"Unsupported source kind: {kind!r}; expected one of {SOURCE_KINDS} or 'auto'.")
