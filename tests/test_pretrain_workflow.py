"""configs/pretrain.json end to end on the tiny synthetic dataset: properties, variants, resume, logs, bad options."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.networks.nets import BasicUNet

from bundle.engines import step_output
from bundle.losses import VARIANTS


@pytest.fixture
def pretrain_overrides(tiny_overrides: dict[str, Any], tiny_paths: dict[str, Any]) -> dict[str, Any]:
    over = {**tiny_overrides, **tiny_paths}
    over.update(num_clusters=6, num_heads=2, num_partitions=2, log_interval=1, image_interval=2, resume=True)
    over["output_dir"] = str(Path(tiny_paths["bundle_root"]) / "runs" / "pretrain")
    over["state_path"] = str(Path(over["output_dir"]) / "checkpoints" / "trainer_state.pt")
    return over


def _run(bundle_workflow, over: dict[str, Any], hook=None):
    wf = bundle_workflow(["pretrain"], **over)
    wf.initialize()
    if hook is not None:
        hook(wf.parser.get_parsed_content("train#trainer"))
    wf.run()
    wf.finalize()
    return wf


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def test_check_properties_train_workflow(bundle_workflow, pretrain_overrides):
    wf = bundle_workflow(["pretrain"], **pretrain_overrides)
    wf.initialize()
    assert wf.check_properties() in (None, [])
    parser = wf.parser
    assert parser["run"] == parser["training"]  # both run ids: `run` (zoo, MONAI Label) and `training` (README)


def test_end_to_end_writes_plain_unet_weights_state_and_tensorboard(bundle_workflow, pretrain_overrides):
    over = dict(pretrain_overrides, epochs=2, iterations=2)
    _run(bundle_workflow, over)
    weights = torch.load(over["pretrained_path"], weights_only=True)
    plain = BasicUNet(
        spatial_dims=2, in_channels=1, out_channels=4, features=over["features"], act="relu", norm="batch", bias=False
    )
    plain.load_state_dict(weights, strict=True)  # heads excluded, plain BasicUNet keys
    assert not any(k.startswith(("dense_head", "global_head", "proj", "mlp")) for k in weights)
    state = torch.load(over["state_path"], weights_only=True)
    assert state["engine"] == {"epoch": 2, "iteration": 4}
    assert {"network", "dense_head", "global_head", "optimizer", "lr_scheduler"} <= set(state)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(over["output_dir"], size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    expected_scalars = {f"pretrain/{k}" for k in ("loss", "mi", "cc", "con", "lr")}
    expected_scalars |= {f"clusters/{k}" for k in ("mutual_information", "marginal_entropy", "dead_clusters")}
    assert expected_scalars <= scalars, expected_scalars - scalars
    expected_images = {f"pictures/{k}" for k in ("input", "clusters", "entropy", "edges", "joint_P")}
    assert expected_images <= images, expected_images - images
    # variant "ours" computes exactly its three terms
    assert not {"pretrain/imsat", "pretrain/dense_con"} & scalars


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_ablation_variant_runs(bundle_workflow, pretrain_overrides, variant):
    over = dict(pretrain_overrides, variant=variant, iterations=1, resume=False)
    wf = _run(bundle_workflow, over)
    trainer = wf.parser.get_parsed_content("train#trainer")
    terms = set(trainer.objective.active_terms)
    out = step_output(trainer.state.output)
    assert set(k for k in ("mi", "cc", "con", "imsat", "dense_con") if k in out) == terms
    assert torch.isfinite(out["loss"])


def test_resume_after_interruption_reproduces_uninterrupted_run(bundle_workflow, pretrain_overrides, tmp_path):
    base = dict(pretrain_overrides, epochs=3, iterations=2, warmup_epochs=1)
    straight = dict(base, bundle_root=str(tmp_path / "a"), output_dir=str(tmp_path / "a" / "runs"))
    straight.update(state_path=str(tmp_path / "a" / "state.pt"), pretrained_path=str(tmp_path / "a" / "unet.pt"))
    _run(bundle_workflow, straight)

    broken = dict(base, bundle_root=str(tmp_path / "b"), output_dir=str(tmp_path / "b" / "runs"))
    broken.update(state_path=str(tmp_path / "b" / "state.pt"), pretrained_path=str(tmp_path / "b" / "unet.pt"))

    class Killed(Exception):
        pass

    def crash_mid_epoch_3(trainer):
        from ignite.engine import Events

        @trainer.on(Events.ITERATION_STARTED)
        def _die(engine):
            if engine.state.iteration == 5:  # first iteration of epoch 3: epoch 2's state is on disk
                raise Killed()

    with pytest.raises(Exception) as info:
        _run(bundle_workflow, broken, hook=crash_mid_epoch_3)
    assert isinstance(_root_cause(info.value), Killed) or isinstance(info.value, Killed)
    assert torch.load(broken["state_path"], weights_only=True)["engine"]["epoch"] == 2

    wf = _run(bundle_workflow, broken)  # the same command again
    assert wf.parser.get_parsed_content("train#handlers")[1].resumed_from == 2
    a = torch.load(straight["pretrained_path"], weights_only=True)
    b = torch.load(broken["pretrained_path"], weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "override, message",
    [
        ({"variant": "simclr"}, "unknown variant 'simclr'; valid variants:"),
        ({"num_clusters": 1}, "num_clusters"),
        ({"alpha": 1.5}, "alpha must be in [0, 1], got 1.5"),
        ({"cc_weight": -1.0}, "cc_weight must be a finite number >= 0, got -1.0"),
        ({"variant": "iic", "alpha": 0.3}, "variant 'iic' fixes alpha = 0.0; got alpha = 0.3"),
        ({"crop_size": [96, 96]}, "larger than the pre-processed"),
        ({"alpha": 1.5, "num_clusters": 1}, "alpha must be in [0, 1], got 1.5\n  - num_clusters (K) must be"),
    ],
)
def test_bad_overrides_rejected_before_training(bundle_workflow, pretrain_overrides, override, message):
    wf = bundle_workflow(["pretrain"], **{**pretrain_overrides, **override})
    with pytest.raises(Exception) as info:
        wf.initialize()
    assert isinstance(_root_cause(info.value), ValueError)
    assert message in str(_root_cause(info.value))
    assert not Path(pretrain_overrides["state_path"]).exists()
    assert not Path(pretrain_overrides["pretrained_path"]).exists()


def test_a_file_corrupted_after_the_datalist_was_built_is_named_before_training(
    bundle_workflow, pretrain_overrides, tiny_acdc, tmp_path
):
    from bundle.data.checks import DataCheckError
    from bundle.data.datalist import load_split, prepare_datalist

    data = tmp_path / "acdc_copy"
    shutil.copytree(tiny_acdc, data)
    datalist = prepare_datalist(data, tmp_path / "dl.json")
    victim = Path(load_split(datalist, "training")[0]["image"])
    victim.write_bytes(b"corrupted after the datalist was written")
    over = dict(pretrain_overrides, dataset_dir=str(data), datalist=datalist)
    wf = bundle_workflow(["pretrain"], **over)
    with pytest.raises(Exception) as caught:
        wf.initialize()
    error = _root_cause(caught.value)
    assert isinstance(error, DataCheckError) and f"{victim}: unreadable or corrupt" in str(error)
    assert not Path(over["pretrained_path"]).exists()


@pytest.mark.parametrize(("typed", "expected"), [("false", False), ("False", False), ("0", False), ("no", False),
                                                 ("OFF", False), ("true", True), ("yes", True), (1, True)])
def test_boolean_options_accept_what_users_type(typed, expected):
    from bundle.options import flag

    assert flag(typed, "resume") is expected


def test_a_false_typed_on_the_command_line_is_false_and_a_bad_value_is_named(bundle_workflow, pretrain_overrides):
    """``--resume false`` reaches the config as the string "false"; the checkpoint handler must see False."""
    wf = bundle_workflow(["pretrain"], **{**pretrain_overrides, "resume": "false", "show_progress": "no"})
    wf.initialize()
    handlers = wf.parser.get_parsed_content("train#handlers")
    (state,) = [h for h in handlers if hasattr(h, "resume")]
    assert state.resume is False
    bad = bundle_workflow(["pretrain"], **{**pretrain_overrides, "resume": "maybe"})
    with pytest.raises(Exception) as info:
        bad.initialize()  # rejected before anything is built
    message = str(_root_cause(info.value))
    assert "resume must be a boolean" in message and "'maybe'" in message


def test_compile_off_cuda_is_refused_before_any_work(bundle_workflow, pretrain_overrides, tmp_path):
    wf = bundle_workflow(["pretrain"], **{**pretrain_overrides, "compile": "true"})
    with pytest.raises(Exception) as info:
        wf.initialize()
    assert "compile is for CUDA devices" in str(_root_cause(info.value))
    assert not (tmp_path / "runs").exists()  # nothing written
