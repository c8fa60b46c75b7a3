"""configs/metadata.json against MONAI's bundle metadata schema (local copy, no network), and configs/logging.conf."""

from __future__ import annotations

import copy
import json
import logging
import logging.config
import shutil
import socket
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
from monai.bundle import verify_metadata

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "configs" / "metadata.json"
SCHEMA = ROOT / "tests" / "data" / "meta_schema_20240725.json"
LOGGING_CONF = ROOT / "configs" / "logging.conf"


@pytest.fixture
def metadata() -> dict:
    return json.loads(META.read_text(encoding="utf-8"))


@pytest.fixture
def schema() -> dict:
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_schema_is_the_one_named_in_metadata(metadata: dict, schema: dict) -> None:
    assert metadata["schema"].endswith("/" + SCHEMA.name)
    assert schema["$schema"] == "https://json-schema.org/draft/2019-09/schema"
    assert "required_packages_version" in schema["required"]


def test_metadata_valid_with_jsonschema(metadata: dict, schema: dict) -> None:
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator_class(schema).validate(metadata)
    broken = copy.deepcopy(metadata)
    del broken["task"]
    with pytest.raises(jsonschema.ValidationError, match="'task' is a required property"):
        validator_class(schema).validate(broken)
    broken = copy.deepcopy(metadata)
    broken["network_data_format"]["outputs"]["pred"]["num_channels"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        validator_class(schema).validate(broken)


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_metadata_valid_with_monai_verify_metadata_offline(tmp_path: Path, no_network: None) -> None:
    # verify_metadata downloads metadata["schema"] unless a file already exists at `filepath` and no hash is given
    local_schema = tmp_path / "schema.json"
    shutil.copyfile(SCHEMA, local_schema)
    verify_metadata(meta_file=str(META), filepath=str(local_schema), create_dir=False)

    broken = json.loads(META.read_text(encoding="utf-8"))
    del broken["required_packages_version"]
    broken_file = tmp_path / "metadata.json"
    broken_file.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(ValueError, match="required_packages_version"):
        verify_metadata(meta_file=str(broken_file), filepath=str(local_schema), create_dir=False)


def test_version_has_changelog_entry(metadata: dict) -> None:
    assert metadata["version"] in metadata["changelog"]


def test_only_required_packages_version(metadata: dict) -> None:
    # MONAI renames optional_packages_version to required_packages_version; having both corrupts _meta_
    assert "optional_packages_version" not in metadata


def _major_minor(text: str) -> tuple[str, ...]:
    return tuple(text.split("+")[0].split(".")[:2])


@pytest.mark.parametrize("key, package", [("monai_version", "monai"), ("numpy_version", "numpy")])
def test_core_versions_match_installed(metadata: dict, key: str, package: str) -> None:
    assert _major_minor(metadata[key]) == _major_minor(version(package))


def test_pytorch_version_is_installable_and_matches(metadata: dict) -> None:
    assert "+" not in metadata["pytorch_version"]  # zoo CI pip-installs torch=={pytorch_version}
    assert _major_minor(metadata["pytorch_version"]) == _major_minor(version("torch"))


def test_required_package_versions_match_installed(metadata: dict) -> None:
    for package, pinned in metadata["required_packages_version"].items():
        assert _major_minor(pinned) == _major_minor(version(package)), package


def test_network_data_format_consistent(metadata: dict) -> None:
    image = metadata["network_data_format"]["inputs"]["image"]
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == len(image["channel_def"]) == 1
    assert pred["num_channels"] == len(pred["channel_def"])
    assert list(pred["channel_def"]) == [str(i) for i in range(pred["num_channels"])]
    assert image["spatial_shape"] == pred["spatial_shape"] == [224, 224]
    assert "eval_metrics" not in metadata or all(isinstance(v, int | float) for v in metadata["eval_metrics"].values())


def test_metadata_formatting(metadata: dict) -> None:
    # zoo pre-commit: pretty-format-json --no-sort-keys --indent=4
    text = META.read_text(encoding="utf-8")
    assert text == json.dumps(metadata, indent=4, ensure_ascii=False) + "\n"


def test_logging_conf_loads(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, root.handlers[:]
    try:
        logging.config.fileConfig(LOGGING_CONF, disable_existing_loggers=False)
        assert root.level == logging.INFO
        assert len(root.handlers) == 1 and isinstance(root.handlers[0], logging.StreamHandler)
        logging.getLogger("bundle.test").info("hello")
        out = capsys.readouterr().out
        assert " - bundle.test - INFO - hello" in out
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)


#: import name -> distribution name, where they differ
_DISTRIBUTIONS = {"PIL": "pillow", "skimage": "scikit-image", "ignite": "pytorch-ignite", "yaml": "pyyaml"}
#: the metadata's own fields for these (monai_version, pytorch_version, numpy_version)
_OWN_FIELDS = {"monai", "torch", "numpy"}


def test_every_third_party_package_the_bundle_imports_is_in_the_metadata(metadata: dict) -> None:
    """An environment built from the metadata must run the bundle: each package imported by bundle/ (at any depth,
    lazily imported ones included) is listed."""
    import ast
    import sys

    imported: set[str] = set()
    for path in (ROOT / "bundle").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {_DISTRIBUTIONS.get(m, m) for m in imported if m not in sys.stdlib_module_names and m != "bundle"}
    listed = {k.lower() for k in metadata["required_packages_version"]}
    assert third_party - _OWN_FIELDS - listed == set()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_configs_are_in_the_model_zoo_json_format(path: Path) -> None:
    """4-space indent, one item a line: the zoo's formatter leaves the files as they are."""
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=4) + "\n"
