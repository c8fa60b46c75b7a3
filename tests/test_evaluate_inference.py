"""configs/evaluate.json (test split, native-geometry metrics, no checkpoint written) and configs/inference.json
(NIfTI in, NIfTI out with the input's geometry), end to end on the tiny synthetic dataset."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.evaluation import SegmentationMetricsSaver, check_inputs, list_images
from bundle.networks import FeatureUNet

TINY = (4, 8, 8, 16, 16, 4)
MYO = 2


def _cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _constant_class_model(path: Path, label: int = MYO) -> None:
    """Weights of a U-Net predicting ``label`` everywhere (zero final weights, a bias favouring ``label``)."""
    net = FeatureUNet(features=TINY)
    with torch.no_grad():
        net.final_conv.weight.zero_()
        net.final_conv.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), 4).float() * 5.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def _random_model(path: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(FeatureUNet(features=TINY).state_dict(), path)


def _naive_dice(pred: np.ndarray, label: np.ndarray, c: int) -> float:
    p, g = pred == c, label == c
    if p.sum() + g.sum() == 0:
        return 1.0
    return 2.0 * float((p & g).sum()) / float(p.sum() + g.sum())


def _files_with_mtimes(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_scores_test_scans_at_native_geometry(bundle_workflow, tiny_overrides, tiny_paths, tmp_path) -> None:
    models = tmp_path / "models"
    _constant_class_model(models / "model.pt")
    before = _files_with_mtimes(models)
    out = tmp_path / "eval"
    wf = bundle_workflow(["train", "evaluate"], **tiny_overrides, **{**tiny_paths, "output_dir": str(out)})
    wf.initialize()
    handlers = wf.parser.get_parsed_content("validate#handlers")
    assert not any(type(h).__name__ == "CheckpointSaver" for h in handlers)
    wf.run()
    wf.finalize()
    assert _files_with_mtimes(models) == before  # nothing written or rewritten next to the weights
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*.pt")] == [Path("models/model.pt")]  # nor elsewhere

    datalist = json.loads(Path(tiny_paths["datalist"]).read_text())
    test_scans = {e["scan_id"]: e for e in datalist["test"]}
    with open(out / "metrics_per_scan.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * len(test_scans)
    assert {r["scan_id"] for r in rows} == set(test_scans)
    assert [r["class"] for r in rows[:4]] == ["RV", "myocardium", "LV", "foreground"]
    whole = {r["scan_id"]: r for r in rows if r["class"] == "foreground"}
    rows = [r for r in rows if r["class"] != "foreground"]
    base = Path(tiny_paths["datalist"]).parent
    for scan_id, entry in test_scans.items():
        label_img = nib.load(base / entry["label"])
        pred_img = nib.load(out / "predictions" / f"{scan_id}_seg.nii.gz")
        assert pred_img.shape == label_img.shape
        np.testing.assert_allclose(pred_img.affine, label_img.affine, atol=1e-4)
        pred, label = np.asanyarray(pred_img.dataobj), np.asanyarray(label_img.dataobj)
        assert set(np.unique(pred)) <= {0, MYO} and (pred == MYO).any()  # the constant model's output
        for r in (r for r in rows if r["scan_id"] == scan_id):
            c = int(r["class_index"])
            assert float(r["dice"]) == pytest.approx(_naive_dice(pred, label, c), abs=1e-5)
            assert math.isfinite(float(r["hd95"])) == (c == MYO)  # only class 2 is predicted at all
        assert whole[scan_id]["class_index"] == "1-3"
        assert float(whole[scan_id]["dice"]) == pytest.approx(_naive_dice(pred > 0, label > 0, 1), abs=1e-5)
    assert 0 < float(next(r for r in rows if r["class_index"] == str(MYO))["dice"]) < 1
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["num_scans"] == len(test_scans) and summary["classes"] == ["RV", "myocardium", "LV"]
    mean_dice = np.mean([float(r["dice"]) for r in rows])
    assert summary["dice"]["mean"] == pytest.approx(mean_dice, abs=1e-5)
    assert summary["hd95"]["per_class"]["RV"] == {"mean": None, "std": None, "n": 0}  # never predicted: no distance
    whole_dice = [float(r["dice"]) for r in whole.values()]
    assert summary["foreground"]["dice"]["mean"] == pytest.approx(np.mean(whole_dice), abs=1e-5)
    assert summary["foreground"]["dice"]["n"] == len(test_scans)
    assert (out / "metrics_summary.csv").is_file()


def test_evaluate_requires_the_fine_tuned_weights(bundle_workflow, tiny_overrides, tiny_paths) -> None:
    wf = bundle_workflow(["train", "evaluate"], **tiny_overrides, **tiny_paths)
    with pytest.raises(RuntimeError) as info:
        wf.initialize()
    assert isinstance(_cause(info.value), FileNotFoundError) and "model.pt" in str(_cause(info.value))


def test_metrics_saver_rejects_a_prediction_off_the_native_grid(tiny_datalist: Path) -> None:
    entry = json.loads(tiny_datalist.read_text())["test"][0]
    label_file = str(tiny_datalist.parent / entry["label"])
    shape = nib.load(label_file).shape
    saver = SegmentationMetricsSaver("unused", num_classes=4)
    with pytest.raises(ValueError, match="was the prediction inverted"):
        saver.score(np.zeros((1, shape[0] + 1, *shape[1:])), label_file, "scan")
    with pytest.raises(ValueError, match="class_names"):
        SegmentationMetricsSaver("unused", num_classes=4, class_names=["a", "b"])


# ------------------------------------------------------------------------------------------------------ inference


def _write_flipped_copy(src: Path, dst: Path) -> None:
    """The same scan stored with its first axis reversed (affine adjusted: same voxels in world space)."""
    img = nib.load(src)
    data = np.asanyarray(img.dataobj)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([data.shape[0] - 1, 0, 0]) + img.affine[:3, 3]
    affine[:3, 0] *= -1
    nib.save(nib.Nifti1Image(data[::-1].copy(), affine), dst)


def _model_and_input_folder(tmp_path: Path, tiny_acdc: Path) -> tuple[Path, Path]:
    """A random model in ``tmp_path/models``, an empty input folder, and a real scan to copy into it."""
    _random_model(tmp_path / "models" / "model.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    return inputs, tiny_acdc / "patient001" / "patient001_frame01.nii.gz"


def test_inference_writes_segmentations_with_the_input_geometry(
    bundle_workflow, tiny_overrides, tiny_acdc: Path, tmp_path: Path
) -> None:
    inputs, src = _model_and_input_folder(tmp_path, tiny_acdc)
    (inputs / "a.nii.gz").write_bytes(src.read_bytes())
    (inputs / "a_gt.nii.gz").write_bytes((tiny_acdc / "patient001" / "patient001_frame01_gt.nii.gz").read_bytes())
    _write_flipped_copy(src, inputs / "b.nii.gz")
    out = tmp_path / "out"
    wf = bundle_workflow(["inference"], workflow_type="infer", **tiny_overrides, bundle_root=str(tmp_path),
                         dataset_dir=str(inputs), output_dir=str(out))
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "b_seg.nii.gz"]  # the _gt file is skipped
    segs = {}
    for name in ("a", "b"):
        seg, img = nib.load(out / f"{name}_seg.nii.gz"), nib.load(inputs / f"{name}.nii.gz")
        assert seg.shape == img.shape and seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(seg.affine, img.affine, atol=1e-4)
        segs[name] = np.asanyarray(seg.dataobj)
        assert set(np.unique(segs[name])) <= {0, 1, 2, 3}
    a, b = segs["a"], segs["b"]
    assert len(np.unique(a)) > 1 and not np.array_equal(a, a[::-1])  # not trivially symmetric
    np.testing.assert_array_equal(b, a[::-1])  # same anatomy stored flipped -> same segmentation, flipped


def write_nrrd_copy(src: Path, dst: Path) -> None:
    """The same scan as NRRD: the voxels in file order, the RAS affine written as NRRD's LPS header."""
    import nrrd

    img = nib.load(src)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    nrrd.write(str(dst), np.asanyarray(img.dataobj), {"space": "left-posterior-superior",
                                                      "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]})


def test_inference_reads_nrrd_as_it_reads_nifti(bundle_workflow, tiny_overrides, tiny_acdc: Path, tmp_path: Path
                                                ) -> None:
    inputs, src = _model_and_input_folder(tmp_path, tiny_acdc)
    (inputs / "a.nii.gz").write_bytes(src.read_bytes())
    write_nrrd_copy(src, inputs / "b.nrrd")
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    wf = bundle_workflow(["inference"], workflow_type="infer", **tiny_overrides, bundle_root=str(tmp_path),
                         dataset_dir=str(inputs), output_dir=str(out))
    wf.initialize()
    wf.run()
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "b_seg.nii.gz"]
    a, b = nib.load(out / "a_seg.nii.gz"), nib.load(out / "b_seg.nii.gz")
    np.testing.assert_allclose(b.affine, nib.load(src).affine, atol=1e-4)  # the NRRD input's world geometry
    assert len(np.unique(np.asanyarray(a.dataobj))) > 1
    np.testing.assert_array_equal(np.asanyarray(b.dataobj), np.asanyarray(a.dataobj))  # the same segmentation
    # a broken NRRD is named like a broken NIfTI, and does not stop the good inputs
    (inputs / "c.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4\n\n")
    checked = check_inputs(list_images(inputs))
    assert len(checked["good"]) == 2 and list(checked["bad"]) == [str(inputs / "c.nrrd")]
    assert "unreadable or corrupt image file" in checked["bad"][str(inputs / "c.nrrd")]


def test_inference_on_a_given_list_of_files(bundle_workflow, tiny_overrides, tiny_acdc: Path, tmp_path: Path) -> None:
    _random_model(tmp_path / "models" / "model.pt")
    chosen = tiny_acdc / "patient002" / "patient002_frame01.nii.gz"
    out = tmp_path / "out"
    wf = bundle_workflow(["inference"], workflow_type="infer", **tiny_overrides, bundle_root=str(tmp_path),
                         input_files=[str(chosen)], output_dir=str(out))
    wf.initialize()
    wf.run()
    assert [p.name for p in out.iterdir()] == ["patient002_frame01_seg.nii.gz"]
    assert nib.load(out / "patient002_frame01_seg.nii.gz").shape == nib.load(chosen).shape


def test_inference_keeps_equal_names_in_different_folders_apart(
    bundle_workflow, tiny_overrides, tiny_acdc: Path, tmp_path: Path
) -> None:
    _random_model(tmp_path / "models" / "model.pt")
    inputs = tmp_path / "in"
    for sub, patient in (("a", "patient001"), ("b/deeper", "patient002")):
        (inputs / sub).mkdir(parents=True)
        src = tiny_acdc / patient / f"{patient}_frame01.nii.gz"
        (inputs / sub / "scan.nii.gz").write_bytes(src.read_bytes())
    out = tmp_path / "out"
    wf = bundle_workflow(["inference"], workflow_type="infer", **tiny_overrides, bundle_root=str(tmp_path),
                         dataset_dir=str(inputs), input_pattern="**/*.nii*", output_dir=str(out))
    wf.initialize()
    wf.run()
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert written == ["a/scan_seg.nii.gz", "b/deeper/scan_seg.nii.gz"]
    for sub in ("a", "b/deeper"):
        assert nib.load(out / sub / "scan_seg.nii.gz").shape == nib.load(inputs / sub / "scan.nii.gz").shape


def test_inference_segments_every_good_file_and_then_fails_naming_the_bad_ones(
    bundle_workflow, tiny_overrides, tiny_acdc: Path, tmp_path: Path
) -> None:
    import logging

    from bundle.data.checks import DataCheckError

    inputs, src = _model_and_input_folder(tmp_path, tiny_acdc)
    img = nib.load(src)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    (inputs / "a_good.nii.gz").write_bytes(src.read_bytes())
    (inputs / "b_corrupt.nii.gz").write_bytes(b"not a nifti file")
    nan = data.copy()
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, img.affine), inputs / "c_nan.nii.gz")
    nib.save(nib.Nifti1Image(data[:, :, 0], img.affine), inputs / "d_2d.nii.gz")
    (inputs / "e_good.nii.gz").write_bytes(src.read_bytes())  # after the bad ones: still segmented
    out = tmp_path / "out"
    wf = bundle_workflow(["inference"], workflow_type="infer", **tiny_overrides, bundle_root=str(tmp_path),
                         dataset_dir=str(inputs), output_dir=str(out))
    warnings: list[str] = []  # a handler on the logger itself: the bundle's logging.conf replaces the root's
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("bundle.evaluation").addHandler(handler)
    try:
        wf.initialize()
    finally:
        logging.getLogger("bundle.evaluation").removeHandler(handler)
    (warning,) = warnings
    assert "3 of 5 inputs will not be segmented" in warning
    assert all(name in warning for name in ("b_corrupt.nii.gz", "c_nan.nii.gz", "d_2d.nii.gz"))
    wf.run()
    assert sorted(p.name for p in out.iterdir()) == ["a_good_seg.nii.gz", "e_good_seg.nii.gz"]
    with pytest.raises(Exception) as caught:
        wf.finalize()
    error = _cause(caught.value)
    assert isinstance(error, DataCheckError)
    message = str(error)
    assert "3 of 5 inputs were not segmented (2 written)" in message
    assert f"{inputs / 'b_corrupt.nii.gz'}: unreadable or corrupt" in message
    assert f"{inputs / 'c_nan.nii.gz'}: 1 NaN/Inf voxels" in message
    assert f"{inputs / 'd_2d.nii.gz'}: 2D image" in message


