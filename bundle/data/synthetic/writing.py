"""The synthetic dataset on disk: NIfTI files and ``Info.cfg`` per patient, manifest, folder state, parallel runs.

The last stage of :mod:`bundle.data.synthetic`: :func:`write_patient` writes one :func:`generate_patient` result in
ACDC layout; :func:`generate_synthetic_acdc` writes a whole dataset folder, idempotently and atomically.
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
from itertools import repeat
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bundle.data.synthetic.rendering import PHASES, generate_patient

__all__ = ["MANIFEST_NAME", "SYNTHETIC_VERSION", "generate_synthetic_acdc", "write_patient"]

SYNTHETIC_VERSION = 1
"""Bumped whenever the generator's output changes; part of the manifest, so old folders are regenerated."""

MANIFEST_NAME = "manifest.json"

_GENERATOR = "bundle.data.synthetic"
"""The manifest's ``generator``: the public dotted path (this package was one module), so existing folders match."""

_PATIENT_DIR = re.compile(r"^patient\d{3,}$")


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
    for phase in PHASES:
        frame = patient[f"{phase}_frame"]
        for suffix, key in (("", "image"), ("_gt", "label")):
            path = target / f"{name}_frame{frame:02d}{suffix}.nii.gz"
            path.write_bytes(_nifti_bytes(patient[f"{key}_{phase}"], patient["affine"]))
            written.append(path)
    return written


def _manifest_header(num_patients: int, seed: int) -> dict[str, Any]:
    return {"generator": _GENERATOR, "version": SYNTHETIC_VERSION, "seed": int(seed), "num_patients": int(num_patients)}


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
        complete = header["generator"] == _GENERATOR and isinstance(files, dict) and len(files) > 0 and all(
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
