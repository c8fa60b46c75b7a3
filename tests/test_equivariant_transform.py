"""Tests of bundle.transforms.equivariant: geometry checked against hand-built expectations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bundle.transforms import EquivariantTransform, TransformParams


def make_params(
    batch: int = 1,
    scale: float = 1.0,
    rotation: float = 0.0,
    tx: float = 0.0,
    ty: float = 0.0,
    flip_x: bool = False,
    flip_y: bool = False,
    gamma: float = 1.0,
) -> TransformParams:
    """The same hand-chosen parameters for every sample of a batch."""
    return TransformParams(
        scale=torch.full((batch,), scale),
        rotation=torch.full((batch,), rotation),
        translation=torch.tensor([[tx, ty]]).repeat(batch, 1),
        flip=torch.tensor([[flip_x, flip_y]]).repeat(batch, 1),
        gamma=torch.full((batch,), gamma),
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blob(height: int, width: int, centre: tuple[float, float], sigma: float = 1.5) -> torch.Tensor:
    """1,1,H,W Gaussian at ``centre`` = (x, y) in pixels relative to the image centre."""
    ys = torch.arange(height, dtype=torch.float64) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    g = torch.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))
    return g.float()[None, None]


def centroid(img: torch.Tensor) -> tuple[float, float]:
    """(x, y) intensity centroid of a H,W map, pixels relative to the image centre."""
    height, width = img.shape
    ys = torch.arange(height, dtype=torch.float64) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    w = img.double()
    return float((w.sum(0) * xs).sum() / w.sum()), float((w.sum(1) * ys).sum() / w.sum())


# ---------------------------------------------------------------- known geometric maps


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_identity_reproduces_input_and_full_mask(mode: str) -> None:
    x = torch.rand(2, 3, 9, 13, generator=seeded(0))
    y, valid = EquivariantTransform(mode=mode).apply(x, make_params(2))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    assert valid.shape == (2, 1, 9, 13) and bool((valid == 1).all())


def test_flips_equal_torch_flip() -> None:
    t = EquivariantTransform()
    x = torch.rand(2, 2, 7, 10, generator=seeded(1))
    for flip_x, flip_y, dims in [(True, False, (-1,)), (False, True, (-2,)), (True, True, (-2, -1))]:
        y, valid = t.apply(x, make_params(2, flip_x=flip_x, flip_y=flip_y))
        torch.testing.assert_close(y, torch.flip(x, dims), atol=1e-5, rtol=0)
        assert bool((valid == 1).all())


@pytest.mark.parametrize("angle,k,wrong_k", [(90.0, 1, -1), (-90.0, -1, 1), (180.0, 2, 0)])
def test_quarter_rotations_equal_rot90(angle: float, k: int, wrong_k: int) -> None:
    # convention: positive angle = counter-clockwise on screen = torch.rot90(x, 1, dims=(-2, -1))
    x = torch.rand(1, 2, 8, 8, generator=seeded(2))
    y, valid = EquivariantTransform().apply(x, make_params(rotation=angle))
    torch.testing.assert_close(y, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert bool((valid == 1).all())
    assert not torch.allclose(y, torch.rot90(x, wrong_k, dims=(-2, -1)), atol=1e-3)


def test_translation_shifts_pattern_and_mask() -> None:
    height, width = 12, 16
    x = torch.rand(1, 1, height, width, generator=seeded(3)) + 1.0
    # tx = 0.25 of 16 px -> 4 px right; ty = -1/6 of 12 px -> 2 px up
    y, valid = EquivariantTransform().apply(x, make_params(tx=0.25, ty=-1.0 / 6.0))
    expected = torch.zeros_like(x)
    expected[..., 0 : height - 2, 4:width] = x[..., 2:height, 0 : width - 4]
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    expected_valid = torch.zeros(1, 1, height, width)
    expected_valid[..., 0 : height - 2, 4:width] = 1.0
    assert torch.equal(valid, expected_valid)


@pytest.mark.parametrize(
    "scale,rotation,tx,ty,flip_x,flip_y",
    [(1.2, 30.0, 0.05, -0.1, True, False), (0.8, -40.0, -0.1, 0.08, False, True), (1.0, 90.0, 0.0, 0.0, False, False)],
)
def test_blob_lands_where_the_forward_map_says_non_square(
    scale: float, rotation: float, tx: float, ty: float, flip_x: bool, flip_y: bool
) -> None:
    """v = R(phi) * s * Flip * u + (tx W, ty H) in physical pixels (y down, CCW on screen), H != W."""
    height, width = 40, 56
    u = (6.0, -4.0)
    x = blob(height, width, u)
    y, _ = EquivariantTransform().apply(
        x, make_params(scale=scale, rotation=rotation, tx=tx, ty=ty, flip_x=flip_x, flip_y=flip_y)
    )
    fu = ((-1 if flip_x else 1) * u[0] * scale, (-1 if flip_y else 1) * u[1] * scale)
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    # counter-clockwise on screen with y pointing down: (1, 0) -> (cos, -sin)
    expected = (c * fu[0] + s * fu[1] + tx * width, -s * fu[0] + c * fu[1] + ty * height)
    got = centroid(y[0, 0])
    assert abs(got[0] - expected[0]) < 0.2 and abs(got[1] - expected[1]) < 0.2, (got, expected)


def test_parameters_apply_per_sample() -> None:
    x = blob(24, 24, (5.0, 0.0)).repeat(2, 1, 1, 1)
    params = TransformParams(
        scale=torch.ones(2),
        rotation=torch.tensor([90.0, 0.0]),
        translation=torch.zeros(2, 2),
        flip=torch.tensor([[False, False], [True, False]]),
        gamma=torch.ones(2),
    )
    y, _ = EquivariantTransform().apply(x, params)
    first, second = centroid(y[0, 0]), centroid(y[1, 0])
    assert abs(first[0]) < 0.05 and abs(first[1] + 5.0) < 0.05  # rotated up
    assert abs(second[0] + 5.0) < 0.05 and abs(second[1]) < 0.05  # mirrored left


# ---------------------------------------------------------------- equivariance and resolution independence


def test_pointwise_map_commutes_exactly_with_nearest() -> None:
    t = EquivariantTransform(mode="nearest")
    params = t.sample(3, generator=seeded(4))
    x = torch.randn(3, 2, 20, 24, generator=seeded(5))

    def s(v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(3.0 * v)

    t_of_s, valid = t.apply(s(x), params)
    s_of_t, _ = t.apply(x, params)
    s_of_t = s(s_of_t)
    inside = valid.expand_as(x).bool()
    assert 0 < int(inside.sum()) < inside.numel()
    assert torch.equal(t_of_s[inside], s_of_t[inside])
    assert not torch.allclose(t_of_s[~inside], s_of_t[~inside])  # outside, padding (0) != s(0) = 0.5


def test_affine_pointwise_map_commutes_with_bilinear() -> None:
    t = EquivariantTransform()
    params = t.sample(3, generator=seeded(6))
    x = torch.randn(3, 2, 20, 24, generator=seeded(7))
    weight = torch.randn(5, 2, 1, 1, generator=seeded(8))
    bias = torch.randn(5, generator=seeded(9))
    t_of_s, valid = t.apply(F.conv2d(x, weight, bias), params)
    s_of_t = F.conv2d(t.apply(x, params)[0], weight, bias)
    inside = valid.expand_as(t_of_s).bool()
    assert 0 < int(inside.sum()) < inside.numel()
    torch.testing.assert_close(t_of_s[inside], s_of_t[inside], atol=5e-4, rtol=0)


def test_same_params_align_image_and_pooled_feature_map() -> None:
    height, width = 48, 64
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    x = (torch.sin(2 * math.pi * xs / 60 + 0.3) * torch.cos(2 * math.pi * ys / 50) + 0.3 * ys / height)[None, None]
    x = x.repeat(4, 2, 1, 1)
    t = EquivariantTransform()
    params = t.sample(4, generator=seeded(10))
    full, full_valid = t.apply(x, params)
    coarse, coarse_valid = t.apply(F.avg_pool2d(x, 2), params)
    pooled = F.avg_pool2d(full, 2)
    inside = ((coarse_valid * -F.max_pool2d(-full_valid, 2)) > 0).expand_as(coarse)
    assert int(inside.sum()) > 0.4 * inside.numel()
    assert float((pooled - coarse)[inside].abs().max()) < 0.03
    # the mask at any resolution comes from the same parameters
    assert torch.equal(t.mask(params, (24, 32)), coarse_valid)


# ---------------------------------------------------------------- validity mask


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_mask_is_zero_exactly_where_padding_entered(mode: str) -> None:
    t = EquivariantTransform(mode=mode)
    params = t.sample(6, generator=seeded(11))
    y, valid = t.apply(torch.ones(6, 1, 23, 31), params)
    inside = valid.bool()
    assert 0 < int(inside.sum()) < inside.numel()
    if mode == "nearest":
        assert torch.equal(inside, y == 1.0)
    else:  # bilinear: padding weight <= 1e-4 px tolerance inside, > 1e-4 outside
        assert bool((y[inside] > 1 - 2e-4).all())
        assert bool((y[~inside] < 1 - 5e-5).all())


def test_mask_method_matches_apply_mask_at_other_sizes() -> None:
    t = EquivariantTransform()
    params = t.sample(2, generator=seeded(12))
    for size in [(14, 14), (7, 9)]:
        m = t.mask(params, size)
        _, valid = t.apply(torch.ones(2, 1, *size), params)
        assert m.shape == (2, 1, *size) and m.dtype == torch.float32
        assert torch.equal(m, valid)
    assert bool((t.mask(make_params(2), (5, 6)) == 1).all())


# ---------------------------------------------------------------- gamma


def test_gamma_known_values() -> None:
    t = EquivariantTransform()
    x = torch.tensor([[0.0, 0.25], [0.5, 1.0]])[None, None]
    out = t.apply_gamma(x, make_params(gamma=2.0))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0625], [0.25, 1.0]])[None, None])
    # range [2, 6]: 3 -> 2 + 4 * (1/4)^0.5 = 4; per-sample gamma
    x2 = torch.tensor([2.0, 3.0, 6.0, 5.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    params = TransformParams(
        scale=torch.ones(2),
        rotation=torch.zeros(2),
        translation=torch.zeros(2, 2),
        flip=torch.zeros(2, 2, dtype=torch.bool),
        gamma=torch.tensor([0.5, 2.0]),
    )
    out2 = t.apply_gamma(x2, params)
    torch.testing.assert_close(out2[0].flatten(), torch.tensor([2.0, 4.0, 6.0, 2.0 + 4.0 * 0.75**0.5]))
    torch.testing.assert_close(out2[1].flatten(), torch.tensor([2.0, 2.25, 6.0, 2.0 + 4.0 * 0.75**2]))


def test_gamma_constant_image_finite_and_gradient_finite() -> None:
    t = EquivariantTransform()
    x = torch.full((2, 1, 4, 5), 0.7)
    out = t.apply_gamma(x, make_params(2, gamma=0.5))
    assert torch.isfinite(out).all() and torch.allclose(out, x)
    z = torch.tensor([[0.0, 0.5], [1.0, 0.25]])[None, None].requires_grad_(True)
    t.apply_gamma(z, make_params(gamma=0.5)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_apply_image_is_gamma_then_geometry() -> None:
    t = EquivariantTransform()
    x = torch.rand(1, 1, 6, 7, generator=seeded(13))
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0
    y, valid = t.apply_image(x, make_params(flip_x=True, gamma=2.0))
    torch.testing.assert_close(y, torch.flip(x**2, (-1,)), atol=1e-5, rtol=0)
    assert bool((valid == 1).all())


# ---------------------------------------------------------------- randomness


def test_seeded_generator_reproducible_and_seeds_differ() -> None:
    t = EquivariantTransform()
    x = torch.rand(4, 1, 16, 16, generator=seeded(14))
    a, b, c = t.sample(4, generator=seeded(0)), t.sample(4, generator=seeded(0)), t.sample(4, generator=seeded(1))
    for name in ("scale", "rotation", "translation", "flip", "gamma"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(t.apply_image(x, a)[0], t.apply_image(x, b)[0])
    assert not torch.equal(a.scale, c.scale) and not torch.equal(a.rotation, c.rotation)
    assert not torch.equal(t.apply_image(x, a)[0], t.apply_image(x, c)[0])


def test_global_rng_state_untouched() -> None:
    t = EquivariantTransform()
    before = torch.get_rng_state()
    params = t.sample(3, generator=seeded(0))
    unseeded = t.sample(3)
    t.apply_image(torch.rand(3, 1, 8, 8, generator=seeded(1)), params)
    t.apply(torch.ones(3, 2, 4, 4), unseeded)
    assert torch.equal(before, torch.get_rng_state())


def test_sampled_ranges_per_sample() -> None:
    n = 4000
    params = EquivariantTransform().sample(n, generator=seeded(15))
    for values, low, high in [
        (params.scale, 0.8, 1.3),
        (params.rotation, -45.0, 45.0),
        (params.translation, -0.1, 0.1),
        (params.gamma, 0.5, 2.0),
    ]:
        assert float(values.min()) >= low and float(values.max()) <= high
        assert float(values.min()) < low + 0.01 * (high - low) and float(values.max()) > high - 0.01 * (high - low)
    assert abs(float(params.flip.float().mean()) - 0.5) < 0.05
    # x and y translations / flips are drawn independently
    assert not torch.equal(params.translation[:, 0], params.translation[:, 1])
    skewed = EquivariantTransform(flip_prob=(0.0, 1.0)).sample(50, generator=seeded(16))
    assert not bool(skewed.flip[:, 0].any()) and bool(skewed.flip[:, 1].all())


# ---------------------------------------------------------------- dtype, gradients


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype_with_fp32_grid(dtype: torch.dtype) -> None:
    t = EquivariantTransform()
    params = make_params(scale=1.1, rotation=23.0, tx=0.03)
    x = torch.rand(1, 2, 32, 96, generator=seeded(17)).to(dtype)
    y, valid = t.apply(x, params)
    assert y.dtype == dtype and valid.dtype == dtype
    reference, _ = t.apply(x.float(), params)  # the same values resampled in fp32
    torch.testing.assert_close(y.float(), reference, atol=1e-2, rtol=1e-2)


def test_gradient_flows_into_input() -> None:
    t = EquivariantTransform()
    x = torch.rand(2, 3, 5, 6, generator=seeded(18)).requires_grad_(True)
    w = torch.rand(2, 3, 5, 6, generator=seeded(19))
    y, _ = t.apply(x, make_params(2, flip_x=True))
    (y * w).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.flip(w, (-1,)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"scale_range": (1.3, 0.8)}, "scale_range"),
        ({"scale_range": (0.0, 1.0)}, "scale_range"),
        ({"scale_range": 1.0}, "scale_range"),
        ({"rotate_range": -5.0}, "rotate_range"),
        ({"rotate_range": (10.0, -10.0)}, "rotate_range"),
        ({"translate_range": (0.1, -0.1)}, "translate_range"),
        ({"translate_range": float("nan")}, "translate_range"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"flip_prob": (0.5, -0.1)}, "flip_prob"),
        ({"gamma_range": (-0.5, 2.0)}, "gamma_range"),
        ({"gamma_range": (2.0, 0.5)}, "gamma_range"),
        ({"mode": "bicubic"}, "mode"),
    ],
)
def test_bad_options_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        EquivariantTransform(**kwargs)


def test_bad_inputs_raise() -> None:
    t = EquivariantTransform()
    params = make_params(2)
    with pytest.raises(ValueError, match=r"batch size 3.*have 2"):
        t.apply(torch.rand(3, 1, 4, 4), params)
    with pytest.raises(ValueError, match=r"batch size 3.*have 2"):
        t.apply_image(torch.rand(3, 1, 4, 4), params)
    with pytest.raises(ValueError, match="B,C,H,W"):
        t.apply(torch.rand(2, 4, 4), params)
    with pytest.raises(ValueError, match="floating-point"):
        t.apply(torch.ones(2, 1, 4, 4, dtype=torch.long), params)
    with pytest.raises(ValueError, match="mode"):
        t.apply(torch.rand(2, 1, 4, 4), params, mode="area")
    with pytest.raises(ValueError, match="batch_size"):
        t.sample(0)
    with pytest.raises(ValueError, match="translation"):
        TransformParams(
            scale=torch.ones(2),
            rotation=torch.zeros(2),
            translation=torch.zeros(3, 2),
            flip=torch.zeros(2, 2, dtype=torch.bool),
            gamma=torch.ones(2),
        )
