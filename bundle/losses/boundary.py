"""Boundary-aware alignment loss L_CC: local correlation between image edges and the cluster-entropy map.

- :func:`sobel_edge_map`: 3x3 Sobel gradient magnitude, ``B,C,H,W -> B,1,H,W`` (replicate padding, no wrap).
- :func:`entropy_map`: per-pixel entropy of cluster probabilities, ``(M,)B,K,H,W -> (M,)B,1,H,W``.
- :class:`BoundaryCrossCorrelationLoss`: eq. (9), minus the mean squared local normalised cross-correlation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.autograd.function import FunctionCtx, once_differentiable
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
        height, width = entropy.shape[-2:]
        if mask is not None:
            mask = -F.max_pool2d(-mask, kernel_size=3, stride=1, padding=1)  # erode by the Sobel radius
        with torch.no_grad():
            # window sizes (in-image part) and, with a mask, the valid mass of each window: moments are
            # box_sum(mask * x) / norm
            ones = torch.ones(1, 1, height, width, dtype=entropy.dtype, device=entropy.device)
            size, _ = _box_sum_(ones, self.window)
            norm = size if mask is None else _box_sum_(mask.clone(), self.window)[0].clamp_min(size / self.window**2)
            phi = _rescale(edge, mask)  # B,1,H,W in [0, 1] on valid pixels, 0 elsewhere
            weighted = phi if mask is None else mask * phi
            phi_moments = _box_sum_(torch.cat([weighted, weighted * phi], dim=1), self.window)[0].div_(norm)
            phi_mean, phi_sq = phi_moments[:, :1], phi_moments[:, 1:]
            phi_var = (phi_sq - phi_mean * phi_mean).clamp_min(self.eps)
            low, scale = _rescale_range(entropy, mask)
        geometry = _CorrelationGeometry(phi, phi_mean, phi_var, mask, norm, self.window, self.eps, self.positive_only)
        return _LocalCorrelationFunction.apply(entropy, low, scale, geometry)


class _CorrelationGeometry(NamedTuple):
    """What :class:`_LocalCorrelationFunction` needs besides the entropy maps (all data, no gradient)."""

    phi: torch.Tensor  # B,1,H,W rescaled edge map
    phi_mean: torch.Tensor  # B,1,H,W local mean of phi
    phi_var: torch.Tensor  # B,1,H,W local variance of phi, floored at eps
    mask: torch.Tensor | None  # B,1,H,W eroded validity mask
    norm: torch.Tensor  # B,1,H,W or 1,1,H,W: window moments are box_sum(mask * x) / norm
    window: int
    eps: float
    positive_only: bool


class _LocalCorrelationFunction(torch.autograd.Function):
    """Entropy maps ``M,B,1,H,W`` -> per-head ``-mean_i r_i^2`` ``(M,)``, with a hand-written backward.

    The arithmetic is that of the docstring of :class:`BoundaryCrossCorrelationLoss`; the point of the custom
    function is memory traffic.  With ``psi`` the rescaled entropy, ``w`` the mask and ``S = box_sum(.) / norm``:

        mu = S(w psi), sq = S(w psi^2), X = S(w psi phi),
        c = X - mu S(w phi) (clamped at 0 when positive_only), v = max(sq - mu^2, eps),
        r^2 = c^2 / (var_phi v),  loss = -sum_i w_i r_i^2 / sum_i w_i.

    The three moments are box-filtered in place in one ``M*B,3,H,W`` buffer (three such buffers in all, forward
    and backward); the backward is the adjoint: per pixel ``g_X = 2 c k``, ``g_sq = -c^2 k / v [sq - mu^2 > eps]``,
    ``g_mu = -S(w phi) g_X - 2 mu g_sq`` with ``k = -g w / (count var_phi v)``, then (the zero-padded box sum is
    self-adjoint) ``G = box_sum(g / norm)`` and ``d loss / d psi = w (G_mu + 2 psi G_sq + phi G_X)``.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, entropy: torch.Tensor, low: torch.Tensor, scale: torch.Tensor, geo: _CorrelationGeometry
    ) -> torch.Tensor:
        n_heads, batch, _, height, width = entropy.shape
        psi = (entropy - low).div_(scale)
        if geo.mask is not None:  # invalid pixels may hold anything (even inf): give them 0
            psi = torch.where(geo.mask > 0, psi, torch.zeros((), dtype=psi.dtype, device=psi.device))
        stack = torch.empty(n_heads, batch, 3, height, width, dtype=psi.dtype, device=psi.device)
        weighted = stack[:, :, 0:1]
        if geo.mask is None:
            weighted.copy_(psi)
        else:
            torch.mul(psi, geo.mask, out=weighted)
        torch.mul(weighted, psi, out=stack[:, :, 1:2])
        torch.mul(weighted, geo.phi, out=stack[:, :, 2:3])
        # box sums in place: the stack becomes the window moments; the row buffer is kept for the backward
        _, work = _box_sum_(stack.view(n_heads * batch, 3, height, width), geo.window)
        moments = stack.div_(geo.norm)
        mu, var, cov = moments[:, :, 0:1], moments[:, :, 1:2], moments[:, :, 2:3]
        cov.addcmul_(geo.phi_mean, mu, value=-1.0)
        if geo.positive_only:
            cov.clamp_min_(0.0)
        var.addcmul_(mu, mu, value=-1.0)
        above = var > geo.eps  # where the variance floor does not act
        var.clamp_min_(geo.eps)
        r2 = cov * cov
        r2.div_(var).div_(geo.phi_var)
        if geo.mask is None:
            count = torch.full((), batch * height * width, dtype=r2.dtype, device=r2.device)
            values = r2.sum(dim=(1, 2, 3, 4))
        else:
            count = geo.mask.sum()
            values = (r2 * geo.mask).sum(dim=(1, 2, 3, 4))
        values = values.div_(count.clamp_min(1.0)).neg_()
        ctx.save_for_backward(psi, moments, above, count, scale)
        ctx.geo = geo  # type: ignore[attr-defined]
        ctx.work = work.view_as(stack)  # type: ignore[attr-defined]  # reused by the backward
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        psi, moments, above, count, scale = ctx.saved_tensors  # type: ignore[attr-defined]
        geo: _CorrelationGeometry = ctx.geo  # type: ignore[attr-defined]
        n_heads, batch, _, height, width = psi.shape
        mu, var, cov = moments[:, :, 0:1], moments[:, :, 1:2], moments[:, :, 2:3]
        # k = d loss / d r^2 / (var_phi v) = -g w / (count var_phi v)
        k = (-grad / count.clamp_min(1.0)).view(n_heads, 1, 1, 1, 1) / geo.phi_var
        k = k / var if geo.mask is None else (k * geo.mask).div_(var)
        stack = ctx.work  # type: ignore[attr-defined]
        ctx.work = None  # type: ignore[attr-defined]
        if stack is None:  # a second backward through the same graph
            stack = torch.empty_like(moments)
        g_mu, g_sq, g_cov = stack[:, :, 0:1], stack[:, :, 1:2], stack[:, :, 2:3]
        torch.mul(cov, k, out=g_cov).mul_(2.0)  # d r^2 / d cov
        torch.mul(cov, cov, out=g_sq).mul_(k).div_(var).mul_(above).neg_()  # d r^2 / d v (0 where floored)
        torch.mul(g_cov, geo.phi_mean, out=g_mu).neg_().addcmul_(mu, g_sq, value=-2.0)
        stack.div_(geo.norm)
        _box_sum_(stack.view(n_heads * batch, 3, height, width), geo.window)  # the adjoint G, in place
        grad_psi = stack[:, :, 0:1].addcmul(psi, stack[:, :, 1:2], value=2.0)
        grad_psi.addcmul_(geo.phi, stack[:, :, 2:3])
        if geo.mask is not None:
            grad_psi.mul_(geo.mask)
        return grad_psi.div_(scale), None, None, None


def _box_sum_(x: torch.Tensor, window: int, work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over the in-image part of each ``window x window`` neighbourhood of ``...,H,W`` maps (zero padding),
    **in place** in ``x``; returns ``(x, work)``.

    Separable shifted in-place adds (rows into ``work``, a buffer shaped as ``x`` that is allocated when not given,
    then columns back into ``x``): ``2 (window - 1)`` adds, about twice as fast on CPU as ``avg_pool2d``.  The
    zero-padded box sum is self-adjoint.
    """
    half = window // 2
    rows = torch.empty_like(x) if work is None else work
    rows.copy_(x)
    for shift in range(1, half + 1):
        rows[..., shift:, :] += x[..., :-shift, :]
        rows[..., :-shift, :] += x[..., shift:, :]
    x.copy_(rows)
    for shift in range(1, half + 1):
        x[..., shift:] += rows[..., :-shift]
        x[..., :-shift] += rows[..., shift:]
    return x, rows


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
