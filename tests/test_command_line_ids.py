"""A misspelt config id on the ``monai.bundle run`` command line is an error, not a silently unused setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import monai.bundle.__main__ as bundle_main
import pytest

from bundle.options import check_command_line_ids, unknown_override_ids

REPO = Path(__file__).resolve().parents[1]
MAIN = bundle_main.__file__


def _argv(*args: str) -> list[str]:
    return [MAIN, "run", *args]


def test_a_misspelt_top_level_id_is_named_with_the_closest_known_one() -> None:
    argv = _argv("training", "--config_file", str(REPO / "configs/pretrain.json"), "--num_cluster", "7",
                 "--epochs", "2", "--alpha=0.3")
    assert unknown_override_ids(argv) == ["num_cluster (did you mean num_clusters?)"]
    with pytest.raises(ValueError, match=r"num_cluster \(did you mean num_clusters\?\)"):
        check_command_line_ids(argv)


def test_nested_ids_list_indices_overlays_and_merge_keys() -> None:
    files = str([str(REPO / "configs/train.json"), str(REPO / "configs/mean_teacher.json")])
    known = _argv("training", "--config_file", files, "--train#trainer#max_epochs", "3", "--mt_weight", "0.5",
                  "--train#handlers#0#print_lr", "false", "--+imports", "['$import os']", "--_meta_#version", "9")
    assert unknown_override_ids(known) == []
    bad = _argv("training", "--config_file", files, "--train#trainer#max_epoch", "3", "--train#handlers#99", "1")
    assert unknown_override_ids(bad) == ["train#trainer#max_epoch (did you mean train#trainer#max_epochs?)",
                                         "train#handlers#99"]
    # a new argument of a component is accepted when its _target_ takes it, refused (with a hint) otherwise
    pretrain = str(REPO / "configs/pretrain.json")
    assert unknown_override_ids(_argv("--config_file", pretrain, "--network_def#dropout", "0.1", "--network_def#norm",
                                      "instance", "--objective#global_statistics", "false",
                                      "--train#preprocessing#map_items", "false")) == []
    assert unknown_override_ids(_argv("--config_file", pretrain, "--network_def#dropuot", "0.1",
                                      "--train#preprocessing#lazy_mode", "1")) == [
        "network_def#dropuot (did you mean network_def#dropout?)",
        "train#preprocessing#lazy_mode (did you mean train#preprocessing#lazy?)"]
    # through **kwargs (PretrainTrainer forwards them), a near miss of a named parameter is still a typo
    assert unknown_override_ids(_argv("--config_file", pretrain, "--train#trainer#num_replica", "2")) == [
        "train#trainer#num_replica (did you mean train#trainer#num_replicas?)"]
    # without the overlay, its ids are unknown
    assert unknown_override_ids(_argv("--config_file", str(REPO / "configs/train.json"), "--mt_weight", "1")) == [
        "mt_weight"]


def test_run_arguments_tracking_settings_and_args_file(tmp_path: Path) -> None:
    config = str(REPO / "configs/train.json")
    argv = _argv("training", "--config_file", config, "--meta_file", "m.json", "--logging_file", "l.conf",
                 "--tracking", "mlflow", "--experiment_name", "x", "--run_name", "y")
    assert unknown_override_ids(argv) == []
    assert unknown_override_ids(_argv("--config_file", config, "--experiment_name", "x")) == ["experiment_name"]
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": config, "lr": 0.1, "learning_rate": 0.1}))
    assert unknown_override_ids(_argv("training", "--args_file", str(args_file))) == [
        "learning_rate"]


def test_other_command_lines_are_not_checked() -> None:
    assert unknown_override_ids(["pytest", "run", "--config_file", "x.json", "--nonsense", "1"]) == []
    assert unknown_override_ids([MAIN, "verify_metadata", "--nonsense", "1"]) == []
    check_command_line_ids(["python", "-c"])  # no error


@pytest.mark.parametrize("config", ["pretrain.json", "train.json", "inference.json"])
def test_the_bundle_command_stops_before_any_work(config: str, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}",
           "--bundle_root", str(tmp_path), "--dataset_dir", str(tmp_path / "absent"), "--epoch", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "unknown config id(s) on the command line: epoch" in proc.stderr + proc.stdout
    assert not any(tmp_path.iterdir()), "nothing may be written before the check"


def test_fire_spellings_workflow_arguments_and_the_separator() -> None:
    config = str(REPO / "configs/train.json")
    assert unknown_override_ids(_argv("training", "--config_file", config, "--noamp", "--alpha", "-1")) == ["alpha"]
    assert unknown_override_ids(_argv("--config_file", config, "--workflow_type", "train",
                                      "--properties_path", "p.json")) == []
    assert unknown_override_ids(_argv("--config_file", config, "--", "--anything", "1")) == []
    tracked = _argv("--config_file", config, "--tracking", "mlflow", "--is_not_rank0", "true")
    assert unknown_override_ids(tracked) == []



@pytest.mark.parametrize("overlay,base", [("quick.json", "pretrain.json"), ("gpu.json", "pretrain.json"),
                                          ("quick_finetune.json", "train.json")])
def test_every_id_an_overlay_sets_exists_in_the_config_it_overlays(overlay: str, base: str) -> None:
    # a misspelt id in an overlay would be merged in as a new, unused setting: no budget may hold one
    ids = [k for k in json.loads((REPO / "configs" / overlay).read_text()) if not k.startswith("_desc_")]
    argv = _argv("training", "--config_file", str(REPO / "configs" / base), *[a for k in ids for a in (f"--{k}", "1")])
    assert ids and unknown_override_ids(argv) == []
