"""configs/multi_gpu_pretrain.json: pre-training under torchrun with 2 CPU processes (gloo).

The network-level proof of global statistics: 2 processes with ``scans_per_batch`` 2 each take the optimiser steps
of 1 process with ``scans_per_batch`` 4 (same global batch, same T), for L_MI + L_CC + L_con together. The network
uses instance norm here, because BatchNorm's statistics are per process by design (SyncBatchNorm needs GPUs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = {"features": [4, 8, 8, 16, 16, 4], "pixdim": [3.0, 3.0], "spatial_size": [64, 64], "crop_size": [32, 32],
        "num_workers": 0, "amp": False, "show_progress": True, "epochs": 2, "iterations": 2, "warmup_epochs": 0,
        "num_clusters": 6, "num_heads": 2, "num_partitions": 2, "log_interval": 1, "image_interval": 2,
        "network_def#norm": "instance", "lr": 0.01}
TRAINED = "{'network': @network.state_dict(), 'dense_head': @dense_head.state_dict(), " \
          "'global_head': @global_head.state_dict()}"
#: every process's initial and final weights, to compare replicas and runs
SAVE_INITIAL = f"$torch.save({TRAINED}, @bundle_root + '/initial' + os.environ.get('RANK', '0') + '.pt')"
SAVE_FINAL = f"$torch.save({TRAINED}, @bundle_root + '/final' + os.environ.get('RANK', '0') + '.pt')"
#: stops every process at the first iteration of epoch 2 (epoch 1's training state is on disk)
#: (no "import" in the expression: MONAI would parse it as an import statement)
KILL = ("$@train#trainer.add_event_handler(monai.engines.workflow.Events.ITERATION_STARTED(once=3), "
        "lambda engine: (_ for _ in ()).throw(KeyboardInterrupt()))")


def _launch(root: Path, tiny_acdc: Path, datalist: Path, nproc: int, **extra: Any) -> subprocess.CompletedProcess:
    overrides: dict[str, Any] = {**TINY, "bundle_root": str(root), "dataset_dir": str(tiny_acdc),
                                 "datalist": str(datalist), "generate_if_missing": False, **extra}
    overrides.setdefault("run", [SAVE_INITIAL, "$@train#trainer.run()"])
    overrides.setdefault("finalize", [SAVE_FINAL] + (["$bundle.distributed.cleanup()"] if nproc > 1 else []))
    configs = ["configs/pretrain.json"] + (["configs/multi_gpu_pretrain.json"] if nproc > 1 else [])
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    # the overrides go through an args file: torchrun would take ``--run`` for an abbreviation of its own options
    args_file = root / f"args_{len(list(root.glob('args_*.json'))) if root.is_dir() else 0}.json"
    args_file.parent.mkdir(parents=True, exist_ok=True)
    args_file.write_text(json.dumps({"config_file": configs, "meta_file": "configs/metadata.json",
                                     "logging_file": "configs/logging.conf", **overrides}))
    cmd = [sys.executable, *launcher, "-m", "monai.bundle", "run", "training", "--args_file", str(args_file)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _load(root: Path, name: str) -> dict[str, torch.Tensor]:
    nested = torch.load(root / f"{name}.pt", weights_only=True)
    return {f"{m}.{k}": v.double() for m, sd in nested.items() for k, v in sd.items() if v.is_floating_point()}


def _update_gap(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                initial: dict[str, torch.Tensor]) -> float:
    """``|| (w_run - w0) - (w_ref - w0) || / || w_ref - w0 ||`` over every trained tensor."""
    diff = sum(float(((run[k] - reference[k]) ** 2).sum()) for k in reference)
    step = sum(float(((reference[k] - initial[k]) ** 2).sum()) for k in reference)
    return (diff / step) ** 0.5


@pytest.fixture(scope="module")
def runs(tiny_acdc: Path, tiny_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("multi_gpu_pretrain")
    launches = {
        "ddp": dict(nproc=2, scans_per_batch=2),
        "single": dict(nproc=1, scans_per_batch=4),
        "per_rank": dict(nproc=2, scans_per_batch=2, **{"objective#global_statistics": False}),
    }
    for name, settings in launches.items():
        done = _launch(tmp / name, tiny_acdc, tiny_datalist, **settings)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    return {name: tmp / name for name in launches}


def test_two_processes_take_the_steps_of_one_process_with_the_whole_batch(runs: dict[str, Path]) -> None:
    a, b = _load(runs["ddp"], "final0"), _load(runs["ddp"], "final1")
    assert all(torch.equal(a[k], b[k]) for k in a), "DDP keeps the replicas identical"
    initial, single = _load(runs["single"], "initial0"), _load(runs["single"], "final0")
    assert all(torch.equal(initial[k], _load(runs["ddp"], "initial0")[k]) for k in initial)  # same start
    # 4 optimiser steps with L_MI + L_CC + L_con: the weights' updates agree to float precision. The floor is not
    # 1e-7: L_CC's normalised cross-correlation is ill-conditioned in flat windows, and a change that leaves the maths
    # alone (2 threads instead of 1, other summation orders) moves these updates by about 2e-3 ...
    assert _update_gap(a, single, initial) < 1e-2
    # ... while per-rank statistics (L_MI's joint and L_con's negatives from each process's half) take other steps
    # (about 0.4 here)
    assert _update_gap(_load(runs["per_rank"], "final0"), single, initial) > 1e-1


def test_rank_zero_alone_writes_the_weights_the_state_and_the_logs(runs: dict[str, Path]) -> None:
    root = runs["ddp"]
    exported = torch.load(root / "models" / "pretrained" / "unet_ssl.pt", weights_only=True)
    final = torch.load(root / "final0.pt", weights_only=True)["network"]
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    state = torch.load(root / "runs" / "pretrain" / "checkpoints" / "trainer_state.pt", weights_only=True)
    assert state["engine"] == {"epoch": 2, "iteration": 4}
    assert not any(k.startswith("module.") for k in state["network"])  # the plain network's keys
    # one writer of each log: another rank's monitor would add an events file, its health figure a line per epoch
    events = list((root / "runs" / "pretrain").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert len((root / "runs" / "pretrain" / "cluster_health.jsonl").read_text().splitlines()) == 2  # 2 epochs
    assert list((root / "runs" / "pretrain" / "pictures").glob("*.png")), "rank 0 draws the pictures"


def test_an_interrupted_ddp_run_resumes_to_the_uninterrupted_weights(
    runs: dict[str, Path], tiny_acdc: Path, tiny_datalist: Path, tmp_path: Path
) -> None:
    killed = _launch(tmp_path, tiny_acdc, tiny_datalist, nproc=2, scans_per_batch=2,
                     run=[SAVE_INITIAL, KILL, "$@train#trainer.run()"])
    assert killed.returncode != 0
    state = torch.load(tmp_path / "runs" / "pretrain" / "checkpoints" / "trainer_state.pt", weights_only=True)
    assert state["engine"]["epoch"] == 1
    resumed = _launch(tmp_path, tiny_acdc, tiny_datalist, nproc=2, scans_per_batch=2)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    straight, again = _load(runs["ddp"], "final0"), _load(tmp_path, "final0")
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    assert all(torch.equal(again[k], v) for k, v in _load(tmp_path, "final1").items())
