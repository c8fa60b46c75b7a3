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

from bundle.losses._kernels import CorrelationGeometry, LocalCorrelationFunction, box_sum_
from bundle.losses.utils import (
    DEFAULT_LOG_EPS,
    as_heads,
    at_least_fp32,
    check_aligned,
    check_mask,
    check_positive,
    check_reduction,
    fp32_region,
    is_distributed,
    pixel_entropy,
    reduce_heads,
    share_of_processes,
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
    power = check_positive(power, "power")
    eps = check_positive(eps, "eps", allow_zero=True)
    with fp32_region(image.device):
        padded = F.pad(at_least_fp32(image), (1, 1, 1, 1), mode="replicate")
        dx = padded[..., :, 2:] - padded[..., :, :-2]  # B,C,H+2,W
        gx = dx[..., :-2, :] + 2.0 * dx[..., 1:-1, :] + dx[..., 2:, :]
        dy = padded[..., 2:, :] - padded[..., :-2, :]  # B,C,H,W+2
        gy = dy[..., :, :-2] + 2.0 * dy[..., :, 1:-1] + dy[..., :, 2:]
        squared = gx * gx + gy * gy
        edge = _safe_power(squared, 0.5, eps).mean(dim=1, keepdim=True)
        if power != 1.0:
            edge = _safe_power(edge, power, 0.0)
    return edge


def entropy_map(probs: torch.Tensor, eps: float = DEFAULT_LOG_EPS) -> torch.Tensor:
    """Per-pixel entropy (nats) of cluster probabilities: ``B,K,H,W -> B,1,H,W``, ``M,B,K,H,W -> M,B,1,H,W``.

    ``-sum_k p_k log max(p_k, eps)`` in fp32 (fp64 kept): 0 for one-hot pixels, log K for uniform ones; finite value and
    gradient at exact zeros.

    Raises:
        ValueError: not ``B,K,H,W``/``M,B,K,H,W`` floating point, or K < 2.
    """
    as_heads(probs, "probs")
    eps = check_positive(eps, "eps")
    with fp32_region(probs.device):
        return pixel_entropy(at_least_fp32(probs), dim=-3, eps=eps, keepdim=True)


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
    - **Windows**: local means are box filters (window sums divided by the number of pixels summed: windows
      are truncated at the image border and, with a mask, restricted to valid pixels).
    - **Mask**: a ``B,1,H,W`` validity mask is eroded by one pixel (a Sobel response next to an out-of-view
      pixel measures the artificial border created by the transform) and the eroded mask removes pixels from
      the window statistics, the normalisation and the final mean.  A head with no valid pixel scores 0.
    - **Efficiency**: the edge map (and its window moments) are computed once per call, under ``no_grad``
      (the image is data, no gradient), and shared by all heads; heads are scored at once.  ``probs`` may be a
      sequence of tensors (e.g. ``(p_hat, p_tilde)``) scored as if concatenated along the head axis without
      copying the probabilities.  The hand-written backward is the adjoint of the window sums, computed in
      place (see ``bundle/losses/_kernels.py``).

    Why not :class:`monai.losses.LocalNormalizedCrossCorrelationLoss` (same squared local NCC, ``-mean r^2``):

    - its window sums zero-pad the border and are divided by the full kernel volume, so border windows count the
      padding as zero-valued pixels; here windows are truncated at the border (and at masked pixels);
    - it floors the window *sums* of squared deviations (``smooth_dr``, i.e. kernel volume x variance) of the maps
      as given and adds ``smooth_nr`` to the numerator; it does not rescale the maps to [0, 1] (see *Affine
      invariance*), so its floor is absolute where ``eps`` here is relative to each map's range;
    - it squares the covariance as is (no ``positive_only``) and has no mask: its mean runs over every pixel,
      out-of-view ones included;
    - ``pred`` and ``target`` must have the same shape, so the edge map would be repeated for every head and its
      window moments recomputed per head and per call; here they are computed once and shared by all heads;
    - its backward is autograd through five separable filterings (zero-padded convolutions); here the moments
      are box-summed in place and the backward is the hand-written adjoint, for less memory traffic on the
      full-resolution maps;
    - it does not disable autocast; here the statistics run in fp32.

    Args:
        window: odd side of the local window, >= 3. Defaults to 5 (the authors').
        edge_power: exponent of the edge magnitude, > 0. Defaults to 1 (authors' runs: 0.75 / 1.5).
        eps: floor of the local variances of the [0, 1]-rescaled maps, > 0. Defaults to 1e-5.
        reduction: ``"none"``: per-head losses ``(M,)`` (0-d for a single ``B,K,H,W`` tensor; a sequence gives
            ``(sum of heads,)``); ``"mean"``/``"sum"`` over heads.  Defaults to ``"mean"``.
        positive_only: count only positive local covariance. Defaults to True.
        global_statistics: under ``torchrun`` (several processes), weight each process's mean by its share of the
            valid pixels of all processes, so that DDP's gradient averaging gives the mean over the whole batch
            (the maps themselves are local: nothing else is exchanged). ``False`` averages the per-process means.
            Without a process group both are the same. Defaults to True.

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
        global_statistics: bool = True,
    ) -> None:
        super().__init__(reduction=check_reduction(reduction))
        if isinstance(window, bool) or int(window) != window or window < 3 or window % 2 == 0:
            raise ValueError(f"window must be an odd integer >= 3, got {window}.")
        self.window = int(window)
        self.edge_power = check_positive(edge_power, "edge_power")
        self.eps = check_positive(eps, "eps")
        self.positive_only = bool(positive_only)
        self.global_statistics = bool(global_statistics)

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
            five, _ = as_heads(tensor, name)
            check_aligned(tensor, image, name)
            heads.append(five)
        mask = check_mask(mask, heads[0])
        edge = self.edge_map(image)
        with fp32_region(image.device):
            entropy = torch.cat([entropy_map(h) for h in heads], dim=0)  # M,B,1,H,W
            values = self._score(edge, entropy, mask)
        return reduce_heads(values, self.reduction, single)

    def edge_map(self, image: torch.Tensor) -> torch.Tensor:
        """phi of eq. (9), the data :meth:`forward` scores against: :func:`sobel_edge_map` of ``image`` ``B,C,H,W``
        with ``edge_power``, ``B,1,H,W`` fp32 (fp64 kept), without gradient.

        Raises:
            ValueError: ``image`` is not a non-empty floating-point ``B,C,H,W`` tensor.
        """
        with torch.no_grad():
            return sobel_edge_map(image, power=self.edge_power)

    def forward_maps(
        self, edge: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Score precomputed maps: ``edge`` ``B,1,H,W`` (used as data, detached; e.g. :meth:`edge_map`) against
        ``entropy`` ``B,1,H,W`` or ``M,B,1,H,W`` (e.g. :func:`entropy_map`); same reduction as :meth:`forward`.

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
        mask = check_mask(mask, entropy5)
        with fp32_region(edge.device):
            values = self._score(at_least_fp32(edge.detach()), at_least_fp32(entropy5), mask)
        return reduce_heads(values, self.reduction, single)

    def _score(self, edge: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-head ``-mean r^2``: edge ``B,1,H,W`` (data), entropy ``M,B,1,H,W`` -> ``(M,)``."""
        height, width = entropy.shape[-2:]
        if mask is not None:
            mask = -F.max_pool2d(-mask, kernel_size=3, stride=1, padding=1)  # erode by the Sobel radius
        with torch.no_grad():
            # window sizes (in-image part) and, with a mask, the valid mass of each window: moments are
            # box_sum(mask * x) / norm
            ones = torch.ones(1, 1, height, width, dtype=entropy.dtype, device=entropy.device)
            size, _ = box_sum_(ones, self.window)
            norm = size if mask is None else box_sum_(mask.clone(), self.window)[0].clamp_min(size / self.window**2)
            phi = _rescale(edge, mask)  # B,1,H,W in [0, 1] on valid pixels, 0 elsewhere
            weighted = phi if mask is None else mask * phi
            phi_moments = box_sum_(torch.cat([weighted, weighted * phi], dim=1), self.window)[0].div_(norm)
            phi_mean, phi_sq = phi_moments[:, :1], phi_moments[:, 1:]
            phi_var = (phi_sq - phi_mean * phi_mean).clamp_min(self.eps)
            low, scale = _rescale_range(entropy, mask)
        geometry = CorrelationGeometry(phi, phi_mean, phi_var, mask, norm, self.window, self.eps, self.positive_only)
        values = LocalCorrelationFunction.apply(entropy, low, scale, geometry)
        if self.global_statistics and is_distributed():  # the mean over every process's valid pixels, after DDP
            count = mask.sum() if mask is not None else torch.tensor(float(entropy.shape[1] * height * width))
            values = values * share_of_processes(count.to(values))
        return values


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


def _rescale_range(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ``...,1,H,W`` slice: the minimum over its valid pixels and the range (max - min, at least
    ``MIN_MAP_RANGE``), shaped to broadcast against ``x``; no gradient."""
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
        return low, (high - low).clamp_min(MIN_MAP_RANGE)


def _rescale(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Affinely map each ``...,1,H,W`` slice to [0, 1] over its valid pixels (min/max detached)."""
    low, scale = _rescale_range(x, mask)
    if mask is None:
        return (x - low) / scale
    # invalid pixels may hold anything (even inf): give them 0 so that masked products stay finite
    return torch.where(mask > 0, (x - low) / scale, torch.zeros((), dtype=x.dtype, device=x.device))
