"""Throughput of the pre-training loader: cached volumes -> 2D slices -> partition batches (slices/second).

The loader is the one training runs: ``train#dataloader`` of ``configs/pretrain.json``, built by MONAI's
``ConfigParser`` with the benchmark's settings as overrides (:func:`pretrain_loader`).

Usage (python-fire)::

    python -m scripts.benchmark_loader run                                   # generated volumes, paper scale
    python -m scripts.benchmark_loader run --data /data/prostate --num_partitions 8   # real data
    python -m scripts.benchmark_loader run --num_workers 2 --scans_per_batch 6 --num_partitions 3 --num_batches 100

Paper scale: volumes pre-processed to 384 x 384 in-plane, random 224 x 224 crops, batch 18 (6 scans x 3
partitions, ACDC) or 48 (6 x 8, prostate), 2 DataLoader workers. With ``two_view=True`` each item also carries a
second view (the same crop with an independent brightness/contrast jitter), a stand-in for the per-item
two-view augmentation, so the figure includes producing and collating two images per slice.

:func:`loader_throughput` returns slices/second (one slice = one item, whatever the number of views); the cache
fill (decode + pre-process, done once per run) is timed separately by :func:`benchmark`.
"""

from __future__ import annotations

import functools
import json
import resource
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from torch.utils.data import DataLoader

from bundle.data.datalist import DatalistOptions, build_datalist, load_datalist, write_datalist
from scripts.fire_cli import fire_main

#: the pre-training config whose loader is measured
PRETRAIN_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain.json"


def pretrain_loader(overrides: Mapping[str, Any]) -> DataLoader:
    """``train#dataloader`` of ``configs/pretrain.json`` with config ids overridden (e.g. ``"prepared_datalist"``,
    ``"train#entries"`` or ``"train#volumes"`` for the data, ``"num_workers"``, ``"scans_per_batch"``)."""
    parser = ConfigParser()
    parser.read_config(str(PRETRAIN_CONFIG))
    parser.update(dict(overrides))
    return parser.get_parsed_content("train#dataloader")


class JitterSecondView:
    """Per-item stand-in for the two-view augmentation: adds ``"image_view2"``, the same crop with an independent
    brightness/contrast jitter (factors in [0.5, 1.5], like the paper's ColorJitter on ACDC), drawn from a generator
    seeded by the item's identity (no global RNG)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, int(item["scan_index"]), int(item["slice_index"])])
        brightness, contrast = (float(v) for v in rng.uniform(0.5, 1.5, size=2))
        img = item["image"]
        mean = float(img.mean())
        # ((x - mean) * contrast + mean) * brightness, as one multiply-add
        item["image_view2"] = torch.add(img * (contrast * brightness), mean * brightness * (1.0 - contrast))
        return item


def generated_volumes(
    num_volumes: int = 20, num_slices: int = 10, spatial_size: Sequence[int] = (384, 384), seed: int = 0
) -> list[dict[str, Any]]:
    """Pre-processed-like volumes (``1,H,W,D`` float32 MetaTensors in [0, 1]) without touching the disk."""
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for i in range(num_volumes):
        img = torch.rand((1, int(spatial_size[0]), int(spatial_size[1]), int(num_slices)), generator=g)
        out.append({"image": MetaTensor(img), "scan_id": f"generated{i:03d}"})
    return out


def loader_throughput(loader: Any, num_batches: int = 50, warmup: int = 5) -> tuple[float, int]:
    """Iterate ``loader`` and return (slices/second over ``num_batches`` batches after ``warmup``, batch size)."""
    rate, batch_size, _ = _measure(loader, num_batches, warmup)
    return rate, batch_size


def _measure(loader: Any, num_batches: int, warmup: int) -> tuple[float, int, float]:
    """(slices/second after warm-up, batch size, slices per CPU-second of the worker processes, all batches)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    it = iter(loader)
    batch_size = 0
    total = 0
    for _ in range(warmup):
        batch_size = len(next(it)["meta_label"])
        total += batch_size
    n = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        batch_size = len(next(it)["meta_label"])
        n += batch_size
    elapsed = time.perf_counter() - start
    for _ in it:  # exhaust, so the workers exit and their CPU time is accounted
        pass
    del it
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    per_cpu = (total + n) / cpu if cpu > 0 else float("nan")
    return n / elapsed, batch_size, per_cpu


