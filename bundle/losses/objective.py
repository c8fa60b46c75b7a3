"""The unified pre-training objective (eq. 11), the paper's ablation variants, and the one-pass MI + CC inputs.

- :class:`PretrainingObjective` and :data:`VARIANTS`: eq. (11) as a weighted sum of the losses of this package.
- :func:`joint_and_entropy`: L_MI's joint and L_CC's entropy maps from one pass over the full-resolution cluster
  probabilities.  When both terms are active the objective scores them through it
  (:meth:`ClusterMutualInformationLoss.forward_joint`, :meth:`BoundaryCrossCorrelationLoss.forward_maps`) instead of
  calling the two losses separately.  The values and gradients are the same (tested against the separate losses);
  the difference is memory traffic: the probabilities ``M,B,K,H,W`` of each view are the largest tensors of a
  pre-training step, and here each view's gradient is written once, over the forward's saved logarithm (the entropy
  part, then the MI part added by one matrix product), instead of two full-size gradients that autograd then sums.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from bundle.losses._kernels import JointEntropyFunction
from bundle.losses.boundary import BoundaryCrossCorrelationLoss
from bundle.losses.contrastive import DenseContrastiveLoss, MetaLabelContrastiveLoss
from bundle.losses.mutual_information import ClusterMutualInformationLoss, IMSATLoss
from bundle.losses.utils import DEFAULT_LOG_EPS, batch_major, check_aligned, check_pair, fp32_region, pool_joints

__all__ = ["PretrainingObjective", "VARIANTS", "joint_and_entropy"]

#: inputs each term needs (``mask``/``dense_mask`` are optional and not listed).
TERM_INPUTS: dict[str, tuple[str, ...]] = {
    "mi": ("p_hat", "p_tilde"),
    "cc": ("p_hat", "p_tilde", "image"),
    "con": ("z_a", "z_b", "meta_labels"),
    "imsat": ("p_hat", "p_tilde"),
    "dense_con": ("dense_a", "dense_b"),
}

_OFF = {"mi_weight": 0.0, "cc_weight": 0.0, "con_weight": 0.0, "imsat_weight": 0.0, "dense_con_weight": 0.0}

#: the paper's pre-training variants (Tables 2-4): constructor arguments on top of the defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "ours": {**_OFF, "mi_weight": 1.0, "cc_weight": 1.0, "con_weight": 1.0},
    "contrast_enc_ours": {**_OFF, "mi_weight": 1.0, "cc_weight": 1.0, "con_weight": 1.0},
    "iic": {**_OFF, "mi_weight": 1.0, "alpha": 0.0},
    "mi_only": {**_OFF, "mi_weight": 1.0},
    "cc_only": {**_OFF, "cc_weight": 1.0},
    "mi_cc": {**_OFF, "mi_weight": 1.0, "cc_weight": 1.0},
    "contrast_enc": {**_OFF, "con_weight": 1.0},
    "imsat": {**_OFF, "imsat_weight": 1.0},
    "dense_contrast": {**_OFF, "dense_con_weight": 1.0},
}


class PretrainingObjective(nn.Module):
    """Unified pre-training objective of

        Peng et al., "Boundary-aware Information Maximization for Self-supervised Medical Image Segmentation",
        Medical Image Analysis 2024, eq. (11):  L = L_con + lambda L_CC + L_MI,

    generalised to a weighted sum of five terms so that the paper's ablations and baselines are one class:

    - ``"mi"``: :class:`ClusterMutualInformationLoss` (alpha) on ``(p_hat, p_tilde)``, averaged over heads;
    - ``"cc"``: :class:`BoundaryCrossCorrelationLoss` on the heads of ``p_hat`` **and** ``p_tilde`` (both
      aligned with the transformed image ``image``) in one call, so the edge map is computed once;
    - ``"con"``: :class:`MetaLabelContrastiveLoss` on ``(z_a, z_b, meta_labels)``;
    - ``"imsat"``: :class:`IMSATLoss` (imsat_lambda), the mean of its values on ``p_hat`` and ``p_tilde``;
    - ``"dense_con"``: :class:`DenseContrastiveLoss` on ``(dense_a, dense_b, dense_mask)``.

    A term whose weight is 0 is not computed and its inputs may be None.  Every loss runs in fp32.

    Args:
        alpha: alpha of L_MI, in [0, 1]. Defaults to 0.5.
        mi_weight, cc_weight, con_weight, imsat_weight, dense_con_weight: term weights, >= 0 (cc_weight is the
            paper's lambda). Defaults 1, 1, 1, 0, 0 (the paper's method).
        temperature: tau of both contrastive losses, > 0. Defaults to 0.07.
        cc_window: window of L_CC (odd, >= 3). Defaults to 5.
        cc_edge_power: exponent of the edge magnitude in L_CC, > 0. Defaults to 1.
        imsat_lambda: weight of the marginal entropy in IMSAT, >= 0. Defaults to 1.
        mi_symmetric: symmetrise the MI joint as IIC and the authors' code do. Defaults to False (eq. 3-8).
        global_statistics: under ``torchrun``, L_MI's joint, L_CC's mean and L_con's negatives span every process's
            batch (see the three losses); ``False`` keeps them per process, for comparison. Defaults to True.

    Raises:
        ValueError: alpha outside [0, 1], a negative or non-finite weight, all weights 0, or a bad sub-loss option.

    Example::

        >>> objective = PretrainingObjective.from_variant("mi_cc", cc_weight=0.1)
        >>> p = torch.rand(3, 2, 10, 32, 32).softmax(2)
        >>> out = objective(p_hat=p, p_tilde=p, image=torch.rand(2, 1, 32, 32))
        >>> sorted(out)
        ['cc', 'loss', 'mi']
    """

    def __init__(
        self,
        alpha: float = 0.5,
        mi_weight: float = 1.0,
        cc_weight: float = 1.0,
        con_weight: float = 1.0,
        imsat_weight: float = 0.0,
        dense_con_weight: float = 0.0,
        temperature: float = 0.07,
        cc_window: int = 5,
        cc_edge_power: float = 1.0,
        imsat_lambda: float = 1.0,
        mi_symmetric: bool = False,
        global_statistics: bool = True,
    ) -> None:
        super().__init__()
        self.mi = ClusterMutualInformationLoss(  # checks alpha first
            alpha=alpha, symmetric=mi_symmetric, global_statistics=global_statistics
        )
        weights = {
            "mi": mi_weight,
            "cc": cc_weight,
            "con": con_weight,
            "imsat": imsat_weight,
            "dense_con": dense_con_weight,
        }
        for term, weight in weights.items():
            if not (math.isfinite(float(weight)) and float(weight) >= 0.0):
                raise ValueError(f"{term}_weight must be a finite number >= 0, got {weight}.")
        self.weights = {term: float(weight) for term, weight in weights.items()}
        if not any(self.weights.values()):
            raise ValueError("all loss weights are 0: at least one of mi/cc/con/imsat/dense_con must be > 0.")
        self.cc = BoundaryCrossCorrelationLoss(
            window=cc_window, edge_power=cc_edge_power, global_statistics=global_statistics
        )
        self.con = MetaLabelContrastiveLoss(temperature=temperature, global_statistics=global_statistics)
        self.imsat = IMSATLoss(weight=imsat_lambda)
        self.dense_con = DenseContrastiveLoss(temperature=temperature)

    @property
    def active_terms(self) -> tuple[str, ...]:
        """Names of the terms with a weight > 0, in the order they are computed."""
        return tuple(term for term, weight in self.weights.items() if weight > 0.0)

    @property
    def required_inputs(self) -> frozenset[str]:
        """The inputs of :meth:`forward` the active terms need (``p_hat``, ``p_tilde``, ``image``, ``z_a``, ``z_b``,
        ``meta_labels``, ``dense_a``, ``dense_b``): what a trainer must compute, without spelling the terms."""
        return frozenset(name for term in self.active_terms for name in TERM_INPUTS[term])

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> PretrainingObjective:
        """Build one of the paper's variants: ``"ours"``, ``"iic"``, ``"mi_only"``, ``"cc_only"``, ``"mi_cc"``,
        ``"contrast_enc"``, ``"contrast_enc_ours"`` (= ours), ``"imsat"``, ``"dense_contrast"``.

        The variant decides **which terms are on**; ``overrides`` replace any other constructor argument. A weight
        override (``cc_weight=0.1``) scales a term the variant turns on and is ignored for a term it leaves off,
        so a config can pass every weight and switch variants with one option. Options a variant fixes (``"iic"``
        is ``"mi_only"`` with ``alpha=0``) may be passed at their default (configs pass every option) or at the
        variant's value; any other value is an error, since the variant would silently replace it (use
        ``"mi_only"`` to vary alpha).

        Raises:
            ValueError: unknown variant name, unknown override, or a value the variant would override.
        """
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(sorted(VARIANTS))}.")
        valid_args = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(overrides) - valid_args)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for PretrainingObjective; valid: {sorted(valid_args)}.")
        spec = VARIANTS[name]
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        kwargs = dict(overrides)
        for key, value in spec.items():
            if key.endswith("_weight"):
                kwargs[key] = 0.0 if value == 0.0 else kwargs.get(key, value)
            else:
                given = kwargs.get(key, value)
                if given not in (value, defaults.get(key)):
                    raise ValueError(f"variant {name!r} fixes {key} = {value}; got {key} = {given}, which it would "
                                     f"replace (use variant 'mi_only' to vary alpha).")
                kwargs[key] = value
        return cls(**kwargs)

    def forward(
        self,
        *,
        p_hat: torch.Tensor | None = None,
        p_tilde: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        z_a: torch.Tensor | None = None,
        z_b: torch.Tensor | None = None,
        meta_labels: torch.Tensor | None = None,
        dense_a: torch.Tensor | None = None,
        dense_b: torch.Tensor | None = None,
        dense_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            p_hat: g(s(T(x))) cluster probabilities ``B,K,H,W`` or ``M,B,K,H,W``.
            p_tilde: g(T(s(x))), same shape as p_hat.
            image: ``B,C,H,W`` transformed image T(x) both probability maps are aligned with.
            mask: optional ``B,1,H,W`` validity mask of T (mi, cc, imsat).
            z_a, z_b: ``B,D`` global embeddings of the two views; meta_labels: ``B`` integer labels.
            dense_a, dense_b: ``B,D,G,G`` aligned dense embeddings; dense_mask: optional ``B,1,G,G``.

        Returns:
            ``{"loss": weighted total, <term>: unweighted value for each active term}`` (0-d fp32 tensors).

        Raises:
            ValueError: an input needed by an active term is None (names it), or any sub-loss shape error.
        """
        given = {
            "p_hat": p_hat,
            "p_tilde": p_tilde,
            "image": image,
            "z_a": z_a,
            "z_b": z_b,
            "meta_labels": meta_labels,
            "dense_a": dense_a,
            "dense_b": dense_b,
        }
        for term in self.active_terms:
            missing = [name for name in TERM_INPUTS[term] if given[name] is None]
            if missing:
                raise ValueError(f"term {term!r} (weight {self.weights[term]}) needs {', '.join(missing)}, got None.")
        out: dict[str, torch.Tensor] = {}
        if self.weights["mi"] > 0 and self.weights["cc"] > 0:
            out["mi"], out["cc"] = self._mi_and_cc(p_hat, p_tilde, image, mask)
        elif self.weights["mi"] > 0:
            out["mi"] = self.mi(p_hat, p_tilde, mask)
        elif self.weights["cc"] > 0:
            out["cc"] = self.cc((p_hat, p_tilde), image, mask)
        if self.weights["con"] > 0:
            out["con"] = self.con(z_a, z_b, meta_labels)
        if self.weights["imsat"] > 0:
            out["imsat"] = (self.imsat(p_hat, mask) + self.imsat(p_tilde, mask)) / 2
        if self.weights["dense_con"] > 0:
            out["dense_con"] = self.dense_con(dense_a, dense_b, dense_mask)
        total = sum(self.weights[term] * value for term, value in out.items())
        return {"loss": total, **out}

    def _mi_and_cc(
        self, p_hat: torch.Tensor, p_tilde: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``self.mi(p_hat, p_tilde, mask)`` and ``self.cc((p_hat, p_tilde), image, mask)``, same values and
        gradients, with one pass over the probabilities (:func:`joint_and_entropy`)."""
        check_aligned(p_hat, image, "p_hat")
        joint, count, ent_hat, ent_tilde, single = joint_and_entropy(p_hat, p_tilde, mask)
        mi = self.mi.forward_joint(joint[0] if single else joint, count)
        cc = self.cc.forward_maps(self.cc.edge_map(image), torch.cat([ent_hat, ent_tilde], dim=0), mask)
        return mi, cc


def joint_and_entropy(
    p_hat: torch.Tensor, p_tilde: torch.Tensor, mask: torch.Tensor | None = None, eps: float = DEFAULT_LOG_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The MI joint (eq. 3) and both views' per-pixel cluster entropies in one pass, in fp32.

    Args:
        p_hat, p_tilde: cluster probabilities ``B,K,H,W`` or ``M,B,K,H,W`` (same shape).
        mask: optional validity mask ``B,1,H,W`` (weights the joint; the entropy maps are returned for every pixel,
            the CC loss applies the mask itself).
        eps: floor inside the logarithms (as :func:`bundle.losses.entropy_map`).

    Returns:
        ``(joint M,K,K normalised by the valid-pixel count, count (0-d), entropy of p_hat M,B,1,H,W, entropy of
        p_tilde M,B,1,H,W, single)`` where ``single`` says the input had no head axis.

    Raises:
        ValueError: as :class:`bundle.losses.ClusterMutualInformationLoss`.
    """
    heads_hat, heads_tilde, mask, single = check_pair(p_hat, p_tilde, mask)
    n_heads, batch, _, height, width = heads_hat.shape
    with fp32_region(heads_hat.device):
        a, b, weights, count = batch_major(heads_hat, heads_tilde, mask)
        joints, ent_a, ent_b = JointEntropyFunction.apply(a, b, weights, float(eps))
        joint = pool_joints(joints, n_heads, count)

        def maps(ent: torch.Tensor) -> torch.Tensor:
            return ent.view(batch, n_heads, 1, height, width).transpose(0, 1)

        return joint, count, maps(ent_a), maps(ent_b), single
