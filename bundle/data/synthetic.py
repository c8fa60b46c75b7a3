"""Synthetic short-axis cine-MRI in the ACDC layout, generated deterministically from a seed.

The bundle's default dataset: it lets the main job run with no data given. Each patient is a stack of 2D
short-axis slices (slice axis last, slice 0 = base) at end-diastole (ED) and end-systole (ES) with labels in
the ACDC convention (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity, papillary muscles included in
the cavity), written the way ACDC ships them::

    <output>/patient001/Info.cfg
    <output>/patient001/patient001_frame01.nii.gz      (ED image, int16)
    <output>/patient001/patient001_frame01_gt.nii.gz   (ED labels, uint8)
    <output>/patient001/patient001_frameXX.nii.gz      (ES image; XX from Info.cfg)
    <output>/patient001/patient001_frameXX_gt.nii.gz
    <output>/manifest.json                             (generator, version, seed, count, file sizes)

The anatomy is a nested pair of perturbed half-ellipsoids for the LV (endo- and epicardium), an RV crescent
attached on the septal side that vanishes toward the apex, papillary muscles, and the thorax around it
(subcutaneous fat, chest-wall muscle, mediastinum, lungs with vessels, spine, descending aorta, liver, stomach,
basal great vessels, pericardial fat) whose intensities overlap the heart's. Acquisition effects: anisotropic
voxels, partial volume, blur, a smooth multiplicative bias field, Rician noise and a faint phase-encode ghost.
Every patient draws its own geometry, pose, contrast and ACDC group (NOR, DCM, HCM, MINF, RV) from a generator
seeded by ``(seed, patient index)``, so a patient does not depend on how many others are generated.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = [
    "GROUPS",
    "LABELS",
    "MANIFEST_NAME",
    "SYNTHETIC_VERSION",
    "TISSUES",
    "generate_patient",
    "generate_synthetic_acdc",
    "patient_name",
    "write_patient",
]

SYNTHETIC_VERSION = 1
"""Bumped whenever the generator's output changes; part of the manifest, so old folders are regenerated."""

MANIFEST_NAME = "manifest.json"

LABELS: dict[str, int] = {"background": 0, "rv": 1, "myocardium": 2, "lv": 3}
"""ACDC label convention."""

GROUPS: tuple[str, ...] = ("NOR", "DCM", "HCM", "MINF", "RV")
"""ACDC pathology groups; patient ``i`` (1-based) belongs to ``GROUPS[(i - 1) % 5]``."""

TISSUES: dict[str, int] = {
    "air": 0,
    "subcutaneous_fat": 1,
    "chest_wall": 2,
    "mediastinum": 3,
    "lung": 4,
    "spine": 5,
    "descending_aorta": 6,
    "liver": 7,
    "stomach": 8,
    "great_vessel": 9,
    "pericardial_fat": 10,
    "rv_wall": 11,
    "rv_blood": 12,
    "myocardium": 13,
    "lv_blood": 14,
    "papillary_muscle": 15,
}
"""Structure codes of the ``tissue_ed`` / ``tissue_es`` maps returned by :func:`generate_patient` (not written)."""

_PATIENT_DIR = re.compile(r"^patient\d{3,}$")
_PHASES = ("ed", "es")


def patient_name(index: int) -> str:
    """ACDC folder / file stem of the 1-based patient ``index``: ``patient_name(7) == "patient007"``."""
    return f"patient{index:03d}"


# ----------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class _Patient:
    """Everything random about one patient; drawn once, shared by the ED and ES frames."""

    group: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    nb_frame: int
    es_frame: int
    height: float
    weight: float
    t: np.ndarray  # (nz,) long-axis position of each slice, 0 = base, 1 = epicardial apex
    pose_angle: float  # in-plane rotation, patient frame -> image frame (radians)
    lv_center_mm: tuple[float, float]  # LV centre of the basal slice, image mm from the grid centre
    drift: tuple[float, float]  # LV axis drift over the long axis (patient frame, mm at t = 1)
    # LV
    r_endo: float
    wall: float
    endo_apex: float
    endo_coef: np.ndarray  # (2, K, 2): base / apex Fourier (amplitude, phase) of the endocardium
    epi_coef: np.ndarray
    wall_modulation: tuple[float, float, float]  # (amount, centre angle, half width) regional thickening/thinning
    infarct: tuple[float, float, float]  # (present, centre angle, half width): akinetic thin sector (MINF)
    lv_ef: float
    es_base_descent: float
    es_shift: tuple[float, float]
    papillary: tuple[float, float, float, float]  # (angle 1, angle 2, radius mm, depth fraction)
    # RV
    rv_angle: float
    rv_extent: float  # long-axis position where the RV ends
    rv_width: float  # crescent thickness at the base (mm)
    rv_overlap: float  # kappa: ellipse centre distance as a fraction of the epicardial radius
    rv_insertion: float  # half-angle of the crescent: where the RV free wall meets the LV (radians)
    rv_wall: float
    rv_ef: float
    rv_coef: np.ndarray
    # thorax (patient frame, mm, relative to the basal LV centre)
    body_center: tuple[float, float]
    body_axes: tuple[float, float]
    mediastinal_margin: float  # soft tissue between the heart and the lungs (mm)
    midline_offset: float
    midline_half_width: float  # posterior mediastinum between the lungs (mm)
    spine_radius: float
    fat_thickness: float
    muscle_thickness: float
    liver_start: float  # long-axis position where the liver dome enters the slices
    stomach: float  # 0: none in view; > 0.5: fluid-filled (bright), else gas-filled (dark)
    great_vessels: tuple[float, float, float]  # (extent in t, aorta radius, pulmonary radius)
    pericardial_fat: tuple[float, float]  # (largest thickness in mm, angle of the patches)
    # image formation
    intensity: dict[str, float]
    noise_sigma: float
    bias_strength: float
    blur_sigma: float
    ghost: float
    texture: float