def _datalist_of(data: str, folder: str) -> str:
    """``data`` itself when it is a datalist of this bundle, else a datalist of it written into ``folder`` (the
    benchmark does not check the files' content)."""
    path = Path(data)
    if path.suffix == ".json" and "labeled" in json.loads(path.read_text()):
        return str(path)
    return str(write_datalist(build_datalist(path, DatalistOptions(check=False)), Path(folder) / "datalist.json"))


def benchmark(
    data: str | None = None,
    num_partitions: int = 3,
    scans_per_batch: int = 6,
    crop_size: Sequence[int] = (224, 224),
    spatial_size: Sequence[int] = (384, 384),
    num_workers: int = 2,
    num_batches: int = 50,
    warmup: int = 5,
    two_view: bool = True,
    num_volumes: int = 20,
    num_slices: int = 10,
    channel: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the pre-training loader of ``configs/pretrain.json`` and measure it.

    The loader reads generated volumes, or what pre-training reads of ``data`` (its training split and unlabeled
    scans, pre-processed as the config does).

    Args:
        data: dataset folder or datalist JSON; ``None`` uses ``num_volumes`` generated volumes of ``num_slices``.
        num_partitions: slice partitions P (paper: ACDC 3, prostate 8).
        scans_per_batch: scans per batch (batch = scans_per_batch * P).
        crop_size: random crop per slice.
        spatial_size: in-plane size of the cached volumes.
        num_workers: DataLoader workers.
        num_batches: measured batches.
        warmup: batches skipped before timing (worker start-up).
        two_view: add a second view per item (see :class:`JitterSecondView`).
        num_volumes: generated volumes (``data=None``).
        num_slices: slices per generated volume.
        channel: channel of 4D images in ``data``.
        seed: sampler/crop seed.

    Returns:
        ``{"slices_per_second", "batches_per_second", "batch_size", "num_workers", "cache_seconds", ...}``;
        ``slices_per_worker_cpu_second`` (CPU time of the worker processes, start-up included) does not depend on
        how busy the machine is, unlike the wall-clock rate.
    """
    overrides: dict[str, Any] = {
        "num_partitions": num_partitions,
        "scans_per_batch": scans_per_batch,
        "crop_size": list(crop_size),
        "spatial_size": list(spatial_size),
        "num_workers": num_workers,
        "iterations": num_batches + warmup,
        "seed": seed,
        "train#dataset#transform": JitterSecondView(seed) if two_view else None,
        # one epoch is measured: its workers must exit at the end so that their CPU time is accounted
        "train#dataloader#persistent_workers": False,
    }
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if data is None:
            overrides["train#volumes"] = generated_volumes(num_volumes, num_slices, spatial_size, seed)
        else:
            datalist = _datalist_of(data, tmp)
            recorded = load_datalist(datalist).get("channel")
            overrides.update({"prepared_datalist": datalist, "channel": recorded if channel is None else channel})
        loader = pretrain_loader(overrides)  # the slice dataset reads every volume once, here
        cache_seconds = time.perf_counter() - start
    rate, batch_size, per_worker_cpu = _measure(loader, num_batches=num_batches, warmup=warmup)
    return {
        "slices_per_second": round(rate, 1),
        "slices_per_worker_cpu_second": round(per_worker_cpu, 1) if num_workers > 0 else None,
        "batches_per_second": round(rate / batch_size, 2),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "two_view": two_view,
        "crop_size": list(crop_size),
        "spatial_size": list(spatial_size),
        "num_volumes": len(loader.dataset.scan_ids),
        "cache_seconds": round(cache_seconds, 2),
        "data": data or f"generated ({num_volumes} x 1x{spatial_size[0]}x{spatial_size[1]}x{num_slices})",
    }


def slices_per_second(**kwargs: Any) -> float:
    """Slices/second of the pre-training loader (keyword arguments as for :func:`benchmark`)."""
    return float(benchmark(**kwargs)["slices_per_second"])


@functools.wraps(benchmark)  # the command line shows benchmark's flags and their descriptions
def run(*args: Any, **kwargs: Any) -> str:
    return json.dumps(benchmark(*args, **kwargs), indent=2)


if __name__ == "__main__":
    fire_main({"run": run})
