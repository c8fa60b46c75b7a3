"""Pre-training losses of boundary-aware information maximization (Peng et al. 2024).

- L_MI (eq. 3-8): :class:`ClusterMutualInformationLoss`; baseline :class:`IMSATLoss`; logging helpers
  :func:`joint_distribution`, :func:`cluster_statistics`.
- L_CC (eq. 9): :class:`BoundaryCrossCorrelationLoss` with :func:`sobel_edge_map` and :func:`entropy_map`.
- L_con (eq. 10): :class:`MetaLabelContrastiveLoss`; baseline :class:`DenseContrastiveLoss`.
- eq. (11) and the ablation variants: :class:`PretrainingObjective`.
"""

from __future__ import annotations

from bundle.losses.boundary import BoundaryCrossCorrelationLoss, entropy_map, sobel_edge_map
from bundle.losses.contrastive import DenseContrastiveLoss, MetaLabelContrastiveLoss
from bundle.losses.mutual_information import (
    ClusterMutualInformationLoss,
    IMSATLoss,
    cluster_statistics,
    joint_distribution,
)
from bundle.losses.objective import VARIANTS, PretrainingObjective

__all__ = [
    "BoundaryCrossCorrelationLoss",
    "ClusterMutualInformationLoss",
    "DenseContrastiveLoss",
    "IMSATLoss",
    "MetaLabelContrastiveLoss",
    "PretrainingObjective",
    "VARIANTS",
    "cluster_statistics",
    "entropy_map",
    "joint_distribution",
    "sobel_edge_map",
]
