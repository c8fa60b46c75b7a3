"""The study command end to end at a tiny budget: plan, pre-training shared by fine-tunes, lr chosen on validation,
test split scored once per run, resume, and the report (CSV, markdown table, plots)."""

from __future__ import annotations

import csv
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts import study as study_cli


def test_every_option_is_documented():
    doc = inspect.getdoc(study_cli.study)
    documented = set(re.findall(r"^\s{4}(\w+):", doc.split("Args:")[1], flags=re.M))
    assert set(inspect.signature(study_cli.study).parameters) == documented


def test_unknown_method_and_budget_are_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        study_cli.study(out_dir=str(tmp_path / "a"), methods=["scratch", "nope"], dry_run=True)
    with pytest.raises(SystemExit, match="unknown budget"):
        study_cli.study(out_dir=str(tmp_path / "b"), budget="huge", dry_run=True)
    assert not (tmp_path / "a" / "datalist.json").exists()


def test_plan_counts_one_pretraining_per_method_and_sweeps(tmp_path, capsys):
    study_cli.study(out_dir=str(tmp_path), methods=["scratch", "ours", "mt_ours", "iic"], labeled=[1, 2],
                    seeds=[0, 1, 2], lrs=[1e-3, 3e-3], alphas=[0.25], budget="tiny", dry_run=True)
    line = capsys.readouterr().out
    # pre-trainings: ours (shared by mt_ours), iic, ours[alpha=0.25]; 5 methods x 2 counts:
    # 2 lrs on seed 0 + 2 more seeds = 4 fine-tunes each -> 40; evaluations 5 x 2 x 3 = 30
    assert line.startswith("73 steps: 3 pre-trainings") and "40 fine-tunes, 30 evaluations" in line


def test_default_lr_grid_searches_three_lrs_per_arm_on_the_first_seed(tmp_path, capsys):
    study_cli.study(out_dir=str(tmp_path), methods=["scratch", "ours"], labeled=[1], seeds=[0, 1], budget="tiny",
                    dry_run=True)
    # per method: 3 lrs on seed 0 + 1 on seed 1 = 4 fine-tunes; 2 evaluations
    assert "8 fine-tunes, 4 evaluations" in capsys.readouterr().out


def test_lr_choice_mean_runs_the_grid_on_every_seed_and_unknown_rules_are_refused(tmp_path, capsys):
    study_cli.study(out_dir=str(tmp_path), methods=["scratch", "ours"], labeled=[1], seeds=[0, 1, 2],
                    lrs=[3e-3, 1e-2], lr_choice="mean", budget="tiny", dry_run=True)
    # per method: 2 lrs x 3 seeds = 6 fine-tunes (first_seed: 2 + 2 = 4); 3 evaluations
    assert "12 fine-tunes, 6 evaluations" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown lr_choice 'best'"):
        study_cli.study(out_dir=str(tmp_path / "c"), lr_choice="best", dry_run=True)
    assert not (tmp_path / "c").exists()


def test_select_lr_by_mean_averages_over_seeds_then_prefers_the_smaller_lr():
    runs = [{"lr": 3e-3, "val_dice": 0.70}, {"lr": 1e-2, "val_dice": 0.72},   # seed 0 alone would take 1e-2
            {"lr": 3e-3, "val_dice": 0.60}, {"lr": 1e-2, "val_dice": 0.50}]   # means: 0.65 against 0.61
    assert study_cli.select_lr_by_mean(runs) == 3e-3
    tie = [{"lr": 1e-2, "val_dice": 0.5}, {"lr": 1e-3, "val_dice": 0.4}, {"lr": 1e-3, "val_dice": 0.6}]
    assert study_cli.select_lr_by_mean(tie) == 1e-3


