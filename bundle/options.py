"""Validation of the bundle configs' user-facing options, run in ``initialize`` before anything is built.

A bad override (``--num_clusters 1``, ``--alpha 2``, ``--variant foo``, a crop larger than the pre-processed
slices, ...) is reported as one ``ValueError`` listing every problem, before data is read or a network built.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import logging
import pydoc
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator
from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

__all__ = ["check_command_line_ids", "check_finetune_options", "check_pretrain_options", "flag", "unknown_override_ids"]

logger = logging.getLogger(__name__)

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _fail(message: str) -> ValueError:
    """Log ``message`` at ERROR (the first thing a command-line user reads, above MONAI's chained tracebacks) and
    return the ``ValueError`` to raise."""
    logger.error(message)
    return ValueError(message)


def flag(value: Any, name: str) -> bool:
    """A boolean option as the user typed it: ``True``/``False``, or the strings and numbers people write on a
    command line (``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``, any case). The command line
    hands ``--resume false`` over as the string ``"false"``, which Python would take as true.

    Raises:
        ValueError: for anything else, naming the option and the accepted values.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail(f"{name} must be a boolean: true/false, yes/no, on/off or 1/0 (any case); got {value!r}")


def _pair(value: Sequence[int] | int, name: str, problems: list[str]) -> tuple[int, ...] | None:
    vals = (value, value) if isinstance(value, int) else tuple(value)
    if len(vals) != 2 or not all(isinstance(v, int) and v > 0 for v in vals):
        problems.append(f"{name} must be two positive integers, got {value!r}")
        return None
    return vals


def check_pretrain_options(
    *,
    variant: str,
    num_clusters: int,
    num_heads: int,
    alpha: float,
    weights: dict[str, float],
    crop_size: Sequence[int],
    spatial_size: Sequence[int],
    features: Sequence[int],
    scans_per_batch: int,
    num_partitions: int,
    epochs: int,
    iterations: int,
    warmup_epochs: int,
) -> None:
    """Raise one ``ValueError`` naming every invalid pre-training option.

    Raises:
        ValueError: unknown ``variant``, ``num_clusters < 2``, ``alpha`` outside [0, 1], negative weights,
            a crop larger than the pre-processed in-plane size, crop sizes not divisible by 16, bad widths,
            non-positive batch / epoch / iteration counts, or warm-up longer than training.
    """
    from bundle.losses import PretrainingObjective

    problems: list[str] = []
    try:  # the objective owns the rules of its own options (variant, alpha, weights)
        PretrainingObjective.from_variant(variant, alpha=alpha, **weights)
    except (ValueError, TypeError) as error:
        problems.append(str(error).rstrip("."))
    if not isinstance(num_clusters, int) or num_clusters < 2:
        problems.append(f"num_clusters (K) must be an integer >= 2, got {num_clusters!r}")
    if not isinstance(num_heads, int) or num_heads < 1:
        problems.append(f"num_heads must be an integer >= 1, got {num_heads!r}")
    crop = _pair(crop_size, "crop_size", problems)
    size = _pair(spatial_size, "spatial_size", problems)
    if crop and size and (crop[0] > size[0] or crop[1] > size[1]):
        problems.append(f"crop_size {list(crop)} is larger than the pre-processed slices spatial_size {list(size)}")
    if crop and (crop[0] % 16 or crop[1] % 16):
        problems.append(f"crop_size {list(crop)} must be divisible by 16 (four 2x poolings of the U-Net)")
    if len(features) != 6 or not all(int(f) > 0 for f in features):
        problems.append(f"features must be six positive widths, got {list(features)!r}")
    for name, v in (
        ("scans_per_batch", scans_per_batch),
        ("num_partitions", num_partitions),
        ("epochs", epochs),
        ("iterations", iterations),
    ):
        if not isinstance(v, int) or v < 1:
            problems.append(f"{name} must be a positive integer, got {v!r}")
    if isinstance(warmup_epochs, int) and isinstance(epochs, int) and not 0 <= warmup_epochs <= epochs:
        problems.append(f"warmup_epochs must lie in [0, epochs={epochs}], got {warmup_epochs!r}")
    if problems:
        raise _fail("invalid pre-training options:\n  - " + "\n  - ".join(problems))


def check_finetune_options(
    *,
    num_classes: int,
    num_labeled: int,
    crop_size: Sequence[int],
    spatial_size: Sequence[int],
    lr: float,
    epochs: int,
    iterations: int,
) -> None:
    """Raise one ``ValueError`` naming every invalid fine-tuning option."""
    problems: list[str] = []
    if not isinstance(num_classes, int) or num_classes < 2:
        problems.append(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(num_labeled, int) or num_labeled < 1:
        problems.append(f"num_labeled must be a positive integer, got {num_labeled!r}")
    crop = _pair(crop_size, "crop_size", problems)
    size = _pair(spatial_size, "spatial_size", problems)
    if crop and size and (crop[0] > size[0] or crop[1] > size[1]):
        problems.append(f"crop_size {list(crop)} is larger than the pre-processed slices spatial_size {list(size)}")
    if not float(lr) > 0:
        problems.append(f"lr must be > 0, got {lr!r}")
    for name, v in (("epochs", epochs), ("iterations", iterations)):
        if not isinstance(v, int) or v < 1:
            problems.append(f"{name} must be a positive integer, got {v!r}")
    if problems:
        raise _fail("invalid fine-tuning options:\n  - " + "\n  - ".join(problems))


def check_compile(compile: Any, device: Any) -> None:
    """Refuse ``compile`` of pre-training off CUDA, before any work: it is meant for GPUs (the method's overhead
    there, see docs/benchmarks.md), and on the CPU torch's default compiler (inductor, torch 2.13) fails on the
    U-Net's backward (a stride assertion in ``replication_pad2d_backward``; ``python -m scripts.benchmark step
    --compile true --device cpu`` reproduces it).

    Raises:
        ValueError: when ``compile`` is true and ``device`` is not a CUDA device.
    """
    if flag(compile, "compile") and torch.device(device).type != "cuda":
        raise _fail(f"compile is for CUDA devices, got device {device}: on the CPU, torch's inductor fails on the "
                    "U-Net's backward (replication_pad2d_backward); run without --compile (the eager step is the "
                    "default and computes the same).")


#: arguments of ``monai.bundle run`` itself (and of the workflow it creates), not config ids.
_RUN_ARGUMENTS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
                  "workflow_name", "workflow_type", "properties_path"}
#: ids MONAI adds with ``--tracking`` (the top-level configs of its experiment-management settings).
_TRACKING_IDS = {key for settings in DEFAULT_EXP_MGMT_SETTINGS.values() for key in settings.get("configs", {})}


def _literal(text: str) -> Any:
    """A command-line value as fire reads it (a Python literal where it parses, the string otherwise)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _run_overrides(argv: Sequence[str]) -> dict[str, Any] | None:
    """``{name: value}`` of the ``--name value`` / ``--name=value`` pairs of a ``monai.bundle run`` command line, or
    None when ``argv`` is not one (``python -m monai.bundle run`` has argv[0] = ``.../monai/bundle/__main__.py``).
    Names are spelled as fire reads them (``-`` as ``_``, ``::`` as ``#``)."""
    if len(argv) < 2 or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py") or argv[1] != "run":
        return None
    pairs: dict[str, Any] = {}
    tokens = list(argv[2:])
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":  # fire's separator: what follows is not for the command
            break
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value, i = tokens[i + 1], i + 1
            pairs[name.replace("-", "_").replace("::", "#")] = _literal(value) if (eq or value) else True
        i += 1
    return pairs


def _has_id(config: Any, parts: Sequence[str]) -> bool:
    for part in parts:
        if isinstance(config, dict) and part in config:
            config = config[part]
        elif isinstance(config, list) and part.lstrip("-").isdigit() and -len(config) <= int(part) < len(config):
            config = config[int(part)]
        else:
            return False
    return True


def _parameters(target: Any) -> list[inspect.Parameter] | None:
    """The parameters of the callable a config component names (``"bundle.networks.FeatureUNet"``, MONAI's
    ``"Compose"``); None when there is no target or it cannot be located or inspected."""
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return None
    module = ComponentLocator().get_component_module_name(target) if "." not in target else None
    candidates = [target] if module is None else [f"{m}.{target}" for m in ([module] if isinstance(module, str)
                                                                           else module)]
    for path in candidates:
        component = pydoc.locate(path)
        if component is not None:
            try:
                return list(inspect.signature(component).parameters.values())
            except (TypeError, ValueError):
                return None
    return None




def unknown_override_ids(argv: Sequence[str]) -> list[str]:
    """The ids a ``python -m monai.bundle run`` command line overrides that none of its config files defines, each
    with the closest defined id when there is one (``"num_cluster (did you mean num_clusters?)"``).

    MONAI adds such an id silently and nothing reads it, so a typo trains with the default. Ids written with a
    leading ``+`` (MONAI's merge), ids under ``_meta_``, new arguments of a component that its ``_target_`` takes
    (``network_def#dropout``; through ``**kwargs`` unless close to a key the component has), the run's own
    arguments and, with ``--tracking``, the tracking settings are accepted. An empty list for any other command
    line (MONAI Label, the Python API).
    """
    pairs = _run_overrides(argv)
    if pairs is None:
        return []
    if "args_file" in pairs:
        pairs = {**ConfigParser.load_config_file(str(pairs["args_file"])), **pairs}
    if "config_file" not in pairs:
        return []
    config = ConfigParser.load_config_files(pairs["config_file"])
    allowed = _RUN_ARGUMENTS | (_TRACKING_IDS if "tracking" in pairs else set())
    unknown = []
    for name in pairs:
        parts = name.lstrip("+").split("#")
        if name in allowed or parts[0] == "_meta_" or name.startswith("+") or _has_id(config, parts):
            continue
        if pairs[name] is True and name.startswith("no") and _has_id(config, name[2:].split("#")):
            continue  # fire reads a bare --noamp as amp=False
        parent = config
        for part in parts[:-1]:
            parent = parent.get(part, {}) if isinstance(parent, dict) else {}
        parameters = _parameters(parent.get("_target_") if isinstance(parent, dict) else None) or []
        named = [p.name for p in parameters if p.kind != inspect.Parameter.VAR_KEYWORD]
        close = difflib.get_close_matches(parts[-1], [*(parent if isinstance(parent, dict) else []), *named], n=1)
        takes_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)
        if parts[-1] in named or (takes_kwargs and not close):
            continue  # a new argument of a component, which its _target_ receives (through **kwargs: unless it is
            # close to one of the component's keys or named parameters, a typo)
        unknown.append(name + (f" (did you mean {'#'.join([*parts[:-1], close[0]])}?)" if close else ""))
    return unknown


def check_command_line_ids(argv: Sequence[str] | None = None) -> None:
    """Reject a ``monai.bundle run`` command line that overrides an id no config defines (see
    :func:`unknown_override_ids`); the first item of every config's ``initialize``.

    Args:
        argv: the command line; ``sys.argv`` by default.

    Raises:
        ValueError: naming every unknown id and the closest known one.
    """
    unknown = unknown_override_ids(sys.argv if argv is None else argv)
    if unknown:
        raise _fail(f"unknown config id(s) on the command line: {', '.join(unknown)}. No config file defines "
                    f"them, so MONAI would add them silently and nothing would read them.")
