"""Write the embedded synthetic short-axis cine-MRI dataset (ACDC layout) to disk.

Usage::

    python -m scripts.make_synthetic_data --output data/synthetic_acdc --num_patients 100 --seed 0

Re-running with the same arguments returns at once (the folder's manifest matches); a partial folder is
regenerated; a folder holding other parameters or other files needs ``--overwrite``.
"""

from __future__ import annotations

import time

from bundle.data.synthetic import generate_synthetic_acdc
from scripts.fire_cli import fire_main


def main(
    output: str = "data/synthetic_acdc",
    num_patients: int = 100,
    seed: int = 0,
    overwrite: bool = False,
    num_workers: int | None = None,
) -> None:
    """Generate ``num_patients`` synthetic patients with ``seed`` into ``output`` and print where and how long.

    Args:
        output: folder to write (ACDC layout: ``patientNNN/`` with ED/ES frames, labels and ``Info.cfg``).
        num_patients: number of patients (two scans each).
        seed: seed of the dataset (each patient is a pure function of it and its index).
        overwrite: replace an existing, different dataset in ``output``.
        num_workers: processes used to write the patients (default: the CPU count).
    """
    start = time.perf_counter()
    path = generate_synthetic_acdc(output, num_patients=num_patients, seed=seed, overwrite=overwrite,
                                   num_workers=num_workers)
    elapsed = time.perf_counter() - start
    print(f"synthetic ACDC dataset: {path} ({num_patients} patients, seed {seed}) ready in {elapsed:.1f} s")


if __name__ == "__main__":
    fire_main(main)
