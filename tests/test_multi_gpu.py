"""configs/multi_gpu_train.json: fine-tuning under torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = {"features": [4, 8, 8, 16, 16, 4], "pixdim": [3.0, 3.0], "spatial_size": [64, 64], "crop_size": [32, 32],
        "num_workers": 0, "amp": False, "epochs": 2, "iterations": 2, "warmup_epochs": 0, "batch_size": 2,
        "sw_batch_size": 64}
#: each rank's final weights, to compare the replicas
SAVE_REPLICA = "$torch.save(@network.state_dict(), @output_dir + f'/rank{bundle.distributed.rank()}.pt')"


def _torchrun(tmp: Path, tiny_acdc: Path, **extra: object) -> subprocess.CompletedProcess:
    overrides = {**TINY, "bundle_root": str(tmp), "dataset_dir": str(tiny_acdc), "datalist": str(tmp / "dl.json"),
                 "finalize": [SAVE_REPLICA, "$bundle.distributed.cleanup()"], **extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "training", "--config_file", str(["configs/train.json", "configs/multi_gpu_train.json"]),
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _replicas(folder: Path) -> tuple[dict, dict]:
    return (torch.load(folder / "rank0.pt", weights_only=True), torch.load(folder / "rank1.pt", weights_only=True))


def test_two_processes_train_one_model_and_rank_zero_writes_it(tiny_acdc: Path, tmp_path: Path) -> None:
    ddp = _torchrun(tmp_path / "ddp", tiny_acdc)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _replicas(tmp_path / "ddp" / "runs" / "finetune")
    assert all(torch.equal(a[k], b[k]) for k in a), "DDP keeps the replicas identical"
    saved = torch.load(tmp_path / "ddp" / "models" / "model.pt", weights_only=True)  # the best-validation model
    assert saved.keys() == a.keys()  # the plain network's keys (no "module." prefix)
    assert list((tmp_path / "ddp" / "runs" / "finetune").glob("events.out.tfevents.*")), "rank 0 logs"
    # the control: the same launch without the DDP wrap trains two different models, so the ranks drew different
    # slices and DDP's gradient averaging is what kept them equal above
    alone = _torchrun(tmp_path / "alone", tiny_acdc, **{"train#trainer#network": "@network"})
    assert alone.returncode == 0, alone.stderr[-3000:]
    c, d = _replicas(tmp_path / "alone" / "runs" / "finetune")
    assert not all(torch.equal(c[k], d[k]) for k in c)


def test_fewer_validation_scans_than_processes_and_none_at_all(tiny_acdc: Path, tmp_path: Path) -> None:
    image = sorted(tiny_acdc.rglob("*frame01.nii.gz"))[0]
    scan = {"image": str(image), "label": str(image).replace(".nii.gz", "_gt.nii.gz")}
    one = _torchrun(tmp_path / "one", tiny_acdc, **{"validate#dataset#data": [scan]})
    assert one.returncode == 0, one.stderr[-3000:]  # both ranks score the one scan
    assert (tmp_path / "one" / "models" / "model.pt").is_file()
    none = _torchrun(tmp_path / "none", tiny_acdc, **{"validate#dataset#data": []})
    assert none.returncode == 0, none.stderr[-3000:]  # no validation: the final weights are the model
    assert (tmp_path / "none" / "models" / "model.pt").is_file()


def test_outside_torchrun_the_overlay_says_how_to_launch(tmp_path: Path) -> None:
    from bundle.distributed import setup

    env = {k: os.environ.pop(k) for k in ("LOCAL_RANK", "WORLD_SIZE", "RANK") if k in os.environ}
    try:
        with pytest.raises(RuntimeError, match="runs under torchrun"):
            setup()
    finally:
        os.environ.update(env)


def test_mean_teacher_under_ddp_is_refused_with_a_reason() -> None:
    from bundle.engines import MeanTeacherTrainer

    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self) -> None:  # no process group needed to test the check
            torch.nn.Module.__init__(self)

    with pytest.raises(ValueError, match="Mean Teacher does not run under DDP yet"):
        MeanTeacherTrainer(device="cpu", max_epochs=1, train_data_loader=[], network=FakeDDP(), optimizer=None,
                           loss_function=None, teacher=torch.nn.Linear(1, 1), unlabeled_data_loader=[],
                           transform=None)
