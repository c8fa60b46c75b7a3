"""One ``python -m monai.bundle run ...`` step of a script (the demo, the study): the command line and its logged run.

The command is printed or logged as the user would type it (paths relative to the repository), so a script's log
doubles as a worked example of the bundle's command lines.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# a pre-training log's per-epoch clustering figures, as bundle/handlers/monitor.py writes them: MI in nats and as a
# percentage of log K (a sign accepted: logs written before MI was clamped at 0 can hold "MI=-0.000")
CLUSTER_MI_LINE = r"clusters: MI=(-?[0-9.]+) nat \((-?[0-9.]+)% of log K\)"


def bundle_command(run_id: str, configs: Sequence[str], overrides: Mapping[str, Any]) -> tuple[list[str], str]:
    """``(argv, shown)``: the ``monai.bundle run`` argv for ``configs/<name>`` files merged in order, with every
    override as ``--key value`` (lists and dicts as JSON, the rest as ``str``: fire reads Python literals), and the
    same command as text with the repository prefix dropped."""
    files = [str(REPO / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file",
           files[0] if len(files) == 1 else json.dumps(files),
           "--meta_file", str(REPO / "configs" / "metadata.json"),
           "--logging_file", str(REPO / "configs" / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    shown = " ".join(shlex.quote(c) for c in cmd[1:]).replace(str(REPO) + "/", "")
    return cmd, shown


@contextmanager
def _terminate_ends_the_step() -> Iterator[None]:
    """While a step runs, a SIGTERM to this script (``kill``, a scheduler's time limit) raises ``SystemExit(143)``,
    so ``subprocess.run`` stops and reaps the step before the script exits. Under Python's default action the
    script would die alone and its step run on, orphaned: a restarted study would then resume a second copy of the
    same step into the same folder. (Ctrl-C already reaches the whole process group.)"""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_logged(cmd: Sequence[str], shown: str, log: Path, append: bool = False) -> float:
    """Run ``cmd`` from the repository root with its output in ``log`` (after a ``$ python <shown>`` line); return
    the seconds it took. Stopping the script (SIGTERM or Ctrl-C) stops the step with it.

    Raises:
        SystemExit: when the command fails, with the end of its log.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    with open(log, "a" if append else "w") as fh:
        fh.write(f"\n$ python {shown}\n")
        fh.flush()
        with _terminate_ends_the_step():
            proc = subprocess.run(list(cmd), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"step failed (exit {proc.returncode}) after {seconds:.0f} s; end of {log}:\n{tail}")
    return seconds