def test_lr_choice_mean_scores_every_seed_at_the_lr_best_on_average(tmp_path, monkeypatch):
    val = {(0, 1e-3): 0.9, (0, 2e-3): 0.5, (1, 1e-3): 0.1, (1, 2e-3): 0.6}  # seed 0 prefers 1e-3; the mean 2e-3
    scored = []

    def finetune(self, folder, mean_teacher, weights, labeled, seed, lr):
        return {"lr": lr, "val_dice": val[(seed, lr)], "best_epoch": 1, "seconds": 1.0}

    def evaluate(self, folder, model_dir):
        scored.append(Path(model_dir).relative_to(tmp_path).as_posix())
        return {"seconds": 1.0, "summary": {"dice": {"mean": 0.5}}}

    monkeypatch.setattr(study_cli.Study, "finetune", finetune)
    monkeypatch.setattr(study_cli.Study, "evaluate", evaluate)
    monkeypatch.setattr(study_cli.Study, "scored", lambda self, folder, model_dir: None)
    (tmp_path / "datalist.json").write_text("{}")  # an existing study datalist: no data prepared
    study_cli.study(out_dir=str(tmp_path), methods=["scratch"], labeled=[1], seeds=[0, 1], lrs=[1e-3, 2e-3],
                    lr_choice="mean", budget="tiny")
    assert scored == ["finetune/scratch/n1/seed0/lr0.002/models", "finetune/scratch/n1/seed1/lr0.002/models"]
    scored.clear()
    study_cli.study(out_dir=str(tmp_path), methods=["scratch"], labeled=[1], seeds=[0, 1], lrs=[1e-3, 2e-3],
                    budget="tiny")  # the first seed's choice: 1e-3 for both
    assert scored == ["finetune/scratch/n1/seed0/lr0.001/models", "finetune/scratch/n1/seed1/lr0.001/models"]


def _fake_steps(monkeypatch, tmp_path: Path, log: list[tuple[str, str, float]]) -> None:
    """Study steps that only record when they start and end: pre-training 1 s, fine-tunes and scores 0.05 s."""
    val = {0.001: 0.4, 0.002: 0.6}  # every arm and seed prefers 2e-3

    def timed(what: str, seconds: float) -> None:
        log.append(("start", what, time.perf_counter()))
        time.sleep(seconds)
        log.append(("end", what, time.perf_counter()))

    def pretrain(self, key, variant, settings):
        timed(f"pretrain {key}", 1.0)
        return {"weights": "w.pt", "seconds": 1.0, "health": None, "mi": 1.0}

    def finetune(self, folder, mean_teacher, weights, labeled, seed, lr):
        timed(Path(folder).relative_to(self.out).as_posix(), 0.05)
        return {"lr": lr, "val_dice": val[lr] - 0.01 * seed, "best_epoch": 1, "seconds": 0.05}

    def evaluate(self, folder, model_dir):
        timed("score " + Path(model_dir).relative_to(self.out).as_posix(), 0.05)
        return {"seconds": 0.05, "summary": {"dice": {"mean": 0.5}}}

    monkeypatch.setattr(study_cli.Study, "pretrain", pretrain)
    monkeypatch.setattr(study_cli.Study, "finetune", finetune)
    monkeypatch.setattr(study_cli.Study, "evaluate", evaluate)
    monkeypatch.setattr(study_cli.Study, "scored", lambda self, folder, model_dir: None)
    monkeypatch.setattr(study_cli, "write_report", lambda *args: None)
    (tmp_path / "datalist.json").write_text("{}")  # an existing study datalist: no data prepared


def test_jobs_run_independent_steps_side_by_side_with_the_same_steps_and_choices(tmp_path, monkeypatch, capsys):
    args = dict(methods=["scratch", "ours"], labeled=[1], seeds=[0, 1], lrs=[1e-3, 2e-3], budget="tiny")
    logs: dict[int, list[tuple[str, str, float]]] = {}
    for jobs in (1, 3):
        out = tmp_path / f"jobs{jobs}"
        out.mkdir()
        logs[jobs] = []
        _fake_steps(monkeypatch, out, logs[jobs])
        study_cli.study(out_dir=str(out), jobs=jobs, **args)
        assert "[11/11]" in capsys.readouterr().out  # 1 pre-training, 2 x (2 lrs + 1 seed) fine-tunes, 4 scores
    steps = {jobs: [what for kind, what, _ in log if kind == "start"] for jobs, log in logs.items()}
    assert sorted(steps[1]) == sorted(steps[3])  # the same steps: the same lr chosen, the same models scored
    assert "score finetune/ours/n1/seed1/lr0.002/models" in steps[3]
    assert steps[1][0] == "pretrain ours" and steps[1][1] == "finetune/scratch/n1/seed0/lr0.001"  # one job: in order

    def at(jobs: int, kind: str, what: str) -> float:
        return next(t for k, w, t in logs[jobs] if k == kind and w == what)

    # three jobs: scratch's grid runs beside the pre-training; ours' fine-tunes wait for it
    assert at(3, "start", "finetune/scratch/n1/seed0/lr0.001") < at(3, "end", "pretrain ours")
    assert at(3, "start", "finetune/ours/n1/seed0/lr0.001") > at(3, "end", "pretrain ours")
    # the other seed waits for the first seed's whole grid, a score for every fine-tune of its arm
    assert at(3, "start", "finetune/scratch/n1/seed1/lr0.002") > at(3, "end", "finetune/scratch/n1/seed0/lr0.002")
    assert at(3, "start", "score finetune/scratch/n1/seed0/lr0.002/models") > at(
        3, "end", "finetune/scratch/n1/seed1/lr0.002")
    with pytest.raises(SystemExit, match="jobs must be at least 1, got 0"):
        study_cli.study(out_dir=str(tmp_path / "z"), jobs=0, dry_run=True)
    assert not (tmp_path / "z").exists()