def test_inference_without_inputs_initialises_and_stops_at_run_naming_the_folder(
    bundle_workflow, tiny_overrides, tmp_path: Path
) -> None:
    """The model zoo checks the workflow's properties with default arguments (no input folder): initialise must
    work; running must stop before any work, naming the folder."""
    _random_model(tmp_path / "models" / "model.pt")
    out = tmp_path / "out"
    wf = bundle_workflow(["inference"], workflow_type="infer", **tiny_overrides, bundle_root=str(tmp_path),
                         dataset_dir=str(tmp_path / "absent"), output_dir=str(out))
    wf.initialize()
    assert wf.check_properties() == []
    with pytest.raises(Exception) as caught:
        wf.run()
    error = _cause(caught.value)
    assert isinstance(error, FileNotFoundError) and str(tmp_path / "absent") in str(error)
    assert not out.exists()


def test_list_images(tmp_path: Path) -> None:
    for name in ("b.nii.gz", "a.nii", "a_gt.nii.gz", "a_seg.nii.gz", "notes.txt", "c.nrrd", "c_seg.nrrd"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(p).name for p in list_images(tmp_path)] == ["a.nii", "b.nii.gz", "c.nrrd"]
    assert [Path(p).name for p in list_images(tmp_path, "*.nii*")] == ["a.nii", "b.nii.gz"]
    with pytest.raises(FileNotFoundError, match="no NIfTI or NRRD image"):
        list_images(tmp_path, "*.mha")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "absent")
    assert list_images(tmp_path / "absent", missing_ok=True) == [] == list_images(tmp_path, "*.mha", missing_ok=True)
