"""2D slices drawn on the fly from cached, pre-processed 3D volumes, with slice-position meta-labels.

- :func:`slice_partition` gives each slice its meta-label from geometry alone (no label map needed).
- :class:`PretrainSliceDataset` returns a random in-plane crop of one slice, indexed by ``(scan, slice[, draw])``.
- :class:`PartitionBatchSampler` builds pre-training batches like the paper's ``ContrastBatchSampler``: several
  scans, and from each one slice of every partition, so every meta-label of a batch has
  ``scans_per_batch >= 2`` members (positives for the supervised contrastive loss, paper eq. 10). Batch size is
  therefore ``scans_per_batch * num_partitions`` (paper: 6 scans x 3 partitions = 18 on ACDC; prostate 6 x 8 = 48).

``configs/pretrain.json`` (``train#dataloader``) chains them: pre-processed volumes -> slices -> sampler ->
``DataLoader``.

Reproducibility: the sampler draws from ``np.random.default_rng([seed, epoch])`` and gives every item its own
``draw`` number; the dataset crops with ``np.random.default_rng([seed, draw, scan, slice])``. So batches and
crops depend only on (seed, epoch), not on worker count or scheduling, and no global RNG is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import Dataset, Sampler

from bundle.data.sources import nifti_stem

__all__ = ["PartitionBatchSampler", "PretrainSliceDataset", "partition_slices", "slice_partition"]

_DRAW_BOUND = 2**62


def slice_partition(slice_index: int, num_slices: int, num_partitions: int) -> int:
    """Meta-label of a slice: the index of the equal-width partition of the slice axis it falls in.

    ``p = floor(slice_index * num_partitions / num_slices)``, i.e. partition p holds the slices with
    ``p * n / P <= i < (p + 1) * n / P`` (partition sizes differ by at most one; partition 0 holds slice 0, the
    first slice along the canonical slice axis, see :mod:`bundle.data.preprocessing`). When
    ``num_slices < num_partitions`` every slice still gets a distinct partition in ``0..P-1`` and some partitions
    are empty. (The authors' ACDC rule, ``c = n // 3; 0 if i <= c - 1, 1 if i <= 2c, else 2``, and prostate rule
    ``i // (n // 8 + 1)`` are slightly unequal variants of the same idea.)

    Args:
        slice_index: i in ``0..num_slices-1``.
        num_slices: n >= 1.
        num_partitions: P >= 1.

    Raises:
        ValueError: for an index outside ``0..n-1`` or a non-positive n or P.

    Example:
        >>> [slice_partition(i, 10, 3) for i in range(10)]
        [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    if num_slices < 1 or num_partitions < 1:
        raise ValueError(f"num_slices and num_partitions must be >= 1, got {num_slices} and {num_partitions}.")
    if not 0 <= slice_index < num_slices:
        raise ValueError(f"slice_index {slice_index} outside 0..{num_slices - 1}.")
    return (int(slice_index) * int(num_partitions)) // int(num_slices)


def partition_slices(num_slices: int, num_partitions: int) -> list[list[int]]:
    """Slice indices of each partition: ``out[p] = [i, ...]`` (possibly empty when ``num_slices < P``)."""
    out: list[list[int]] = [[] for _ in range(num_partitions)]
    for i in range(num_slices):
        out[slice_partition(i, num_slices, num_partitions)].append(i)
    return out


def _scan_id(item: Mapping[str, Any], index: int) -> str:
    if "scan_id" in item:
        return str(item["scan_id"])
    img = item.get("image")
    if isinstance(img, MetaTensor) and "filename_or_obj" in img.meta:
        return nifti_stem(str(img.meta["filename_or_obj"]))
    return str(index)


class PretrainSliceDataset(Dataset):
    """Random in-plane crops of 2D slices of pre-processed volumes, with their slice-position meta-label.

    Indexed by ``(scan_idx, slice_idx)`` or ``(scan_idx, slice_idx, draw)``; ``draw`` (from
    :class:`PartitionBatchSampler`) seeds the crop, otherwise the dataset's epoch (:meth:`set_epoch`) does.

    Args:
        volumes: pre-processed items with ``"image"`` of shape ``1,H,W,D`` (e.g. a MONAI ``Dataset`` with the
            pre-processing listed in ``configs/train.json``, as ``configs/pretrain.json`` builds it); each is read
            once, at construction, and its image kept as a plain float32 tensor (shared with forked DataLoader
            workers).
        num_partitions: number of slice-position partitions P (paper: ACDC 3, prostate 8).
        crop_size: in-plane crop ``(h, w)``; must fit inside ``H, W``.
        seed: base seed of the crops.
        transform: optional callable applied to each returned dict (e.g. building two augmented views).
        image_key: key of the image in ``volumes``' items.

    Returns (per item):
        ``{"image": 1,h,w float32 tensor, "meta_label": int, "scan_id": str, "slice_index": int,
        "scan_index": int}`` (after ``transform``, if given).

    Raises:
        ValueError: for an image that is not ``1,H,W,D``, a crop larger than the slice, or P < 1.
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, Any]],
        num_partitions: int,
        crop_size: Sequence[int] = (224, 224),
        seed: int = 0,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        image_key: str = "image",
    ) -> None:
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}.")
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size must be two positive sizes (h, w), got {crop_size}.")
        if len(volumes) == 0:
            raise ValueError("volumes is empty: no scan to draw slices from.")
        self.num_partitions = int(num_partitions)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.seed = int(seed)
        self.transform = transform
        self.epoch = 0
        self.images: list[torch.Tensor] = []  # D,H,W per scan
        self.scan_ids: list[str] = []
        for i in range(len(volumes)):
            item = volumes[i]
            img = item[image_key]
            sid = _scan_id(item, i)
            if img.ndim != 4 or img.shape[0] != 1:
                raise ValueError(f"{sid}: expected image of shape 1,H,W,D, got {tuple(img.shape)}.")
            h, w = int(img.shape[1]), int(img.shape[2])
            if h < self.crop_size[0] or w < self.crop_size[1]:
                raise ValueError(f"{sid}: crop {self.crop_size} larger than the slice ({h}, {w}).")
            t = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            # stored slice-major (D,H,W, contiguous) so a slice is one block of memory: cropping a D-last volume
            # gathers every voxel from a different cache line and is ~20x slower
            self.images.append(t[0].to(torch.float32).permute(2, 0, 1).contiguous())
            self.scan_ids.append(sid)
        self.num_slices = [int(t.shape[0]) for t in self.images]
        self.partitions = [partition_slices(n, self.num_partitions) for n in self.num_slices]

    def __len__(self) -> int:
        return int(sum(self.num_slices))

    def set_epoch(self, epoch: int) -> None:
        """Epoch used to seed crops of items indexed without a ``draw`` number."""
        self.epoch = int(epoch)

    def __getitem__(self, index: Sequence[int]) -> Any:
        if isinstance(index, int | np.integer):
            raise TypeError("index PretrainSliceDataset with (scan_idx, slice_idx[, draw]) tuples.")
        scan, k = int(index[0]), int(index[1])
        draw = int(index[2]) if len(index) > 2 else self.epoch
        img = self.images[scan]
        n = self.num_slices[scan]
        if not 0 <= k < n:
            raise IndexError(f"{self.scan_ids[scan]}: slice {k} outside 0..{n - 1}.")
        rng = np.random.default_rng([self.seed, draw, scan, k])
        h, w = self.crop_size
        y = int(rng.integers(0, img.shape[1] - h + 1))
        x = int(rng.integers(0, img.shape[2] - w + 1))
        out = {
            "image": img[k : k + 1, y : y + h, x : x + w].clone(),
            "meta_label": slice_partition(k, n, self.num_partitions),
            "scan_id": self.scan_ids[scan],
            "slice_index": k,
            "scan_index": scan,
        }
        return self.transform(out) if self.transform is not None else out


class PartitionBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Pre-training batches of ``scans_per_batch`` scans x one slice from each of their ``num_partitions``
    partitions, as in the paper (authors' ``ContrastBatchSampler``), so every meta-label of a batch has
    ``scans_per_batch`` members.

    Scans are drawn without replacement within a batch (with replacement when there are fewer scans than
    ``scans_per_batch``); a scan with an empty partition (fewer slices than partitions) has that slot filled from
    another scan that has the partition, so the batch keeps ``scans_per_batch`` members per meta-label.

    Args:
        dataset: the :class:`PretrainSliceDataset` indexed.
        scans_per_batch: scans per batch (>= 2: positives for every meta-label); ``batch_size =
            scans_per_batch * dataset.num_partitions``.
        iterations: batches per epoch (``len(sampler)``).
        seed: seed of the draws; epoch ``e`` uses ``np.random.default_rng([seed, e])``.
        num_replicas: processes sharing one global batch (DDP): each iteration draws ``num_replicas x
            scans_per_batch`` scans, exactly as one process with that many scans per batch would, and this process
            yields the items of its own ``scans_per_batch`` of them. Every process must use the same ``seed``.
        rank: this process's index among the ``num_replicas``.

    Raises:
        ValueError: for ``scans_per_batch < 2``, ``iterations < 1``, a ``rank`` outside ``[0, num_replicas)``, or a
            partition no scan has.

    Example:
        >>> sampler = PartitionBatchSampler(ds, scans_per_batch=6, iterations=300)  # doctest: +SKIP
        >>> DataLoader(ds, batch_sampler=sampler, num_workers=2)  # doctest: +SKIP
    """

    def __init__(
        self,
        dataset: PretrainSliceDataset,
        scans_per_batch: int = 6,
        iterations: int = 300,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if scans_per_batch < 2:
            raise ValueError(f"scans_per_batch must be >= 2 so every meta-label has positives, got {scans_per_batch}.")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}.")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.partitions = dataset.partitions
        self.num_partitions = dataset.num_partitions
        self.scans_per_batch = int(scans_per_batch)
        self.iterations = int(iterations)
        self.seed = int(seed)
        self.epoch = 0
        self._explicit_epoch = False
        self.having = [[s for s, parts in enumerate(self.partitions) if parts[p]] for p in range(self.num_partitions)]
        missing = [p for p, scans in enumerate(self.having) if not scans]
        if missing:
            raise ValueError(
                f"no scan has a slice in partition(s) {missing} of {self.num_partitions}"
                f" (slice counts: {sorted(set(dataset.num_slices))}); use fewer partitions."
            )

    @property
    def batch_size(self) -> int:
        """Slices per batch of this process: ``scans_per_batch * num_partitions``."""
        return self.scans_per_batch * self.num_partitions

    def __len__(self) -> int:
        return self.iterations

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch of the next iteration (otherwise each ``iter()`` advances it by one, from 0)."""
        self.epoch = int(epoch)
        self._explicit_epoch = True

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self.epoch
        if not self._explicit_epoch:
            self.epoch += 1
        self._explicit_epoch = False
        rng = np.random.default_rng([self.seed, epoch])
        n_scans = len(self.partitions)
        total = self.scans_per_batch * self.num_replicas  # the global batch's scans
        replace = n_scans < total
        mine = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for _ in range(self.iterations):
            scans = rng.choice(n_scans, size=total, replace=replace)
            draws = rng.integers(0, _DRAW_BOUND, size=(total, self.num_partitions))
            batch: list[tuple[int, int, int]] = []
            for j, s in enumerate(scans.tolist()):
                for p in range(self.num_partitions):
                    # every process makes every draw of the global batch, so its stream stays the same
                    scan = s if self.partitions[s][p] else int(rng.choice(self.having[p]))
                    candidates = self.partitions[scan][p]
                    k = candidates[int(rng.integers(len(candidates)))]
                    batch.append((scan, k, int(draws[j, p])))
            yield batch[mine.start:mine.stop]
