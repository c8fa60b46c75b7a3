"""Pre-processing geometry (orientation, spacing, normalisation, pad/crop, inverse), slice meta-labels, the
pre-training slice dataset, its partition batch sampler and the loader of configs/pretrain.json."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from bundle.configs import volume_transforms
from bundle.data.datalist import load_split, prepare_datalist
from bundle.data.slices import PartitionBatchSampler, PretrainSliceDataset, partition_slices, slice_partition
from scripts.benchmark_loader import benchmark, generated_volumes, pretrain_loader

REPO = Path(__file__).resolve().parents[1]


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _ramp(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel (i, j, k) holds 1 + i + 100 j + 10000 k: every voxel's origin is readable from its value."""
    i, j, k = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (1 + i + 100 * j + 10000 * k).astype(np.float32)


# ------------------------------------------------------------------------------------------- pre-processing
def test_inplane_spacing_slice_axis_untouched(tmp_path: Path) -> None:
    path = _save(
        tmp_path / "a.nii.gz",
        np.random.default_rng(0).uniform(1, 9, (24, 20, 5)).astype(np.float32),
        np.diag([0.5, 0.8, 5.0, 1.0]),
    )
    out = Compose(volume_transforms(spatial_size=(12, 16)))({"image": path})["image"]
    # 24 voxels x 0.5 mm = 12 mm -> 12 voxels at 1 mm; 20 x 0.8 mm = 16 mm -> 16 voxels; 5 slices kept, 5 mm apart
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (1, 12, 16, 5)
    spacing = np.linalg.norm(np.asarray(out.affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [1.0, 1.0, 5.0], atol=1e-6)
    padded = Compose(volume_transforms(spatial_size=(40, 36)))({"image": path})["image"]
    assert tuple(padded.shape) == (1, 40, 36, 5)
    inside = (padded[0] != 0).any(-1)
    assert int(inside.sum(0).max()) == 12 and int(inside.sum(1).max()) == 16  # data block 12 x 16, zero padding
    cropped = Compose(volume_transforms(spatial_size=(8, 8)))({"image": path})["image"]
    assert tuple(cropped.shape) == (1, 8, 8, 5)


def test_percentile_normalisation_matches_numpy(tmp_path: Path) -> None:
    data = np.random.default_rng(1).gamma(2.0, 50.0, (20, 18, 6)).astype(np.float32)
    path = _save(tmp_path / "a.nii.gz", data, np.diag([1.0, 1.0, 4.0, 1.0]))  # already 1 mm, RAS: no resampling
    out = Compose(volume_transforms(spatial_size=(20, 18)))({"image": path})["image"][0]
    p1, p99 = np.percentile(data, [1, 99])
    np.testing.assert_allclose(out.numpy(), (data - p1) / (p99 - p1), rtol=1e-4, atol=1e-5)
    assert abs(float(np.percentile(out.numpy(), 1))) < 1e-4 and abs(float(np.percentile(out.numpy(), 99)) - 1) < 1e-4


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # stored L, P, S (e.g. the prostate files): both in-plane axes flipped
        ([[-1, 0, 0], [0, -1, 0], [0, 0, 1]], lambda v: v[::-1, ::-1, :]),
        # stored A, R, S: in-plane axes swapped
        ([[0, 1, 0], [1, 0, 0], [0, 0, 1]], lambda v: v.transpose(1, 0, 2)),
        # stored R, A, I: the slice axis stays last, pointed superior
        ([[1, 0, 0], [0, 1, 0], [0, 0, -1]], lambda v: v[:, :, ::-1]),
        # sagittal: slices along R (stored axis 2), in-plane A and S: slice axis kept last, not moved first
        ([[0, 0, 1], [1, 0, 0], [0, 1, 0]], lambda v: v),
    ],
)
def test_slice_last_orientation(tmp_path: Path, rows: list[list[int]], expected) -> None:
    shape = (6, 5, 4)
    data = _ramp(shape)
    affine = np.eye(4)
    affine[:3, :3] = rows
    path = _save(tmp_path / "a.nii.gz", data, affine)
    tr = volume_transforms(spatial_size=(8, 8))
    out = Compose(tr[:5])({"image": path})["image"][0].numpy()  # load, channel, select image and label, orientation
    np.testing.assert_array_equal(out, expected(data))
    assert out.shape[-1] == 4


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.3)])
def test_inverse_restores_original_grid(tmp_path: Path, spacing: tuple[float, float]) -> None:
    shape = (22, 18, 5)
    lab = np.zeros(shape, np.uint8)
    lab[4:15, 3:12, 1:4] = 1
    lab[8:12, 6:9, 2] = 2
    affine = np.array([[0.0, spacing[1], 0.0, 3.0], [-spacing[0], 0.0, 0.0, 7.0], [0.0, 0.0, 6.0, -2.0], [0, 0, 0, 1]])
    img = np.random.default_rng(2).uniform(1, 9, shape).astype(np.float32)
    entry = {"image": _save(tmp_path / "i.nii.gz", img, affine), "label": _save(tmp_path / "l.nii.gz", lab, affine)}
    transform = Compose(volume_transforms(spatial_size=(32, 24)))
    out = transform(entry)
    assert tuple(out["image"].shape) == tuple(out["label"].shape) == (1, 32, 24, 5)
    data = dict(out)
    data["pred"] = out["label"].clone()  # a "prediction" on the pre-processed grid
    back = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)(data)["pred"]
    assert tuple(back.shape) == (1, *shape)
    np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-5)
    agree = float((back[0].numpy() == lab).mean())
    if spacing == (1.0, 1.0):
        assert agree == 1.0  # no resampling: exactly the original label map
    else:
        assert agree > 0.95  # resampled there and back (nearest): only boundary voxels may move


