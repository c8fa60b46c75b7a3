"""Pre-training losses of boundary-aware information maximization (Peng et al. 2024).

One concept per file; the loss files are peers that share only :mod:`bundle.losses.utils` and
:mod:`bundle.losses._kernels`:

- ``mutual_information.py``, L_MI (eq. 3-8): :class:`ClusterMutualInformationLoss`; baseline :class:`IMSATLoss`;
  logging helpers :func:`joint_distribution`, :func:`cluster_statistics`.
- ``boundary.py``, L_CC (eq. 9): :class:`BoundaryCrossCorrelationLoss` with :func:`sobel_edge_map` and
  :func:`entropy_map`.
- ``contrastive.py``, L_con (eq. 10): :class:`MetaLabelContrastiveLoss`; baseline :class:`DenseContrastiveLoss`.
- ``objective.py``, eq. (11) and the ablation variants: :class:`PretrainingObjective`, :data:`VARIANTS` (and
  ``joint_and_entropy``, the one-pass MI + CC inputs it uses when both terms are on).
- ``consistency.py``, Mean Teacher's consistency (fine-tuning, Appendix E): :func:`softmax_mse_consistency`,
  :class:`ConsistencyWeight` with :func:`sigmoid_rampup`.
- ``utils.py``: shared input checks, fp32 region, head reductions, batch-major layout, pixel entropy.
- ``_kernels.py`` (private): the hand-written autograd functions and the in-place box sum.
"""

from __future__ import annotations

from bundle.losses.boundary import BoundaryCrossCorrelationLoss, entropy_map, sobel_edge_map
from bundle.losses.consistency import ConsistencyWeight, sigmoid_rampup, softmax_mse_consistency
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
    "ConsistencyWeight",
    "DenseContrastiveLoss",
    "IMSATLoss",
    "MetaLabelContrastiveLoss",
    "PretrainingObjective",
    "VARIANTS",
    "cluster_statistics",
    "entropy_map",
    "joint_distribution",
    "sigmoid_rampup",
    "sobel_edge_map",
    "softmax_mse_consistency",
]
