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


def _torchrun(tmp: Path, tiny_acdc: Path, configs: tuple[str, ...] = ("configs/train.json",), **extra: object
              ) -> subprocess.CompletedProcess:
    overrides = {**TINY, "bundle_root": str(tmp), "dataset_dir": str(tiny_acdc), "datalist": str(tmp / "dl.json"),
                 "finalize": [SAVE_REPLICA, "$bundle.distributed.cleanup()"], **extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "training", "--config_file", str([*configs, "configs/multi_gpu_train.json"]),
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
        with pytest.raises(RuntimeError, match="run under torchrun"):
            setup()
    finally:
        os.environ.update(env)


def test_mean_teacher_under_ddp_keeps_one_student_and_one_teacher(tiny_acdc: Path, tmp_path: Path) -> None:
    save_teacher = "$torch.save(@teacher.state_dict(), @output_dir + f'/teacher{bundle.distributed.rank()}.pt')"
    run = _torchrun(tmp_path, tiny_acdc, configs=("configs/train.json", "configs/mean_teacher.json"),
                    mt_batch_size=2, finalize=[SAVE_REPLICA, save_teacher, "$bundle.distributed.cleanup()"],
                    # the teacher keeps its own BatchNorm statistics, which its forward passes on each rank's own
                    # unlabeled slices move: only the handler's copy from rank 0 keeps the teachers equal
                    mt_buffers="keep")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "runs" / "finetune_mt"
    students, teachers = _replicas(out), [torch.load(out / f"teacher{r}.pt", weights_only=True) for r in (0, 1)]
    for a, b in (students, teachers):
        assert all(torch.equal(a[k], b[k]) for k in a), "the replicas stay identical, BatchNorm buffers included"
    # the teacher is the EMA of the student, not a copy of it
    assert not all(torch.equal(teachers[0][k], students[0][k]) for k in students[0])
    assert (tmp_path / "models" / "model.pt").is_file()
