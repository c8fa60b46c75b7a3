"""A label-free run's health figure: how well the pre-training clusters already segment, epoch by epoch.

Mutual information alone says that the two views agree, not that the clusters follow anatomy. When labeled
validation scans exist, :class:`ClusterDiceHealth` scores the cluster maps of the first dense head against their
labels after every ``interval`` epochs:

1. every slice of every validation volume goes through the U-Net's feature pass and head 0 (eval mode), and each
   pixel takes its most probable cluster;
2. each of the K clusters is matched to the class it overlaps most over all validation scans (majority vote,
   IIC's many-to-one evaluation of over-clustering heads);
3. the matched map of each scan is scored by 3D Dice per foreground class (:func:`bundle.metrics.dice_per_class`).

A structure that covers a small part of the field of view (the prostate zones: about 1 % of a 384 x 384 slice) is
the majority of no cluster until the clusters are very fine, so its majority-vote Dice stays 0 while clusters that
follow it already exist. The second figure, ``one_to_one``, gives each foreground class its own cluster, the
assignment with the largest total Dice over the validation scans (Hungarian matching,
:func:`one_to_one_mapping`); it shows those clusters, and with over-clustering it under-counts a structure split
over several clusters. Report both.

The matches are fitted on the same scans they score, so the figures are upper bounds on what a read-out of the
clusters could do there: health figures for pre-training, never results. They go to the log, to
``engine.state.metrics`` (``cluster_dice_mean`` and one entry per class, ``cluster_dice_one_to_one_mean``) and, one
JSON line per scoring, to ``<log_dir>/cluster_health.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from scipy.optimize import linear_sum_assignment
from torch import nn

from bundle.metrics import dice_per_class

__all__ = ["ClusterDiceHealth", "cluster_confusion", "majority_vote_mapping", "one_to_one_mapping"]

logger = logging.getLogger("bundle.pretrain")


def cluster_confusion(clusters: np.ndarray, labels: np.ndarray, num_clusters: int, num_classes: int) -> np.ndarray:
    """``K x C`` pixel counts of (cluster, class) pairs.

    Raises:
        ValueError: on mismatched shapes or values outside ``[0, K)`` / ``[0, C)``.
    """
    clusters, labels = np.asarray(clusters), np.asarray(labels)
    if clusters.shape != labels.shape:
        raise ValueError(f"clusters {clusters.shape} and labels {labels.shape} must have the same shape.")
    if clusters.size and (clusters.min() < 0 or clusters.max() >= num_clusters):
        raise ValueError(f"cluster ids must lie in [0, {num_clusters}), got [{clusters.min()}, {clusters.max()}].")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}].")
    flat = clusters.astype(np.int64).ravel() * num_classes + labels.astype(np.int64).ravel()
    return np.bincount(flat, minlength=num_clusters * num_classes).reshape(num_clusters, num_classes)


def majority_vote_mapping(confusion: np.ndarray) -> np.ndarray:
    """Class of each cluster: the one it overlaps most (ties and empty clusters go to the lowest class index)."""
    return np.asarray(confusion).argmax(axis=1)


def one_to_one_mapping(confusion: np.ndarray) -> np.ndarray:
    """Class of each cluster when every foreground class takes one cluster of its own and the rest is background.

    Of all assignments of distinct clusters to the foreground classes, the one with the largest sum of the
    classes' Dice ``2 n_kc / (n_k + n_c)`` (pixel counts of the ``K x C`` confusion; Hungarian algorithm). Needs
    ``K >= C - 1`` clusters.

    Raises:
        ValueError: when there are fewer clusters than foreground classes.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    k, c = confusion.shape
    if k < c - 1:
        raise ValueError(f"{k} clusters cannot give each of the {c - 1} foreground classes its own.")
    sizes = confusion.sum(axis=1, keepdims=True) + confusion.sum(axis=0, keepdims=True)
    dice = 2.0 * confusion / np.maximum(sizes, 1.0)
    clusters, classes = linear_sum_assignment(dice[:, 1:], maximize=True)
    mapping = np.zeros(k, dtype=np.int64)
    mapping[clusters] = classes + 1
    return mapping


