"""MONAI Label's use of the bundle, simulated the way ``monailabel/tasks/{train,infer}/bundle.py`` do it.

Training (``BundleTrainTask``): read ``configs/train.json`` raw, take ``train#handlers`` and prepend a
``CheckpointLoader`` of ``models/model.pt`` only if no handler is one, then ``monai.bundle.run(run_id="run",
init_id=None, final_id=None, meta_file=..., config_file=..., **overrides)`` with ``bundle_root``, ``device``,
``train#trainer#max_epochs``, ``train#dataset#data`` / ``validate#dataset#data`` (lists of 3D ``{image, label}``
files) and ``train#handlers`` (plus small settings here, so the run takes a second).

Inference (``BundleInferTask``): ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` of
``configs/inference.json``; weights from ``models/model.pt``; it calls ``inferer(image[None], network)`` itself on
the whole 3D volume, then runs the post-processing without ``SaveImaged``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import monai.bundle
import nibabel as nib
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import SaveImaged

from bundle.networks import FeatureUNet

REPO = Path(__file__).resolve().parents[1]
TINY = (4, 8, 8, 16, 16, 4)


def _bundle_copy(tmp_path: Path) -> Path:
    """A bundle folder as MONAI Label sees it: configs/ (copied from the repository) and models/."""
    root = tmp_path / "bundle"
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "models").mkdir()
    return root


def _scans(tiny_acdc: Path, patients: list[int]) -> list[dict[str, str]]:
    out = []
    for index in patients:
        folder = tiny_acdc / f"patient{index:03d}"
        for image in sorted(folder.glob("*_frame??.nii.gz")):
            out.append({"image": str(image), "label": str(image).replace(".nii.gz", "_gt.nii.gz")})
    return out


def test_train_config_keeps_the_ids_monai_label_overrides() -> None:
    config = ConfigParser.load_config_file(REPO / "configs" / "train.json")
    assert "run" in config and "max_epochs" in config["train"]["trainer"]
    assert "data" in config["train"]["dataset"] and "data" in config["validate"]["dataset"]
    # a CheckpointLoader among the train handlers (even disabled) would stop MONAI Label's warm start
    assert not [h for h in config["train"]["handlers"] if h.get("_target_") == "CheckpointLoader"]


def _train_as_monai_label(root: Path, overrides: dict[str, Any]) -> list[str]:
    """MONAI Label's single-GPU training call; returns what the bundle's fine-tuning logger said (read on the logger
    itself: the bundle's logging.conf replaces the root's handlers)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("bundle.finetune").addHandler(handler)
    try:
        monai.bundle.run(run_id="run", init_id=None, final_id=None, meta_file=str(root / "configs" / "metadata.json"),
                         config_file=str(root / "configs" / "train.json"), **overrides)
    finally:
        logging.getLogger("bundle.finetune").removeHandler(handler)
    return messages


def test_monai_label_training_call(tiny_acdc: Path, tmp_path: Path) -> None:
    root = _bundle_copy(tmp_path)
    torch.manual_seed(123)  # not the bundle's seed: these weights differ from the network's own initialisation
    warm = FeatureUNet(features=TINY).state_dict()
    torch.save(warm, root / "models" / "model.pt")

    bundle_config = ConfigParser()
    bundle_config.read_config(str(root / "configs" / "train.json"))
    bundle_config.config.update({"bundle_root": str(root)})
    train_handlers = bundle_config.get("train#handlers", [])
    if not [t for t in train_handlers if t.get("_target_") == "CheckpointLoader"]:
        train_handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(root / "models" / "model.pt"),
                                  "load_dict": {"model": "$@network"}, "strict": False})
    overrides: dict[str, Any] = {
        "bundle_root": str(root),
        "train#trainer#max_epochs": 1,
        "train#dataset#data": _scans(tiny_acdc, [1, 2]),
        "device": torch.device("cpu"),
        "train#handlers": train_handlers,
        "validate#dataset#data": _scans(tiny_acdc, [3]),
        # not MONAI Label's: a tiny network and slices so that the run takes a second
        "features": list(TINY), "pixdim": [3.0, 3.0], "spatial_size": [64, 64], "crop_size": [32, 32],
        "iterations": 2, "batch_size": 2, "num_workers": 0, "warmup_epochs": 0, "lr": 1e-5,
    }
    messages = _train_as_monai_label(root, overrides)
    # no pre-trained weights in the bundle: the log says the run starts from MONAI Label's model.pt, not "scratch"
    (said,) = [m for m in messages if "no pre-trained weights there" in m]
    assert f"the network starts from {root / 'models' / 'model.pt'}" in said and "scratch" not in said

    assert not (root / "data").exists() and not (root / "runs" / "datalist.json").exists()  # its data only
    trained = torch.load(root / "models" / "model.pt", weights_only=True)  # rewritten by the best-metric saver
    assert set(trained) == set(warm)
    # warm start: two tiny steps from the loaded weights stay next to them (a fresh init would be far away)
    conv = "conv_0.conv_0.conv.weight"
    assert not torch.equal(trained[conv], warm[conv])
    torch.testing.assert_close(trained[conv], warm[conv], rtol=0, atol=1e-3)


