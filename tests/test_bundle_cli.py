"""Stopping a script (the study, the demo) stops the bundle steps it is running: no orphan writes on into a run
folder that a restarted study then resumes a second time; and ``run_concurrently``, which runs a plan's ready steps
side by side (the study's ``--jobs``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from scripts.bundle_cli import REPO

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGTERM semantics are POSIX")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_sigterm_to_the_script_stops_its_step(tmp_path: Path) -> None:
    pid_file = tmp_path / "step.pid"
    # the step: records its pid, then would run for a minute
    step = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from scripts.bundle_cli import run_logged
        run_logged([sys.executable, "-c", {step!r}], "step", Path({str(tmp_path / 'log.txt')!r}))
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    step_pid = None
    try:
        assert _wait_for(lambda: pid_file.is_file() and pid_file.read_text().strip() != "", 30), "step never started"
        step_pid = int(pid_file.read_text())
        assert _alive(step_pid)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        assert _wait_for(lambda: not _alive(step_pid), 10), "the step outlived the script that ran it"
        assert "$ python step" in (tmp_path / "log.txt").read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
        if step_pid is not None and _alive(step_pid):
            os.kill(step_pid, signal.SIGKILL)


def test_run_concurrently_runs_ready_steps_side_by_side_and_waits_for_dependencies() -> None:
    from scripts.bundle_cli import Step, run_concurrently

    both = threading.Barrier(2, timeout=10)  # passes only if the two first steps run at the same time
    finished: list[str] = []

    def step(name: str, needs: tuple[str, ...] = (), together: bool = False) -> Step:
        def work() -> str:
            if together:
                both.wait()
            return name
        return Step(lambda: all(n in finished for n in needs), work, finished.append)

    plan = [step("a", together=True), step("b", together=True), step("c", needs=("a", "b")), step("d")]
    run_concurrently(plan, jobs=2)
    assert sorted(finished) == ["a", "b", "c", "d"]  # a and b ran side by side (else the barrier breaks)
    assert finished.index("c") > max(finished.index("a"), finished.index("b"))  # c waited for both
    finished.clear()
    # one job: list order, each step once its dependencies are done
    run_concurrently([step("x", needs=("y",)), step("y"), step("z")], jobs=1)
    assert finished == ["y", "x", "z"]


def test_run_concurrently_lets_running_steps_finish_after_a_failure_then_raises_it() -> None:
    from scripts.bundle_cli import Step, run_concurrently

    started = threading.Event()
    finished: list[str] = []

    def slow() -> str:
        started.wait(10)
        time.sleep(0.2)
        return "slow"

    def failing() -> str:
        started.set()
        raise SystemExit("step failed (exit 1)")

    plan = [Step(lambda: True, slow, finished.append), Step(lambda: True, failing, finished.append),
            Step(lambda: True, lambda: "never", finished.append)]
    with pytest.raises(SystemExit, match="step failed"):
        run_concurrently(plan, jobs=2)
    assert finished == ["slow"]  # the running step's result kept; no new step started after the failure
    with pytest.raises(RuntimeError, match="1 step"):
        run_concurrently([Step(lambda: False, lambda: None, finished.append)], jobs=2)
    with pytest.raises(ValueError, match="jobs must be at least 1, got 0"):
        run_concurrently([], jobs=0)


def test_run_concurrently_gives_each_worker_slot_its_environment(tmp_path: Path) -> None:
    from scripts.bundle_cli import Step, run_concurrently, run_logged

    both = threading.Barrier(2, timeout=30)  # two steps at once: two slots

    def step(i: int) -> Step:
        def work() -> str:
            both.wait()
            log = tmp_path / f"{i}.txt"
            run_logged([sys.executable, "-c", "import os; print('slot', os.environ['SLOT'])"], "env", log)
            return log.read_text().split("slot ")[-1].strip()
        return Step(lambda: True, work, seen.append)

    seen: list[str] = []
    run_concurrently([step(0), step(1)], jobs=2, step_env=lambda slot: {"SLOT": str(slot)})
    assert sorted(seen) == ["0", "1"]
    assert "SLOT" not in os.environ


def test_sigterm_to_a_script_running_steps_side_by_side_stops_every_step(tmp_path: Path) -> None:
    pids = [tmp_path / f"step{i}.pid" for i in range(2)]
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from scripts.bundle_cli import Step, run_concurrently, run_logged
        def step(pid_file):
            code = f"import os, time; open({{pid_file!r}}, 'w').write(str(os.getpid())); time.sleep(60)"
            return Step(lambda: True, lambda: run_logged([sys.executable, "-c", code], "step",
                                                         Path(pid_file + ".log")), print)
        run_concurrently([step({str(pids[0])!r}), step({str(pids[1])!r})], jobs=2)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    step_pids: list[int] = []
    try:
        assert _wait_for(lambda: all(p.is_file() and p.read_text().strip() for p in pids), 30), "steps never started"
        step_pids = [int(p.read_text()) for p in pids]
        assert all(_alive(pid) for pid in step_pids)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        assert _wait_for(lambda: not any(_alive(pid) for pid in step_pids), 10), "a step outlived the script"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in step_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
