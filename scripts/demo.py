"""The README's main job: pre-train, fine-tune with one labeled scan, evaluate, and compare with no pre-training.

Usage (python-fire; ``./run.sh demo`` sets up the venv first)::

    python -m scripts.demo                       # quick settings, embedded synthetic data, ~10 min on 2 CPU cores
    python -m scripts.demo --num_labeled 2 --finetune_lr 3e-4 --scratch_lr 1e-3
    python -m scripts.demo --dataset_dir /data/prostate --num_classes 3 --num_partitions 8

Each step is one ``python -m monai.bundle run ...`` command, printed before it runs, so the demo doubles as a
worked example of the bundle's command lines. Outputs go under ``--bundle_root`` (default ``runs/demo``): the
shared datalist, the pre-trained weights ``models/pretrained/unet_ssl.pt``, the fine-tuned ``models/model.pt``
(with pre-training) and ``scratch/models/model.pt`` (without), and each arm's ``evaluate/metrics_*``. At the end the
test-set 3D Dice per class of both arms is printed side by side and written to ``demo_summary.json``. After
pre-training it prints the label-free health figures: the mutual information between the two views' cluster
assignments and the cluster Dice (cluster maps matched to the validation labels by majority vote, and with
one cluster per class).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from scripts.bundle_cli import CLUSTER_MI_LINE, REPO, bundle_command, run_logged
from scripts.fire_cli import fire_main


def _run(run_id: str, configs: list[str], overrides: dict[str, Any], log: Path) -> float:
    cmd, shown = bundle_command(run_id, configs, overrides)
    print(f"\n$ python {shown}", flush=True)
    seconds = run_logged(cmd, shown, log, append=True)
    print(f"  done in {seconds:.0f} s (log: {log})", flush=True)
    return seconds


def _pretrain_health(folder: Path, log: Path) -> str:
    """The label-free figures of the finished pre-training: last MI (nats, fraction of log K) and cluster Dice."""
    mi = re.findall(CLUSTER_MI_LINE, log.read_text())
    text = f"  pre-training MI between the views' clusters: {mi[-1][0]} nat ({mi[-1][1]} % of log K)" if mi else ""
    health = folder / "cluster_health.jsonl"
    if health.is_file():
        last = json.loads(health.read_text().splitlines()[-1])
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in last["per_class"].items())
        text += (f"\n  cluster Dice (majority-vote match on {last['scans']} validation scans, a health figure): "
                 f"{per_class}, mean {last['mean']:.3f}")
        if "one_to_one" in last:
            text += f"; one cluster per class: mean {last['one_to_one']['mean']:.3f}"
    return text


def _summary_dice(path: Path) -> dict[str, float]:
    summary = json.loads(path.read_text())
    dice = summary["dice"]
    out = {name: float(v["mean"]) for name, v in dice["per_class"].items()}
    out["mean"] = float(dice["mean"])
    return out


def data_overrides(dataset_dir: str | None) -> dict[str, str]:
    """The data ids of every step: the user's dataset, or the repository's embedded synthetic data (generated on
    first use: the configs generate only into ``synthetic_dir``, so it is named, the demo's bundle_root being
    elsewhere)."""
    if dataset_dir:
        return {"dataset_dir": dataset_dir}
    synthetic = str(REPO / "data" / "synthetic_acdc")
    return {"dataset_dir": synthetic, "synthetic_dir": synthetic}


def main(
    bundle_root: str = "runs/demo",
    dataset_dir: str | None = None,
    num_classes: int = 4,
    num_partitions: int = 3,
    num_labeled: int = 1,
    labeled_seed: int = 0,
    pretrain_epochs: int = 4,
    pretrain_iterations: int = 25,
    finetune_epochs: int = 8,
    finetune_iterations: int = 25,
    finetune_lr: float = 1e-3,
    scratch_lr: float = 1e-3,
    seed: int = 0,
) -> None:
    """Run the quick pre-train -> fine-tune -> evaluate pipeline with and without pre-training; print both Dice.

    Args:
        bundle_root: folder of this demo's runs, datalist and weights (relative paths are from the repository).
        dataset_dir: a dataset folder or datalist JSON; default: the embedded synthetic ACDC data (generated).
        num_classes: label classes, background included (4 for ACDC, 3 for prostate zones).
        num_partitions: slice-position partitions of L_con (3 for ACDC, 8 for prostate).
        num_labeled: labeled scans for fine-tuning.
        labeled_seed: which recorded labeled subset to use.
        pretrain_epochs: pre-training epochs.
        pretrain_iterations: iterations per pre-training epoch.
        finetune_epochs: fine-tuning epochs (both arms).
        finetune_iterations: iterations per fine-tuning epoch (both arms).
        finetune_lr: fine-tuning lr of the arm with pre-training.
        scratch_lr: fine-tuning lr of the arm from scratch.
        seed: seed of every run.
    """
    root = (REPO / bundle_root).resolve() if not Path(bundle_root).is_absolute() else Path(bundle_root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "demo.log"
    data = data_overrides(dataset_dir)
    common = {
        "bundle_root": str(root),
        **data,
        "datalist": str(root / "datalist.json"),
        "num_classes": num_classes,
        "seed": seed,
    }
    times: dict[str, float] = {}
    started = time.perf_counter()

    pretrain = {
        **common,
        "num_partitions": num_partitions,
        "epochs": pretrain_epochs,
        "iterations": pretrain_iterations,
        "output_dir": str(root / "pretrain"),
        "ckpt_dir": str(root / "models"),
        "resume": False,
        "show_progress": False,
    }
    times["pretrain"] = _run("training", ["pretrain.json", "quick.json"], pretrain, log)
    print(_pretrain_health(root / "pretrain", log), flush=True)

    finetune = {
        **common,
        "num_labeled": num_labeled,
        "labeled_seed": labeled_seed,
        "epochs": finetune_epochs,
        "iterations": finetune_iterations,
    }
    arms = {
        "with pre-training": {
            "ckpt_dir": str(root / "models"),
            "output_dir": str(root / "finetune"),
            "pretrained_path": str(root / "models" / "pretrained" / "unet_ssl.pt"),
            "pretrained_required": True,
            "lr": finetune_lr,
        },
        "from scratch": {
            "ckpt_dir": str(root / "scratch" / "models"),
            "output_dir": str(root / "scratch" / "finetune"),
            "pretrained_path": "null",
            "lr": scratch_lr,
        },
    }
    results: dict[str, dict[str, float]] = {}
    for arm, paths in arms.items():
        times[f"finetune {arm}"] = _run("training", ["train.json", "quick_finetune.json"], {**finetune, **paths}, log)
        eval_dir = Path(paths["output_dir"]).parent / "evaluate"
        evaluate = {**finetune, **paths, "output_dir": str(eval_dir)}
        times[f"evaluate {arm}"] = _run(
            "evaluating", ["train.json", "quick_finetune.json", "evaluate.json"], evaluate, log
        )
        results[arm] = _summary_dice(eval_dir / "metrics_summary.json")
        results[arm]["_dir"] = str(eval_dir)  # type: ignore[assignment]

    total = time.perf_counter() - started
    names = [k for k in results["with pre-training"] if not k.startswith("_")]
    print(f"\nTest-set 3D Dice ({num_labeled} labeled scan(s), seed {labeled_seed}; quick CPU settings):")
    print(f"{'class':<22}{'with pre-training':>20}{'from scratch':>16}")
    for name in names:
        a, b = results["with pre-training"][name], results["from scratch"][name]
        print(f"{name:<22}{a:>20.4f}{b:>16.4f}")
    print(f"total time {total / 60:.1f} min: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    summary = {"dice": results, "seconds": times, "total_seconds": total, "num_labeled": num_labeled}
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"per-scan metrics: {results['with pre-training']['_dir']}, {results['from scratch']['_dir']}")
    print(f"summary: {root / 'demo_summary.json'}")


if __name__ == "__main__":
    fire_main(main)
