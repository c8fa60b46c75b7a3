"""Test-set scoring at the scans' native geometry, and the small helpers of the evaluation and inference configs.

:class:`SegmentationMetricsSaver` is a MONAI/Ignite handler for the evaluator of ``configs/evaluate.json``. After
each iteration it takes every prediction already mapped back to its file's grid (``Invertd`` in the evaluator's
post-processing), reads that scan's ground truth from disk as stored, checks that shape and affine agree, and scores
each foreground class with :func:`bundle.metrics.scan_metrics` (3D Dice, HD95 and ASD in millimetres at the native
voxel spacing). When the evaluator completes it writes::

    <output_dir>/metrics_per_scan.csv    scan_id, class_index, class, dice, hd95, asd   (one row per scan and class)
    <output_dir>/metrics_summary.json    bundle.metrics.summarize(): per metric, per class and overall mean/std/n
                                         (null where no scan had a finite value, e.g. HD95 of a class never found)
    <output_dir>/metrics_summary.csv     metric, class, mean, std, n                    ("mean" rows: over classes)

With more than one foreground class, each scan is also scored on the union of its foreground classes
(:func:`bundle.metrics.foreground_metrics`, ``label > 0``: the whole gland of a zonal prostate mask, the whole heart
of an ACDC mask): a ``foreground`` row per scan in the per-scan CSV (class index ``1-<C-1>``), a ``foreground``
entry ``{metric: {mean, std, n}}`` in the summary JSON and ``foreground`` rows in the summary CSV.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from bundle.data.checks import DataCheckError, check_entries
from bundle.data.preprocessing import IMAGE_SUFFIXES
from bundle.data.sources import nifti_stem
from bundle.metrics import foreground_metrics, scan_metrics, summarize

__all__ = [
    "AFFINE_ATOL",
    "SegmentationMetricsSaver",
    "class_names_from_datalist",
    "common_folder",
    "check_inputs",
    "fail_on_bad_inputs",
    "list_images",
    "report_bad_inputs",
    "require_inputs",
    "require_file",
    "write_metrics",
]

logger = logging.getLogger(__name__)

AFFINE_ATOL = 1e-3  # mm: prediction and ground truth must be on the same grid

PER_SCAN_FILE = "metrics_per_scan.csv"
SUMMARY_JSON = "metrics_summary.json"
SUMMARY_CSV = "metrics_summary.csv"
FOREGROUND = "foreground"  # the union of the foreground classes (label > 0)
METRICS = ("dice", "hd95", "asd")


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """Return ``path`` as a string when it is an existing file.

    Raises:
        FileNotFoundError: naming ``what`` and the path otherwise.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing {what}.")
    return str(path)


def list_images(
    folder: str | os.PathLike,
    pattern: str = "*",
    exclude_suffixes: Sequence[str] = ("_gt", "_seg"),
    missing_ok: bool = False,
) -> list[str]:
    """Sorted image files (NIfTI ``.nii``/``.nii.gz`` or NRRD ``.nrrd``) of ``folder`` matching ``pattern`` (``**/``
    patterns search sub-folders), leaving out ground-truth and output files (file stems ending with one of
    ``exclude_suffixes``) and every other file.

    Args:
        missing_ok: return ``[]`` for a missing folder or no match instead of raising (for configs parsed by
            other tools, e.g. MONAI Label, where the folder is not used; :func:`require_inputs` raises later).

    Raises:
        FileNotFoundError: when ``folder`` is not a directory or no image matches (unless ``missing_ok``).
    """
    root = Path(folder)
    if not root.is_dir():
        if missing_ok:
            return []
        raise FileNotFoundError(f"{root}: input folder of the images to segment does not exist.")
    files = sorted(
        str(p) for p in root.glob(pattern)
        if p.is_file() and p.name.endswith(IMAGE_SUFFIXES) and not nifti_stem(p).endswith(tuple(exclude_suffixes))
    )
    if not files and not missing_ok:
        excluded = ", ".join(f"*{s}" for s in exclude_suffixes)
        raise FileNotFoundError(f"{root}: no NIfTI or NRRD image matches {pattern!r} (excluding {excluded}).")
    return files


