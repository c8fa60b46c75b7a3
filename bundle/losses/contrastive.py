"""Contrastive losses: the global meta-label (supervised) contrastive loss L_con and the dense local baseline.

- :class:`MetaLabelContrastiveLoss`: eq. (10) of Peng et al. 2024 on ``B,D`` encoder embeddings of two views.
- :class:`DenseContrastiveLoss`: the local contrastive loss of Chaitanya et al. 2020 on ``B,D,G,G`` decoder
  embeddings of two aligned views ("Contrast (Dec)" baseline).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from bundle.losses.utils import (
    at_least_fp32,
    check_positive,
    check_reduction,
    fp32_region,
    gather_over_processes,
    is_distributed,
)

__all__ = ["MetaLabelContrastiveLoss", "DenseContrastiveLoss"]

#: stands for log 0 in the similarity logits (finite, so fully excluded rows stay NaN-free).
_EXCLUDED = -1e9


class MetaLabelContrastiveLoss(_Loss):
    """Supervised contrastive loss over meta-labels, L_con of

        Peng et al., "Boundary-aware Information Maximization for Self-supervised Medical Image Segmentation",
        Medical Image Analysis 2024, eq. (10) (SupCon "L_out", Khosla et al. 2020, with slice-position labels).

    The 2N items are both views of the N images, ``z = [normalise(z_a); normalise(z_b)]`` with labels
    ``[labels; labels]``.  For each anchor i,

        l_i = -1/|S_i| sum_{j in S_i} log( exp(z_i.z_j / tau) / sum_{a != i} exp(z_i.z_a / tau) ),

    S_i = the other items with the label of i (always including the other view of the same image).  With all
    labels distinct this is NT-Xent (SimCLR).  Computed as one 2N x 2N similarity matrix in fp32 with a
    log-sum-exp.  An anchor without positives (impossible with two views; guarded anyway) scores 0 and is left
    out of the mean.

    Args:
        temperature: tau > 0. Defaults to 0.07 (the paper).
        reduction: ``"none"``: per-anchor losses ``(2N,)`` (view a first, then view b); ``"mean"``: mean over
            anchors with a positive; ``"sum"``: their sum.  Defaults to ``"mean"``.

        global_statistics: under ``torchrun`` (several processes), every process's items of both views join each
            anchor's positives and negatives (all-gathered with gradients, meta-labels with them) and each process
            scores its own anchors, so that DDP's gradient averaging gives the loss of one process with the whole
            batch. ``False`` contrasts within each process's batch only (for comparison). Without a process group
            both are the same. Defaults to True.

    Raises:
        ValueError: temperature <= 0 or an unsupported reduction.

    Example::

        >>> loss = MetaLabelContrastiveLoss(temperature=0.07)
        >>> loss(torch.randn(8, 16), torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 0.07,
        reduction: LossReduction | str = LossReduction.MEAN,
        global_statistics: bool = True,
    ) -> None:
        super().__init__(reduction=check_reduction(reduction))
        self.temperature = check_positive(temperature, "temperature")
        self.global_statistics = bool(global_statistics)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            z_a: ``B,D`` embeddings of the first view (L2-normalised here).
            z_b: ``B,D`` embeddings of the second view, same images in the same order.
            labels: ``B`` integer meta-labels (shared by both views of an image).

        Raises:
            ValueError: when z_a/z_b are not equal ``B,D`` shapes or labels is not an integer ``B`` vector.
        """
        if z_a.ndim != 2 or z_a.shape != z_b.shape or z_a.shape[0] < 1 or z_a.shape[1] < 1:
            raise ValueError(f"z_a and z_b must be equal non-empty B,D tensors, got {tuple(z_a.shape)} and "
                             f"{tuple(z_b.shape)}.")
        if not isinstance(labels, torch.Tensor) or labels.shape != (z_a.shape[0],):
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a 1-D tensor of length B={z_a.shape[0]}, got {shape}.")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integer meta-labels, got dtype {labels.dtype}.")
        local = None
        if self.global_statistics and is_distributed():  # every process's items are negatives (and positives)
            batch, rank = z_a.shape[0], dist.get_rank()
            z_a, z_b = gather_over_processes(z_a), gather_over_processes(z_b)
            labels = gather_over_processes(labels.to(z_a.device))
            n = z_a.shape[0]
            local = torch.cat([torch.arange(rank * batch, (rank + 1) * batch),
                               torch.arange(n + rank * batch, n + (rank + 1) * batch)]).to(z_a.device)
        with fp32_region(z_a.device):
            z = F.normalize(at_least_fp32(torch.cat([z_a, z_b], dim=0)), dim=1)
            both = torch.cat([labels, labels], dim=0).to(z.device)
            items = z.shape[0]
            self_mask = torch.eye(items, dtype=torch.bool, device=z.device)
            logits = (z @ z.T / self.temperature).masked_fill(self_mask, _EXCLUDED)
            log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            positives = (both[:, None] == both[None, :]) & ~self_mask
            n_pos = positives.sum(dim=1)
            per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(dim=1) / n_pos.clamp_min(1)
            has_pos = n_pos > 0
            if local is not None:  # this process's anchors only: DDP's averaging makes the mean global
                per_anchor, has_pos = per_anchor[local], has_pos[local]
        return _reduce_anchors(per_anchor, self.reduction, has_pos)


class DenseContrastiveLoss(_Loss):
    """Local (dense) contrastive loss of

        Chaitanya et al., "Contrastive learning of global and local features for medical image segmentation with
        limited annotations", NeurIPS 2020, eq. (3) -- the "Contrast (Dec)" baseline of Peng et al. 2024.

    Inputs are ``B,D,G,G`` embeddings of two views already aligned position by position (the engine applies T).
    Per image, every valid grid position of either view is an anchor; its positive is the same position in the
    other view; its negatives are all other valid positions of the same image in both views:

        l_(v,p) = -log( exp(e_v,p . e_v',p / tau) / sum_{(u,q) != (v,p), q valid} exp(e_v,p . e_u,q / tau) ).

    Computed for all images at once with one batched ``2G^2 x 2G^2`` similarity matrix per image (fp32).
    Embeddings are L2-normalised here as well.

    Args:
        temperature: tau > 0. Defaults to 0.07.
        reduction: ``"none"``: per-anchor losses ``B,2,G,G`` (view a, view b; 0 at invalid positions);
            ``"mean"``: mean over valid anchors (0 if none); ``"sum"``.  Defaults to ``"mean"``.

    Raises:
        ValueError: temperature <= 0 or an unsupported reduction.

    Example::

        >>> e = F.normalize(torch.randn(2, 8, 4, 4), dim=1)
        >>> DenseContrastiveLoss()(e, e).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.07, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=check_reduction(reduction))
        self.temperature = check_positive(temperature, "temperature")

    def forward(self, e_a: torch.Tensor, e_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            e_a: ``B,D,G,G`` embeddings of the first view.
            e_b: ``B,D,G,G`` embeddings of the second view, aligned with ``e_a``.
            mask: optional validity mask ``B,1,G,G`` (1 = position valid in both views).

        Raises:
            ValueError: when e_a/e_b are not equal ``B,D,G,G`` shapes or the mask shape is wrong.
        """
        if e_a.ndim != 4 or e_a.shape != e_b.shape or e_a.numel() == 0:
            raise ValueError(f"e_a and e_b must be equal non-empty B,D,G,G tensors, got {tuple(e_a.shape)} and "
                             f"{tuple(e_b.shape)}.")
        batch, _, g_h, g_w = e_a.shape
        if mask is not None and tuple(mask.shape) != (batch, 1, g_h, g_w):
            raise ValueError(f"mask must have shape B,1,G,G = {(batch, 1, g_h, g_w)}, got {tuple(mask.shape)}.")
        positions = g_h * g_w
        with fp32_region(e_a.device):
            z = at_least_fp32(torch.cat([e_a.flatten(2), e_b.flatten(2)], dim=2))  # B,D,2P
            z = F.normalize(z, dim=1).transpose(1, 2)  # B,2P,D
            if mask is None:
                valid = torch.ones(batch, 2 * positions, dtype=torch.bool, device=z.device)
            else:
                valid = (mask.detach().reshape(batch, positions) > 0).to(z.device).repeat(1, 2)
            items = 2 * positions
            eye = torch.eye(items, dtype=torch.bool, device=z.device)
            allowed = valid[:, None, :] & ~eye  # B,2P,2P: candidate a for anchor i
            logits = (torch.bmm(z, z.transpose(1, 2)) / self.temperature).masked_fill(~allowed, _EXCLUDED)
            partner = torch.arange(items, device=z.device).roll(positions)  # (v,p) -> (v',p)
            positive = logits.gather(2, partner.expand(batch, items).unsqueeze(2)).squeeze(2)
            per_anchor = (torch.logsumexp(logits, dim=2) - positive) * valid
        return _reduce_anchors(per_anchor.view(batch, 2, g_h, g_w), self.reduction, valid)


def _reduce_anchors(per_anchor: torch.Tensor, reduction: str, counted: torch.Tensor) -> torch.Tensor:
    """``"none"``: the per-anchor losses; ``"sum"``: their sum; ``"mean"``: their sum over the number of anchors
    that count (``counted``, boolean), at least 1."""
    if reduction == LossReduction.NONE.value:
        return per_anchor
    total = per_anchor.sum()
    if reduction == LossReduction.SUM.value:
        return total
    return total / counted.sum().clamp_min(1)