def test_each_step_of_several_gets_its_share_of_the_cores_and_one_gpu(monkeypatch):
    monkeypatch.setattr(study_cli.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    env = study_cli._step_environment(4)
    assert env(0) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "2"}
    assert env(1)["CUDA_VISIBLE_DEVICES"] == "3" and env(2)["CUDA_VISIBLE_DEVICES"] == "2"  # round robin
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU: every step shares it, nothing to set
    assert study_cli._step_environment(16)(5) == {}


def test_tiny_study_runs_resumes_and_reports(tmp_path, tiny_acdc, capsys):
    out = tmp_path / "study"
    args = dict(out_dir=str(out), dataset_dir=str(tiny_acdc), methods=["scratch", "mt_ours"], labeled=[1],
                seeds=[0, 1], lrs=[1e-3, 2e-3], budget="tiny", jobs=2,
                label_names=["background", "right ventricle", "myocardium", "left ventricle"])
    study_cli.study(**args)
    printed = capsys.readouterr().out
    assert "[11/11]" in printed  # 1 pre-training, 2 x 2 lrs on seed 0 + 2 on seed 1, 4 evaluations
    assert "started: pre-train ours" in printed  # two jobs: a line when each step starts too
    report = printed.split("report: ")[-1]  # the last line names every file the report wrote
    assert all(f in report for f in ("runs.csv", "results.md", "dice_vs_labeled.png",
                                     "dice_vs_labeled_foreground.png", "pretraining.png", "cluster_maps.png"))

    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [("scratch", "0"), ("scratch", "1"), ("mt_ours", "0"),
                                                        ("mt_ours", "1")]
    for method in ("scratch", "mt_ours"):
        tuned = {float(json.loads(p.read_text())["lr"]): json.loads(p.read_text())["val_dice"]
                 for p in (out / "finetune" / method / "n1" / "seed0").glob("lr*/done.json")}
        best_lr = min(tuned, key=lambda lr: (-tuned[lr], lr))  # the first seed's best validation Dice (ties: lower lr)
        assert {float(r["lr"]) for r in rows if r["method"] == method} == {best_lr}  # ... is used for every seed
        other_lr = next(x for x in tuned if x != best_lr)
        assert not (out / "finetune" / method / "n1" / "seed1" / f"lr{other_lr:g}").exists()
    for row in rows:
        assert 0.0 <= float(row["dice_mean"]) <= 1.0 and float(row["evaluate_s"]) > 0
        assert 0.0 <= float(row["foreground_dice"]) <= 1.0  # three foreground classes: their union scored too
        assert len(row["datalist_hash"]) == 12 and row["test_scans"] == "2"
    assert float(rows[2]["pretrain_s"]) > 0 and float(rows[0]["pretrain_s"]) == 0  # scratch has no pre-training

    table = (out / "results.md").read_text()
    assert "| mt_ours | 1 | 2 |" in table and "right ventricle" in table and "±" in table
    assert "foreground (label > 0)" in table
    assert (out / "dice_vs_labeled.png").stat().st_size > 0 and (out / "cluster_maps.png").stat().st_size > 0
    assert (out / "pretraining.png").stat().st_size > 0
    assert (out / "dice_vs_labeled_foreground.png").stat().st_size > 0  # the union's Dice plotted too
    (curve,) = study_cli.pretraining_curves(out / "pretrain" / "ours")  # one epoch: MI and cluster Dice logged
    assert curve["epoch"] == 1 and curve["mi"] >= 0 and 0.0 <= curve["cluster_dice"] <= 1.0
    assert 0.0 <= curve["cluster_dice_one_to_one"] <= 1.0

    # a second call finds every step done and runs no bundle command
    log_before = (out / "study.log").read_text()
    study_cli.study(**args)
    again = capsys.readouterr().out
    assert "[11/11]" in again and again.count("skipped (done)") == 11
    assert (out / "study.log").read_text() == log_before