def test_monai_label_training_without_validation_keeps_the_final_model(tiny_acdc: Path, tmp_path: Path) -> None:
    """MONAI Label's ``val_split`` 0 sends an empty ``validate#dataset#data``: fine-tuning runs without validation,
    says so, and writes the final weights as ``models/model.pt`` (nothing else would)."""
    root = _bundle_copy(tmp_path)
    overrides: dict[str, Any] = {
        "bundle_root": str(root), "train#trainer#max_epochs": 1, "train#dataset#data": _scans(tiny_acdc, [1, 2]),
        "device": torch.device("cpu"), "validate#dataset#data": [],
        "features": list(TINY), "pixdim": [3.0, 3.0], "spatial_size": [64, 64], "crop_size": [32, 32],
        "iterations": 2, "batch_size": 2, "num_workers": 0, "warmup_epochs": 0,
    }
    messages = _train_as_monai_label(root, overrides)
    assert any("no validation scans: validation is off" in m for m in messages)
    final = torch.load(root / "models" / "model.pt", weights_only=True)
    assert set(final) == set(FeatureUNet(features=TINY).state_dict())


def test_monai_label_inference_call(tiny_acdc: Path, tmp_path: Path) -> None:
    root = _bundle_copy(tmp_path)
    torch.manual_seed(0)
    torch.save(FeatureUNet(features=TINY).state_dict(), root / "models" / "model.pt")
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(root), "device": torch.device("cpu"), "features": list(TINY),
                   "pixdim": [3.0, 3.0], "spatial_size": [64, 64]})

    network = parser.get_parsed_content("network_def", instantiate=True)
    checkpoint = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint))
    network.eval()
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    post = [t for t in parser.get_parsed_content("postprocessing", instantiate=True).transforms
            if not isinstance(t, SaveImaged)]

    path = tiny_acdc / "patient004" / "patient004_frame01.nii.gz"
    # what MONAI Label's BasicInferTask hands the pre-processing: the request (with the image path) plus image_path
    request = {"model": "segmentation", "image": str(path), "device": torch.device("cpu"), "client_id": None,
               "result_extension": ".nii.gz", "result_dtype": "uint8", "result_compress": False}
    data = pre({**request, "image_path": str(path)})
    assert data["image_path"] == str(path)  # left for MONAI Label's writer
    image = data["image"]
    assert image.shape[:3] == (1, 64, 64)
    with torch.no_grad():
        pred = inferer(image[None], network)
    assert pred.shape == (1, 4, *image.shape[1:])  # the 2D network applied to every slice of the 3D volume
    data["pred"] = pred[0]
    for transform in post:
        data = transform(data)
    assert tuple(data["pred"].shape) == (1, *nib.load(path).shape)  # back on the input's grid
    labels = parser.get_parsed_content("_meta_#network_data_format#outputs#pred#channel_def")
    assert [labels[k] for k in sorted(labels)][1:] == ["right ventricle", "myocardium", "left ventricle"]


@pytest.mark.parametrize("extra", [[], ["mean_teacher.json"]])
def test_lr_schedule_follows_the_trainer_length_monai_label_sets(extra: list[str]) -> None:
    """MONAI Label overrides ``train#trainer#max_epochs``; the cosine must end with that run, not with ``epochs``."""
    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.json"), *(str(REPO / "configs" / f) for f in extra)])
    parser.update({"train#trainer#max_epochs": 100, "iterations": 7, "network": "$torch.nn.Linear(1, 1)"})
    schedule = parser.get_parsed_content("lr_scheduler")
    assert parser.get_parsed_content("epochs") == 50 and schedule.t_total == 100 * 7
