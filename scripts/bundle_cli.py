"""One ``python -m monai.bundle run ...`` step of a script (the demo, the study): the command line and its logged run,
and :func:`run_concurrently`, which runs a plan's independent steps several at a time (the study's ``--jobs``).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# a pre-training log's per-epoch clustering figures, as bundle/handlers/monitor.py writes them: MI in nats and as a
# percentage of log K (a sign accepted: logs written before MI was clamped at 0 can hold "MI=-0.000")
CLUSTER_MI_LINE = r"clusters: MI=(-?[0-9.]+) nat \((-?[0-9.]+)% of log K\)"

# the steps running now (several under run_concurrently), so that stopping the script stops every one of them
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()
# the environment variables run_concurrently gives the step running in this thread (its threads, its GPU)
_STEP_ENV = threading.local()


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
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               **getattr(_STEP_ENV, "env", {}))
    start = time.perf_counter()
    with open(log, "a" if append else "w") as fh:
        fh.write(f"\n$ python {shown}\n")
        fh.flush()
        with _terminate_ends_the_step(), subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=fh,
                                                          stderr=subprocess.STDOUT) as proc:
            with _RUNNING_LOCK:
                _RUNNING.add(proc)
            try:
                proc.wait()
            except BaseException:  # as subprocess.run: the script stops, so does its step
                proc.kill()
                raise
            finally:
                with _RUNNING_LOCK:
                    _RUNNING.discard(proc)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"step failed (exit {proc.returncode}) after {seconds:.0f} s; end of {log}:\n{tail}")
    return seconds


def stop_running_steps() -> None:
    """Stop (SIGTERM) every step :func:`run_logged` is running in this process, in any thread."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        if proc.poll() is None:
            proc.terminate()


@dataclass
class Step:
    """One step of a plan for :func:`run_concurrently`.

    Attributes:
        ready: whether the step can start now (what it depends on is finished); asked in the calling thread.
        work: the step itself, run in a worker thread (its commands through :func:`run_logged`); returns a result.
        finish: called in the calling thread with ``work``'s result, once per step, in the order steps finish.
    """

    ready: Callable[[], bool]
    work: Callable[[], Any]
    finish: Callable[[Any], None]


def run_concurrently(steps: Sequence[Step], jobs: int = 1,
                     step_env: Callable[[int], Mapping[str, str]] | None = None) -> None:
    """Run ``steps``, up to ``jobs`` at once, each as soon as it is ready; among the ready ones, in list order (with
    one job: one after the other, in list order when each step's dependencies come before it).

    Args:
        steps: the plan.
        jobs: steps at once (>= 1).
        step_env: environment variables for the commands of the step in worker slot ``0 .. jobs - 1`` (e.g. its
            threads and its GPU); none by default.

    Raises:
        ValueError: when ``jobs`` is below 1.
        RuntimeError: when steps are left that can never start (a dependency missing from the plan).

    A failed step starts no new step; the ones running then run to their end (their results kept, their
    ``finish`` called) and the first failure is raised. Stopping the script (SIGTERM, Ctrl-C) stops every running
    step.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}.")
    pending = list(steps)
    running: dict[Future, tuple[Step, int]] = {}
    free = list(range(jobs))
    failure: BaseException | None = None

    def in_slot(step: Step, slot: int) -> Any:
        _STEP_ENV.env = dict(step_env(slot)) if step_env is not None else {}
        try:
            return step.work()
        finally:
            _STEP_ENV.env = {}

    with ThreadPoolExecutor(max_workers=jobs) as pool, _terminate_ends_the_step():
        try:
            while pending or running:
                for step in [s for s in pending if failure is None and s.ready()]:
                    if not free:
                        break
                    pending.remove(step)
                    slot = free.pop(0)
                    running[pool.submit(in_slot, step, slot)] = (step, slot)
                if not running:
                    if failure is None:
                        raise RuntimeError(f"{len(pending)} step(s) can never start: what they wait for is not "
                                           "in the plan.")
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    step, slot = running.pop(future)
                    free.append(slot)
                    free.sort()
                    try:
                        result = future.result()
                    except BaseException as exc:  # noqa: BLE001 (re-raised once the running steps end)
                        if failure is None and running:
                            print(f"a step failed; waiting for the {len(running)} running to finish.", flush=True)
                        failure = failure or exc
                        continue
                    step.finish(result)
        except BaseException:
            stop_running_steps()
            raise
    if failure is not None:
        raise failure
