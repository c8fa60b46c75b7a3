"""Shared fixtures: a tiny synthetic ACDC dataset and the overrides that make every bundle config run in seconds.

- ``tiny_acdc`` (session): :data:`TINY_PATIENTS` synthetic patients (2 scans each) in ACDC layout, in a
  session-scoped temporary folder. With the datalist defaults (10 % validation, 20 % test, patient-level) the split
  is 4 training / 2 validation / 2 test scans, and labeled subsets of 1, 2 and 4 scans exist for seeds 0, 1, 2.
- ``tiny_datalist`` (session): the datalist JSON of ``tiny_acdc`` (built once, read-only afterwards).
- ``tiny_overrides`` (function): small settings shared by the pre-training and fine-tuning configs (unknown ids are
  simply added to a config, so one dict serves every config).
- ``tiny_paths`` (function): ``bundle_root`` and every path a config writes to, under the test's ``tmp_path``; the
  repository is never written to.
- ``bundle_configs``: paths of the repository's ``configs/`` files, ``workflow_files`` the ``meta_file`` /
  ``logging_file`` arguments of ``ConfigWorkflow``, and ``bundle_workflow`` a factory of ``ConfigWorkflow`` objects
  for named configs (``bundle_workflow(["train", "evaluate"], **overrides)``).

Every test runs with one intra-op torch thread (restored afterwards): on a small, shared machine the tiny networks
of these tests run 10-50 times slower with two contending threads than with one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_PATIENTS = 4
TINY_SEED = 0

if str(REPO) not in sys.path:  # the bundle root on sys.path, as ConfigWorkflow.run() and MONAI Label do
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_acdc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny synthetic ACDC dataset (4 patients x ED/ES), generated once per test session."""
    from bundle.data.synthetic import generate_synthetic_acdc

    return generate_synthetic_acdc(
        tmp_path_factory.mktemp("tiny_acdc") / "acdc", num_patients=TINY_PATIENTS, seed=TINY_SEED, num_workers=1
    )


@pytest.fixture(scope="session")
def tiny_datalist(tiny_acdc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Datalist JSON of ``tiny_acdc`` (4 training, 2 validation, 2 test scans), built once per session."""
    from bundle.data.datalist import prepare_datalist

    return Path(prepare_datalist(tiny_acdc, tmp_path_factory.mktemp("tiny_datalist") / "datalist.json"))


@pytest.fixture
def tiny_overrides() -> dict[str, Any]:
    """Settings for a tiny, CPU-only run of any bundle config (a fresh dict per test, safe to modify)."""
    return {
        "device": "$torch.device('cpu')",
        "features": [4, 8, 8, 16, 16, 4],
        "pixdim": [3.0, 3.0],
        "spatial_size": [64, 64],
        "crop_size": [32, 32],
        "epochs": 1,
        "iterations": 2,
        "warmup_epochs": 0,
        "val_interval": 1,
        "batch_size": 2,
        "slices_per_volume": 2,
        "scans_per_batch": 2,
        "num_workers": 0,
        "cache_rate": 1.0,
        "sw_batch_size": 64,
        "amp": False,
        "show_progress": False,
        "seed": 0,
    }


@pytest.fixture
def tiny_paths(tmp_path: Path, tiny_acdc: Path, tiny_datalist: Path) -> dict[str, Any]:
    """Path overrides: ``bundle_root`` is ``tmp_path`` (so models/, runs/ go there), data and datalist are the tiny
    session ones, and no pre-trained weights exist unless a test writes ``pretrained_path``."""
    return {
        "bundle_root": str(tmp_path),
        "dataset_dir": str(tiny_acdc),
        "datalist": str(tiny_datalist),
        "generate_if_missing": False,
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "runs" / "out"),
        "pretrained_path": str(tmp_path / "models" / "pretrained" / "unet_ssl.pt"),
    }


@pytest.fixture
def workflow_files() -> dict[str, str]:
    """``meta_file`` and ``logging_file`` arguments for ``monai.bundle.ConfigWorkflow``."""
    return {"meta_file": str(CONFIGS / "metadata.json"), "logging_file": str(CONFIGS / "logging.conf")}


@pytest.fixture
def bundle_configs() -> dict[str, str]:
    """Paths of the repository's config files by stem (``train``, ``evaluate``, ``inference``, ...)."""
    return {p.stem: str(p) for p in sorted(CONFIGS.glob("*.json"))}


@pytest.fixture
def bundle_workflow(workflow_files: dict[str, str]) -> Callable[..., Any]:
    """Factory ``bundle_workflow(["train", "mean_teacher"], workflow_type="train", **overrides)`` returning a
    ``monai.bundle.ConfigWorkflow`` of the named repository configs, merged in order (not yet initialised)."""
    from monai.bundle import ConfigWorkflow

    def make(names: Sequence[str], workflow_type: str | None = "train", **override: Any) -> ConfigWorkflow:
        files = [str(CONFIGS / f"{name}.json") for name in names]
        return ConfigWorkflow(config_file=files, workflow_type=workflow_type, **workflow_files, **override)

    return make
