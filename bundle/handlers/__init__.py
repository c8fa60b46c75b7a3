"""Ignite/MONAI handlers that plug into this bundle's engines (configs name them ``bundle.handlers.<Name>``).

- :mod:`~bundle.handlers.checkpoint`: resumable training state, the exported pre-trained weights, and MONAI's
  ``CheckpointSaver`` with atomic writes.
- :mod:`~bundle.handlers.cluster_health`: the label-free health figure of pre-training (cluster maps vs labels).
- :mod:`~bundle.handlers.freeze`: warm-up epochs of fine-tuning with the encoder frozen.
- :mod:`~bundle.handlers.mean_teacher`: the Mean Teacher's EMA teacher.
- :mod:`~bundle.handlers.monitor`: progress bar, log lines, TensorBoard and collapse warnings of pre-training.
"""

from __future__ import annotations

from .checkpoint import AtomicCheckpointSaver, NetworkExport, TrainingStateCheckpoint, atomic_save
from .cluster_health import ClusterDiceHealth
from .freeze import FreezeEncoder
from .mean_teacher import EMATeacher, MeanTeacherHandler
from .monitor import PretrainMonitor, ProgressBar

__all__ = [
    "AtomicCheckpointSaver",
    "ClusterDiceHealth",
    "EMATeacher",
    "FreezeEncoder",
    "MeanTeacherHandler",
    "NetworkExport",
    "PretrainMonitor",
    "ProgressBar",
    "TrainingStateCheckpoint",
    "atomic_save",
]
