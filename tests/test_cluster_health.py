"""Cluster-Dice health figure of pre-training: confusion counts, majority vote, and the handler end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from torch import nn

from bundle.handlers import ClusterDiceHealth
from bundle.handlers.cluster_health import cluster_confusion, majority_vote_mapping, one_to_one_mapping
from bundle.networks import DenseClusterHead, FeatureUNet


def test_confusion_counts_by_hand():
    clusters = np.array([[0, 0, 1], [2, 2, 2]])
    labels = np.array([[0, 1, 1], [1, 1, 0]])
    conf = cluster_confusion(clusters, labels, num_clusters=3, num_classes=2)
    # cluster 0: one pixel of class 0, one of class 1; cluster 1: one of class 1; cluster 2: one 0, two 1
    np.testing.assert_array_equal(conf, [[1, 1], [0, 1], [1, 2]])
    np.testing.assert_array_equal(majority_vote_mapping(conf), [0, 1, 1])


def test_one_to_one_match_finds_a_small_structure_that_is_no_cluster_majority():
    # pixels of (background, small class) per cluster: the small class (10 px) is the majority of no cluster
    conf = np.array([[80, 0], [10, 6], [10, 4]])
    np.testing.assert_array_equal(majority_vote_mapping(conf), [0, 0, 0])  # its majority-vote Dice is 0
    # Dice of the small class with each cluster: 0, 2*6/(16+10) = 0.4615, 2*4/(14+10) = 0.3333 -> cluster 1
    np.testing.assert_array_equal(one_to_one_mapping(conf), [0, 1, 0])


def test_one_to_one_match_maximises_the_total_not_each_class_greedily():
    # classes a, b (columns 1, 2) both prefer cluster 0; the best total gives it to a and cluster 1 to b
    conf = np.array([[0, 10, 9], [0, 0, 5], [20, 0, 0]])
    # Dice: a-0 = 20/29 = 0.690, b-0 = 18/33 = 0.545, b-1 = 10/19 = 0.526, a-1 = 0:
    # {a:0, b:1} sums to 1.216 > {a:1, b:0} = 0.545, while a greedy b-first pick would take cluster 0 for b
    np.testing.assert_array_equal(one_to_one_mapping(conf), [1, 2, 0])
    with pytest.raises(ValueError, match="2 foreground classes"):
        one_to_one_mapping(np.ones((1, 3)))


def test_confusion_rejects_out_of_range_and_shape():
    with pytest.raises(ValueError, match="cluster ids"):
        cluster_confusion(np.array([3]), np.array([0]), num_clusters=3, num_classes=2)
    with pytest.raises(ValueError, match="labels"):
        cluster_confusion(np.array([0]), np.array([2]), num_clusters=3, num_classes=2)
    with pytest.raises(ValueError, match="same shape"):
        cluster_confusion(np.zeros((2, 2), int), np.zeros((2, 3), int), num_clusters=3, num_classes=2)


class _IntensityClusters(nn.Module):
    """A stand-in U-Net + head: the cluster of a pixel is its (integer) intensity, one-hot with large logits."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.num_clusters = k
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward_features(self, x: torch.Tensor, with_logits: bool = False) -> dict[str, torch.Tensor]:
        return {"decoder": x}

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # as DenseClusterHead: M,B,K,H,W
        onehot = nn.functional.one_hot(feats[:, 0].long(), self.num_clusters).permute(0, 3, 1, 2).float()
        return torch.softmax(onehot * 20, dim=1)[None]


def _volume(rng: np.random.Generator, shape=(8, 8, 3)) -> dict[str, torch.Tensor]:
    label = torch.as_tensor(rng.integers(0, 3, size=shape))[None]
    return {"image": label.float(), "label": label}


def test_perfect_over_clustering_scores_one_and_swapped_classes_still_match(tmp_path):
    """Clusters 0..2 equal the classes, so the majority vote recovers them: Dice 1 for every class."""
    rng = np.random.default_rng(0)
    vols = [_volume(rng) for _ in range(3)]
    net = _IntensityClusters(k=5)
    health = ClusterDiceHealth(net, net, vols, num_classes=3, class_names=["a", "b"], log_dir=tmp_path)
    record = health.score(torch.device("cpu"))
    assert record["per_class"] == {"a": 1.0, "b": 1.0} and record["mean"] == 1.0 and record["scans"] == 3
    assert record["one_to_one"] == {"per_class": {"a": 1.0, "b": 1.0}, "mean": 1.0}

    # relabel the images with a permutation of the classes: the clusters differ from the labels, the match fixes it
    perm = torch.tensor([2, 0, 1])
    swapped = [{"image": perm[v["label"]].float(), "label": v["label"]} for v in vols]
    assert ClusterDiceHealth(net, net, swapped, num_classes=3).score(torch.device("cpu"))["mean"] == 1.0


def test_one_cluster_everywhere_scores_zero_for_foreground():
    rng = np.random.default_rng(1)
    vols = [{"image": torch.zeros(1, 8, 8, 2), "label": _volume(rng, (8, 8, 2))["label"]} for _ in range(2)]
    net = _IntensityClusters(k=4)
    record = ClusterDiceHealth(net, net, vols, num_classes=3).score(torch.device("cpu"))
    # the single cluster maps to the majority class; the other foreground class is never predicted
    assert record["clusters_used"] == 1
    assert min(record["per_class"].values()) == 0.0


def test_handler_logs_each_interval_writes_jsonl_and_restores_train_mode(tmp_path):
    net = FeatureUNet(features=(4, 4, 4, 4, 4, 4)).train()
    head = DenseClusterHead(4, num_clusters=6, num_heads=2).train()
    vols = [{"image": torch.rand(1, 16, 16, 3), "label": torch.randint(0, 4, (1, 16, 16, 3))} for _ in range(2)]
    health = ClusterDiceHealth(net, head, vols, num_classes=4, interval=2, log_dir=tmp_path)
    engine = Engine(lambda e, b: None)
    health.attach(engine)
    engine.run([0], max_epochs=3)
    assert [r["epoch"] for r in health.history] == [2, 3]  # every 2nd epoch and the last
    assert net.training and head.training
    lines = [json.loads(x) for x in (tmp_path / "cluster_health.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [2, 3] and set(lines[0]["per_class"]) == {"class1", "class2", "class3"}
    assert 0.0 <= engine.state.metrics["cluster_dice_mean"] <= 1.0
    assert 0.0 <= engine.state.metrics["cluster_dice_one_to_one_mean"] <= 1.0 and "one_to_one" in lines[0]


def test_no_labeled_volumes_switches_off_and_bad_options_raise():
    net = _IntensityClusters(k=3)
    engine = Engine(lambda e, b: None)
    ClusterDiceHealth(net, net, [], num_classes=3).attach(engine)
    engine.run([0], max_epochs=1)
    assert "cluster_dice_mean" not in engine.state.metrics
    with pytest.raises(ValueError, match="interval"):
        ClusterDiceHealth(net, net, [], num_classes=3, interval=0)
    with pytest.raises(ValueError, match="class_names"):
        ClusterDiceHealth(net, net, [], num_classes=3, class_names=["only_one"])
