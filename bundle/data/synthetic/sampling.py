"""Everything random about one synthetic patient, drawn from a generator: ACDC group, grid, pose, anatomy, contrast.

The first stage of :mod:`bundle.data.synthetic`: :func:`sample_patient` returns the :class:`PatientParameters` that
:mod:`bundle.data.synthetic.rendering` turns into images and label maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GROUPS", "PatientParameters", "patient_name", "sample_patient"]

GROUPS: tuple[str, ...] = ("NOR", "DCM", "HCM", "MINF", "RV")
"""ACDC pathology groups; patient ``i`` (1-based) belongs to ``GROUPS[(i - 1) % 5]``."""


def patient_name(index: int) -> str:
    """ACDC folder / file stem of the 1-based patient ``index``: ``patient_name(7) == "patient007"``."""
    return f"patient{index:03d}"


@dataclass(frozen=True)
class PatientParameters:
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


def sample_patient(index: int, rng: np.random.Generator) -> PatientParameters:
    """Draw the parameters of the 1-based patient ``index`` from ``rng``; its ACDC group follows from ``index``."""
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
    return PatientParameters(
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

