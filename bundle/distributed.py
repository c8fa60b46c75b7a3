"""Training on several GPUs or nodes under ``torchrun`` (DDP): the helpers of ``configs/multi_gpu_pretrain.json`` and
``configs/multi_gpu_train.json``.

Each overlay is merged after its base config::

    torchrun --nproc_per_node=N -m monai.bundle run training \\
        --config_file "['configs/pretrain.json','configs/multi_gpu_pretrain.json']"
    torchrun --nproc_per_node=N -m monai.bundle run training \\
        --config_file "['configs/train.json','configs/multi_gpu_train.json']"

Pre-training: every iteration draws one global batch of N x ``scans_per_batch`` scans (and ``T`` for all its slices)
as a pure function of (seed, epoch, iteration); each process trains on its share, the losses pool their statistics
over the processes (L_MI's joint, L_con's negatives; ``global_statistics``) and DDP averages the gradients, so N
processes take the step one process with the whole batch would take (up to BatchNorm, whose statistics stay per
process unless ``sync_batchnorm``).

Fine-tuning: every process trains on its own draws of labeled slices and augmentations (the effective batch is
N x ``batch_size``; the lr is not scaled) and DDP averages the gradients. After each epoch rank 0's BatchNorm
statistics are copied to every rank, every process validates its share of the validation scans and MONAI's metric
handlers gather the scores, so the best-model decision is the same on every rank.

Only rank 0's handlers log, draw and write files (the other ranks' TensorBoard handlers are built, then dropped, and
may leave empty event files; module loggers print on every rank); every rank resumes from rank 0's training state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence, Sized
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data import DistributedSampler
from monai.handlers import CheckpointSaver, StatsHandler, TensorBoardStatsHandler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bundle.handlers import ClusterDiceHealth, NetworkExport, PretrainMonitor, ProgressBar
from bundle.losses.utils import broadcast_from_rank_zero

__all__ = [
    "BroadcastBuffers",
    "cleanup",
    "on_rank_zero",
    "rank",
    "rank_seed",
    "setup",
    "validation_sampler",
    "world_size",
    "wrap",
]

#: handlers that log, draw or write files: kept on rank 0 only (TrainingStateCheckpoint stays on every rank: all
#: of them resume from the file, rank 0 alone writes it)
_RANK_ZERO_HANDLERS = (
    StatsHandler, TensorBoardStatsHandler, CheckpointSaver,
    NetworkExport, ProgressBar, PretrainMonitor, ClusterDiceHealth,
)
#: spreads the ranks' seeds far apart (a large odd number).
_RANK_STRIDE = 1_000_003


def setup() -> torch.device:
    """Join the default process group of a ``torchrun`` launch (once; nccl on GPUs, gloo on CPUs) and return this
    process's device: GPU ``LOCAL_RANK`` (the node-local index; the global rank exceeds a node's GPU count on
    several nodes), or the CPU.

    Raises:
        RuntimeError: outside a ``torchrun`` launch (no ``LOCAL_RANK``/``WORLD_SIZE`` in the environment).
    """
    missing = [name for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK") if name not in os.environ]
    if missing:
        raise RuntimeError(f"the multi-GPU overlays run under torchrun ({', '.join(missing)} not set): "
                           "torchrun --nproc_per_node=N -m monai.bundle run training --config_file "
                           "\"['configs/train.json','configs/multi_gpu_train.json']\" (or pretrain.json with "
                           "multi_gpu_pretrain.json)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank() -> int:
    """The global rank of this process: the process group's, else torchrun's ``RANK`` (known before the group is
    joined), else 0."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """The number of processes: the process group's, else torchrun's ``WORLD_SIZE``, else 1."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank_seed(seed: int) -> int:
    """``seed`` made distinct per rank, so that each process draws its own slices and augmentations (DDP then
    broadcasts rank 0's initial weights, so the replicas still start equal)."""
    return int(seed) + _RANK_STRIDE * rank()


def wrap(network: nn.Module, device: torch.device, sync_batchnorm: bool = False,
         find_unused_parameters: bool = False) -> DistributedDataParallel:
    """``network`` on ``device`` inside DDP, for the trainer; the plain module stays what the optimiser, the evaluator,
    the checkpoints and the pre-trained weights use (their keys have no ``module.`` prefix).

    Args:
        network: the module to train.
        device: this process's device (:func:`setup`).
        sync_batchnorm: BatchNorm statistics over the whole global batch (``nn.SyncBatchNorm``, GPUs only); the
            layers are replaced inside ``network`` and keep their parameters, so the optimiser is unaffected.
        find_unused_parameters: let some parameters get no gradient in an iteration (e.g. a frozen encoder).
    """
    if sync_batchnorm:
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)  # the same module, its BatchNorm layers replaced
    return DistributedDataParallel(
        network.to(device),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def validation_sampler(dataset: Sized) -> DistributedSampler | None:
    """Each rank's share of the validation scans (not padded, in order), or None (every rank scores every scan)
    when there are fewer scans than processes; MONAI's metric handlers gather the scores either way, and duplicated
    scans leave the gathered mean unchanged."""
    if len(dataset) < dist.get_world_size():
        return None
    return DistributedSampler(dataset, even_divisible=False, shuffle=False)


def on_rank_zero(handlers: Sequence[Any] | None) -> list[Any]:
    """``handlers`` without the logging and checkpoint handlers on ranks other than 0 (selected by type, whatever
    their position)."""
    handlers = list(handlers or [])
    return handlers if rank() == 0 else [h for h in handlers if not isinstance(h, _RANK_ZERO_HANDLERS)]


class BroadcastBuffers:
    """At the end of every epoch (before validation, when attached first) copy rank 0's buffers, e.g. BatchNorm's
    running statistics, to every rank. DDP keeps the weights equal, but each rank updates its running statistics with
    its own batches; without this, each rank would validate its shard with other statistics than the ones rank 0
    saves.

    Args:
        network: the plain module (its buffers are the wrapped module's).
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        broadcast_from_rank_zero(list(self.network.buffers()))


def cleanup() -> None:
    """Leave the process group (after every rank has finished)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