def _fourier_coefficients(rng: np.random.Generator, orders: int, amplitude: float) -> np.ndarray:
    """(2, orders, 2) array: for base and apex, (amplitude, phase) of harmonics 1..orders (harmonic k ~ 1/k)."""
    coef = np.empty((2, orders, 2))
    for end in range(2):
        for k in range(orders):
            coef[end, k, 0] = rng.normal(0.0, amplitude / (k + 1)) if k > 0 else rng.normal(0.0, amplitude * 0.3)
            coef[end, k, 1] = rng.uniform(0.0, 2.0 * np.pi)
    return coef


def _sample_patient(index: int, rng: np.random.Generator) -> _Patient:
    group = GROUPS[(index - 1) % len(GROUPS)]
    u = rng.uniform

    nx = int(rng.integers(24, 33)) * 8  # 192..256
    ny = int(rng.integers(24, 33)) * 8
    pixel = round(float(np.clip(u(280.0, 360.0) / max(nx, ny), 1.3, 1.8)), 4)  # field of view ~280..360 mm
    slice_spacing = np.ceil(u(max(5.0, 3.0 * pixel), 10.0) * 2.0) / 2.0  # 5..10 mm, >= 3x the pixel size
    heart_length = u(75.0, 105.0)  # base to epicardial apex (mm)
    t_last = u(0.86, 0.95)
    nz = int(np.clip(round(heart_length * t_last / slice_spacing) + 1, 6, 16))
    t = np.linspace(0.0, t_last, nz)

    # group-specific cardiac shape and function
    r_endo, wall, lv_ef = u(22.0, 27.0), u(7.0, 10.0), u(0.55, 0.70)
    rv_width, rv_ef = u(22.0, 32.0), u(0.45, 0.62)
    wall_mod = (0.0, 0.0, 1.0)
    infarct = (0.0, 0.0, 1.0)
    if group == "DCM":
        r_endo, wall, lv_ef = u(29.0, 36.0), u(5.0, 7.5), u(0.12, 0.35)
        rv_ef = u(0.25, 0.5)
    elif group == "HCM":
        r_endo, wall, lv_ef = u(17.0, 22.0), u(12.0, 17.0), u(0.68, 0.82)
        wall_mod = (u(0.2, 0.5), 0.0, u(0.8, 1.4))  # septal hypertrophy (centre angle relative to the RV)
    elif group == "MINF":
        r_endo, wall, lv_ef = u(25.0, 32.0), u(7.0, 9.5), u(0.2, 0.42)
        infarct = (1.0, u(0.0, 2.0 * np.pi), u(0.5, 1.0))
    elif group == "RV":
        rv_width, rv_ef = u(34.0, 45.0), u(0.15, 0.38)

    rv_extent = u(0.62, min(0.8, t_last - 0.1))
    endo_apex = 1.0 - wall / heart_length * u(0.9, 1.3)
    theta_rv = np.deg2rad(u(135.0, 170.0))
    pm_angle = theta_rv + np.pi

    blood = u(250.0, 450.0)
    intensity = {
        "blood": blood,
        "rv_blood": blood * u(0.85, 1.05),
        "myocardium": blood * u(0.22, 0.45),
        "subcutaneous_fat": blood * u(0.75, 1.05),
        "pericardial_fat": blood * u(0.65, 1.0),
        "chest_wall": blood * u(0.18, 0.38),
        "mediastinum": blood * u(0.28, 0.5),
        "lung": blood * u(0.02, 0.07),
        "lung_vessel": blood * u(0.4, 0.8),
        "liver": blood * u(0.33, 0.6),
        "spine": blood * u(0.25, 0.5),
        "vessel": blood * u(0.85, 1.1),
        "stomach_fluid": blood * u(0.6, 1.0),
    }
    body_axes = (u(155.0, 190.0), u(105.0, 130.0))
    half_fov = 0.5 * pixel * np.array([nx, ny])
    lv_center = tuple(float(v) for v in rng.uniform(-0.12, 0.12, 2) * half_fov)
    nb_frame = int(rng.integers(25, 36))
    return _Patient(
        group=group,
        shape=(nx, ny, nz),
        spacing=(pixel, pixel, float(slice_spacing)),
        origin=tuple(float(round(v, 2)) for v in rng.uniform(-200.0, 50.0, 3)),
        nb_frame=nb_frame,
        es_frame=int(np.clip(round(nb_frame * u(0.30, 0.45)), 2, nb_frame)),
        height=round(u(150.0, 195.0), 0),
        weight=round(u(50.0, 110.0), 0),
        t=t,
        pose_angle=float(np.deg2rad(u(-40.0, 40.0))),
        lv_center_mm=lv_center,
        drift=(u(-10.0, 10.0), u(-10.0, 10.0)),
        r_endo=r_endo,
        wall=wall,
        endo_apex=endo_apex,
        endo_coef=_fourier_coefficients(rng, 4, 0.07),
        epi_coef=_fourier_coefficients(rng, 3, 0.04),
        wall_modulation=wall_mod,
        infarct=infarct,
        lv_ef=lv_ef,
        es_base_descent=u(0.03, 0.08),
        es_shift=(u(-3.0, 3.0), u(-3.0, 3.0)),
        papillary=(pm_angle + np.deg2rad(u(30.0, 55.0)), pm_angle - np.deg2rad(u(30.0, 55.0)), u(2.5, 4.5),
                   u(0.55, 0.75)),
        rv_angle=theta_rv,
        rv_extent=rv_extent,
        rv_width=rv_width,
        rv_overlap=u(0.35, 0.6),
        rv_insertion=np.deg2rad(u(65.0, 95.0)),
        rv_wall=u(2.0, 3.5),
        rv_ef=rv_ef,
        rv_coef=_fourier_coefficients(rng, 3, 0.06),
        body_center=(-u(15.0, 35.0), -u(10.0, 30.0)),
        body_axes=body_axes,
        mediastinal_margin=u(4.0, 16.0),
        midline_offset=u(-8.0, 8.0),
        midline_half_width=u(14.0, 26.0),
        spine_radius=u(14.0, 19.0),
        fat_thickness=u(5.0, 20.0),
        muscle_thickness=u(8.0, 16.0),
        liver_start=u(0.05, 0.55),
        stomach=u(0.0, 1.0) if u() < 0.6 else 0.0,
        great_vessels=(u(0.04, 0.2), u(11.0, 16.0), u(10.0, 14.0)),
        pericardial_fat=(u(3.0, 9.0), u(0.0, 2.0 * np.pi)),
        intensity=intensity,
        noise_sigma=blood * u(0.02, 0.06),
        bias_strength=u(0.08, 0.22),
        blur_sigma=u(0.6, 1.1),
        ghost=u(0.0, 0.04),
        texture=u(0.04, 0.1),
    )


