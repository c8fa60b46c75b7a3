"""Resumable training state and the exported pre-trained segmentation weights.

``TrainingStateCheckpoint`` saves everything a run needs to continue exactly where it stopped (network,
heads, optimiser, lr scheduler, AMP scaler, epoch and iteration) at the end of every ``interval`` epochs,
atomically (write to a temporary file, then ``os.replace``), and restores it when the same command is run
again.  Random draws in this bundle are pure functions of ``(seed, epoch, iteration)``, so no RNG state has to
be saved: a run killed at any point and restarted ends with the same weights as an uninterrupted one (work
since the last saved epoch is redone).

``NetworkExport`` writes the segmentation network's plain ``state_dict`` (keys of a MONAI ``BasicUNet``, heads
excluded) at the end of every epoch and of the run, for fine-tuning to load.

``AtomicCheckpointSaver`` is MONAI's ``CheckpointSaver`` whose fixed-name files (the best model ``models/model.pt``,
the final model) are replaced atomically: MONAI's own deletes the previous best before writing the new one, so a
kill in between left no model at all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from bundle.files import atomic_path

__all__ = ["AtomicCheckpointSaver", "TrainingStateCheckpoint", "NetworkExport", "atomic_save"]

logger = logging.getLogger(__name__)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through :func:`bundle.files.atomic_path`, so a crash never leaves half a
    file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


class _ReplaceFixedName(BaseSaveHandler):
    """Ignite save handler for one fixed file name: every save replaces the file atomically, so ``remove`` (which
    ignite calls *before* saving the new best) has nothing to do."""

    def __init__(self, dirname: str | os.PathLike, filename: str) -> None:
        self.path = Path(dirname) / filename

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        atomic_save(checkpoint, self.path)

    def remove(self, filename: str) -> None:
        pass


class AtomicCheckpointSaver(CheckpointSaver):
    """:class:`monai.handlers.CheckpointSaver` (same arguments, same files) whose ``key_metric_filename`` and
    ``final_filename`` files are written to a temporary file and moved over the old one: at any moment the folder
    holds the previous best model or the new one, never neither."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("_key_metric_checkpoint", "_final_checkpoint"):
            checkpoint = getattr(self, name, None)
            fixed = getattr(getattr(checkpoint, "save_handler", None), "filename", None)
            if checkpoint is not None and fixed is not None:
                checkpoint.save_handler = _ReplaceFixedName(self.save_dir, fixed)


class TrainingStateCheckpoint:
    """Save the full training state every ``interval`` epochs and resume from it on the next run.

    Args:
        save_path: file of the training state (e.g. ``runs/pretrain/checkpoints/trainer_state.pt``).
        save_dict: objects with ``state_dict``/``load_state_dict`` by name (network, heads, optimizer,
            lr_scheduler, ...). The engine's epoch/iteration and its AMP scaler are added automatically.
        interval: save every ``interval`` epochs (and always at the end of the run).
        resume: restore from ``save_path`` when it exists. Set False to start over (the file is then
            overwritten at the first save).

    Under a process group (torchrun) only rank 0 writes the file and every rank restores from it, so the replicas
    resume with the same weights, optimiser state and iteration.

    Raises:
        ValueError: when the saved state does not match the current objects (another configuration): the
            message names the object and the mismatch, and nothing is trained.
    """

    def __init__(
        self, save_path: str | os.PathLike, save_dict: dict[str, Any], interval: int = 1, resume: bool = True
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.interval = int(interval)
        self.resume = bool(resume)
        self.resumed_from: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def _objects(self, engine: Engine) -> dict[str, Any]:
        objs = dict(self.save_dict)
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            objs["scaler"] = scaler
        return objs

    def save(self, engine: Engine) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # the replicas are identical: rank 0's copy is the state
        state = {name: obj.state_dict() for name, obj in self._objects(engine).items()}
        state["engine"] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        atomic_save(state, self.save_path)

    def load(self, engine: Engine) -> None:
        if not self.resume or not self.save_path.is_file():
            return
        try:
            state = torch.load(self.save_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file must stop the run, not silently restart from scratch
            raise ValueError(f"{self.save_path}: cannot read the training state ({e}); delete it to start over.") from e
        objs = self._objects(engine)
        missing = sorted(set(objs) - set(state))
        if missing:
            raise ValueError(f"{self.save_path}: saved state lacks {missing}; delete it or set resume=false.")
        for name, obj in objs.items():
            try:
                obj.load_state_dict(state[name])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ValueError(f"{self.save_path}: saved '{name}' does not match this configuration: {e}") from e
        epoch, iteration = int(state["engine"]["epoch"]), int(state["engine"]["iteration"])
        engine.state.epoch, engine.state.iteration = epoch, iteration
        self.resumed_from = epoch
        logger.info(f"resumed from {self.save_path} at epoch {epoch} (iteration {iteration}).")


class NetworkExport:
    """Write ``network.state_dict()`` (plain keys) to ``save_path`` every ``interval`` epochs and at completion.

    Args:
        network: the segmentation network.
        save_path: output file, e.g. ``models/pretrained/unet_ssl.pt`` (kept out of ``models/*.pt`` so MONAI
            Label does not offer it as a fine-tuned model).
        interval: epochs between writes.
    """

    def __init__(self, network: torch.nn.Module, save_path: str | os.PathLike, interval: int = 1) -> None:
        self.network = network
        self.save_path = Path(save_path)
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def save(self, engine: Engine | None = None) -> None:
        net = getattr(self.network, "_orig_mod", self.network)
        atomic_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, self.save_path)