def check_inputs(files: Sequence[str], channel: int | None = None) -> dict[str, Any]:
    """Check each image to segment on its own, with the checks training applies (readable, 3D, finite values and
    affine, plausible spacing, not constant): ``{"good": [paths], "bad": {path: "problem; problem"}}``, so one bad
    file never stops the good ones."""
    good: list[str] = []
    bad: dict[str, str] = {}
    for f in files:
        try:
            check_entries([{"image": f}], num_classes=None, require_label=False, channel=channel, name="inputs")
        except DataCheckError as error:
            bad[str(f)] = "; ".join(p.removeprefix(f"{f}: ") for p in error.problems)
        else:
            good.append(str(f))
    return {"good": good, "bad": bad}


def _bad_lines(inputs: Mapping[str, Any]) -> list[str]:
    return [f"{path}: {problem}" for path, problem in inputs["bad"].items()]


def report_bad_inputs(inputs: Mapping[str, Any]) -> None:
    """Before any work: name every bad input (a warning; the good ones are segmented)."""
    if inputs["bad"]:
        lines = "\n".join(_bad_lines(inputs))
        logger.warning(f"{len(inputs['bad'])} of {len(inputs['bad']) + len(inputs['good'])} inputs will not be "
                       f"segmented:\n{lines}")


def require_inputs(inputs: Mapping[str, Any], folder: str | os.PathLike, pattern: str = "*") -> None:
    """At the start of the run: stop when there is nothing to segment (an empty input list is not an error
    earlier, so that tools can initialise the workflow without inputs, e.g. the model zoo's property checks).

    Raises:
        FileNotFoundError: no input at all (:func:`list_images`' message for ``folder``).
        DataCheckError: inputs given but none can be segmented, naming each and its problem.
    """
    if not inputs["good"] and not inputs["bad"]:
        list_images(folder, pattern)
    if not inputs["good"]:
        raise DataCheckError(_bad_lines(inputs), header="no input image can be segmented")


def fail_on_bad_inputs(inputs: Mapping[str, Any]) -> None:
    """After the good inputs were segmented: fail (non-zero exit of ``monai.bundle run``) when any input was bad.

    Raises:
        DataCheckError: naming every input that was not segmented and why.
    """
    if inputs["bad"]:
        n = len(inputs["bad"]) + len(inputs["good"])
        raise DataCheckError(_bad_lines(inputs), header=f"{len(inputs['bad'])} of {n} inputs were not segmented "
                             f"({len(inputs['good'])} written)")


def common_folder(files: Sequence[str]) -> str:
    """The deepest folder holding every file (``""`` for none): outputs keep the inputs' sub-folders below it, so
    equal file names in different folders get different outputs."""
    if not files:
        return ""
    return os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])


def class_names_from_datalist(datalist: str | os.PathLike | Mapping[str, Any] | None, num_classes: int) -> list[str]:
    """Names of the foreground classes ``1 .. num_classes - 1`` from the datalist's ``label_names`` (indices as
    strings where a name is unknown)."""
    names: Mapping[str, Any] = {}
    if datalist is not None:
        data = datalist if isinstance(datalist, Mapping) else json.loads(Path(datalist).read_text())
        names = data.get("label_names") or {}
    return [str(names.get(str(c), c)) for c in range(1, int(num_classes))]


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.6g}"