def test_report_only_from_finished_runs(tmp_path, capsys):
    study_cli.study(out_dir=str(tmp_path), methods=["scratch"], report_only=True)
    assert "no finished runs" in capsys.readouterr().out
    assert Path(tmp_path / "study.json").is_file()


def test_best_validation_reads_the_validation_line_not_the_training_one(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "- INFO - Key metric: val_mean_dice best value: 0.2009 at epoch: 6\n"
        "- INFO - Key metric: train_mean_dice best value: 0.4116 at epoch: 6\n"
    )
    assert study_cli._best_validation(log) == (0.2009, 6)
    log.write_text("nothing here\n")
    with pytest.raises(SystemExit, match="no validation result"):
        study_cli._best_validation(log)


def test_pretraining_curves_read_every_epoch_of_the_log(tmp_path):
    # a log written before MI was clamped at 0 can hold "MI=-0.000" (float rounding at independent views)
    (tmp_path / "log.txt").write_text(
        "- INFO - epoch 1/3: loss=3.2 clusters: MI=-0.000 nat (-0.0% of log K) H(marg)=1.714/1.792 dead=0\n"
        "- INFO - epoch 2/3: loss=3.1 clusters: MI=0.250 nat (7.0% of log K) H(marg)=3.5/3.6 dead=0\n"
        "- INFO - epoch 3/3: loss=3.0 clusters: MI=1.714 nat (46.5% of log K) H(marg)=3.6/3.6 dead=0\n"
    )
    (tmp_path / "cluster_health.jsonl").write_text(json.dumps({"epoch": 3, "mean": 0.4}) + "\n")
    curves = study_cli.pretraining_curves(tmp_path)
    assert [(c["epoch"], c["mi"], c["cluster_dice"]) for c in curves] == [(1, 0.0, None), (2, 0.25, None),
                                                                          (3, 1.714, 0.4)]
    assert curves[2]["mi_fraction"] == pytest.approx(0.465)


def test_select_best_prefers_validation_dice_then_the_smaller_lr():
    runs = [{"lr": 3e-3, "val_dice": 0.5}, {"lr": 1e-3, "val_dice": 0.5}, {"lr": 1e-2, "val_dice": 0.4}]
    assert study_cli.select_best(runs)["lr"] == 1e-3
    assert study_cli.select_best(runs[2:] + [{"lr": 1e-4, "val_dice": 0.45}])["lr"] == 1e-4


def test_demo_prints_the_pretraining_health_figures(tmp_path):
    from scripts.demo import _pretrain_health

    log = tmp_path / "demo.log"
    log.write_text("epoch 1/2: clusters: MI=0.100 nat (2.7% of log K)\n"
                   "epoch 2/2: clusters: MI=1.234 nat (33.5% of log K)\n")
    (tmp_path / "cluster_health.jsonl").write_text(
        json.dumps({"per_class": {"RV": 0.1, "LV": 0.5}, "mean": 0.3, "scans": 8}) + "\n"
    )
    text = _pretrain_health(tmp_path, log)
    assert "1.234 nat (33.5 % of log K)" in text and "RV 0.100, LV 0.500, mean 0.300" in text


