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

Stages, each feeding only the next: :mod:`~bundle.data.synthetic.sampling` (the random parameters of a patient),
:mod:`~bundle.data.synthetic.rendering` (images and label maps from them) and
:mod:`~bundle.data.synthetic.writing` (the files on disk, the manifest, parallel generation).
"""

from __future__ import annotations

from bundle.data.synthetic.rendering import LABELS, TISSUES, generate_patient
from bundle.data.synthetic.sampling import GROUPS, patient_name
from bundle.data.synthetic.writing import MANIFEST_NAME, SYNTHETIC_VERSION, generate_synthetic_acdc, write_patient

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