def write_metrics(
    rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, class_names: Sequence[str]
) -> dict[str, Any]:
    """Write the per-scan CSV and the summary JSON/CSV (see the module docstring); return the summary.

    Args:
        rows: one mapping per scan: ``"scan_id"`` and per-class arrays ``"dice"``, ``"hd95"``, ``"asd"``, and
            optionally ``"foreground"`` (the same three, one value each; written when every row has it).
        output_dir: folder of the three files (created).
        class_names: names of the scored classes, in column order.

    Raises:
        ValueError: when ``rows`` is empty or a row does not have one value per class.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize([{k: r[k] for k in METRICS if k in r} for r in rows], class_names=class_names)
    foreground = None
    if all(FOREGROUND in r for r in rows):
        fg = summarize([r[FOREGROUND] for r in rows], class_names=[FOREGROUND])
        foreground = {m: fg[m]["per_class"][FOREGROUND] for m in METRICS}
    with open(out / PER_SCAN_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scan_id", "class_index", "class", *METRICS])
        for row in rows:
            for i, name in enumerate(class_names):
                values = [float(np.asarray(row[m])[i]) for m in METRICS]
                writer.writerow([row["scan_id"], row["class_indices"][i], name, *(_fmt(v) for v in values)])
            if foreground is not None:
                values = [float(np.asarray(row[FOREGROUND][m])[0]) for m in METRICS]
                index = f"{row['class_indices'][0]}-{row['class_indices'][-1]}"
                writer.writerow([row["scan_id"], index, FOREGROUND, *(_fmt(v) for v in values)])
    with open(out / SUMMARY_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "class", "mean", "std", "n"])
        for metric in METRICS:
            for name, stats in summary[metric]["per_class"].items():
                writer.writerow([metric, name, _fmt(stats["mean"]), _fmt(stats["std"]), stats["n"]])
            s = summary[metric]
            writer.writerow([metric, "mean", _fmt(s["mean"]), _fmt(s["std"]), s["n"]])
            if foreground is not None:
                f = foreground[metric]
                writer.writerow([metric, FOREGROUND, _fmt(f["mean"]), _fmt(f["std"]), f["n"]])
    payload = {"num_scans": len(rows), "classes": list(class_names), **summary}
    if foreground is not None:
        payload[FOREGROUND] = foreground
    (out / SUMMARY_JSON).write_text(json.dumps(_nan_to_none(payload), indent=4) + "\n")
    return payload


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: statistics over no finite value are written as ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def _filename(item: Mapping[str, Any], key: str) -> str | None:
    value = item.get(key)
    meta = getattr(value, "meta", None)
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    return str(name) if name else None


class SegmentationMetricsSaver:
    """Per-scan, per-class 3D Dice, HD95 and ASD (mm) at each scan's native geometry, written at completion.

    Attach to an evaluator whose post-processing puts, under ``pred_key``, the predicted label map of each scan on
    the grid of its original file (``1,X,Y,Z`` MetaTensor, e.g. ``Invertd`` then ``AsDiscreted(argmax=True)``).
    The ground truth is read from the file named in the label's meta data (``filename_or_obj``), as stored on disk,
    so no resampling of the reference enters the scores; its voxel spacing is the header's.

    Args:
        output_dir: folder of ``metrics_per_scan.csv``, ``metrics_summary.json`` and ``metrics_summary.csv``.
        num_classes: number of classes including background.
        class_names: names of the foreground classes ``1 .. num_classes - 1`` (default: their indices).
        pred_key: key of the native-grid prediction in the evaluator's output items.
        label_key: key of the label, whose meta data name the ground-truth file.
        include_background: also score class 0.

    Raises:
        ValueError: (while running) when a prediction is not a single-channel label map, or its shape or affine
            differs from the ground-truth file's, naming the scan; at construction for a bad ``num_classes`` or
            a wrong number of class names.

    Example (config)::

        {"_target_": "bundle.evaluation.SegmentationMetricsSaver", "output_dir": "@output_dir",
         "num_classes": "@num_classes", "pred_key": "pred_native"}
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        pred_key: str = "pred_native",
        label_key: str = "label",
        include_background: bool = False,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        self.class_indices = list(range(0 if include_background else 1, num_classes))
        if class_names is None:
            class_names = [str(c) for c in self.class_indices]
        elif include_background and len(class_names) == num_classes - 1:
            class_names = ["background", *class_names]
        if len(class_names) != len(self.class_indices):
            raise ValueError(f"{len(class_names)} class_names given for the {len(self.class_indices)} scored classes "
                             f"{self.class_indices}: {list(class_names)}.")
        self.output_dir = Path(output_dir)
        self.num_classes = num_classes
        self.class_names = [str(n) for n in class_names]
        self.pred_key = pred_key
        self.label_key = label_key
        self.include_background = include_background
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows = []

    def score(self, pred: torch.Tensor | np.ndarray, label_file: str, scan_id: str) -> dict[str, Any]:
        """Score one native-grid prediction against the ground-truth file; returns the row for the CSV."""
        pred_np = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        if pred_np.ndim == 4 and pred_np.shape[0] == 1:
            pred_np = pred_np[0]
        label_img = nib.load(label_file)
        label = np.asanyarray(label_img.dataobj)
        if label.ndim == 4 and label.shape[-1] == 1:
            label = label[..., 0]
        if pred_np.shape != label.shape:
            raise ValueError(f"{scan_id}: prediction of shape {pred_np.shape} on the native grid but the ground truth "
                             f"{label_file} has shape {label.shape} (was the prediction inverted?).")
        affine = getattr(pred, "affine", None)
        if affine is not None:
            affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=float)
            if not np.allclose(affine, label_img.affine, atol=AFFINE_ATOL):
                raise ValueError(f"{scan_id}: prediction affine\n{affine}\ndiffers from the ground truth's "
                                 f"({label_file})\n{label_img.affine}")
        spacing = tuple(float(z) for z in label_img.header.get_zooms()[:3])
        row: dict[str, Any] = {"scan_id": scan_id, "class_indices": self.class_indices}
        pred_labels = np.rint(pred_np)
        row.update(scan_metrics(pred_labels, label, self.num_classes, spacing, self.include_background))
        if self.num_classes > 2:  # several foreground classes: also their union
            row[FOREGROUND] = foreground_metrics(pred_labels, label, self.num_classes, spacing)
        return row

    def iteration_completed(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch] * len(outputs)
        for item, batch in zip(outputs, batches, strict=True):
            if self.pred_key not in item:
                raise ValueError(f"evaluator output has no {self.pred_key!r} (keys: {sorted(item)}); add the "
                                 "native-grid prediction to the post-processing.")
            label_file = _filename(item, self.label_key) or _filename(batch, self.label_key)
            if label_file is None:
                raise ValueError(f"no ground-truth file name in the meta data of {self.label_key!r}.")
            scan_id = batch.get("scan_id") if isinstance(batch, Mapping) else None
            scan_id = str(scan_id) if scan_id is not None else nifti_stem(_filename(item, "image") or label_file)
            self.rows.append(self.score(item[self.pred_key], label_file, scan_id))

    def epoch_completed(self, engine: Engine | None = None) -> None:
        if not self.rows:
            logger.warning("no scan was evaluated: nothing written.")
            return
        self.summary = write_metrics(self.rows, self.output_dir, self.class_names)
        dice = self.summary["dice"]
        per_class = ", ".join(f"{k} {v['mean']:.4f}" for k, v in dice["per_class"].items())
        if FOREGROUND in self.summary:
            per_class += f"; foreground {self.summary[FOREGROUND]['dice']['mean']:.4f}"
        logger.info(f"{len(self.rows)} scans: 3D Dice mean {dice['mean']:.4f} ({per_class}); "
                    f"HD95 {self.summary['hd95']['mean']:.2f} mm, ASD {self.summary['asd']['mean']:.2f} mm; "
                    f"written to {self.output_dir}")
