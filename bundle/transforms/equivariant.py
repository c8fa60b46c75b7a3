"""The random transformation ``T`` of the paper, shared by images and feature maps of any size.

Peng et al., "Boundary-aware Information Maximization for Self-supervised Medical Image Segmentation",
Medical Image Analysis 2024, Sec. 2.1 (Eq. 3: ``p_hat = g(s(T(x)))`` and ``p_tilde = g(T(s(x)))``) and
Appendix F ("Details on the transformation T"): a random affine map (scale U(0.8, 1.3), rotation
U(-45, 45) degrees, translation U(-10%, 10%)) plus, for raw images only, gamma correction U(0.5, 2.0).
The *same* geometric draw must reach the image and the network's feature maps, whatever their channel count
or resolution.  Random flips per axis are added, as in the authors' code (``Mirror``).

Coordinates.  Every geometric parameter is stored resolution-free: translation as a fraction of the image
extent, rotation and scale about the image centre.  A map ``B,C,H,W`` is resampled through
``F.affine_grid`` (``align_corners=False``), whose normalised coordinates cover the whole field of view for
any ``H, W``; so a 224x224 image, its 224x224 decoder features and its 14x14 bottleneck (any integer
pooling of the same field of view) get the same ``theta`` and stay aligned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["EquivariantTransform", "TransformParams"]

#: Interpolation modes of :class:`EquivariantTransform` (those of ``F.grid_sample`` with a 2x2 or 1x1 support).
SUPPORTED_MODES = ("bilinear", "nearest")

#: Bilinear sampling: how far (in input pixels) outside the hull of pixel centres a sample may lie and still count
#: as valid.  Covers fp32 round-off of the grid (about 1e-5 px at 1000 px); the padding weight it admits is <= 1e-4.
_BILINEAR_TOLERANCE_PX = 1e-4


@dataclass(frozen=True)
class TransformParams:
    """One draw of :class:`EquivariantTransform` for a batch of ``B`` samples (all tensors on one device).

    The geometric map takes an input pixel at centred position ``u`` (pixels, ``x`` to the right, ``y`` down,
    origin at the image centre) to the output position ``v = R(rotation) * scale * Flip * u + (tx * W, ty * H)``:
    flip first, then isotropic scaling (``scale > 1`` enlarges the content), then rotation about the centre
    (positive angles turn the content counter-clockwise as displayed, like ``torch.rot90(x, 1, (-2, -1))``),
    then translation by a fraction of the width/height.  The rotation is a true rotation in pixel space, also
    for ``H != W`` (see :meth:`theta`).

    Args:
        scale: ``B`` isotropic scale factors (> 0).
        rotation: ``B`` angles in degrees, counter-clockwise on screen.
        translation: ``B,2`` shifts ``(tx, ty)`` as fractions of the width and height (``tx > 0``: right,
            ``ty > 0``: down).
        flip: ``B,2`` booleans ``(flip_x, flip_y)``: mirror left-right / top-bottom.
        gamma: ``B`` gamma exponents, used by :meth:`EquivariantTransform.apply_image` only.

    Raises:
        ValueError: when a field has the wrong shape, the batch sizes differ, or the fields are on different
            devices.
    """

    scale: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor
    flip: torch.Tensor
    gamma: torch.Tensor

    def __post_init__(self) -> None:
        batch = self.scale.shape[0] if self.scale.ndim == 1 else -1
        expected = {
            "scale": (batch,),
            "rotation": (batch,),
            "translation": (batch, 2),
            "flip": (batch, 2),
            "gamma": (batch,),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or batch < 1:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"TransformParams.{name} must have shape {shape} (B from scale, B >= 1), got {got}.")
            if value.device != self.scale.device:
                raise ValueError(f"TransformParams.{name} is on {value.device}, scale on {self.scale.device}.")
        if self.flip.dtype != torch.bool:
            raise ValueError(f"TransformParams.flip must be a bool tensor, got {self.flip.dtype}.")

    @property
    def batch_size(self) -> int:
        """Number of samples ``B``."""
        return int(self.scale.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the parameter tensors."""
        return self.scale.device

    def to(self, device: torch.device | str) -> TransformParams:
        """The same parameters on ``device``."""
        return TransformParams(
            scale=self.scale.to(device),
            rotation=self.rotation.to(device),
            translation=self.translation.to(device),
            flip=self.flip.to(device),
            gamma=self.gamma.to(device),
        )

    def rows(self, start: int, stop: int) -> TransformParams:
        """The parameters of samples ``start .. stop - 1`` (a process's share of a draw made for a global batch)."""
        return TransformParams(
            scale=self.scale[start:stop],
            rotation=self.rotation[start:stop],
            translation=self.translation[start:stop],
            flip=self.flip[start:stop],
            gamma=self.gamma[start:stop],
        )

    @classmethod
    def identity(cls, batch_size: int, device: torch.device | str | None = None) -> TransformParams:
        """Parameters that leave every input unchanged (scale 1, no rotation, shift or flip, gamma 1)."""
        ones = torch.ones(batch_size, device=device)
        return cls(
            scale=ones,
            rotation=torch.zeros(batch_size, device=device),
            translation=torch.zeros(batch_size, 2, device=device),
            flip=torch.zeros(batch_size, 2, dtype=torch.bool, device=device),
            gamma=ones.clone(),
        )

    def theta(self, size: Sequence[int]) -> torch.Tensor:
        """The ``B,2,3`` fp32 sampling matrix of ``F.affine_grid`` (``align_corners=False``) for maps of ``size``.

        ``theta`` maps normalised *output* coordinates to normalised *input* coordinates, i.e. it is the inverse
        of the forward map ``v = M u + d`` (``M = R S F``): with ``D = diag(W/2, H/2)`` converting normalised to
        centred pixel coordinates, ``A = D^-1 M^-1 D`` and ``theta = [A | -A (2 tx, 2 ty)]``.  ``A`` depends on
        ``size`` only through the aspect ratio ``H / W``, which is what keeps the rotation a true rotation in
        pixel space for non-square maps; all maps of one field of view (same aspect ratio) share ``theta``.

        Args:
            size: ``(H, W)`` of the map to resample.
        """
        height, width = (int(s) for s in size)
        scale = self.scale.float()
        angle = self.rotation.float() * (math.pi / 180.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        sign = 1.0 - 2.0 * self.flip.float()  # -1 where flipped
        fx, fy = sign[:, 0] / scale, sign[:, 1] / scale
        a00, a01 = fx * cos, -fx * sin * (height / width)
        a10, a11 = fy * sin * (width / height), fy * cos
        tx, ty = 2.0 * self.translation[:, 0].float(), 2.0 * self.translation[:, 1].float()
        b0, b1 = -(a00 * tx + a01 * ty), -(a10 * tx + a11 * ty)
        return torch.stack((torch.stack((a00, a01, b0), -1), torch.stack((a10, a11, b1), -1)), 1)


def _pair(value: float | Sequence[float], name: str, symmetric: bool) -> tuple[float, float]:
    """``(low, high)`` from a pair, or from ``r >= 0`` as ``(-r, r)`` when ``symmetric``; ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and symmetric:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0 or an ordered pair (low, high), got {value!r}.")
        return -float(value), float(value)
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        or value[0] > value[1]
    ):
        raise ValueError(f"{name} must be an ordered pair of finite numbers (low <= high), got {value!r}.")
    return float(value[0]), float(value[1])


class EquivariantTransform:
    """Random transformation ``T`` of Peng et al. 2024 (Sec. 2.1, Eq. 3; Appendix F), per sample.

    ``sample`` draws one set of parameters per sample from an explicit ``torch.Generator``; ``apply`` resamples
    any ``B,C,H,W`` tensor (image, decoder features, bottleneck, logits) with those parameters, so that
    ``T(s(x))`` and ``s(T(x))`` can be compared pixel by pixel; ``apply_image`` adds the per-sample gamma
    correction that only raw images receive.  Both return a validity mask: 1 where the output was sampled
    entirely from inside the input, 0 where zero padding contributed.  See :class:`TransformParams` for the
    exact geometric convention.

    Args:
        scale_range: ``(low, high)``, ``0 < low <= high``; scale drawn U(low, high). Defaults to ``(0.8, 1.3)``.
        rotate_range: degrees; ``r >= 0`` means U(-r, r), or an ordered pair. Defaults to 45.
        translate_range: fraction of the width/height, drawn independently per axis; ``t >= 0`` means U(-t, t),
            or an ordered pair. Defaults to 0.1.
        flip_prob: probability of a left-right and of a top-bottom flip, one number for both axes or a pair
            ``(p_x, p_y)``, each in [0, 1]. Defaults to 0.5.
        gamma_range: ``(low, high)``, ``0 < low <= high``; gamma drawn U(low, high). Defaults to ``(0.5, 2.0)``.
        mode: interpolation, ``"bilinear"`` or ``"nearest"`` (the authors' code used nearest). Defaults to
            ``"bilinear"``.

    Raises:
        ValueError: naming the option, when a range is not an ordered pair of finite numbers, a scale or gamma
            bound is <= 0, a probability is outside [0, 1], or the mode is unsupported.

    Example::

        >>> t = EquivariantTransform()
        >>> params = t.sample(2, generator=torch.Generator().manual_seed(0))
        >>> image_tf, valid = t.apply_image(torch.rand(2, 1, 64, 64), params)
        >>> bottleneck_tf, valid_4 = t.apply(torch.rand(2, 512, 4, 4), params)
        >>> image_tf.shape, valid.shape, valid_4.shape
        (torch.Size([2, 1, 64, 64]), torch.Size([2, 1, 64, 64]), torch.Size([2, 1, 4, 4]))
    """

    def __init__(
        self,
        scale_range: Sequence[float] = (0.8, 1.3),
        rotate_range: float | Sequence[float] = 45.0,
        translate_range: float | Sequence[float] = 0.1,
        flip_prob: float | Sequence[float] = 0.5,
        gamma_range: Sequence[float] = (0.5, 2.0),
        mode: str = "bilinear",
    ) -> None:
        self.scale_range = _pair(scale_range, "scale_range", symmetric=False)
        if self.scale_range[0] <= 0:
            raise ValueError(f"scale_range must be > 0, got {scale_range!r}.")
        self.rotate_range = _pair(rotate_range, "rotate_range", symmetric=True)
        self.translate_range = _pair(translate_range, "translate_range", symmetric=True)
        probs = (flip_prob, flip_prob) if isinstance(flip_prob, (int, float)) else flip_prob
        if (
            isinstance(probs, (str, bytes))
            or not isinstance(probs, Sequence)
            or len(probs) != 2
            or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0 for p in probs)
        ):
            raise ValueError(f"flip_prob must be a probability in [0, 1] or a pair of them, got {flip_prob!r}.")
        self.flip_prob = (float(probs[0]), float(probs[1]))
        self.gamma_range = _pair(gamma_range, "gamma_range", symmetric=False)
        if self.gamma_range[0] <= 0:
            raise ValueError(f"gamma_range must be > 0, got {gamma_range!r}.")
        self.mode = self._check_mode(mode)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scale_range={self.scale_range}, rotate_range={self.rotate_range}, "
            f"translate_range={self.translate_range}, flip_prob={self.flip_prob}, gamma_range={self.gamma_range}, "
            f"mode={self.mode!r})"
        )

    @staticmethod
    def _check_mode(mode: str) -> str:
        if mode not in SUPPORTED_MODES:
            raise ValueError(f"Unsupported mode: {mode!r}, available options are {SUPPORTED_MODES}.")
        return mode

    def sample(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> TransformParams:
        """Draw independent parameters for ``batch_size`` samples.

        Only ``generator`` is consumed: one ``torch.rand(batch_size, 7)`` call on the generator's device, so a
        given generator state and ``batch_size`` give the same parameters whatever ``device`` they are moved
        to.  With ``generator=None`` a fresh generator seeded from the OS entropy source is used (not
        reproducible); the global RNG state is never read, advanced, saved or restored.

        Args:
            batch_size: number of samples ``B`` (>= 1).
            device: where the returned tensors live. Defaults to the generator's device (CPU when none given).
            generator: the source of randomness.

        Raises:
            ValueError: when ``batch_size`` is not a positive integer.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        u = torch.rand(batch_size, 7, generator=generator, device=generator.device)

        def uniform(column: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
            return bounds[0] + (bounds[1] - bounds[0]) * column

        params = TransformParams(
            scale=uniform(u[:, 0], self.scale_range),
            rotation=uniform(u[:, 1], self.rotate_range),
            translation=uniform(u[:, 2:4], self.translate_range),
            flip=u[:, 4:6] < torch.tensor(self.flip_prob, device=u.device),
            gamma=uniform(u[:, 6], self.gamma_range),
        )
        return params if device is None else params.to(device)

    def _grid(self, params: TransformParams, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        theta = params.theta(size).to(device)
        return F.affine_grid(theta, [params.batch_size, 1, size[0], size[1]], align_corners=False)

    @staticmethod
    def _valid_from_grid(grid: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
        """``B,1,H,W`` bool: every input pixel the sample at ``grid`` reads (with non-zero weight) exists."""
        height, width = size
        # grid_sample, align_corners=False: pixel index = ((g + 1) * size - 1) / 2
        ix = ((grid[..., 0] + 1.0) * width - 1.0) / 2.0
        iy = ((grid[..., 1] + 1.0) * height - 1.0) / 2.0
        if mode == "nearest":  # grid_sample rounds half to even, as torch.round does
            ix, iy = torch.round(ix), torch.round(iy)
            valid = (ix >= 0) & (ix <= width - 1) & (iy >= 0) & (iy <= height - 1)
        else:  # bilinear reads floor(i) and floor(i) + 1: inside iff 0 <= i <= size - 1
            tol = _BILINEAR_TOLERANCE_PX
            valid = (ix >= -tol) & (ix <= width - 1 + tol) & (iy >= -tol) & (iy <= height - 1 + tol)
        return valid.unsqueeze(1)

    def mask(
        self,
        params: TransformParams,
        size: Sequence[int],
        mode: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Validity mask ``B,1,h,w`` (1: no padding in the output pixel) for maps of ``size = (h, w)``.

        Equal to the mask :meth:`apply` returns for a ``B,C,h,w`` input; computed on ``params.device``.

        Raises:
            ValueError: when ``size`` is not two positive integers or ``mode`` is unsupported.
        """
        mode = self._check_mode(self.mode if mode is None else mode)
        if len(size) != 2 or min(int(s) for s in size) < 1:
            raise ValueError(f"size must be (h, w) with positive entries, got {tuple(size)}.")
        hw = (int(size[0]), int(size[1]))
        return self._valid_from_grid(self._grid(params, hw, params.device), hw, mode).to(dtype)

    @staticmethod
    def _check_input(x: torch.Tensor, params: TransformParams, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a B,C,H,W tensor, got shape {shape}.")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}.")
        if x.shape[0] != params.batch_size:
            raise ValueError(
                f"Batch size mismatch: {name} has batch size {x.shape[0]} but params have {params.batch_size}."
            )

    def apply(
        self, x: torch.Tensor, params: TransformParams, mode: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Geometric part of ``T`` on any ``B,C,H,W`` tensor; differentiable with respect to ``x``.

        One ``F.grid_sample`` call (zero padding, ``align_corners=False``).  The grid is computed in fp32 and
        the resampling runs in at least fp32 (a bf16 grid would misplace samples by up to a pixel at 224 px);
        the output is cast back, so fp16/bf16 inputs keep their dtype.

        Args:
            x: ``B,C,H,W`` floating-point tensor, any ``C, H, W``.
            params: from :meth:`sample`, with the same ``B``.
            mode: interpolation, overriding the constructor's.

        Returns:
            ``(y, valid)``: ``y`` is ``B,C,H,W`` in ``x.dtype``; ``valid`` is ``B,1,H,W`` in ``x.dtype``, 1 where
            every input pixel the output pixel was interpolated from lies inside ``x`` (for bilinear: the sample
            lies within the hull of pixel centres, up to 1e-4 px), 0 where zero padding contributed.

        Raises:
            ValueError: when ``x`` is not a floating-point ``B,C,H,W`` tensor or its batch size differs from
                the parameters'.
        """
        mode = self._check_mode(self.mode if mode is None else mode)
        self._check_input(x, params, "x")
        size = (int(x.shape[-2]), int(x.shape[-1]))
        grid = self._grid(params, size, x.device)
        work_dtype = torch.promote_types(x.dtype, torch.float32)
        y = F.grid_sample(x.to(work_dtype), grid.to(work_dtype), mode=mode, padding_mode="zeros", align_corners=False)
        valid = self._valid_from_grid(grid, size, mode)
        return y.to(x.dtype), valid.to(x.dtype)

    def apply_gamma(self, x: torch.Tensor, params: TransformParams) -> torch.Tensor:
        """Per-sample gamma correction, on each image's own intensity range.

        Each image (all its channels together) is min-max rescaled to [0, 1], raised to its ``gamma`` and
        mapped back to ``[min, max]``: the range is kept, intensities above 1 or below 0 (percentile
        normalisation can produce both) stay finite, and a constant image is returned unchanged.  Computed in
        at least fp32, returned in ``x.dtype``; the gradient is finite everywhere (0 at the image minimum).

        Raises:
            ValueError: when ``x`` is not a floating-point ``B,C,H,W`` tensor or the batch sizes differ.
        """
        self._check_input(x, params, "x")
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        low = work.amin(dim=(1, 2, 3), keepdim=True)
        span = work.amax(dim=(1, 2, 3), keepdim=True) - low
        unit = (work - low) / span.clamp_min(torch.finfo(work.dtype).tiny)
        gamma = params.gamma.to(device=x.device, dtype=work.dtype).view(-1, 1, 1, 1)
        safe = unit.clamp_min(torch.finfo(work.dtype).tiny)  # keeps d(u^g)/du finite for g < 1
        powered = torch.where(unit > 0, safe.pow(gamma), torch.zeros_like(unit))
        return (low + span * powered).to(x.dtype)

    def apply_image(self, x: torch.Tensor, params: TransformParams) -> tuple[torch.Tensor, torch.Tensor]:
        """``T`` for raw images: :meth:`apply_gamma`, then :meth:`apply` (constructor's mode).

        Returns:
            ``(y, valid)`` as :meth:`apply`.

        Raises:
            ValueError: as :meth:`apply`.
        """
        return self.apply(self.apply_gamma(x, params), params)
