"""Turn a dataset on disk into the one datalist JSON the configs consume.

Usage (python-fire)::

    python -m scripts.make_datalist acdc --root /data/ACDC/database --output data/acdc.json --num_val 8 --num_test 17
    python -m scripts.make_datalist msd      --root /data/Task05_Prostate --output data/prostate.json --channel 0
    python -m scripts.make_datalist folder   --root /data/prostate --output data/prostate.json \\
        --image_pattern 'images/{id}.nii.gz' --label_pattern 'masks/{id}_Segmentation.nii.gz' \\
        --label_names '[background,PZ,TZ]'
    python -m scripts.make_datalist datalist --root my_monai_datalist.json --output data/mine.json
    python -m scripts.make_datalist auto     --root DIR --output FILE --seeds '[0,1,2]' --labeled_counts '[1,2,4]'

Every file is checked first (``--check False`` skips the voxel checks); on any problem the tool prints one line per
problem, ``<path>: <problem>``, writes nothing and exits with status 1. See :mod:`bundle.data.datalist` for the
file format.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bundle.data.checks import DataCheckError
from bundle.data.datalist import DatalistOptions, build_datalist, write_datalist
from scripts.fire_cli import fire_main


def make_datalist(
    kind: str,
    root: str,
    output: str,
    seeds: Sequence[int] = DatalistOptions.seeds,
    labeled_counts: Sequence[int] = DatalistOptions.labeled_counts,
    num_val: float = DatalistOptions.num_val,
    num_test: float = DatalistOptions.num_test,
    split_seed: int = DatalistOptions.split_seed,
    num_classes: int | None = DatalistOptions.num_classes,
    channel: int | None = DatalistOptions.channel,
    image_pattern: str | None = DatalistOptions.image_pattern,
    label_pattern: str | None = DatalistOptions.label_pattern,
    patient_regex: str | None = DatalistOptions.patient_regex,
    check: bool = DatalistOptions.check,
    overwrite: bool = False,
    unlabeled_dir: str | None = DatalistOptions.unlabeled_dir,
    label_names: Sequence[str] | dict[str, str] | None = DatalistOptions.label_names,
) -> str:
    """Build the datalist of ``root`` (layout ``kind``: acdc, msd, folder, datalist or auto) into ``output``.

    The flags are the fields of :class:`bundle.data.datalist.DatalistOptions` (and their defaults), plus ``output``
    and ``overwrite``.

    Args:
        kind: source layout, or ``auto`` to detect it.
        root: dataset folder (a JSON file for ``datalist``).
        output: datalist JSON to write (atomically).
        seeds: seeds for which labeled subsets are recorded.
        labeled_counts: labeled scans per seed (nested subsets of training).
        num_val: validation scans, a count (int) or a fraction of all scans (float < 1); whole patients.
        num_test: test scans, count or fraction; whole patients.
        split_seed: seed of the patient-level split.
        num_classes: number of label classes (default: declared by the layout, else max label + 1).
        channel: channel of 4D multi-channel images (default 0 for Decathlon multi-modal tasks).
        image_pattern: folder layout: image path pattern with ``{id}``.
        label_pattern: folder layout: label path pattern with ``{id}``.
        patient_regex: folder layout: regex extracting the patient id from the scan id.
        check: check every file's content before writing.
        overwrite: replace an existing, different ``output``.
        unlabeled_dir: a folder of unlabeled images (NIfTI or NRRD at any depth) added to pre-training only.
        label_names: class names, background included, in class order (``'[background,PZ,TZ]'``) or as a mapping
            (``'{"0": "background", "1": "PZ", "2": "TZ"}'``); default: the layout's, else the class indices.

    Returns:
        the path written.

    Raises:
        DataCheckError: for any data problem (the CLI prints it and exits 1).
        FileExistsError: when ``output`` exists with different content and ``overwrite`` is false.
    """
    options = DatalistOptions(
        kind=kind,
        seeds=seeds,
        labeled_counts=labeled_counts,
        num_val=num_val,
        num_test=num_test,
        split_seed=split_seed,
        num_classes=num_classes,
        channel=channel,
        image_pattern=image_pattern,
        label_pattern=label_pattern,
        patient_regex=patient_regex,
        check=check,
        unlabeled_dir=unlabeled_dir,
        label_names=label_names,
    )
    datalist = build_datalist(root, options)
    out = Path(output)
    if out.exists() and not overwrite:
        old = json.loads(out.read_text())
        if old.get("file_hash") != datalist["file_hash"] or old.get("split_hash") != datalist["split_hash"]:
            raise FileExistsError(f"{out}: exists with a different file list or split; pass --overwrite to replace.")
    path = write_datalist(datalist, out)
    counts = {k: len(datalist[k]) for k in ("training", "validation", "test", "unlabeled")}
    print(
        f"{path}: {datalist['source']['kind']} source, {counts['training']} training / {counts['validation']}"
        f" validation / {counts['test']} test / {counts['unlabeled']} unlabeled scans,"
        f" labeled counts {datalist['labeled_counts']} for seeds"
        f" {datalist['seeds']}, num_classes {datalist['num_classes']}, file_hash {datalist['file_hash'][:12]}"
    )
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: run :func:`make_datalist` with fire; data problems print cleanly and return 1."""
    try:
        fire_main(make_datalist, argv, name="make_datalist")
    except (DataCheckError, FileExistsError, ValueError) as e:
        print(f"make_datalist: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
