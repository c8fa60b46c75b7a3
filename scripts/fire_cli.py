"""The scripts' python-fire entry point: ``--help`` shows the help and runs nothing, wherever it stands.

Fire alone runs the command first when ``--help`` follows other flags: ``python -m scripts.study --dataset_dir X
--help`` would start a study of hours on ``X`` and show the help of its return value afterwards. Here ``-h`` /
``--help`` anywhere before a ``--`` separator shows the command's help instead (after ``--`` fire's own meaning
holds).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import fire

HELP_FLAGS = ("-h", "--help")


def fire_main(component: Any, argv: Sequence[str] | None = None, name: str | None = None) -> Any:
    """Run ``component`` as a fire command line (``argv``: the arguments, ``sys.argv[1:]`` by default).

    With ``-h`` or ``--help`` among the arguments before ``--``, only the help is shown (of the sub-command named by
    the first argument when ``component`` is a dict of commands): fire exits with status 0 and nothing is called.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    head = args[: args.index("--")] if "--" in args else args
    if any(a in HELP_FLAGS for a in head):
        command = head[:1] if isinstance(component, dict) and head and head[0] in component else []
        return fire.Fire(component, command=[*command, "--help"], name=name)
    return fire.Fire(component, command=args, name=name)