@pytest.mark.parametrize("config", ["pretrain.json", "train.json"])
def test_demo_generates_the_embedded_data_only_by_default(tmp_path, config):
    """The demo's bundle_root is runs/demo while the embedded data live in the repository's data/: its overrides
    must still let the configs generate them, and never generate into a user's folder."""
    from monai.bundle import ConfigParser

    from scripts.demo import REPO, data_overrides

    for dataset_dir, generate in ((None, True), (str(tmp_path / "mine"), False)):
        parser = ConfigParser()
        parser.read_config(REPO / "configs" / config)
        parser.update({"bundle_root": str(tmp_path / "runs" / "demo"), **data_overrides(dataset_dir)})
        assert parser.get_parsed_content("generate_if_missing") is generate


def test_a_second_study_into_a_running_studys_folder_is_refused(tmp_path):
    if os.name != "posix":
        pytest.skip("advisory file locks are POSIX")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from scripts.study import _claim_folder; "
         f"h = _claim_folder(Path({str(tmp_path)!r})); print('held', flush=True); time.sleep(60)"],
        cwd=study_cli.REPO, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(study_cli.REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=rf"another study is running in this folder \(pid {holder.pid}\)"):
            study_cli.study(out_dir=str(tmp_path), budget="tiny", dry_run=True)
        assert not (tmp_path / "study.json").exists()  # refused before anything is written
        study_cli.study(out_dir=str(tmp_path), budget="tiny", report_only=True)  # a report may be read meanwhile
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    study_cli.study(out_dir=str(tmp_path), budget="tiny", dry_run=True)  # the lock went with its process
    assert (tmp_path / "study.json").is_file()


def _summary(dice: float) -> dict:
    return {"num_scans": 2, "classes": ["LV"], "dice": {"per_class": {"LV": {"mean": dice}}, "mean": dice},
            "hd95": {"mean": 1.0}}


def test_a_test_score_is_redone_when_the_selected_fine_tune_changes(tmp_path, monkeypatch):
    runner = study_cli.Study(tmp_path, None, study_cli.BUDGETS["tiny"], 2, 3, 0, {})
    scored = []

    def fake_bundle_run(run_id, configs, overrides, folder):  # stands in for `monai.bundle run evaluating`
        folder.mkdir(parents=True, exist_ok=True)
        scored.append(overrides["ckpt_dir"])
        (folder / "metrics_summary.json").write_text(json.dumps(_summary(0.1 * len(scored))))
        return 1.0

    monkeypatch.setattr(runner, "bundle_run", fake_bundle_run)
    folder = tmp_path / "evaluate" / "scratch" / "n1" / "seed0"
    first, second = (tmp_path / "finetune" / "scratch" / "n1" / "seed0" / f"lr{lr}" / "models" for lr in (0.003, 0.01))
    assert runner.scored(folder, first) is None
    runner.evaluate(folder, first)
    assert runner.evaluate(folder, first)["summary"]["dice"]["mean"] == pytest.approx(0.1)  # done: not scored again
    assert runner.scored(folder, first) is not None and runner.scored(folder, second) is None
    assert runner.evaluate(folder, second)["summary"]["dice"]["mean"] == pytest.approx(0.2)  # another model: again
    assert scored == [str(first), str(second)]
    assert "scored again" in (tmp_path / "study.log").read_text()


def test_the_report_names_the_fine_tune_that_was_scored_not_each_seeds_best(tmp_path):
    seed1 = tmp_path / "finetune" / "scratch" / "n1" / "seed1"
    for lr, val in ((0.003, 0.7), (0.01, 0.6)):  # 3e-3 is better on this seed, but seed 0 chose 1e-2
        (seed1 / f"lr{lr:g}").mkdir(parents=True)
        (seed1 / f"lr{lr:g}" / "done.json").write_text(json.dumps(
            {"lr": lr, "val_dice": val, "best_epoch": 3, "seconds": 5.0}))
    ev = tmp_path / "evaluate" / "scratch" / "n1" / "seed1"
    ev.mkdir(parents=True)
    ev_record = {"seconds": 1.0, "model_dir": "finetune/scratch/n1/seed1/lr0.01/models", "summary": _summary(0.5)}
    (ev / "done.json").write_text(json.dumps(ev_record))
    table = study_cli._method_table(["scratch"], [], [], [])
    (row,) = study_cli.collect_rows(tmp_path, table, [1], [1])
    assert (row["lr"], row["val_dice"], row["dice_mean"]) == (0.01, 0.6, 0.5)
