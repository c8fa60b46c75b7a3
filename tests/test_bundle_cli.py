"""Stopping a script (the study, the demo) stops the bundle step it is running: no orphan writes on into a run
folder that a restarted study then resumes a second time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
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
