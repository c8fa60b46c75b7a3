"""Does pre-training pay off? Methods x labeled-scan counts x seeds, each run with the bundle's own configs.

Usage (python-fire)::

    python -m scripts.study --dataset_dir /data/ACDC/training --out_dir runs/study/acdc \\
        --methods "[scratch,ours,mt_ours]" --labeled "[1,2,4]" --seeds "[0,1,2]" --budget cpu
    python -m scripts.study --out_dir runs/study/acdc --report_only True     # tables and plots from finished runs
    python -m scripts.study --dataset_dir /data/prostate --out_dir runs/study/prostate --num_classes 3 \\
        --num_partitions 8 --label_names "[background,PZ,TZ]" --labeled "[1,2]"
    python -m scripts.study --help

What one study does, in order (every step is one ``python -m monai.bundle run ...`` command, logged in its folder):

1. **Datalist.** One patient-level split for the whole study (``<out_dir>/datalist.json``; its hash goes in every
   row), with the labeled subsets of every requested count and seed.
2. **Pre-training**, once per pre-training method (``configs/pretrain.json`` + the budget; seed ``pretrain_seed``),
   shared by every fine-tune that starts from it.
3. **Fine-tuning** (``configs/train.json`` [+ ``configs/mean_teacher.json``]) with the same recipe for every method:
   for each (method, labeled count) the lr is chosen from ``lrs`` by the best validation 3D Dice of the first seed,
   then used for every seed (``--lr_choice mean``: every seed runs the whole grid and the lr with the best mean
   validation Dice over the seeds is used for all of them). Model selection (the best validation epoch) uses the
   validation split only.
4. **Evaluation** of each selected model, once, on the test split (``configs/evaluate.json``).
5. **Report**: ``runs.csv`` (one row per run; its ``finetune_s`` is every fine-tune of that seed, so on the first
   seed the whole lr grid's cost), ``results.md`` (the paper's table form: per class and mean, mean +- std
   over seeds; with several foreground classes also their union, ``label > 0``, e.g. the whole prostate gland),
   ``dice_vs_labeled.png`` (with several foreground classes also ``dice_vs_labeled_foreground.png``, their union's
   Dice), ``pretraining.png`` (MI and cluster Dice per pre-training epoch) and ``cluster_maps.png``
   (each pre-training method's cluster map on the same validation slices, the paper's Figure 2).

Finished steps are skipped (each writes ``done.json`` last), so an interrupted study resumes where it stopped.
With ``--jobs N`` up to N steps run at once, each as soon as what it needs is done (pre-trainings and scratch
fine-tunes side by side, an arm's lrs and seeds side by side); the steps are the commands of one job.
Stopping the study (Ctrl-C, ``kill``) stops every step it runs; a second study started into a folder that a running
one holds (``study.lock``) is refused before it writes anything.

Methods (``--methods``): ``scratch``, ``ours`` (L_con + L_CC + L_MI), ``iic`` (alpha 0), ``mi_cc`` (no L_con),
``con_only`` (L_con alone), ``mt_scratch`` (Mean Teacher from scratch), ``mt_ours`` (Mean Teacher from ``ours``).
Sweeps add pre-trained methods: ``--alphas "[0,0.5,1]"`` adds ``ours[alpha=0]`` ..., likewise ``--cc_weights``
and ``--num_clusters`` (the paper's Tables 3-5).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from scripts.bundle_cli import CLUSTER_MI_LINE, REPO, Step, bundle_command, run_concurrently, run_logged
from scripts.fire_cli import fire_main

#: method -> (pre-training variant or None, Mean Teacher)
METHODS: dict[str, tuple[str | None, bool]] = {
    "scratch": (None, False),
    "ours": ("ours", False),
    "iic": ("iic", False),
    "mi_cc": ("mi_cc", False),
    "con_only": ("contrast_enc", False),
    "mt_scratch": (None, True),
    "mt_ours": ("ours", True),
}

#: named budgets: the overlay files on top of pretrain.json / train.json, then settings shared by both phases and
#: each phase's own (the overlays' values stay the single owner of the CPU settings).
BUDGETS: dict[str, dict[str, Any]] = {
    "tiny": {  # seconds per run: the CI check of the whole study path
        "pretrain_overlay": [], "finetune_overlay": [],
        "common": {"features": [4, 8, 8, 16, 16, 4], "pixdim": [3.0, 3.0], "spatial_size": [64, 64],
                   "crop_size": [32, 32], "num_workers": 0, "device": "$torch.device('cpu')", "amp": False},
        "pretrain": {"epochs": 1, "iterations": 2, "warmup_epochs": 0, "scans_per_batch": 2, "num_clusters": 6,
                     "num_heads": 1, "health_scans": 2},
        "finetune": {"epochs": 2, "iterations": 2, "warmup_epochs": 0, "batch_size": 2, "sw_batch_size": 64},
        "mean_teacher": {"mt_batch_size": 2},
    },
    "cpu": {  # the CPU evidence: configs/quick*.json, longer; ~25 min of pre-training, ~7 min a fine-tune (2 cores)
        "pretrain_overlay": ["quick.json"], "finetune_overlay": ["quick_finetune.json"],
        "common": {},
        "pretrain": {"epochs": 20, "iterations": 100, "log_interval": 20, "image_interval": 500},
        "finetune": {"epochs": 30, "iterations": 50},
        "mean_teacher": {},
    },
    "gpu": {  # the paper's network and geometry on one GPU, pre-training ~5 min (configs/gpu.json), fine-tunes 1000
        # iterations each; scripts/gpu_study.sh runs the main arms with it
        "pretrain_overlay": ["gpu.json"], "finetune_overlay": [], "common": {}, "pretrain": {},
        "finetune": {"epochs": 20, "iterations": 50, "warmup_epochs": 1, "num_workers": 4},
        "mean_teacher": {},
    },
    "paper": {  # the configs as shipped (the paper's settings; a GPU)
        "pretrain_overlay": [], "finetune_overlay": [], "common": {}, "pretrain": {}, "finetune": {},
        "mean_teacher": {},
    },
}


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", str(value))


class Study:
    """Plans and runs the steps of one study; every path lives under ``out_dir``."""

    def __init__(self, out_dir: Path, dataset_dir: str | None, budget: dict[str, dict[str, Any]],
                 num_classes: int, num_partitions: int, pretrain_seed: int, extra: dict[str, Any]) -> None:
        self.out = out_dir
        self.dataset_dir = dataset_dir
        self.budget = budget
        self.num_classes = num_classes
        self.num_partitions = num_partitions
        self.pretrain_seed = pretrain_seed
        self.extra = extra
        self.datalist = out_dir / "datalist.json"
        self.log = out_dir / "study.log"
        self._log_lock = threading.Lock()  # steps run side by side (--jobs) append to one study log

    # -- one bundle command ------------------------------------------------------------------------------------
    def bundle_run(self, run_id: str, configs: Sequence[str], overrides: dict[str, Any], folder: Path) -> float:
        folder.mkdir(parents=True, exist_ok=True)
        cmd, shown = bundle_command(run_id, configs, overrides)
        self.note(f"$ python {shown}")
        seconds = run_logged(cmd, shown, folder / "log.txt", append=True)  # a resumed step keeps its history
        self.note(f"# done in {seconds:.0f} s: {os.path.relpath(folder, self.out)}")
        return seconds

    def note(self, line: str) -> None:
        """Append one line to the study log."""
        with self._log_lock, open(self.log, "a") as fh:
            fh.write(line + "\n")

    def common(self) -> dict[str, Any]:
        data = {"dataset_dir": self.dataset_dir} if self.dataset_dir else {}
        return {"bundle_root": str(REPO), **data, "datalist": str(self.datalist), "num_classes": self.num_classes,
                **self.budget["common"]}

    # -- steps -------------------------------------------------------------------------------------------------
    def pretrain(self, key: str, variant: str, settings: dict[str, Any]) -> dict[str, Any]:
        folder = self.out / "pretrain" / key
        done = folder / "done.json"
        if done.is_file():
            return json.loads(done.read_text())
        overrides = {**self.common(), "show_progress": False, "num_partitions": self.num_partitions,
                     **self.budget["pretrain"],
                     "variant": variant, **settings, "seed": self.pretrain_seed, "output_dir": str(folder),
                     "ckpt_dir": str(folder / "models"), "state_path": str(folder / "trainer_state.pt"),
                     "resume": True, **self.extra.get("pretrain", {})}
        seconds = self.bundle_run("training", ["pretrain.json", *self.budget["pretrain_overlay"]], overrides, folder)
        health = _read_jsonl(folder / "cluster_health.jsonl")
        record = {"weights": str(folder / "models" / "pretrained" / "unet_ssl.pt"), "seconds": seconds,
                  "health": health[-1] if health else None, "mi": _last_mi(folder / "log.txt")}
        done.write_text(json.dumps(record, indent=2))
        return record

    def finetune(self, folder: Path, mean_teacher: bool, weights: str | None, labeled: int, seed: int,
                 lr: float) -> dict[str, Any]:
        done = folder / "done.json"
        if done.is_file():
            return json.loads(done.read_text())
        configs = ["train.json", *self.budget["finetune_overlay"]] + (["mean_teacher.json"] if mean_teacher else [])
        mean_teacher_overrides = self.budget["mean_teacher"] if mean_teacher else {}
        overrides = {**self.common(), **self.budget["finetune"], **mean_teacher_overrides,
                     "num_labeled": labeled, "labeled_seed": seed,
                     "seed": seed, "lr": lr, "output_dir": str(folder), "ckpt_dir": str(folder / "models"),
                     "pretrained_path": weights or "null", "pretrained_required": bool(weights),
                     **{k: v for k, v in self.extra.get("finetune", {}).items()
                        if mean_teacher or not k.startswith("mt_")}}
        seconds = self.bundle_run("training", configs, overrides, folder)
        best, epoch = _best_validation(folder / "log.txt")
        record = {"lr": lr, "val_dice": best, "best_epoch": epoch, "seconds": seconds,
                  "model": str(folder / "models" / "model.pt")}
        done.write_text(json.dumps(record, indent=2))
        return record

    def scored(self, folder: Path, model_dir: Path) -> dict[str, Any] | None:
        """The finished test-split evaluation in ``folder`` if it scored ``model_dir``; None when there is none, or
        when it scored another fine-tune (the lr chosen on the first seed changed since, e.g. a wider grid), or when
        it does not say which (written by an older study)."""
        done = folder / "done.json"
        if not done.is_file():
            return None
        record = json.loads(done.read_text())
        return record if record.get("model_dir") == os.path.relpath(model_dir, self.out) else None

    def evaluate(self, folder: Path, model_dir: Path) -> dict[str, Any]:
        done = folder / "done.json"
        record = self.scored(folder, model_dir)
        if record is not None:
            return record
        if done.is_file():  # a score of another fine-tune: replaced, and the study log says so
            self.note(f"# {folder}: scored again, for {model_dir} (the selected fine-tune changed)")
            done.unlink()
        overrides = {**self.common(), **self.budget["finetune"], "ckpt_dir": str(model_dir), "output_dir": str(folder),
                     "save_predictions": False}
        configs = ["train.json", *self.budget["finetune_overlay"], "evaluate.json"]
        seconds = self.bundle_run("evaluating", configs, overrides, folder)
        summary = json.loads((folder / "metrics_summary.json").read_text())
        record = {"seconds": seconds, "model_dir": os.path.relpath(model_dir, self.out), "summary": summary}
        done.write_text(json.dumps(record, indent=2))
        return record


def _claim_folder(out: Path) -> IO[str] | None:
    """Hold ``out/study.lock`` while the returned handle lives (the OS drops it when the process ends, however it
    ends): a second study started into the same folder would resume the same unfinished steps a second time, two
    trainings writing one checkpoint.

    Raises:
        SystemExit: when another running study holds the folder.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; the study runs unguarded
        return None
    handle = open(out / "study.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise SystemExit(f"{out}: another study is running in this folder (pid {holder}); wait for it to end or "
                         "choose another --out_dir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _visible_gpus() -> list[str]:
    """The GPUs a step may be given: ``CUDA_VISIBLE_DEVICES``'s entries where it is set, else torch's count."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() not in ("", "-1")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _step_environment(jobs: int) -> Callable[[int], dict[str, str]]:
    """The environment of the step in worker slot ``0 .. jobs - 1`` when ``jobs`` steps run at once: the CPU cores
    shared out as threads (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``, unless the user set them) and, where several
    GPUs are visible, the slot's GPU (``CUDA_VISIBLE_DEVICES``, round robin)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = {} if "OMP_NUM_THREADS" in os.environ else {
        name: str(max(1, cores // jobs)) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    gpus = _visible_gpus()

    def env(slot: int) -> dict[str, str]:
        return {**threads, **({"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if len(gpus) > 1 else {})}

    return env


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _last_mi(log: Path) -> float | None:
    found = re.findall(CLUSTER_MI_LINE, log.read_text()) if log.is_file() else []
    return float(found[-1][0]) if found else None


def _best_validation(log: Path) -> tuple[float, int]:
    """Best validation mean Dice and its epoch, from MONAI's ``Key metric: val_mean_dice best value: X at epoch: N``
    lines (the trainer's own ``train_mean_dice`` line has the same form and is not read)."""
    found = re.findall(r"Key metric: val_mean_dice best value: ([0-9.eE+-]+) at epoch: (\d+)", log.read_text())
    if not found:
        raise SystemExit(f"{log}: no validation result found (did validation run?).")
    value, epoch = found[-1]
    return float(value), int(epoch)


def select_best(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fine-tune with the best validation Dice; a tie goes to the smaller lr (the same choice in every call)."""
    return max(records, key=lambda r: (r["val_dice"], -r["lr"]))


def select_lr_by_mean(records: Sequence[dict[str, Any]]) -> float:
    """The lr whose fine-tunes (one per seed) have the best mean validation Dice; a tie goes to the smaller lr."""
    by_lr: dict[float, list[float]] = defaultdict(list)
    for record in records:
        by_lr[record["lr"]].append(record["val_dice"])
    return max(by_lr, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), -lr))


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _method_table(methods: Sequence[str], alphas: Sequence[float] | None, cc_weights: Sequence[float] | None,
                  num_clusters: Sequence[int] | None) -> dict[str, tuple[str | None, bool, dict[str, Any]]]:
    table: dict[str, tuple[str | None, bool, dict[str, Any]]] = {}
    for name in methods:
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; available: {', '.join(METHODS)}.")
        variant, mt = METHODS[name]
        table[name] = (variant, mt, {})
    for option, values in (("alpha", alphas), ("cc_weight", cc_weights), ("num_clusters", num_clusters)):
        for value in values or ():
            table[f"ours[{option}={value}]"] = ("ours", False, {option: value})
    return table


def _pretrain_key(variant: str, settings: dict[str, Any]) -> str:
    return _slug(variant + "".join(f"_{k}={v}" for k, v in sorted(settings.items())))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
    return [value]


def study(
    out_dir: str = "runs/study",
    dataset_dir: str | None = None,
    methods: Sequence[str] = ("scratch", "ours", "mt_ours"),
    labeled: Sequence[int] = (1,),
    seeds: Sequence[int] = (0, 1, 2),
    budget: str = "cpu",
    jobs: int = 1,
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2),
    lr_choice: str = "first_seed",
    alphas: Sequence[float] | None = None,
    cc_weights: Sequence[float] | None = None,
    num_clusters: Sequence[int] | None = None,
    num_classes: int = 4,
    num_partitions: int = 3,
    label_names: Sequence[str] | dict[str, str] | None = None,
    pretrain_seed: int = 0,
    pretrain_epochs: int | None = None,
    pretrain_iterations: int | None = None,
    finetune_epochs: int | None = None,
    finetune_iterations: int | None = None,
    features: Sequence[int] | None = None,
    crop_size: Sequence[int] | None = None,
    pretrain_overrides: dict[str, Any] | None = None,
    finetune_overrides: dict[str, Any] | None = None,
    report_only: bool = False,
    dry_run: bool = False,
) -> None:
    """Run (or resume) a study and write its CSV, markdown table and plots.

    Args:
        out_dir: folder of the whole study (datalist, every run, the report); relative paths are from the repo.
        dataset_dir: dataset folder or datalist JSON (ACDC / Decathlon / folder of pairs); default: the configs'
            embedded synthetic data.
        methods: methods to compare: scratch, ours, iic, mi_cc, con_only, mt_scratch, mt_ours.
        labeled: labeled-scan counts (each must be recorded in the datalist: 1, 2 and 4 are).
        seeds: labeled-subset and fine-tuning seeds (0, 1 and 2 are recorded in a new datalist).
        budget: named budget: tiny (CI), cpu (2 CPU cores), gpu (the paper's network on one GPU: pre-training
            about 5 min with ``configs/gpu.json``, fine-tunes of 1000 iterations), paper (the configs as shipped).
        jobs: steps run at once. A step starts as soon as what it needs is done (a fine-tune its pre-training and,
            off the lr grid, its first seed's grid; a test score every fine-tune of its arm), so with more than one,
            scratch fine-tunes run beside a pre-training and an arm's lrs and seeds side by side. Each step then
            gets the CPU cores divided by ``jobs`` as its threads (``OMP_NUM_THREADS``, unless set) and, where
            several GPUs are visible, one GPU (round robin; with one GPU every step shares it). The steps are the
            commands of one job; only their thread count differs, which moves float digits as another machine does.
        lrs: fine-tuning lr grid; per (method, labeled count) the best on validation is used (``lr_choice``).
            The default spans what real cardiac MRI chose: 1e-2 from scratch and with Mean Teacher, 3e-3 for the
            pre-trained fine-tune at 1 and 2 scans, 1e-2 at 4 (docs/results.md).
        lr_choice: how each (method, labeled count) picks its lr on validation: ``first_seed`` (the grid on the
            first seed, its best lr for the others) or ``mean`` (the grid on every seed, the best mean validation
            Dice over the seeds; more fine-tunes, less noise from one seed's validation).
        alphas: sweep of L_MI's alpha (adds ours[alpha=a] pre-trained methods; Table 3).
        cc_weights: sweep of lambda_CC (adds ours[cc_weight=w]; Table 4).
        num_clusters: sweep of K (adds ours[num_clusters=k]; Table 5).
        num_classes: label classes, background included (4 for ACDC, 3 for prostate zones).
        num_partitions: slice-position partitions of L_con (3 for ACDC, 8 for prostate).
        label_names: class names for a new study datalist, background included (``'[background,PZ,TZ]'``); they
            head the table's columns. Default: the layout's (ACDC: RV, Myo, LV), else the class indices.
        pretrain_seed: seed of every pre-training.
        pretrain_epochs: override the budget's pre-training epochs.
        pretrain_iterations: override the budget's iterations per pre-training epoch.
        finetune_epochs: override the budget's fine-tuning epochs.
        finetune_iterations: override the budget's iterations per fine-tuning epoch.
        features: override the U-Net widths (six numbers) of every run.
        crop_size: override the training crop of every run.
        pretrain_overrides: any further pre-training config ids, e.g. '{"cluster_temperature": 0.1}'.
        finetune_overrides: any further fine-tuning config ids, e.g. '{"mt_weight": 0.1}' (Mean Teacher's
            ``mt_*`` ids reach the Mean Teacher arms only).
        report_only: only write the report from the finished runs.
        dry_run: print the plan (steps and their order) and stop.
    """
    if budget not in BUDGETS:
        raise SystemExit(f"unknown budget {budget!r}; available: {', '.join(BUDGETS)}.")
    if lr_choice not in ("first_seed", "mean"):
        raise SystemExit(f"unknown lr_choice {lr_choice!r}; available: first_seed, mean.")
    jobs = int(jobs)
    if jobs < 1:
        raise SystemExit(f"jobs must be at least 1, got {jobs}.")
    out = Path(out_dir) if Path(out_dir).is_absolute() else REPO / out_dir
    out.mkdir(parents=True, exist_ok=True)
    lock = None if report_only else _claim_folder(out)  # noqa: F841 (held while this call runs)
    plan = {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in BUDGETS[budget].items()}
    for key, value in (("epochs", pretrain_epochs), ("iterations", pretrain_iterations)):
        if value is not None:
            plan["pretrain"][key] = int(value)
    for key, value in (("epochs", finetune_epochs), ("iterations", finetune_iterations)):
        if value is not None:
            plan["finetune"][key] = int(value)
    if features is not None:
        plan["common"]["features"] = [int(f) for f in _as_list(features)]
    if crop_size is not None:
        plan["common"]["crop_size"] = [int(c) for c in _as_list(crop_size)]
    extra = {"pretrain": dict(pretrain_overrides or {}), "finetune": dict(finetune_overrides or {})}
    table = _method_table([str(m) for m in _as_list(methods)], _as_list(alphas), _as_list(cc_weights),
                          [int(k) for k in _as_list(num_clusters)])
    labeled_counts = [int(n) for n in _as_list(labeled)]
    seed_list = [int(s) for s in _as_list(seeds)]
    lr_grid = [float(x) for x in _as_list(lrs)]
    runner = Study(out, dataset_dir, plan, num_classes, num_partitions, pretrain_seed, extra)
    (out / "study.json").write_text(json.dumps(
        {"budget": budget, "plan": plan, "extra": extra, "methods": list(table), "labeled": labeled_counts,
         "seeds": seed_list, "lrs": lr_grid, "lr_choice": lr_choice, "dataset_dir": dataset_dir,
         "pretrain_seed": pretrain_seed, "num_classes": num_classes, "num_partitions": num_partitions}, indent=2))
    if report_only:
        write_report(out, table, labeled_counts, seed_list)
        return

    # the plan, in order: pre-trainings, then the lr grid of each arm on its first seed (on every seed with
    # lr_choice "mean"), then the other seeds at the lr their first seed chose
    pretrainings = {_pretrain_key(v, s): (v, s) for v, _, s in table.values() if v is not None}
    grid_seeds = seed_list if lr_choice == "mean" else seed_list[:1]
    finetunes: list[tuple[str, int, int, float | None]] = []
    for name in table:
        for n in labeled_counts:
            finetunes += [(name, n, s, lr) for s in grid_seeds for lr in lr_grid]
    for name in table:
        for n in labeled_counts:
            finetunes += [(name, n, s, None) for s in seed_list if s not in grid_seeds]
    total = len(pretrainings) + len(finetunes) + len(table) * len(labeled_counts) * len(seed_list)
    if dry_run:
        print(f"{total} steps: {len(pretrainings)} pre-trainings {sorted(pretrainings)}, {len(finetunes)} "
              f"fine-tunes, {total - len(pretrainings) - len(finetunes)} evaluations.")
        return
    if dataset_dir is not None or not runner.datalist.is_file():
        from bundle.data.datalist import prepare_datalist

        source = dataset_dir or str(REPO / "data" / "synthetic_acdc")
        if dataset_dir is None and not Path(source).is_dir():
            from bundle.data.synthetic import generate_synthetic_acdc

            generate_synthetic_acdc(source, num_patients=100, seed=0)
        prepare_datalist(source, runner.datalist, seeds=sorted(set(seed_list) | {0, 1, 2}),
                        labeled_counts=sorted(set(labeled_counts) | {1, 2, 4}), num_classes=num_classes,
                        label_names=label_names)
        runner.dataset_dir = source
    step, started = 0, time.perf_counter()

    def progress(what: str, seconds: float | None) -> None:
        nonlocal step
        step += 1
        elapsed = time.perf_counter() - started
        took = "skipped (done)" if seconds is None else f"{seconds:.0f} s"
        print(f"[{step}/{total}] {what}: {took}; study {elapsed / 60:.1f} min", flush=True)

    def starting(what: str) -> None:  # with several steps at once, a line when each starts too
        if jobs > 1:
            print(f"  started: {what}; study {(time.perf_counter() - started) / 60:.1f} min", flush=True)

    # what the steps share; written only by their finish callbacks, in this thread
    weights: dict[str, dict[str, Any]] = {}
    chosen: dict[tuple[str, int], float] = {}
    tuned: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    planned: dict[tuple[str, int], int] = defaultdict(int)  # fine-tunes per arm: its test scores wait for all
    for name, n, _, _ in finetunes:
        planned[(name, n)] += 1

    def pretrain_step(key: str, variant: str, settings: dict[str, Any]) -> Step:
        def work() -> tuple[dict[str, Any], bool]:
            fresh = not (out / "pretrain" / key / "done.json").is_file()
            if fresh:
                starting(f"pre-train {key}")
            return runner.pretrain(key, variant, settings), fresh

        def finish(result: tuple[dict[str, Any], bool]) -> None:
            record, fresh = result
            weights[key] = record
            health = record.get("health") or {}
            note = f" (MI {record.get('mi')}, cluster Dice {health.get('mean', float('nan')):.3f})"
            progress(f"pre-train {key}{note}", record["seconds"] if fresh else None)

        return Step(lambda: True, work, finish)

    def finetune_step(name: str, n: int, seed: int, grid_lr: float | None) -> Step:
        variant, mt, settings = table[name]
        key = _pretrain_key(variant, settings) if variant else None

        def ready() -> bool:  # its pre-training finished; off the grid, the first seed's lr chosen
            return (key is None or key in weights) and (grid_lr is not None or (name, n) in chosen)

        def work() -> tuple[dict[str, Any], Path, bool]:
            lr = grid_lr if grid_lr is not None else chosen[(name, n)]
            folder = out / "finetune" / _slug(name) / f"n{n}" / f"seed{seed}" / f"lr{lr:g}"
            fresh = not (folder / "done.json").is_file()
            if fresh:
                starting(f"fine-tune {name} n={n} seed={seed} lr={lr:g}")
            return runner.finetune(folder, mt, weights[key]["weights"] if key else None, n, seed, lr), folder, fresh

        def finish(result: tuple[dict[str, Any], Path, bool]) -> None:
            record, folder, fresh = result
            progress(f"fine-tune {name} n={n} seed={seed} lr={record['lr']:g} (val Dice {record['val_dice']:.3f})",
                     record["seconds"] if fresh else None)
            tuned[(name, n)].append({**record, "folder": str(folder), "seed": seed})
            first = [r for r in tuned[(name, n)] if r["seed"] == seed_list[0]]
            if seed == seed_list[0] and len(first) == len(lr_grid):  # the first seed's whole grid: its choice
                chosen[(name, n)] = select_best(first)["lr"]

        return Step(ready, work, finish)

    def evaluate_step(name: str, n: int, seed: int) -> Step:
        # every seed is scored at its arm's one lr: the first seed's best, or the best mean over the seeds
        def ready() -> bool:
            return len(tuned[(name, n)]) == planned[(name, n)]

        def work() -> tuple[dict[str, Any], bool]:
            records = tuned[(name, n)]
            lr = select_lr_by_mean(records) if lr_choice == "mean" else chosen[(name, n)]
            (record,) = [r for r in records if r["seed"] == seed and r["lr"] == lr]
            folder = out / "evaluate" / _slug(name) / f"n{n}" / f"seed{seed}"
            model_dir = Path(record["folder"]) / "models"
            fresh = runner.scored(folder, model_dir) is None
            if fresh:
                starting(f"evaluate {name} n={n} seed={seed}")
            return runner.evaluate(folder, model_dir), fresh

        def finish(result: tuple[dict[str, Any], bool]) -> None:
            ev, fresh = result
            progress(f"evaluate {name} n={n} seed={seed} on the test split (3D Dice "
                     f"{ev['summary']['dice']['mean']:.3f})", ev["seconds"] if fresh else None)

        return Step(ready, work, finish)

    steps = [pretrain_step(key, variant, settings) for key, (variant, settings) in pretrainings.items()]
    steps += [finetune_step(*f) for f in finetunes]
    steps += [evaluate_step(name, n, seed) for name in table for n in labeled_counts for seed in seed_list]
    run_concurrently(steps, jobs, step_env=_step_environment(jobs) if jobs > 1 else None)
    write_report(out, table, labeled_counts, seed_list)


# ----------------------------------------------------------------------------------------------------------- report


def collect_rows(out: Path, table: dict[str, Any], labeled: Sequence[int], seeds: Sequence[int]) -> list[dict]:
    """One row per finished (method, labeled, seed): the selected fine-tune and its test-split evaluation."""
    datalist_hash = _file_hash(out / "datalist.json") if (out / "datalist.json").is_file() else ""
    rows = []
    for name, (variant, _, settings) in table.items():
        for n in labeled:
            for seed in seeds:
                ev_done = out / "evaluate" / _slug(name) / f"n{n}" / f"seed{seed}" / "done.json"
                if not ev_done.is_file():
                    continue
                tuned = [json.loads(p.read_text())
                         for p in (out / "finetune" / _slug(name) / f"n{n}" / f"seed{seed}").glob("lr*/done.json")]
                ev = json.loads(ev_done.read_text())
                # the fine-tune that was scored (an older study's record does not say: its best validation then)
                scored = (out / ev["model_dir"]).parent / "done.json" if "model_dir" in ev else None
                best = json.loads(scored.read_text()) if scored is not None else select_best(tuned)
                summary = ev["summary"]
                pre = out / "pretrain" / _pretrain_key(variant, settings) / "done.json" if variant else None
                pre_rec = json.loads(pre.read_text()) if pre is not None and pre.is_file() else {}
                row: dict[str, Any] = {"method": name, "labeled": n, "seed": seed, "lr": best["lr"],
                                       "val_dice": best["val_dice"], "best_epoch": best["best_epoch"]}
                for cls in summary["classes"]:
                    row[f"dice_{cls}"] = summary["dice"]["per_class"][cls]["mean"]
                row["dice_mean"] = summary["dice"]["mean"]
                row["foreground_dice"] = summary.get("foreground", {}).get("dice", {}).get("mean")
                row["hd95_mean"] = summary["hd95"]["mean"]
                row["pretrain_s"] = round(pre_rec.get("seconds", 0.0), 1)
                row["pretrain_mi"] = pre_rec.get("mi")
                row["finetune_s"] = round(sum(r["seconds"] for r in tuned), 1)
                row["evaluate_s"] = round(ev["seconds"], 1)
                row["test_scans"] = summary["num_scans"]
                row["datalist_hash"] = datalist_hash
                rows.append(row)
    return rows


def _mean_std(values: Sequence[float]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def write_report(out: Path, table: dict[str, Any], labeled: Sequence[int], seeds: Sequence[int]) -> None:
    """``runs.csv``, ``results.md``, ``dice_vs_labeled.png`` (and ``dice_vs_labeled_foreground.png`` where several
    foreground classes have their union scored), ``pretraining.png`` and ``cluster_maps.png`` from the finished
    runs."""
    rows = collect_rows(out, table, labeled, seeds)
    if not rows:
        print(f"no finished runs under {out} yet.")
        return
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    classes = [k[len("dice_"):] for k in rows[0] if k.startswith("dice_") and k != "dice_mean"]
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["labeled"])].append(row)
    whole = any(r["foreground_dice"] is not None for r in rows)  # several foreground classes: their union too
    lines = ["| method | labeled scans | seeds | lr | " + " | ".join(classes) + " | mean 3D Dice | HD95 (mm) |"
             + (" foreground (label > 0) 3D Dice |" if whole else ""),
             "|---" * (len(classes) + 6 + whole) + "|"]
    for (name, n), group in groups.items():
        cells = [_mean_std([r[f"dice_{c}"] for r in group]) for c in classes]
        lr_text = ", ".join(sorted({f"{r['lr']:g}" for r in group}))
        lines.append(f"| {name} | {n} | {len(group)} | {lr_text} | "
                     + " | ".join(cells) + f" | **{_mean_std([r['dice_mean'] for r in group])}** | "
                     f"{_mean_std([r['hd95_mean'] for r in group])} |"
                     + (f" {_mean_std([r['foreground_dice'] for r in group])} |" if whole else ""))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    written = [out / "runs.csv", out / "results.md", _plot_dice(out, groups)]
    if whole:  # e.g. the whole prostate gland, the primary figure where the classes are its zones
        written.append(_plot_dice(out, groups, "foreground_dice", "dice_vs_labeled_foreground.png",
                                  "test foreground (label > 0) 3D Dice"))
    written += [_plot_pretraining(out, table), _plot_clusters(out, table)]
    print("report: " + ", ".join(str(path) for path in written if path is not None))


def pretraining_curves(folder: Path) -> list[dict[str, Any]]:
    """Per epoch of one pre-training: ``{"epoch", "mi", "mi_fraction", "cluster_dice", "cluster_dice_one_to_one"}``
    from its log and ``cluster_health.jsonl`` (the majority-vote and one-cluster-per-class matches; None where no
    health figure was scored)."""
    log = folder / "log.txt"
    found = re.findall(r"epoch (\d+)/\d+: .*?" + CLUSTER_MI_LINE, log.read_text()) if log.is_file() else []
    health = {r["epoch"]: r for r in _read_jsonl(folder / "cluster_health.jsonl")}
    by_epoch = {int(e): (float(mi), float(frac) / 100.0) for e, mi, frac in found}  # a resumed epoch: the last
    return [{"epoch": e, "mi": mi, "mi_fraction": frac, "cluster_dice": health.get(e, {}).get("mean"),
             "cluster_dice_one_to_one": health.get(e, {}).get("one_to_one", {}).get("mean")}
            for e, (mi, frac) in sorted(by_epoch.items())]


def _plot_pretraining(out: Path, table: dict[str, Any]) -> Path | None:
    """MI (nats) and cluster Dice per epoch of every pre-training: does it learn, and how fast. Returns the file
    written (None without a pre-training log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(_pretrain_key(v, s) for v, _, s in table.values() if v))
    curves = {k: pretraining_curves(out / "pretrain" / k) for k in keys}
    curves = {k: c for k, c in curves.items() if c}
    if not curves:
        return None
    fig, (ax_mi, ax_dice) = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, rows in curves.items():
        ax_mi.plot([r["epoch"] for r in rows], [r["mi"] for r in rows], marker=".", label=key)
        scored = [r for r in rows if r["cluster_dice"] is not None]
        line = ax_dice.plot([r["epoch"] for r in scored], [r["cluster_dice"] for r in scored], marker=".",
                            label=f"{key}, majority vote")[0]
        matched = [r for r in scored if r["cluster_dice_one_to_one"] is not None]
        if matched:
            ax_dice.plot([r["epoch"] for r in matched], [r["cluster_dice_one_to_one"] for r in matched], ls="--",
                         color=line.get_color(), label=f"{key}, one cluster per class")
    ax_mi.set_xlabel("pre-training epoch")
    ax_mi.set_ylabel("MI between the views' clusters (nat)")
    ax_dice.set_xlabel("pre-training epoch")
    ax_dice.set_ylabel("cluster Dice, validation (health figure)")
    for ax in (ax_mi, ax_dice):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pretraining.png", dpi=120)
    plt.close(fig)
    return out / "pretraining.png"


def _plot_dice(out: Path, groups: dict[tuple[str, int], list[dict]], key: str = "dice_mean",
               file_name: str = "dice_vs_labeled.png", label: str = "test mean 3D Dice") -> Path:
    """Test ``key`` (a ``runs.csv`` column) against the labeled-scan count, one line per method: mean ± std over
    its seeds and a dot per seed, into ``out / file_name`` (returned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups = {k: [r for r in group if r[key] is not None] for k, group in groups.items()}
    groups = {k: group for k, group in groups.items() if group}
    names = list(dict.fromkeys(k[0] for k in groups))
    for i, name in enumerate(names):
        dodge = 2.0 ** (0.06 * (i - (len(names) - 1) / 2))  # side by side at each count, on the log axis
        ns = sorted(n for m, n in groups if m == name)
        means, stds = [], []
        for n in ns:
            vals = [r[key] for r in groups[(name, n)]]
            mean = sum(vals) / len(vals)
            means.append(mean)
            stds.append(math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
        line = ax.errorbar([n * dodge for n in ns], means, yerr=stds, marker="o", capsize=3, label=name)
        seeds = [r[key] for n in ns for r in groups[(name, n)]]
        xs = [n * dodge for n in ns for _ in groups[(name, n)]]
        ax.scatter(xs, seeds, s=10, alpha=0.5, color=line[0].get_color())  # each seed
    counts = sorted({n for _, n in groups})
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlim(min(counts) / 1.5, max(counts) * 1.5)
    ax.minorticks_off()
    ax.set_xlabel("labeled scans")
    ax.set_ylabel(label)
    ax.set_title("mean ± std over seeds; dots: each seed", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / file_name, dpi=120)
    plt.close(fig)
    return out / file_name


def _plot_clusters(out: Path, table: dict[str, Any], num_slices: int = 3) -> Path | None:
    """Cluster map (head 0) of each pre-training method on the same validation slices, beside the image. Returns the
    file written (None without pre-trained weights or validation scans)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from monai.bundle import ConfigParser

    from bundle.handlers.monitor import cluster_palette

    keys = list(dict.fromkeys(_pretrain_key(v, s) for v, _, s in table.values() if v))
    states = {k: out / "pretrain" / k / "trainer_state.pt" for k in keys}
    states = {k: p for k, p in states.items() if p.is_file()}
    if not states:
        return None
    study = json.loads((out / "study.json").read_text())

    def parser_for(settings: dict[str, Any]) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config([str(REPO / "configs" / c) for c in ["pretrain.json", *study["plan"]["pretrain_overlay"]]])
        dataset = study.get("dataset_dir") or str(REPO / "data" / "synthetic_acdc")
        shape = {k: study[k] for k in ("num_classes", "num_partitions") if study.get(k) is not None}
        for key, value in {"bundle_root": str(REPO), "datalist": str(out / "datalist.json"), "dataset_dir": dataset,
                           "device": "$torch.device('cpu')", **shape, **study["plan"]["common"],
                           **study["plan"]["pretrain"], **study["extra"]["pretrain"], **settings}.items():
            parser[key] = value
        return parser

    parser = parser_for({})
    volumes = parser.get_parsed_content("health#dataset")
    if len(volumes) == 0:
        return None
    volume = volumes[0]
    depth = volume["image"].shape[-1]
    picks = [round(depth * f) for f in (0.3, 0.5, 0.7)][:num_slices]
    images = torch.as_tensor(volume["image"])[..., picks].permute(3, 0, 1, 2).float()
    fig, axes = plt.subplots(len(picks), len(states) + 1, figsize=(2.2 * (len(states) + 1), 2.2 * len(picks)),
                             squeeze=False)
    for r in range(len(picks)):
        axes[r, 0].imshow(images[r, 0].numpy(), cmap="gray")
    axes[0, 0].set_title("image", fontsize=8)
    for c, (key, path) in enumerate(states.items(), start=1):
        state = torch.load(path, map_location="cpu", weights_only=False)
        settings = next(s for v, _, s in table.values() if v and _pretrain_key(v, s) == key)
        own = parser_for(settings)
        network = own.get_parsed_content("network_def", instantiate=True)
        head = own.get_parsed_content("dense_head_def", instantiate=True)
        network.load_state_dict(state["network"])
        head.load_state_dict(state["dense_head"])
        network.eval()
        head.eval()
        with torch.no_grad():
            clusters = head(network.forward_features(images, with_logits=False)["decoder"])[0].argmax(1)
        palette = cluster_palette(head.num_clusters)
        for r in range(len(picks)):
            axes[r, c].imshow(palette[clusters[r].numpy()])
        axes[0, c].set_title(key, fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "cluster_maps.png", dpi=110)
    plt.close(fig)
    return out / "cluster_maps.png"


if __name__ == "__main__":
    fire_main(study)
