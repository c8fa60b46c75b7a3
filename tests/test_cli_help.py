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