# ------------------------------------------------------------------------------------------------ rendering


def _norm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sqrt(a² + b²); ``np.hypot`` is several times slower and its overflow care is not needed here."""
    return np.sqrt(a * a + b * b)


def _harmonics(du: np.ndarray, dv: np.ndarray, orders: int, rotate: float = 0.0) -> list[tuple[np.ndarray, ...]]:
    """[(cos kθ, sin kθ) for k = 1..orders], θ = atan2(dv, du) - rotate, by the angle-addition recurrence.

    Avoids ``arctan2``, which costs as much as the rest of the rendering together.
    """
    norm = _norm(du, dv) + np.float32(1e-6)
    c0, s0 = du / norm, dv / norm
    if rotate:
        cr, sr = np.float32(np.cos(rotate)), np.float32(np.sin(rotate))
        c0, s0 = c0 * cr + s0 * sr, s0 * cr - c0 * sr
    out = [(c0, s0)]
    for _ in range(orders - 1):
        c, s = out[-1]
        out.append((c * c0 - s * s0, s * c0 + c * s0))
    return out


def _cos_shift(harmonic: tuple[np.ndarray, ...], phase: float) -> np.ndarray:
    """cos(kθ - phase) from (cos kθ, sin kθ)."""
    return harmonic[0] * np.float32(np.cos(phase)) + harmonic[1] * np.float32(np.sin(phase))


def _perturbation(harmonics: list[tuple[np.ndarray, ...]], coef: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Relative radius change Σ_k a_k cos(kθ - φ_k); amplitudes interpolated linearly from base (t=0) to apex (t=1)."""
    w = t.astype(np.float32)[None, None, :]
    out = np.float32(0.0)
    for k in range(coef.shape[1]):
        amp = (1.0 - w) * np.float32(coef[0, k, 0]) + w * np.float32(coef[1, k, 0])
        out = out + amp * _cos_shift(harmonics[k], coef[0, k, 1])
    return out


def _ramp(signed_distance: np.ndarray, pixel: float) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre lies ``signed_distance`` mm outside an edge."""
    return np.clip(0.5 - signed_distance / np.float32(pixel), 0.0, 1.0)


def _ellipse_distance(u: np.ndarray, v: np.ndarray, a: Any, b: Any) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to the ellipse u²/a² + v²/b² = 1."""
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return (rho - 1.0) * np.minimum(a, b)


def _paint(image: np.ndarray, tissue: np.ndarray, distance: np.ndarray, value: Any, code: int, pixel: float) -> None:
    """Layer a structure (given by its signed distance) over the image and tissue map, in place."""
    frac = _ramp(distance, pixel)
    image += frac * (np.float32(value) - image)
    np.copyto(tissue, np.uint8(code), where=distance < 0)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: int, per_slice: bool) -> np.ndarray:
    """Zero-mean, unit-std smooth random field: Gaussian bumps on a ``cells`` x ``cells`` lattice."""
    nx, ny, nz = shape
    bases = []
    for n in (nx, ny):
        x = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
        c = np.linspace(-0.1, 1.1, cells, dtype=np.float32)[None, :]
        bases.append(np.exp(-(((x - c) * (cells - 1) / 1.2) ** 2)))
    coefficients = rng.standard_normal((cells, cells, nz if per_slice else 1)).astype(np.float32)
    if per_slice and nz > 1:  # correlate neighbouring slices
        coefficients = 0.7 * coefficients[:, :, :1] + 0.3 * coefficients
    field = np.einsum("ic,cdk,jd->ijk", bases[0], coefficients, bases[1], optimize=True)
    field = np.broadcast_to(field, shape).astype(np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _patient_grid(p: _Patient) -> tuple[np.ndarray, np.ndarray]:
    """Patient-frame coordinates (u toward patient left, v anterior; mm, origin at the basal LV centre)."""
    nx, ny, _ = p.shape
    x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2.0) * np.float32(p.spacing[0]) - np.float32(p.lv_center_mm[0])
    y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2.0) * np.float32(p.spacing[1]) - np.float32(p.lv_center_mm[1])
    c, s = np.float32(np.cos(p.pose_angle)), np.float32(np.sin(p.pose_angle))
    # at pose 0, array axis 0 runs anterior -> posterior and axis 1 right -> left (the usual short-axis view)
    u = s * x[:, None, None] + c * y[None, :, None]
    v = -c * x[:, None, None] + s * y[None, :, None]
    return u, v


