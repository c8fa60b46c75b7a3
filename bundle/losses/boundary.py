"""Boundary-aware alignment loss L_CC: local correlation between image edges and the cluster-entropy map.

- :func:`sobel_edge_map`: 3x3 Sobel gradient magnitude, ``B,C,H,W -> B,1,H,W`` (replicate padding, no wrap).
- :func:`entropy_map`: per-pixel entropy of cluster probabilities, ``(M,)B,K,H,W -> (M,)B,1,H,W``.
- :class:`BoundaryCrossCorrelationLoss`: eq. (9), minus the mean squared local normalised cross-correlation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from bundle.losses.mutual_information import (
    DEFAULT_LOG_EPS,
    _as_heads,
    _at_least_fp32,
    _check_mask,
    _check_reduction,
    _fp32_region,
    _reduce_heads,
    pixel_entropy,
)

__all__ = ["sobel_edge_map", "entropy_map", "BoundaryCrossCorrelationLoss"]

#: smallest per-slice range used to rescale a map to [0, 1]; flatter maps are not amplified further.
MIN_MAP_RANGE = 1e-6


def sobel_edge_map(image: torch.Tensor, power: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """Sobel gradient magnitude of an image, averaged over channels: ``B,C,H,W -> B,1,H,W`` (fp32).

    ``gx``/``gy`` are the 3x3 Sobel responses (``[1,2,1]`` smoothing times a central difference, computed
    separably from exact differences) on the image padded by **replicating** its border, so there is no
    wrap-around: a constant image gives exactly 0 everywhere and a vertical step gives no response in the
    first/last columns.  The magnitude ``sqrt(gx^2 + gy^2)`` of each channel is averaged over channels and
    raised to ``power``.

    Gradient-safe without biasing the value: where ``gx^2 + gy^2 <= eps`` the magnitude is exactly 0 with a
    zero gradient (``sqrt`` and ``power`` are only evaluated on the other pixels), so the result stays finite
    and differentiable although the losses use it as data (no gradient).

    Args:
        image: ``B,C,H,W`` floating-point image.
        power: exponent applied to the magnitude, > 0. Defaults to 1.
        eps: squared-gradient level at or below which a pixel counts as flat, >= 0. Defaults to 1e-12.

    Raises:
        ValueError: image not ``B,C,H,W`` floating point, power <= 0 or eps < 0.

    Example::

        >>> ramp = torch.arange(5.0).expand(1, 1, 4, 5)    # intensity = column index
        >>> sobel_edge_map(ramp)[0, 0, 0]
        tensor([4., 8., 8., 8., 4.])
    """
    _check_image(image)
    if not float(power) > 0.0:
        raise ValueError(f"power must be > 0, got {power}.")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    with _fp32_region(image.device):
        padded = F.pad(_at_least_fp32(image), (1, 1, 1, 1), mode="replicate")
        dx = padded[..., :, 2:] - padded[..., :, :-2]  # B,C,H+2,W
        gx = dx[..., :-2, :] + 2.0 * dx[..., 1:-1, :] + dx[..., 2:, :]
        dy = padded[..., 2:, :] - padded[..., :-2, :]  # B,C,H,W+2
        gy = dy[..., :, :-2] + 2.0 * dy[..., :, 1:-1] + dy[..., :, 2:]
        squared = gx * gx + gy * gy
        edge = _safe_power(squared, 0.5, float(eps)).mean(dim=1, keepdim=True)
        if float(power) != 1.0:
            edge = _safe_power(edge, float(power), 0.0)
    return edge


def entropy_map(probs: torch.Tensor, eps: float = DEFAULT_LOG_EPS) -> torch.Tensor:
    """Per-pixel entropy (nats) of cluster probabilities: ``B,K,H,W -> B,1,H,W``, ``M,B,K,H,W -> M,B,1,H,W``.

    ``-sum_k p_k log max(p_k, eps)`` in fp32 (fp64 kept): 0 for one-hot pixels, log K for uniform ones; finite value and
    gradient at exact zeros.

    Raises:
        ValueError: not ``B,K,H,W``/``M,B,K,H,W`` floating point, or K < 2.
    """
    _as_heads(probs, "probs")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}.")
    with _fp32_region(probs.device):
        return pixel_entropy(_at_least_fp32(probs), dim=-3, eps=float(eps), keepdim=True)


class BoundaryCrossCorrelationLoss(_Loss):
    """Boundary-aware alignment loss L_CC of

        Peng et al., "Boundary-aware Information Maximization for Self-supervised Medical Image Segmentation",
        Medical Image Analysis 2024, eq. (9).

    phi = :func:`sobel_edge_map` of the image (``edge_power`` applied), psi = :func:`entropy_map` of the
    cluster probabilities.  For every pixel i the squared normalised cross-correlation over the
    ``window x window`` neighbourhood N(i)

        r_i^2 = cov_i(phi, psi)^2 / (var_i(phi) var_i(psi))

    is computed, and the loss is ``-mean_i r_i^2`` over the valid pixels, in [-1, 0] (minimised; -1 when the
    entropy map is a local positive affine copy of the edge map).

    Design choices:

    - **Positive correlation only** (``positive_only=True``, default): ``cov`` is clamped at 0 before
      squaring, so entropy peaks must sit *on* image edges; the literal square of eq. (9) would also reward
      high entropy in flat regions next to edges (anti-correlation).  The authors clamp at ``eps`` too.
    - **Affine invariance**: phi is rescaled to [0, 1] per image and psi per image and head (min/max over the
      valid pixels, detached; ranges below 1e-6 are not amplified further), so the result does not depend on
      ``a * image + b`` (a > 0) nor on an affine rescaling of the entropy map, and ``eps`` is relative.
    - **Zero-variance windows**: the local variances are floored at ``eps`` in the denominator; a flat
      window (constant image or constant entropy) has ``cov = 0`` and scores exactly 0 correlation with a
      finite (zero) gradient; windows with variance below ``eps`` are damped smoothly.
    - **Windows**: local means are box filters (``avg_pool2d``, stride 1, no padding values:
      windows are truncated at the image border and, with a mask, restricted to valid pixels).
    - **Mask**: a ``B,1,H,W`` validity mask is eroded by one pixel (a Sobel response next to an out-of-view
      pixel measures the artificial border created by the transform) and the eroded mask removes pixels from
      the window statistics, the normalisation and the final mean.  A head with no valid pixel scores 0.
    - **Efficiency**: the edge map (and its window moments) are computed once per call, under ``no_grad``
      (the image is data, no gradient), and shared by all heads; heads are scored at once.  ``probs`` may be a
      sequence of tensors (e.g. ``(p_hat, p_tilde)``) scored as if concatenated along the head axis without
      copying the probabilities.

    Args:
        window: odd side of the local window, >= 3. Defaults to 5 (the authors').
        edge_power: exponent of the edge magnitude, > 0. Defaults to 1 (authors' runs: 0.75 / 1.5).
        eps: floor of the local variances of the [0, 1]-rescaled maps, > 0. Defaults to 1e-5.
        reduction: ``"none"``: per-head losses ``(M,)`` (0-d for a single ``B,K,H,W`` tensor; a sequence gives
            ``(sum of heads,)``); ``"mean"``/``"sum"`` over heads.  Defaults to ``"mean"``.
        positive_only: count only positive local covariance. Defaults to True.

    Raises:
        ValueError: bad window, edge_power, eps or reduction.

    Example::

        >>> loss = BoundaryCrossCorrelationLoss(window=5)
        >>> probs = torch.rand(6, 2, 10, 32, 32).softmax(2)       # M,B,K,H,W
        >>> image = torch.rand(2, 1, 32, 32)
        >>> -1.0 <= loss(probs, image).item() <= 0.0
        True
    """

    def __init__(
        self,
        window: int = 5,
        edge_power: float = 1.0,
        eps: float = 1e-5,
        reduction: LossReduction | str = LossReduction.MEAN,
        positive_only: bool = True,
    ) -> None:
        super().__init__(reduction=_check_reduction(reduction))
        if isinstance(window, bool) or int(window) != window or window < 3 or window % 2 == 0:
            raise ValueError(f"window must be an odd integer >= 3, got {window}.")
        if not float(edge_power) > 0.0:
            raise ValueError(f"edge_power must be > 0, got {edge_power}.")
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}.")
        self.window = int(window)
        self.edge_power = float(edge_power)
        self.eps = float(eps)
        self.positive_only = bool(positive_only)

    def forward(
        self, probs: torch.Tensor | Sequence[torch.Tensor], image: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            probs: cluster probabilities ``B,K,H,W`` or ``M,B,K,H,W``, or a sequence of such tensors (heads
                concatenated); all aligned with ``image``.
            image: ``B,C,H,W`` image the probabilities were predicted for (the transformed view T(x)).
            mask: optional validity mask ``B,1,H,W``.

        Raises:
            ValueError: bad shapes (names the tensor), mismatched B/H/W, K < 2.
        """
        _check_image(image)
        tensors = [probs] if isinstance(probs, torch.Tensor) else list(probs)
        if not tensors:
            raise ValueError("probs is an empty sequence.")
        single = isinstance(probs, torch.Tensor) and probs.ndim == 4
        heads = []
        for index, tensor in enumerate(tensors):
            name = "probs" if isinstance(probs, torch.Tensor) else f"probs[{index}]"
            five, _ = _as_heads(tensor, name)
            if five.shape[1] != image.shape[0] or five.shape[-2:] != image.shape[-2:]:
                raise ValueError(f"{name} (shape {tuple(tensor.shape)}) and image (shape {tuple(image.shape)}) "
                                 "must share B, H and W.")
            heads.append(five)
        mask = _check_mask(mask, heads[0])
        with torch.no_grad():
            edge = sobel_edge_map(image, power=self.edge_power)
        with _fp32_region(image.device):
            entropy = torch.cat([entropy_map(h) for h in heads], dim=0)  # M,B,1,H,W
            values = self._score(edge, entropy, mask)
        return _reduce_heads(values, self.reduction, single)

    def forward_maps(
        self, edge: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Score precomputed maps: ``edge`` ``B,1,H,W`` (used as data, detached) against ``entropy``
        ``B,1,H,W`` or ``M,B,1,H,W``; same reduction as :meth:`forward`.

        Raises:
            ValueError: bad or mismatched shapes.
        """
        if edge.ndim != 4 or edge.shape[1] != 1:
            raise ValueError(f"edge must be B,1,H,W, got shape {tuple(edge.shape)}.")
        if entropy.ndim not in (4, 5) or entropy.shape[-3] != 1 or entropy.shape[-4:] != edge.shape:
            raise ValueError(f"entropy must be B,1,H,W or M,B,1,H,W matching edge {tuple(edge.shape)}, "
                             f"got shape {tuple(entropy.shape)}.")
        single = entropy.ndim == 4
        entropy5 = entropy.unsqueeze(0) if single else entropy
        mask = _check_mask(mask, entropy5)
        with _fp32_region(edge.device):
            values = self._score(_at_least_fp32(edge.detach()), _at_least_fp32(entropy5), mask)
        return _reduce_heads(values, self.reduction, single)

    def _score(self, edge: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-head ``-mean r^2``: edge ``B,1,H,W`` (data), entropy ``M,B,1,H,W`` -> ``(M,)``."""
        n_heads, batch, _, height, width = entropy.shape
        if mask is not None:
            mask = -F.max_pool2d(-mask, kernel_size=3, stride=1, padding=1)  # erode by the Sobel radius
        with torch.no_grad():
            phi = _rescale(edge, mask)  # B,1,H,W in [0, 1] on valid pixels, 0 elsewhere
            if mask is None:
                phi_moments = self._box_mean(torch.cat([phi, phi * phi], dim=1))
                weight = None
            else:
                phi_moments = self._box_mean(torch.cat([mask, mask * phi, mask * phi * phi], dim=1))
                weight = phi_moments[:, :1].clamp_min(1.0 / self.window**2)  # mask mass of the window
                phi_moments = phi_moments[:, 1:] / weight
            phi_mean, phi_sq = phi_moments[:, :1], phi_moments[:, 1:]
            phi_var = (phi_sq - phi_mean * phi_mean).clamp_min(self.eps)
        psi = _rescale(entropy, mask)  # M,B,1,H,W
        stack = torch.cat([psi, psi * psi, psi * phi], dim=2)  # M,B,3,H,W (phi broadcast over heads)
        if mask is not None:
            stack = stack * mask
        moments = self._box_mean(stack.view(n_heads * batch, 3, height, width)).view(n_heads, batch, 3, height, width)
        if weight is not None:
            moments = moments / weight
        psi_mean, psi_sq, cross = moments[:, :, :1], moments[:, :, 1:2], moments[:, :, 2:]
        cov = cross - phi_mean * psi_mean
        if self.positive_only:
            cov = cov.clamp_min(0.0)
        psi_var = (psi_sq - psi_mean * psi_mean).clamp_min(self.eps)
        r2 = cov * cov / (phi_var * psi_var)  # M,B,1,H,W
        if mask is None:
            return -r2.mean(dim=(1, 2, 3, 4))
        count = mask.sum()
        values = -(r2 * mask).sum(dim=(1, 2, 3, 4)) / count.clamp_min(1.0)
        return torch.where(count > 0, values, torch.zeros_like(values))

    def _box_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the in-image part of each ``window x window`` window (stride 1, borders truncated)."""
        return F.avg_pool2d(x, self.window, stride=1, padding=self.window // 2, count_include_pad=False)


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}.")
    if image.ndim != 4 or image.numel() == 0:
        raise ValueError(f"image must be a non-empty B,C,H,W tensor, got shape {tuple(image.shape)}.")
    if not image.is_floating_point():
        raise ValueError(f"image must be floating point, got dtype {image.dtype}.")


def _safe_power(x: torch.Tensor, power: float, floor: float) -> torch.Tensor:
    """``x ** power`` where ``x > floor``, exactly 0 elsewhere, with a finite gradient everywhere (x >= 0)."""
    positive = x > floor
    safe = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, safe.pow(power), torch.zeros_like(x))


def _rescale(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Affinely map each ``...,1,H,W`` slice to [0, 1] over its valid pixels (min/max detached)."""
    with torch.no_grad():
        if mask is None:
            low = x.amin(dim=(-2, -1), keepdim=True)
            high = x.amax(dim=(-2, -1), keepdim=True)
        else:
            valid = mask > 0
            low = torch.where(valid, x, torch.full_like(x, float("inf"))).amin(dim=(-2, -1), keepdim=True)
            high = torch.where(valid, x, torch.full_like(x, float("-inf"))).amax(dim=(-2, -1), keepdim=True)
            empty = ~valid.any(dim=-1, keepdim=True).any(dim=-2, keepdim=True)
            low = torch.where(empty, torch.zeros_like(low), low)
            high = torch.where(empty, torch.zeros_like(high), high)
        scale = (high - low).clamp_min(MIN_MAP_RANGE)
    if mask is None:
        return (x - low) / scale
    # invalid pixels may hold anything (even inf): give them 0 so that masked products stay finite
    return torch.where(mask > 0, (x - low) / scale, torch.zeros((), dtype=x.dtype, device=x.device))
