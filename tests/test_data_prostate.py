"""Integration test on the real prostate development set (../shared/data/prostate beside the checkout).

Skipped cleanly when that folder is absent. Nothing derived from the data is written into the repository: the
datalist goes to pytest's tmp_path.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from bundle.configs import volume_transforms
from bundle.data.checks import check_entries
from bundle.data.datalist import load_split, prepare_datalist
from scripts.benchmark_loader import pretrain_loader

PROSTATE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prostate"

pytestmark = pytest.mark.skipif(not (PROSTATE / "images").is_dir(), reason=f"real prostate data absent ({PROSTATE})")


def test_prostate_datalist_preprocess_and_pretrain_batch(tmp_path: Path) -> None:
    path = prepare_datalist(PROSTATE, tmp_path / "prostate.json", num_val=2, num_test=4, seeds=(0,), check=False)
    raw = json.loads(Path(path).read_text())
    assert raw["source"]["kind"] == "folder"
    assert raw["source"]["label_pattern"] == "masks/{id}_Segmentation.nii.gz"
    assert raw["num_classes"] == 3  # 0 background, 1 peripheral zone, 2 transition zone
    assert (len(raw["training"]), len(raw["validation"]), len(raw["test"])) == (14, 2, 4)
    train = load_split(path, "training")
    check_entries(train[:4], num_classes=3)  # the real files pass the bad-input checks

    # pre-process two volumes at paper settings: 1.0 mm in-plane, 384 x 384, slice axis untouched
    transform = Compose(volume_transforms(spatial_size=(384, 384)))
    for entry in train[:2]:
        out = transform(entry)
        img, lab = out["image"], out["label"]
        n_slices = int(np.asarray(out["image_meta_dict"]["spatial_shape"])[2])
        assert tuple(img.shape) == tuple(lab.shape) == (1, 384, 384, n_slices)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(img.affine)[:3, :2], axis=0), [1.0, 1.0], atol=1e-6)
        assert set(torch.unique(lab).tolist()) <= {0.0, 1.0, 2.0} and lab.max() > 0
        assert float(img.min()) > -0.5 and float(img.max()) < 3.0  # 1%/99% percentiles -> 0/1, no clipping

    # one pre-training batch of the paper's prostate setting (8 partitions) from 3 training scans
    loader = pretrain_loader(
        {
            "train#entries": load_split(path, "training", with_labels=False)[:3],
            "num_partitions": 8,
            "crop_size": [224, 224],
            "scans_per_batch": 2,
            "iterations": 1,
            "num_workers": 0,
        }
    )
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (16, 1, 224, 224)
    assert Counter(batch["meta_label"].tolist()) == {p: 2 for p in range(8)}