def test_channel_selection_of_4d_image(tmp_path: Path) -> None:
    base = np.random.default_rng(3).uniform(1, 9, (10, 8, 4)).astype(np.float32)
    img4 = np.stack([base, 100.0 - base**2], axis=-1)
    path = _save(tmp_path / "m.nii.gz", img4, np.eye(4))
    for channel in (0, 1):
        out = Compose(volume_transforms(spatial_size=(10, 8), channel=channel))({"image": path})
        ref = img4[..., channel]
        p1, p99 = np.percentile(ref, [1, 99])
        np.testing.assert_allclose(out["image"][0].numpy(), (ref - p1) / (p99 - p1), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps the transform's ValueError
        Compose(volume_transforms(spatial_size=(10, 8)))({"image": path})
    assert isinstance(err.value.__cause__, ValueError) and "2-channel image" in str(err.value.__cause__)


def test_volume_transforms_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pixdim"):
        volume_transforms(pixdim=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spatial_size"):
        volume_transforms(spatial_size=(0, 384))
    with pytest.raises(FileNotFoundError, match="configs/train.json"):
        volume_transforms(bundle_root=tmp_path)


def test_the_listed_chain_of_train_json_is_the_one_every_config_runs() -> None:
    """train.json lists the steps; its overlays refer to that id; the standalone configs instantiate the same list."""
    listed = ConfigParser.load_config_file(REPO / "configs" / "train.json")["train"]["deterministic_transforms"]
    steps = [step["_target_"].rsplit(".", 1)[-1] for step in listed]
    built = volume_transforms(bundle_root=REPO, pixdim=(0.7, 1.2), spatial_size=(40, 36), channel=1)
    assert [type(t).__name__ for t in built] == steps == [
        "LoadImaged", "EnsureChannelFirstd", "SelectChanneld", "SelectChanneld", "SliceLastOrientationd",
        "KeySafeSpacingd", "ScaleIntensityRangePercentilesd", "ResizeWithPadOrCropd"]
    assert built[2].channel == 1 and built[3].channel is None  # the image's channel; label maps single-channel
    assert tuple(built[5].spacing_transform.pixdim) == (0.7, 1.2, -1.0)
    assert tuple(built[7].padder.padder.spatial_size) == (40, 36, -1)
    for name in ("pretrain.json", "inference.json"):
        text = (REPO / "configs" / name).read_text()
        assert "bundle.configs.volume_transforms(pixdim=@pixdim" in text and "LoadImaged" not in text
    for name in ("evaluate.json", "mean_teacher.json"):
        assert "LoadImaged" not in (REPO / "configs" / name).read_text()


# ------------------------------------------------------------------------------------------------ meta-labels
def test_slice_partition_hand_checked() -> None:
    # floor(i * P / n)
    assert [slice_partition(i, 10, 3) for i in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [slice_partition(i, 9, 3) for i in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [slice_partition(i, 24, 8) for i in range(24)] == [p for p in range(8) for _ in range(3)]
    assert [slice_partition(i, 5, 8) for i in range(5)] == [0, 1, 3, 4, 6]  # fewer slices than partitions
    assert [slice_partition(i, 4, 1) for i in range(4)] == [0, 0, 0, 0]
    assert partition_slices(5, 3) == [[0, 1], [2, 3], [4]]
    for bad in ((5, 5, 3), (-1, 5, 3), (0, 0, 3), (0, 5, 0)):
        with pytest.raises(ValueError):
            slice_partition(*bad)


# ----------------------------------------------------------------------------------------- slice dataset
def _volumes(slices: tuple[int, ...], hw: tuple[int, int] = (12, 10)) -> list[dict]:
    return [
        {"image": MetaTensor(torch.from_numpy(_ramp((*hw, d)))[None] + 1e6 * s), "scan_id": f"scan{s}"}
        for s, d in enumerate(slices)
    ]


def test_dataset_item_is_a_crop_of_the_right_slice() -> None:
    ds = PretrainSliceDataset(_volumes((6, 7)), num_partitions=3, crop_size=(5, 4), seed=7)
    assert len(ds) == 13
    item = ds[(1, 4, 123)]
    assert item["image"].shape == (1, 5, 4) and item["image"].dtype == torch.float32
    assert (item["scan_id"], item["slice_index"], item["meta_label"]) == ("scan1", 4, 1)  # floor(4 * 3 / 7) = 1
    top_left = int(item["image"][0, 0, 0].item() - 1e6 - 1 - 40000)  # value = 1 + y + 100 x + 10000 k + 1e6 s
    y, x = top_left % 100, top_left // 100
    assert 0 <= y <= 12 - 5 and 0 <= x <= 10 - 4
    expected = torch.from_numpy(_ramp((12, 10, 7))[y : y + 5, x : x + 4, 4]) + 1e6
    torch.testing.assert_close(item["image"][0], expected)
    torch.testing.assert_close(ds[(1, 4, 123)]["image"], item["image"])  # same draw, same crop
    crops = {ds[(1, 4, d)]["image"][0, 0, 0].item() for d in range(20)}
    assert len(crops) > 1  # different draws, different crops


def test_dataset_rejects_bad_volumes() -> None:
    with pytest.raises(ValueError, match="crop"):
        PretrainSliceDataset(_volumes((4,), hw=(6, 6)), num_partitions=2, crop_size=(8, 8))
    with pytest.raises(ValueError, match="1,H,W,D"):
        PretrainSliceDataset([{"image": torch.zeros(2, 8, 8, 4)}], num_partitions=2, crop_size=(4, 4))
    with pytest.raises(TypeError, match="tuples"):
        PretrainSliceDataset(_volumes((4,)), num_partitions=2, crop_size=(4, 4))[0]


# ---------------------------------------------------------------------------------------------- sampler
def test_sampler_every_meta_label_has_positives() -> None:
    ds = PretrainSliceDataset(_volumes((9, 10, 11, 12, 13)), num_partitions=3, crop_size=(4, 4))
    sampler = PartitionBatchSampler(ds, scans_per_batch=3, iterations=20, seed=1)
    assert sampler.batch_size == 9 and len(sampler) == 20
    batches = list(sampler)
    assert len(batches) == 20
    for batch in batches:
        assert len(batch) == 9
        labels = [slice_partition(k, ds.num_slices[s], 3) for s, k, _ in batch]
        assert Counter(labels) == {0: 3, 1: 3, 2: 3}  # every meta-label has scans_per_batch >= 2 members
        scans = [s for s, _, _ in batch]
        assert len(set(scans)) == 3 and all(scans.count(s) == 3 for s in scans)  # 3 scans, one slice per partition
    assert len({b[0][:2] for b in batches}) > 1


def test_sampler_deterministic_per_seed_and_epoch() -> None:
    ds = PretrainSliceDataset(_volumes((9, 10, 11, 12)), num_partitions=3, crop_size=(4, 4))
    a = PartitionBatchSampler(ds, scans_per_batch=2, iterations=5, seed=3)
    b = PartitionBatchSampler(ds, scans_per_batch=2, iterations=5, seed=3)
    first, second = list(a), list(a)  # each iteration advances the epoch
    assert first == list(b) and second == list(b) and first != second
    b.set_epoch(0)
    assert list(b) == first
    assert list(PartitionBatchSampler(ds, scans_per_batch=2, iterations=5, seed=4)) != first


def test_sampler_fills_partitions_missing_in_short_scans() -> None:
    ds = PretrainSliceDataset(_volumes((2, 8)), num_partitions=4, crop_size=(4, 4))  # scan0: partitions 0 and 2 only
    for batch in PartitionBatchSampler(ds, scans_per_batch=2, iterations=10, seed=0):
        labels = [slice_partition(k, ds.num_slices[s], 4) for s, k, _ in batch]
        assert Counter(labels) == {0: 2, 1: 2, 2: 2, 3: 2}
    with pytest.raises(ValueError, match="no scan has a slice in partition"):
        PartitionBatchSampler(PretrainSliceDataset(_volumes((2, 2)), num_partitions=4, crop_size=(4, 4)))
    with pytest.raises(ValueError, match="scans_per_batch must be >= 2"):
        PartitionBatchSampler(ds, scans_per_batch=1)


def test_sampler_shards_one_global_batch_over_processes() -> None:
    ds = PretrainSliceDataset(_volumes((2, 9, 10, 11, 12, 13)), num_partitions=3, crop_size=(4, 4))  # scan 0 short
    whole = list(PartitionBatchSampler(ds, scans_per_batch=4, iterations=6, seed=5))
    shards = [PartitionBatchSampler(ds, scans_per_batch=2, iterations=6, seed=5, num_replicas=2, rank=r)
              for r in (0, 1)]
    for shard in shards:
        shard.set_epoch(0)
    ranks = [list(shard) for shard in shards]
    # the processes' batches, concatenated in rank order, are the one-process batch with twice the scans ...
    assert [a + b for a, b in zip(*ranks, strict=True)] == whole
    # ... and each keeps scans_per_batch members per meta-label
    for batch in ranks[1]:
        assert Counter(slice_partition(k, ds.num_slices[s], 3) for s, k, _ in batch) == {0: 2, 1: 2, 2: 2}
    with pytest.raises(ValueError, match="rank must be in"):
        PartitionBatchSampler(ds, scans_per_batch=2, num_replicas=2, rank=2)


# ----------------------------------------------------------------------------------------------- loader
def _write_scans(tmp_path: Path, n: int) -> list[dict]:
    entries = []
    for i in range(n):
        data = np.random.default_rng(i).uniform(1, 9, (24, 20, 6 + i)).astype(np.float32)
        entries.append(
            {"image": _save(tmp_path / f"s{i}.nii.gz", data, np.diag([1.2, 1.2, 5.0, 1.0])), "scan_id": f"s{i}"}
        )
    return entries


def test_pretrain_loader_from_files(tmp_path: Path) -> None:
    entries = _write_scans(tmp_path, 3)
    kw = {"num_partitions": 3, "crop_size": [16, 16], "scans_per_batch": 2, "iterations": 2, "spatial_size": [32, 32],
          "train#entries": entries}
    loader = pretrain_loader({**kw, "num_workers": 0})
    batches = list(loader)
    assert len(batches) == 2
    batch = batches[0]
    assert tuple(batch["image"].shape) == (6, 1, 16, 16) and batch["image"].dtype == torch.float32
    assert sorted(batch["meta_label"].tolist()) == [0, 0, 1, 1, 2, 2]
    assert all(s in {"s0", "s1", "s2"} for s in batch["scan_id"])
    # the same seed through a worker process gives the same batches (crops seeded per item, not per worker)
    worker = next(iter(pretrain_loader({**kw, "num_workers": 1})))
    torch.testing.assert_close(worker["image"], batch["image"])
    assert worker["scan_id"] == batch["scan_id"]


def test_pretrain_loader_from_preprocessed_volumes(tmp_path: Path) -> None:
    loader = pretrain_loader(
        {"train#volumes": generated_volumes(num_volumes=2, num_slices=6, spatial_size=(30, 30)), "num_partitions": 2,
         "crop_size": [20, 20], "scans_per_batch": 2, "iterations": 1, "num_workers": 0}
    )
    assert loader.batch_sampler.batch_size == 4
    assert tuple(next(iter(loader))["image"].shape) == (4, 1, 20, 20)


def test_pretrain_loader_from_datalist_uses_training_only(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(5):
        data = np.random.default_rng(i).uniform(1, 9, (20, 20, 6)).astype(np.float32)
        _save(root / "images" / f"c{i}.nii.gz", data, np.eye(4))
        _save(root / "labels" / f"c{i}.nii.gz", (data > 5).astype(np.uint8), np.eye(4))
    path = prepare_datalist(root, tmp_path / "dl.json", num_val=1, num_test=1, labeled_counts=(1,), seeds=(0,))
    loader = pretrain_loader(
        {
            "prepared_datalist": path,
            "num_partitions": 3,
            "crop_size": [16, 16],
            "scans_per_batch": 3,
            "iterations": 3,
            "spatial_size": [24, 24],
            "num_workers": 0,
        }
    )
    train_ids = {e["scan_id"] for e in load_split(path, "training")}
    seen = {s for batch in loader for s in batch["scan_id"]}
    assert seen == train_ids and "label" not in next(iter(loader))


def test_benchmark_loader_smoke() -> None:
    result = benchmark(
        num_volumes=2,
        num_slices=4,
        spatial_size=(32, 32),
        crop_size=(16, 16),
        num_partitions=2,
        scans_per_batch=2,
        num_workers=0,
        num_batches=2,
        warmup=1,
    )
    assert result["batch_size"] == 4 and result["slices_per_second"] > 0 and result["num_volumes"] == 2
