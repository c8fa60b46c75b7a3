"""Every command of every fire script documents every flag (``--help`` shows each parameter's Args line), and
the scripts expose only their commands."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

#: module -> the commands its ``fire.Fire`` exposes (a single function: its name)
COMMANDS = {
    "scripts.demo": ["main"],
    "scripts.study": ["study"],
    "scripts.make_datalist": ["make_datalist"],
    "scripts.make_synthetic_data": ["main"],
    "scripts.render_synthetic_examples": ["main"],
    "scripts.benchmark": ["step", "loader"],
    "scripts.benchmark_loader": ["run"],  # benchmark's own signature and Args (functools.wraps)
    "scripts.device_check": ["losses"],
}


def _documented(doc: str) -> set[str]:
    """Parameter names with a line of their own in the docstring's ``Args:`` section."""
    if "Args:" not in doc:
        return set()
    section = doc.split("Args:", 1)[1]
    section = re.split(r"\n\s*(Returns|Raises|Example|Examples|Yields):", section)[0]
    return set(re.findall(r"^\s{4,}(\w+):", section, flags=re.MULTILINE))


@pytest.mark.parametrize(("module", "command"), [(m, c) for m, cs in COMMANDS.items() for c in cs])
def test_every_flag_is_documented(module: str, command: str) -> None:
    function = getattr(importlib.import_module(module), command)
    params = [p for p in inspect.signature(function).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    doc = inspect.getdoc(function) or ""
    missing = [p.name for p in params if p.name not in _documented(doc)]
    assert doc.strip() and not missing, f"{module}.{command}: undocumented flags {missing}"


def test_help_after_other_flags_shows_the_help_and_runs_nothing(tmp_path, capsys) -> None:
    # fire alone would run the study on these flags first and show the help of its result afterwards
    from scripts.fire_cli import fire_main
    from scripts.study import study

    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exit_info:
        fire_main(study, ["--out_dir", str(out), "--budget", "tiny", "--help"])
    assert exit_info.value.code == 0
    assert not out.exists()
    shown = capsys.readouterr()
    assert "--pretrain_epochs" in shown.out + shown.err  # fire writes help to stderr when not on a terminal


def test_help_of_a_sub_command_and_plain_runs() -> None:
    from scripts.fire_cli import fire_main

    calls: list[int] = []

    def step(iters: int = 1) -> None:
        """One step.

        Args:
            iters: how many.
        """
        calls.append(iters)

    for argv in (["step", "--iters", "3", "-h"], ["-h"], ["step", "--help", "--", "--verbose"]):
        with pytest.raises(SystemExit) as exit_info:
            fire_main({"step": step}, argv)
        assert exit_info.value.code == 0, argv
    assert calls == []
    fire_main({"step": step}, ["step", "--iters", "3"])
    fire_main(step, ["--iters", "5"])
    assert calls == [3, 5]
