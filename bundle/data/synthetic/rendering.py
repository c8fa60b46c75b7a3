"""Images and label maps of one synthetic patient, rendered from its sampled parameters.

The second stage of :mod:`bundle.data.synthetic`: the thorax (identical in both frames), the heart of each phase
(ED, ES) painted over it with its ACDC label map, then the acquisition (gain, blur, ghost, Rician noise).
:func:`generate_patient` runs sampling and rendering for one patient, in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from bundle.data.synthetic.sampling import PatientParameters, patient_name, sample_patient

__all__ = ["LABELS", "PHASES", "TISSUES", "generate_patient"]

LABELS: dict[str, int] = {"background": 0, "rv": 1, "myocardium": 2, "lv": 3}
"""ACDC label convention."""

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

PHASES: tuple[str, ...] = ("ed", "es")
"""The frames of each patient, in order: end-diastole, end-systole (the ``_ed`` / ``_es`` keys of a patient)."""


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


def _patient_grid(p: PatientParameters) -> tuple[np.ndarray, np.ndarray]:
    """Patient-frame coordinates (u toward patient left, v anterior; mm, origin at the basal LV centre)."""
    nx, ny, _ = p.shape
    x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2.0) * np.float32(p.spacing[0]) - np.float32(p.lv_center_mm[0])
    y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2.0) * np.float32(p.spacing[1]) - np.float32(p.lv_center_mm[1])
    c, s = np.float32(np.cos(p.pose_angle)), np.float32(np.sin(p.pose_angle))
    # at pose 0, array axis 0 runs anterior -> posterior and axis 1 right -> left (the usual short-axis view)
    u = s * x[:, None, None] + c * y[None, :, None]
    v = -c * x[:, None, None] + s * y[None, :, None]
    return u, v


def _lv_mean_radii(p: PatientParameters, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ED endo- and epicardial radii (mm) at long-axis positions ``t``: nested half-ellipsoids, base a bit narrower."""
    taper = 0.9 + 0.1 * np.clip(t / 0.25, 0.0, 1.0)
    endo = np.float32(p.r_endo) * np.sqrt(np.clip(1.0 - (t / np.float32(p.endo_apex)) ** 2, 0.0, None)) * taper
    epi = np.float32(p.r_endo + p.wall) * np.sqrt(np.clip(1.0 - t**2, 0.0, None)) * taper
    return endo, epi


def _rv_profile(p: PatientParameters, t: np.ndarray) -> np.ndarray:
    """1 at the base, falling to 0 where the RV ends (``rv_extent``)."""
    return np.sqrt(np.clip(1.0 - (t / np.float32(p.rv_extent)) ** 2, 0.0, None))


def _render_thorax(p: PatientParameters, u: np.ndarray, v: np.ndarray, rng: np.random.Generator
                   ) -> tuple[np.ndarray, ...]:
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


def _heart_box(p: PatientParameters, cu: np.ndarray, cv: np.ndarray, reach: float) -> tuple[slice, slice] | None:
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


def _render_heart(p: PatientParameters, u: np.ndarray, v: np.ndarray, image: np.ndarray, tissue: np.ndarray, phase: str
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


def _acquire(p: PatientParameters, clean: np.ndarray, gain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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
    p = sample_patient(int(index), np.random.default_rng(anatomy_ss))
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
    for phase, ss in zip(PHASES, (ed_ss, es_ss), strict=True):
        image, tissue = thorax_image.copy(), thorax_tissue.copy()
        label = _render_heart(p, u, v, image, tissue, phase)
        out[f"image_{phase}"] = _acquire(p, image, gain, np.random.default_rng(ss))
        out[f"label_{phase}"] = label
        out[f"tissue_{phase}"] = tissue
    return out