def _lv_mean_radii(p: _Patient, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ED endo- and epicardial radii (mm) at long-axis positions ``t``: nested half-ellipsoids, base a bit narrower."""
    taper = 0.9 + 0.1 * np.clip(t / 0.25, 0.0, 1.0)
    endo = np.float32(p.r_endo) * np.sqrt(np.clip(1.0 - (t / np.float32(p.endo_apex)) ** 2, 0.0, None)) * taper
    epi = np.float32(p.r_endo + p.wall) * np.sqrt(np.clip(1.0 - t**2, 0.0, None)) * taper
    return endo, epi


def _rv_profile(p: _Patient, t: np.ndarray) -> np.ndarray:
    """1 at the base, falling to 0 where the RV ends (``rv_extent``)."""
    return np.sqrt(np.clip(1.0 - (t / np.float32(p.rv_extent)) ** 2, 0.0, None))


def _render_thorax(p: _Patient, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Everything outside the heart (identical in both frames): image and tissue map."""
    nx, ny, nz = p.shape
    pix = p.spacing[0]
    val = p.intensity
    t = p.t.astype(np.float32)[None, None, :]

    # in-plane layers, the same on every slice: body (subcutaneous fat), chest wall, thoracic cavity, spine, aorta
    image2d = np.zeros((nx, ny, 1), dtype=np.float32)
    tissue2d = np.zeros((nx, ny, 1), dtype=np.uint8)
    bu, bv = p.body_center
    a, b = p.body_axes
    du, dv = u - np.float32(bu), v - np.float32(bv)
    h = _harmonics(du, dv, 5)
    wobble = 1.0 + 0.035 * _cos_shift(h[1], -0.7) + 0.025 * _cos_shift(h[2], -bu) + 0.015 * _cos_shift(h[4], -bv)
    dv_back = np.where(dv < 0, dv * np.float32(1.12), dv)  # flatter back
    body = _ellipse_distance(du, dv_back, a * wobble, b * wobble)
    _paint(image2d, tissue2d, body, val["subcutaneous_fat"], TISSUES["subcutaneous_fat"], pix)
    f = p.fat_thickness
    fat = np.float32(f) * (1.0 + 0.45 * _cos_shift(h[0], np.pi / 2 + bu / 40.0) + 0.2 * _cos_shift(h[1], bv))
    _paint(image2d, tissue2d, body + fat, val["chest_wall"], TISSUES["chest_wall"], pix)
    muscle = np.float32(p.muscle_thickness) * (1.0 + 0.3 * _cos_shift(h[2], bu - bv))
    cavity = body + fat + muscle
    _paint(image2d, tissue2d, cavity, val["mediastinum"], TISSUES["mediastinum"], pix)
    spine_r = np.float32(p.spine_radius)
    su, sv = du - np.float32(p.midline_offset), dv + np.float32(b * 0.88 - p.fat_thickness - p.muscle_thickness)
    spine = _norm(su, sv) - spine_r
    _paint(image2d, tissue2d, spine, val["chest_wall"] * 0.6, TISSUES["spine"], pix)  # cortex
    _paint(image2d, tissue2d, spine + 2.5, val["spine"], TISSUES["spine"], pix)  # marrow
    ao_r = np.float32(p.great_vessels[1] * 0.8)
    aorta = _norm(su - (spine_r + ao_r) * 0.75, sv - (spine_r + ao_r) * 0.85) - ao_r
    _paint(image2d, tissue2d, aorta, val["vessel"], TISSUES["descending_aorta"], pix)
    image = np.repeat(image2d, nz, axis=2)
    tissue = np.repeat(tissue2d, nz, axis=2)

    # lungs fill the thoracic cavity except the heart's mediastinal zone and the posterior midline strip
    # (spine, aorta, oesophagus); toward the apex the liver and stomach come up through the diaphragm
    _, r_epi = _lv_mean_radii(p, t)
    rv_width = np.float32(p.rv_width) * _rv_profile(p, t)
    cu = np.float32(p.drift[0]) * t + np.float32(np.cos(p.rv_angle)) * 0.45 * rv_width
    cv = np.float32(p.drift[1]) * t + np.float32(np.sin(p.rv_angle)) * 0.45 * rv_width
    zu, zv = u - cu, v - cv
    h = _harmonics(zu, zv, 3)
    zone_radius = (r_epi + 0.6 * rv_width + np.float32(p.mediastinal_margin)) * (
        1.0 + 0.08 * _cos_shift(h[1], -p.pose_angle) + 0.05 * _cos_shift(h[2], -1.0))
    zone = _norm(zu, zv) - zone_radius
    taper = np.clip(0.5 - 0.6 * dv / np.float32(b), 0.4, 1.0)  # the posterior mediastinum widens toward the spine
    strip = np.maximum(np.abs(du - np.float32(p.midline_offset)) - np.float32(p.midline_half_width) * taper,
                       v + r_epi * 0.5)
    outside = np.maximum(np.maximum(cavity + np.float32(3.0), -spine - 4.0), -aorta - 3.0)  # in-plane part
    _paint(image, tissue, np.maximum(np.maximum(outside, -zone), -strip), val["lung"], TISSUES["lung"], pix)
    spots = rng.integers(0, image.size, size=image.size // 250)  # small vessels: bright dots in the lungs
    spots = spots[tissue.ravel()[spots] == TISSUES["lung"]]
    image.ravel()[spots] = np.float32(val["lung_vessel"])

    # liver (right) and stomach (left): domes growing from the cavity wall, on the apical slices only
    ca, cb = a - f - p.muscle_thickness, b - f - p.muscle_thickness
    for start, code, centre, size, order, amount in (
        (p.liver_start, TISSUES["liver"], (-0.85, -0.45), 0.9, 3, 0.08),
        (p.liver_start + 0.15, TISSUES["stomach"], (0.8, -0.5), 0.5, 2, 0.1),
    ):
        ks = np.flatnonzero(p.t > start)
        if ks.size == 0 or (code == TISSUES["stomach"] and p.stomach == 0):
            continue
        sl = np.s_[:, :, ks[0]:]
        grow = np.clip((t[sl] - np.float32(start)) / 0.5, 0.0, 1.0)
        gu, gv = du - np.float32(centre[0] * ca), dv - np.float32(centre[1] * cb)
        dome = _norm(gu, gv) * (1.0 + amount * _harmonics(gu, gv, order)[-1][0]) - grow * np.float32(size * ca)
        if code == TISSUES["liver"]:
            value, dist = val["liver"], np.maximum(dome, cavity)
        else:
            value, dist = (val["stomach_fluid"] if p.stomach > 0.5 else val["lung"]), np.maximum(dome, cavity + 2.0)
        _paint(image[sl], tissue[sl], dist, value, code, pix)
    return image, tissue


def _heart_box(p: _Patient, cu: np.ndarray, cv: np.ndarray, reach: float) -> tuple[slice, slice] | None:
    """Index box of the in-plane grid within ``reach`` mm of the LV axis points (cu, cv) (inverse of _patient_grid)."""
    c, s = np.cos(p.pose_angle), np.sin(p.pose_angle)
    x = s * cu - c * cv + p.lv_center_mm[0]
    y = c * cu + s * cv + p.lv_center_mm[1]
    box = []
    for centre, n in ((x, p.shape[0]), (y, p.shape[1])):
        lo = int(np.floor((centre.min() - reach) / p.spacing[0] + (n - 1) / 2.0))
        hi = int(np.ceil((centre.max() + reach) / p.spacing[0] + (n - 1) / 2.0)) + 1
        lo, hi = max(lo, 0), min(hi, n)
        if lo >= hi:
            return None
        box.append(slice(lo, hi))
    return box[0], box[1]


def _render_heart(p: _Patient, u: np.ndarray, v: np.ndarray, image: np.ndarray, tissue: np.ndarray, phase: str
                  ) -> np.ndarray:
    """Paint the heart of one phase over the thorax (in place); returns the ACDC label map."""
    pix = p.spacing[0]
    val = p.intensity
    es = phase == "es"
    t_slice = p.t.astype(np.float32)
    t = np.clip((t_slice - p.es_base_descent) / (1.0 - p.es_base_descent), 0.0, None) if es else t_slice
    t3 = t[None, None, :]

    # per-slice geometry (shape 1,1,Z): LV axis drifts along the long axis and moves a little between phases
    cu = np.float32(p.drift[0]) * t3 + np.float32(p.es_shift[0] if es else 0.0)
    cv = np.float32(p.drift[1]) * t3 + np.float32(p.es_shift[1] if es else 0.0)
    r_endo_mean, r_epi_mean = _lv_mean_radii(p, t3)
    wall = r_epi_mean - r_endo_mean
    # RV crescent: an ellipse centred toward the RV direction, minus the LV epicardium; vanishes at rv_extent
    profile = _rv_profile(p, t3)
    width = np.float32(p.rv_width) * profile * np.float32(np.sqrt(1.0 - p.rv_ef) if es else 1.0)
    r_ref = r_epi_mean * (np.float32(np.sqrt(1.0 - p.lv_ef)) * 0.35 + 0.65 if es else 1.0)
    kappa = np.float32(p.rv_overlap) * profile
    centre_dist = kappa * r_ref
    radial = r_ref * (1.0 - kappa) + width + np.float32(1e-3)
    # tangential semi-axis such that the ellipse meets the LV circle at +-rv_insertion (a circle when width = 0)
    ca_, sa_ = np.float32(np.cos(p.rv_insertion)), np.float32(np.sin(p.rv_insertion))
    tangential = r_ref * sa_ / np.sqrt(np.clip(1.0 - ((r_ref * ca_ - centre_dist) / radial) ** 2, 1e-4, None))
    tangential = tangential + np.float32(1e-3)
    extent, ao_r, pa_r = p.great_vessels
    vessels = ((p.rv_angle - 1.1, ao_r, 1.0), (p.rv_angle + 0.6, pa_r, 1.25))

    # work inside a box around the heart: bound every structure's reach from the LV axis
    bound = lambda coef: 1.0 + float(np.abs(coef[:, :, 0]).sum(axis=1).max())  # noqa: E731
    lv_reach = r_endo_mean * bound(p.endo_coef) + wall * (1.0 + p.wall_modulation[0]) * bound(p.epi_coef)
    rv_reach = centre_dist + np.maximum(radial, tangential) * bound(p.rv_coef) + p.rv_wall
    vessel_reach = max(r_epi_mean.max() * dist + 2.0 * radius for _, radius, dist in vessels)
    reach = float(max(lv_reach.max(), rv_reach.max(), vessel_reach)) + p.pericardial_fat[0] + 3.0 * pix
    label = np.zeros(p.shape, dtype=np.uint8)
    box = _heart_box(p, cu.ravel(), cv.ravel(), reach)
    if box is None:
        return label
    u, v, image, tissue = u[box], v[box], image[box], tissue[box]

    hu, hv = u - cu, v - cv
    r = _norm(hu, hv)
    h = _harmonics(hu, hv, 4, rotate=p.rv_angle)  # θ = 0 toward the RV (septum)

    # ED radii, then systolic contraction with conserved wall area (the wall thickens)
    wall_factor = np.float32(1.0)
    amount, centre, half = p.wall_modulation
    if amount > 0:  # regional (septal) hypertrophy
        wall_factor = 1.0 + np.float32(amount) * np.exp((_cos_shift(h[0], centre) - 1.0) * np.float32(2.0 / half**2))
    infarct = np.float32(0.0)
    present, centre, half = p.infarct
    if present > 0:  # thinned, akinetic sector
        infarct = np.exp((_cos_shift(h[0], centre) - 1.0) * np.float32(2.0 / half**2))
        wall_factor = wall_factor * (1.0 - 0.4 * infarct)
    r_endo_ed = r_endo_mean * (1.0 + _perturbation(h, p.endo_coef, t))
    r_epi_ed = r_endo_ed + wall * wall_factor * (1.0 + _perturbation(h, p.epi_coef, t))
    if es:
        k = np.float32(np.sqrt(1.0 - p.lv_ef))
        r_endo = r_endo_ed * (k + (1.0 - k) * infarct)
        r_epi = np.sqrt(r_endo**2 + (r_epi_ed**2 - r_endo_ed**2) * np.float32(1.06))
    else:
        r_endo, r_epi = r_endo_ed, r_epi_ed

    # t grows along the slices, so the RV and the great vessels occupy the first slices, the papillary muscles a
    # middle range: compute them there only
    m_rv = int(np.count_nonzero(profile > 0.05))
    rv = np.s_[:, :, :m_rv]
    ct, st = np.float32(np.cos(p.rv_angle)), np.float32(np.sin(p.rv_angle))
    ru = ct * hu[rv] + st * hv[rv] - centre_dist[rv]  # along the RV direction
    rt = -st * hu[rv] + ct * hv[rv]
    h_rv = _harmonics(ru / radial[rv], rt / tangential[rv], 3)
    rv_scale = 1.0 + _perturbation(h_rv, p.rv_coef, t[:m_rv])
    rv_cavity = _ellipse_distance(ru, rt, radial[rv] * rv_scale, tangential[rv] * rv_scale)
    rv_outer = rv_cavity - np.float32(p.rv_wall)

    # basal great vessels (aortic root, pulmonary trunk) and patchy pericardial fat, under the heart
    gv = np.s_[:, :, : int(np.count_nonzero(t < extent))]
    for angle, radius, dist in vessels:
        vu = hu[gv] - np.float32(np.cos(angle) * dist) * r_epi_mean[gv] - np.float32(np.cos(angle) * radius)
        vv = hv[gv] - np.float32(np.sin(angle) * dist) * r_epi_mean[gv] - np.float32(np.sin(angle) * radius)
        _paint(image[gv], tissue[gv], _norm(vu, vv) - np.float32(radius), val["vessel"], TISSUES["great_vessel"], pix)
    thickness, angle = p.pericardial_fat
    fat = r - r_epi - np.float32(thickness) * np.clip(_cos_shift(h[1], -angle), 0.0, None) ** 2
    rv_patches = np.float32(thickness) * np.clip(_cos_shift(h_rv[2], angle), 0.0, None) ** 2
    fat[rv] = np.minimum(fat[rv], rv_outer - rv_patches)
    _paint(image, tissue, fat, val["pericardial_fat"], TISSUES["pericardial_fat"], pix)

    epi = r - r_epi
    endo = r - r_endo
    _paint(image[rv], tissue[rv], np.maximum(rv_outer, -epi[rv]), val["myocardium"], TISSUES["rv_wall"], pix)
    _paint(image[rv], tissue[rv], np.maximum(rv_cavity, -epi[rv]), val["rv_blood"], TISSUES["rv_blood"], pix)
    _paint(image, tissue, epi, val["myocardium"], TISSUES["myocardium"], pix)
    _paint(image, tissue, endo, val["blood"], TISSUES["lv_blood"], pix)

    # papillary muscles: dark spots inside the cavity (labelled as cavity, as in ACDC), mid-ventricle, bigger at ES
    a1, a2, pm_r, depth = p.papillary
    pm_profile = np.exp(-(((t - 0.5) / 0.22) ** 2))
    ks = np.flatnonzero(pm_profile > 0.05)
    if ks.size:
        pm = np.s_[:, :, ks[0]: ks[-1] + 1]
        pm_radius = np.float32(pm_r * (1.3 if es else 1.0)) * pm_profile[None, None, ks[0]: ks[-1] + 1]
        pm_dist = np.float32(depth * (0.85 * np.sqrt(1.0 - p.lv_ef) if es else 1.0)) * r_endo_mean[pm]
        for angle in (a1, a2):
            pu = hu[pm] - np.float32(np.cos(angle)) * pm_dist
            pv = hv[pm] - np.float32(np.sin(angle)) * pm_dist
            d = np.maximum(_norm(pu, pv) - pm_radius, endo[pm] + 1.0)
            _paint(image[pm], tissue[pm], d, val["myocardium"] * 1.1, TISSUES["papillary_muscle"], pix)

    inner = label[box]
    inner[rv][(rv_cavity < 0) & (epi[rv] >= 0)] = LABELS["rv"]
    inner[epi < 0] = LABELS["myocardium"]
    inner[endo < 0] = LABELS["lv"]
    return label


def _acquire(p: _Patient, clean: np.ndarray, gain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth gain (tissue texture x coil bias), in-plane blur, ghost and Rician noise -> int16 magnitude image."""
    image = gaussian_filter(clean * gain, sigma=(p.blur_sigma, p.blur_sigma, 0.0), mode="nearest")
    if p.ghost > 0:  # phase-encode ghost along axis 1
        image += np.float32(p.ghost) * np.roll(image, p.shape[1] // 2, axis=1)
    noise = rng.standard_normal((2, *p.shape), dtype=np.float32) * np.float32(p.noise_sigma)
    magnitude = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return np.clip(np.rint(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16)


def generate_patient(index: int, seed: int = 0) -> dict[str, Any]:
    """Generate one synthetic patient (ED and ES frames) in memory.

    The result depends only on ``(seed, index)``: patient 7 is the same whether 7 or 100 patients are made.

    Args:
        index: 1-based patient number (``patient{index:03d}`` on disk).
        seed: dataset seed (non-negative integer).

    Returns:
        dict with ``name`` (``"patient007"``), ``image_ed``/``image_es`` (int16, X,Y,Z), ``label_ed``/``label_es``
        (uint8, X,Y,Z, values in :data:`LABELS`), ``tissue_ed``/``tissue_es`` (uint8 structure codes of
        :data:`TISSUES`, for inspection), ``spacing`` (mm, X,Y,Z), ``affine`` (4x4, diagonal spacing plus
        origin), ``ed_frame``/``es_frame`` (1-based frame numbers) and ``info`` (the ``Info.cfg`` fields:
        ED, ES, Group, Height, NbFrame, Weight). Slice 0 is the base, the last slice is near the apex.

    Raises:
        ValueError: if ``index`` < 1 or ``seed`` < 0 or either is not an integer.

    Example:
        >>> patient = generate_patient(7, seed=0)
        >>> patient["image_ed"].shape == patient["label_ed"].shape
        True
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 1:
        raise ValueError(f"index must be a positive integer (1-based patient number), got {index!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    anatomy_ss, thorax_ss, ed_ss, es_ss = np.random.SeedSequence([int(seed), int(index)]).spawn(4)
    p = _sample_patient(int(index), np.random.default_rng(anatomy_ss))
    thorax_rng = np.random.default_rng(thorax_ss)
    u, v = _patient_grid(p)
    thorax_image, thorax_tissue = _render_thorax(p, u, v, thorax_rng)
    bias = np.exp(np.float32(p.bias_strength) * _smooth_field(thorax_rng, p.shape, 4, per_slice=True))
    texture = _smooth_field(thorax_rng, p.shape, 14, per_slice=True)
    gain = bias * (1.0 + np.float32(p.texture) * texture)  # the bias is smooth: applying it before the blur is fine

    affine = np.diag([*p.spacing, 1.0])
    affine[:3, 3] = p.origin
    out: dict[str, Any] = {
        "name": patient_name(int(index)),
        "spacing": p.spacing,
        "affine": affine,
        "ed_frame": 1,
        "es_frame": p.es_frame,
        "info": {"ED": 1, "ES": p.es_frame, "Group": p.group, "Height": p.height, "NbFrame": p.nb_frame,
                 "Weight": p.weight},
    }
    for phase, ss in zip(_PHASES, (ed_ss, es_ss), strict=True):
        image, tissue = thorax_image.copy(), thorax_tissue.copy()
        label = _render_heart(p, u, v, image, tissue, phase)
        out[f"image_{phase}"] = _acquire(p, image, gain, np.random.default_rng(ss))
        out[f"label_{phase}"] = label
        out[f"tissue_{phase}"] = tissue
    return out


# ------------------------------------------------------------------------------------------------- writing


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 without a gzip timestamp, so equal arrays give byte-identical files."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    # run-length deflate: ~1.5x faster than the default strategy on noisy magnitudes, smaller on label maps;
    # zlib's gzip wrapper (wbits 31) writes no timestamp
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
    return compressor.compress(image.to_bytes()) + compressor.flush()


def _info_cfg(info: dict[str, Any]) -> str:
    return "".join(
        f"{key}: {info[key]}\n" if key in ("ED", "ES", "Group", "NbFrame") else f"{key}: {float(info[key]):.1f}\n"
        for key in ("ED", "ES", "Group", "Height", "NbFrame", "Weight")
    )


def write_patient(patient: dict[str, Any], folder: str | os.PathLike) -> list[Path]:
    """Write one :func:`generate_patient` result in ACDC layout into ``folder/<name>/``; returns the files written.

    Raises:
        KeyError: if ``patient`` lacks one of the keys :func:`generate_patient` returns.
    """
    missing = [k for k in ("name", "affine", "info", "ed_frame", "es_frame", "image_ed", "label_ed", "image_es",
                           "label_es") if k not in patient]
    if missing:
        raise KeyError(f"patient dict lacks {missing}; expected the output of generate_patient().")
    name = patient["name"]
    target = Path(folder) / name
    target.mkdir(parents=True, exist_ok=True)
    written = []
    cfg = target / "Info.cfg"
    cfg.write_text(_info_cfg(patient["info"]))
    written.append(cfg)
    for phase in _PHASES:
        frame = patient[f"{phase}_frame"]
        for suffix, key in (("", "image"), ("_gt", "label")):
            path = target / f"{name}_frame{frame:02d}{suffix}.nii.gz"
            path.write_bytes(_nifti_bytes(patient[f"{key}_{phase}"], patient["affine"]))
            written.append(path)
    return written


def _manifest_header(num_patients: int, seed: int) -> dict[str, Any]:
    return {"generator": __name__, "version": SYNTHETIC_VERSION, "seed": int(seed), "num_patients": int(num_patients)}


def _folder_state(folder: Path, num_patients: int, seed: int) -> str:
    """Classify ``folder``: 'missing', 'empty', 'complete' (manifest matches, every listed file there with its size),
    'stale' (complete, same parameters, older generator version), 'other' (complete, other seed or count),
    'partial' (only generator output, incomplete) or 'foreign' (incomplete, holds other files)."""
    if not folder.exists():
        return "missing"
    entries = list(folder.iterdir())
    if not entries:
        return "empty"
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        header = {k: manifest[k] for k in ("generator", "version", "seed", "num_patients")}
        files = manifest["files"]
        complete = header["generator"] == __name__ and isinstance(files, dict) and len(files) > 0 and all(
            (folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        complete = False
    if complete:
        wanted = _manifest_header(num_patients, seed)
        if header == wanted:
            return "complete"
        return "stale" if {**header, "version": wanted["version"]} == wanted else "other"
    if any(e.name != MANIFEST_NAME and not (e.is_dir() and _PATIENT_DIR.match(e.name)) for e in entries):
        return "foreign"
    return "partial"


def _write_one(index: int, seed: int, folder: str) -> dict[str, int]:
    """Generate and write patient ``index``; returns {relative path: size} (a process-pool task)."""
    root = Path(folder)
    return {path.relative_to(root).as_posix(): path.stat().st_size
            for path in write_patient(generate_patient(index, seed), root)}


def _default_workers(num_patients: int) -> int:
    if num_patients < 8:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 4))


def generate_synthetic_acdc(
    output_dir: str | os.PathLike,
    num_patients: int = 100,
    seed: int = 0,
    overwrite: bool = False,
    num_workers: int | None = None,
) -> Path:
    """Write ``num_patients`` synthetic patients (``patient001`` ...) in ACDC layout into ``output_dir``.

    Idempotent: a folder that already holds a complete dataset written with the same ``num_patients``, ``seed``
    and generator version (checked against its ``manifest.json``: parameters, every file present with its
    recorded size) is returned untouched. A partial folder (interrupted copy, missing or truncated files, no
    manifest) or one written by an older generator version is regenerated. The dataset is written into a hidden
    temporary sibling and renamed into place at the end, so ``output_dir`` never holds a half-written dataset.

    Args:
        output_dir: dataset folder (created; its parent must be writable).
        num_patients: number of patients (>= 1).
        seed: dataset seed (>= 0); patient ``i`` is :func:`generate_patient` ``(i, seed)``.
        overwrite: regenerate even if a complete dataset is there, and replace a folder that holds a dataset
            with other parameters or unrelated files (which is refused otherwise).
        num_workers: processes that generate patients in parallel (output is identical for any value); None:
            1 below 8 patients, else the usable CPUs up to 4.

    Returns:
        ``Path(output_dir)``.

    Raises:
        ValueError: if ``num_patients`` < 1, ``seed`` < 0 or ``num_workers`` < 1.
        FileExistsError: if ``output_dir`` is a file, holds unrelated files, or holds a synthetic dataset with
            other parameters, and ``overwrite`` is False.

    Example:
        >>> root = generate_synthetic_acdc("data/synthetic_acdc", num_patients=4, seed=0)  # doctest: +SKIP
        >>> sorted(p.name for p in (root / "patient001").iterdir())[0]  # doctest: +SKIP
        'Info.cfg'
    """
    if isinstance(num_patients, bool) or not isinstance(num_patients, (int, np.integer)) or num_patients < 1:
        raise ValueError(f"num_patients must be a positive integer, got {num_patients!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer))
                                    or num_workers < 1):
        raise ValueError(f"num_workers must be a positive integer or None, got {num_workers!r}.")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {str(out)!r} exists and is not a directory.")
    state = _folder_state(out, int(num_patients), int(seed))
    if not overwrite:
        if state == "complete":
            return out
        if state == "other":
            raise FileExistsError(
                f"{str(out)!r} holds a synthetic dataset made with other parameters (see its {MANIFEST_NAME}); "
                f"pass overwrite=True to replace it with num_patients={num_patients}, seed={seed}."
            )
        if state == "foreign":
            raise FileExistsError(
                f"{str(out)!r} holds files that are not part of a synthetic ACDC dataset; refusing to replace it "
                "(pass overwrite=True, or choose an empty folder)."
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        indices = range(1, int(num_patients) + 1)
        workers = _default_workers(int(num_patients)) if num_workers is None else int(num_workers)
        files: dict[str, int] = {}
        if workers == 1:
            for index in indices:
                files.update(_write_one(index, int(seed), str(staging)))
        else:  # spawn: no fork of a parent that may hold threads (torch, BLAS)
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for written in pool.map(_write_one, indices, repeat(int(seed)), repeat(str(staging))):
                    files.update(written)
        manifest = {**_manifest_header(int(num_patients), int(seed)), "files": files}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