class ClusterDiceHealth:
    """Per-epoch 3D Dice of the majority-vote-matched cluster maps on labeled validation volumes.

    Args:
        network: a :class:`bundle.networks.FeatureUNet` (its ``forward_features`` gives the decoder features).
        dense_head: the :class:`bundle.networks.DenseClusterHead`; head 0 is scored.
        volumes: pre-processed validation volumes, each a dict with ``"image"`` ``1,H,W,D`` and ``"label"``
            ``1,H,W,D`` (e.g. a MONAI ``Dataset`` over the validation split with the bundle's volume transforms).
            An empty sequence, or volumes without labels, switches the figure off with one log line.
        num_classes: classes of the labels, background included.
        class_names: names of the foreground classes for the log (default ``class1``, ...).
        interval: score every ``interval`` epochs (and after the last epoch).
        max_scans: score at most this many volumes (the first ones); ``None`` for all.
        batch_size: slices per forward pass.
        log_dir: folder of ``cluster_health.jsonl`` (and the TensorBoard writer); ``None`` writes no file.

    Raises:
        ValueError: when ``num_classes < 2``, ``interval < 1`` or ``max_scans < 1``.
    """

    def __init__(
        self,
        network: nn.Module,
        dense_head: nn.Module,
        volumes: Sequence[dict[str, Any]],
        num_classes: int,
        class_names: Sequence[str] | None = None,
        interval: int = 1,
        max_scans: int | None = 8,
        batch_size: int = 16,
        log_dir: str | Path | None = None,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        if max_scans is not None and max_scans < 1:
            raise ValueError(f"max_scans must be >= 1 or None, got {max_scans}.")
        self.network = network
        self.dense_head = dense_head
        self.volumes = volumes
        self.num_classes = int(num_classes)
        names = list(class_names) if class_names else [f"class{c}" for c in range(1, num_classes)]
        if len(names) != num_classes - 1:
            raise ValueError(f"class_names must name the {num_classes - 1} foreground classes, got {names}.")
        self.class_names = names
        self.interval = int(interval)
        self.max_scans = max_scans
        self.batch_size = int(batch_size)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.history: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        if len(self.volumes) == 0:
            logger.info("cluster health: no labeled validation volumes, so no cluster Dice is scored.")
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch, last = engine.state.epoch, engine.state.epoch == engine.state.max_epochs
        if epoch % self.interval and not last:
            return
        device = next(self.network.parameters()).device
        record = self.score(device)
        if record is None:
            return
        record = {"epoch": epoch, "iteration": engine.state.iteration, **record}
        self.history.append(record)
        engine.state.metrics["cluster_dice_mean"] = record["mean"]
        engine.state.metrics["cluster_dice_one_to_one_mean"] = record["one_to_one"]["mean"]
        for name in self.class_names:
            engine.state.metrics[f"cluster_dice_{name}"] = record["per_class"][name]
        per_class = " ".join(f"{k}={v:.3f}" for k, v in record["per_class"].items())
        one_to_one = " ".join(f"{k}={v:.3f}" for k, v in record["one_to_one"]["per_class"].items())
        logger.info(
            f"epoch {epoch}: cluster Dice (head 0, majority vote on {record['scans']} validation scans) "
            f"{per_class} mean={record['mean']:.3f}; one cluster per class {one_to_one} "
            f"mean={record['one_to_one']['mean']:.3f} ({record['seconds']:.1f} s)"
        )
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / "cluster_health.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def cluster_maps(self, device: torch.device) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(clusters, label)`` integer maps ``H,W,D`` of each scored volume (networks left in their mode)."""
        modes = (self.network.training, self.dense_head.training)
        self.network.eval()
        self.dense_head.eval()
        maps = []
        try:
            for i, item in enumerate(self.volumes):
                if self.max_scans is not None and i >= self.max_scans:
                    break
                if "label" not in item:
                    continue
                image = torch.as_tensor(item["image"]).float()  # 1,H,W,D
                slices = image.permute(3, 0, 1, 2)  # D,1,H,W
                out = []
                for start in range(0, slices.shape[0], self.batch_size):
                    batch = slices[start : start + self.batch_size].to(device)
                    feats = self.network.forward_features(batch, with_logits=False)["decoder"]
                    out.append(self.dense_head(feats)[0].argmax(dim=1).cpu())  # b,H,W
                clusters = torch.cat(out).permute(1, 2, 0).numpy()  # H,W,D
                label = np.asarray(torch.as_tensor(item["label"])[0]).astype(np.int64)
                maps.append((clusters, label))
        finally:
            self.network.train(modes[0])
            self.dense_head.train(modes[1])
        return maps

    def score(self, device: torch.device) -> dict[str, Any] | None:
        """Cluster Dice on the validation volumes: ``{"per_class", "mean", "one_to_one", "scans", "seconds"}``
        (majority vote, and ``one_to_one: {"per_class", "mean"}``)."""
        start = time.perf_counter()
        maps = self.cluster_maps(device)
        if not maps:
            return None
        k = int(self.dense_head.num_clusters)
        confusion = sum(cluster_confusion(c, y, k, self.num_classes) for c, y in maps)
        figures = {}
        for match, mapping in (
            ("majority", majority_vote_mapping(confusion)),
            ("one_to_one", one_to_one_mapping(confusion)),
        ):
            dice = np.stack([dice_per_class(mapping[c], y, self.num_classes) for c, y in maps])  # scans x C-1
            per_class = {name: float(v) for name, v in zip(self.class_names, dice.mean(axis=0), strict=True)}
            figures[match] = {"per_class": per_class, "mean": float(dice.mean())}
        return {
            **figures["majority"],
            "one_to_one": figures["one_to_one"],
            "scans": len(maps),
            "clusters_used": int((confusion.sum(axis=1) > 0).sum()),
            "seconds": time.perf_counter() - start,
        }
