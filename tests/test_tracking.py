"""``--tracking mlflow`` (MONAI's own option) on pre-training: the loss per iteration and the method's own figures per
epoch reach MLflow through MONAI's standard ``MLFlowHandler``. Needs the ``tracking`` extra (mlflow-skinny with its
SQLite store); skipped without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")

REPO = Path(__file__).resolve().parents[1]


def test_pretraining_sends_the_loss_and_the_method_figures_to_mlflow(
    tiny_overrides: dict[str, Any], tiny_paths: dict[str, Any], tmp_path: Path
) -> None:
    finetune_only = ("val_interval", "batch_size", "slices_per_volume", "cache_rate", "sw_batch_size")
    overrides = {k: v for k, v in tiny_overrides.items() if k not in finetune_only}
    overrides = {**overrides, **tiny_paths, "epochs": 2, "iterations": 2, "num_clusters": 6, "num_heads": 2,
                 "num_partitions": 2, "output_dir": str(tmp_path / "runs" / "pretrain")}
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": "configs/pretrain.json", "meta_file": "configs/metadata.json",
                                "logging_file": "configs/logging.conf", "tracking": "mlflow", **overrides}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--args_file", str(args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    store = tmp_path / "runs" / "pretrain" / "mlruns.db"  # MONAI's default tracking URI: output_dir/mlruns.db
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    history = {name: client.get_metric_history(run.info.run_id, name) for name in run.data.metrics}
    assert [m.step for m in history["train_loss"]] == [1, 2, 3, 4]  # the loss of every iteration
    for name in ("loss", "mi", "cc", "con", "mutual_information", "mutual_information_fraction", "marginal_entropy",
                 "dead_clusters", "cluster_dice_mean"):  # every epoch: the components, the clustering, the health
        assert [m.step for m in history[name]] == [1, 2], name
    epoch_loss = [m.value for m in history["loss"]]
    iteration_loss = [m.value for m in history["train_loss"]]
    assert epoch_loss[0] == pytest.approx(sum(iteration_loss[:2]) / 2, rel=1e-5)  # the epoch mean of the iterations
