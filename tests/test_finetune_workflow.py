"""Fine-tuning: pre-trained weight loading, loss, encoder freezing, the Mean Teacher step (against hand-written
references), and configs/train.json (+ configs/mean_teacher.json) run end to end on the tiny synthetic dataset."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from bundle.engines import MeanTeacherTrainer, batch_statistics_only
from bundle.finetune import load_pretrained, segmentation_loss
from bundle.handlers import FreezeEncoder, MeanTeacherHandler
from bundle.handlers.freeze import ENCODER_MODULES
from bundle.networks import FeatureUNet
from bundle.transforms import EquivariantTransform

TINY = (4, 8, 8, 16, 16, 4)


@contextlib.contextmanager
def _log_text(name: str = "bundle.finetune") -> Iterator[list[str]]:
    """Messages logged to ``name``, from a handler on that logger itself (ConfigWorkflow applies logging.conf,
    which replaces the root logger's handlers, pytest's capture handler included)."""
    logger, messages = logging.getLogger(name), []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _cause(error: BaseException) -> BaseException:
    """The original error behind MONAI's ``RuntimeError("Failed to evaluate ...")`` wrappers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _net(out_channels: int = 4, seed: int = 0) -> FeatureUNet:
    torch.manual_seed(seed)
    return FeatureUNet(out_channels=out_channels, features=TINY)


def _save_pretrained(path: Path, out_channels: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """A pre-training-like export: plain state dict of a U-Net with another head size."""
    state = {k: v.clone() for k, v in _net(out_channels, seed).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


# ------------------------------------------------------------------------------------------------ load_pretrained


def test_load_pretrained_copies_tensors_of_same_name_and_shape(tmp_path: Path) -> None:
    source = _save_pretrained(tmp_path / "ssl.pt", out_channels=2)
    net = _net(4, seed=5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    head = {"final_conv.weight", "final_conv.bias"}  # 2 vs 4 output channels: the only shape changes
    with _log_text() as log:
        info = load_pretrained(net, tmp_path / "ssl.pt")
    after = net.state_dict()
    assert set(info["skipped"]) == head and set(info["unused"]) == head
    assert len(info["loaded"]) == len(before) - 2
    for name in info["loaded"]:
        assert torch.equal(after[name], source[name]), name
    for name in head:
        assert torch.equal(after[name], before[name]), name
    text = " ".join(log)
    assert f"loaded {len(before) - 2} of {len(before)}" in text and "final_conv.weight" in text


def test_load_pretrained_accepts_model_wrapped_checkpoint(tmp_path: Path) -> None:
    source = _net(4, seed=3).state_dict()
    torch.save({"model": source}, tmp_path / "wrapped.pt")
    net = _net(4, seed=4)
    info = load_pretrained(net, str(tmp_path / "wrapped.pt"))
    assert info["skipped"] == [] and len(info["loaded"]) == len(source)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.items())


def test_load_pretrained_refuses_a_file_that_matches_nothing(tmp_path: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="none of its 1 tensors matches"):
        load_pretrained(_net(), tmp_path / "other.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_pretrained(_net(), tmp_path / "list.pt")


@pytest.mark.parametrize("path", [None, "", "null", "None"])
def test_load_pretrained_empty_path_trains_from_scratch(path: Any) -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with _log_text() as log:
        info = load_pretrained(net, path)
    assert info["loaded"] == [] and info["path"] is None
    assert "training from scratch" in " ".join(log)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_load_pretrained_missing_file(tmp_path: Path) -> None:
    with _log_text() as log:
        assert load_pretrained(_net(), tmp_path / "absent.pt")["loaded"] == []
    assert "training from scratch" in " ".join(log)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_pretrained(_net(), tmp_path / "absent.pt", required=True)
    with pytest.raises(ValueError, match="required"):
        load_pretrained(_net(), None, required=True)


# ------------------------------------------------------------------------------------------------------------ loss


def _naive_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    b, c, h, w = logits.shape
    total = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                z = logits[i, :, y, x]
                total += -(z[int(labels[i, 0, y, x])] - torch.log(torch.exp(z).sum()))
    return total / (b * h * w)


def _naive_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MONAI DiceLoss defaults: per sample and class 1 - (2I + 1e-5) / (|P| + |G| + 1e-5), mean over both."""
    probs = torch.softmax(logits, dim=1)
    losses = []
    for i in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            g = (labels[i, 0] == c).float()
            p = probs[i, c]
            losses.append(1 - (2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5))
    return torch.stack(losses).mean()


def test_segmentation_loss_against_hand_written_ce_and_dice() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=gen)
    labels = torch.randint(0, 3, (2, 1, 4, 5), generator=gen).float()
    ce = _naive_ce(logits, labels)
    torch.testing.assert_close(segmentation_loss("ce")(logits, labels), ce, rtol=1e-5, atol=1e-6)
    expected = ce + _naive_dice_loss(logits, labels)
    torch.testing.assert_close(segmentation_loss("dice_ce")(logits, labels), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Unsupported loss_type: 'dice'"):
        segmentation_loss("dice")


# ------------------------------------------------------------------------------------------------- FreezeEncoder


def test_freeze_encoder_for_the_first_epochs_only() -> None:
    net = _net()
    states: list[tuple[bool, bool]] = []

    def step(engine: Engine, batch: Any) -> None:
        states.append((net.conv_0.conv_0.conv.weight.requires_grad, net.final_conv.weight.requires_grad))

    engine = Engine(step)
    FreezeEncoder(net, epochs=2).attach(engine)
    engine.run([0], max_epochs=3)
    assert states == [(False, True), (False, True), (True, True)]
    encoder = {id(p) for m in ENCODER_MODULES for p in getattr(net, m).parameters()}
    assert all(p.requires_grad for p in net.parameters())
    assert len(encoder) < len(list(net.parameters()))


def test_freeze_encoder_bad_options() -> None:
    with pytest.raises(ValueError, match="freeze_encoder_epochs"):
        FreezeEncoder(_net(), epochs=-1)
    with pytest.raises(ValueError, match="no encoder module"):
        FreezeEncoder(nn.Conv2d(1, 2, 1), epochs=1)


# ------------------------------------------------------------------------------------------------- Mean Teacher step


class _PixelNet(nn.Module):
    """Per-pixel linear classifier (no normalisation), so outputs do not depend on batch composition."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _mt_batches() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    labeled = {
        "image": torch.rand(2, 1, 6, 5, generator=gen),
        "label": torch.randint(0, 3, (2, 1, 6, 5), generator=gen),
    }
    unlabeled = {"image": torch.rand(3, 1, 6, 5, generator=gen)}
    return labeled, unlabeled


def _mt_trainer(student: nn.Module, teacher: nn.Module, transform: EquivariantTransform, lr: float, weight: float,
                rampup: int = 0, unlabeled: list | None = None, iterations: int = 1) -> MeanTeacherTrainer:
    labeled, unl = _mt_batches()
    return MeanTeacherTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[labeled] * iterations,
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=lr),
        loss_function=segmentation_loss("ce"),
        teacher=teacher,
        unlabeled_data_loader=[unl] if unlabeled is None else unlabeled,
        transform=transform,
        consistency_weight=weight,
        rampup_iterations=rampup,
        decollate=False,
    )


def _naive_mt_loss(student: nn.Module, teacher: nn.Module, flip_x: bool, weight: float) -> torch.Tensor:
    labeled, unl = _mt_batches()
    ce = F.cross_entropy(student(labeled["image"]), labeled["label"][:, 0].long())
    x_u = unl["image"]
    x_u_t = torch.flip(x_u, dims=[-1]) if flip_x else x_u
    t_logits = teacher(x_u).detach()
    t_logits_t = torch.flip(t_logits, dims=[-1]) if flip_x else t_logits
    cons = ((torch.softmax(student(x_u_t), 1) - torch.softmax(t_logits_t, 1)) ** 2).mean()
    return ce + weight * cons


@pytest.mark.parametrize("flip_x", [False, True])
def test_mean_teacher_step_matches_hand_written_loss_and_gradient(flip_x: bool) -> None:
    # T = deterministic left-right flip (flip_x=True) or identity: known in closed form, mask all ones
    transform = EquivariantTransform(scale_range=(1.0, 1.0), rotate_range=0.0, translate_range=0.0,
                                     flip_prob=(1.0 if flip_x else 0.0, 0.0), gamma_range=(1.0, 1.0))
    student, teacher = _PixelNet(0), _PixelNet(7)
    reference = copy.deepcopy(student)
    expected = _naive_mt_loss(reference, teacher, flip_x, weight=2.0)
    expected.backward()
    lr = 0.5
    trainer = _mt_trainer(student, teacher, transform, lr=lr, weight=2.0)
    fired: list[str] = []
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                  IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(event, lambda e, name=event.name: fired.append(name))
    trainer.run()
    out = trainer.state.output
    torch.testing.assert_close(out["loss"].detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert out["consistency_weight"] == 2.0
    assert fired == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"]
    assert out["pred"].shape == (2, 3, 6, 5)  # labeled predictions only
    for p_new, p_ref in zip(student.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p_new.detach(), (p_ref - lr * p_ref.grad).detach(), rtol=1e-5, atol=1e-6)


def test_mean_teacher_weight_ramp_up_and_unlabeled_cycling() -> None:
    identity = EquivariantTransform(scale_range=(1.0, 1.0), rotate_range=0.0, translate_range=0.0, flip_prob=0.0,
                                    gamma_range=(1.0, 1.0))
    student = _PixelNet(0)
    teacher = copy.deepcopy(student)
    trainer = _mt_trainer(student, teacher, identity, lr=0.1, weight=3.0, rampup=4, iterations=3)
    weights: list[float] = []
    trainer.add_event_handler(
        IterationEvents.MODEL_COMPLETED, lambda e: weights.append(e.state.output["consistency_weight"])
    )
    MeanTeacherHandler(teacher, student, decay=0.99).attach(trainer)
    trainer.run()  # 3 iterations, the single unlabeled batch is cycled
    # sigmoid ramp-up exp(-5 (1 - t/4)^2) at t = 0, 1, 2
    assert weights == pytest.approx([3.0 * math.exp(-5.0 * (1 - t / 4) ** 2) for t in range(3)])
    assert not torch.equal(teacher.conv.weight, student.conv.weight)  # EMA lags behind the student


def test_a_resumed_teacher_is_kept_and_a_missing_update_handler_is_refused(
    bundle_workflow, tiny_overrides, tiny_paths
) -> None:
    student, teacher = _PixelNet(0), _PixelNet(7)
    handler = MeanTeacherHandler(teacher, student, decay=0.99)
    handler.start_from_student()
    assert torch.equal(teacher.conv.weight, student.conv.weight)  # a new run: the teacher starts as the student
    restored = _PixelNet(3)
    teacher.load_state_dict(restored.state_dict())
    handler.load_state_dict({"step": 5})  # a resumed run: teacher and update count restored
    handler.start_from_student()
    assert torch.equal(teacher.conv.weight, restored.conv.weight)
    # overriding train#handlers after the overlay added the EMA handler is refused before training
    _save_pretrained(Path(tiny_paths["pretrained_path"]), out_channels=4)
    plain = bundle_workflow(["train"], **tiny_overrides, **tiny_paths).parser.get("train#handlers")
    wf = bundle_workflow(["train", "mean_teacher"], **tiny_overrides, **tiny_paths, mt_batch_size=2,
                         **{"train#handlers": plain})
    with pytest.raises(Exception) as info:
        wf.initialize()
    assert "no train handler updates the teacher" in str(info.value) + str(info.value.__cause__)


def test_mean_teacher_bad_inputs() -> None:
    student = _PixelNet(0)
    with pytest.raises(ValueError, match="separate copy"):
        _mt_trainer(student, student, EquivariantTransform(), lr=0.1, weight=1.0)
    with pytest.raises(ValueError, match="yields no batch"):
        _mt_trainer(student, _PixelNet(1), EquivariantTransform(), lr=0.1, weight=1.0, unlabeled=[]).run()


# ------------------------------------------------------------------------------------------ configs/train.json e2e


def test_train_config_selects_the_recorded_labeled_scans(bundle_workflow, tiny_overrides, tiny_paths) -> None:
    wf = bundle_workflow(["train"], **tiny_overrides, **tiny_paths, num_labeled=2, labeled_seed=1, lr=1e-3,
                         loss_type="dice_ce")
    wf.initialize()
    recorded = json.loads(Path(tiny_paths["datalist"]).read_text())
    entries = wf.parser.get_parsed_content("train#entries")
    assert [e["scan_id"] for e in entries] == recorded["labeled"]["1"]["2"]
    validation = wf.parser.get_parsed_content("validate#entries")
    assert [e["scan_id"] for e in validation] == [e["scan_id"] for e in recorded["validation"]]
    optimizer = wf.parser.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.RAdam)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.param_groups[0]["weight_decay"] == 1e-5
    assert wf.parser.get_parsed_content("loss").lambda_dice == 1.0


def test_train_config_rejects_bad_options_before_reading_data(bundle_workflow, tiny_overrides, tiny_paths) -> None:
    overrides = {**tiny_overrides, **tiny_paths, "crop_size": [96, 96], "lr": 0.0}
    with pytest.raises(RuntimeError) as info:
        bundle_workflow(["train"], **overrides).initialize()
    error = _cause(info.value)
    assert isinstance(error, ValueError)
    assert "crop_size [96, 96] is larger" in str(error) and "lr must be > 0" in str(error)


def test_train_runs_end_to_end_from_pretrained_weights(
    bundle_workflow, tiny_overrides, tiny_paths, tmp_path: Path
) -> None:
    source = _save_pretrained(Path(tiny_paths["pretrained_path"]), out_channels=2)
    wf = bundle_workflow(["train"], **tiny_overrides, **tiny_paths)
    with _log_text() as log:
        wf.initialize()
    network = wf.parser.get_parsed_content("network")
    total = len(network.state_dict())
    assert f"loaded {total - 2} of {total}" in " ".join(log)
    state = network.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.items() if not k.startswith("final_conv"))
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(saved) == set(FeatureUNet(features=TINY).state_dict())  # plain state dict, loadable as is
    FeatureUNet(features=TINY).load_state_dict(saved)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2
    assert "val_mean_dice" in wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert not (tmp_path / "data").exists()  # the given dataset was used, no synthetic data generated


def test_train_from_scratch_when_pretrained_path_is_null(
    bundle_workflow, tiny_overrides, tiny_paths, tmp_path: Path
) -> None:
    source = _save_pretrained(Path(tiny_paths["pretrained_path"]), out_channels=4)  # present, must be ignored
    wf = bundle_workflow(["train"], **tiny_overrides, **{**tiny_paths, "pretrained_path": None})
    with _log_text() as log:
        wf.initialize()
    assert "training from scratch" in " ".join(log)
    state = wf.parser.get_parsed_content("network").state_dict()
    assert not any(torch.equal(state[k], v) for k, v in source.items() if v.is_floating_point() and v.numel() > 4
                   and "conv.weight" in k)
    wf.run()
    assert (tmp_path / "models" / "model.pt").is_file()


def test_train_refuses_pretrained_file_that_loads_nothing(bundle_workflow, tiny_overrides, tiny_paths) -> None:
    path = Path(tiny_paths["pretrained_path"])
    path.parent.mkdir(parents=True)
    torch.save({"backbone.weight": torch.zeros(2)}, path)
    with pytest.raises(RuntimeError) as info:
        bundle_workflow(["train"], **tiny_overrides, **tiny_paths).initialize()
    assert isinstance(_cause(info.value), ValueError) and "none of its 1 tensors matches" in str(_cause(info.value))


def test_train_frozen_encoder_warm_up_keeps_pretrained_encoder(bundle_workflow, tiny_overrides, tiny_paths) -> None:
    source = _save_pretrained(Path(tiny_paths["pretrained_path"]), out_channels=4)
    wf = bundle_workflow(["train"], **tiny_overrides, **tiny_paths, freeze_encoder_epochs=1, lr=1e-2)
    wf.initialize()
    wf.run()
    net = wf.parser.get_parsed_content("network")
    for name, param in net.named_parameters():
        if name.split(".")[0] in ENCODER_MODULES:
            assert torch.equal(param.detach(), source[name]), name
    assert not torch.equal(net.final_conv.weight.detach(), source["final_conv.weight"])


def test_mean_teacher_overlay_runs_end_to_end(bundle_workflow, tiny_overrides, tiny_paths, tmp_path: Path) -> None:
    source = _save_pretrained(Path(tiny_paths["pretrained_path"]), out_channels=4)
    wf = bundle_workflow(["train", "mean_teacher"], **tiny_overrides, **tiny_paths, mt_batch_size=2, lr=1e-2)
    wf.initialize()
    assert wf.check_properties() == []
    teacher = wf.parser.get_parsed_content("teacher")
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert isinstance(trainer, MeanTeacherTrainer)
    names = [type(h).__name__ for h in wf.parser.get_parsed_content("train#trainer#train_handlers")]
    assert names[-1] == "MeanTeacherHandler" and "ValidationHandler" in names  # train.json's handlers + the EMA's
    student = wf.parser.get_parsed_content("network")
    with torch.no_grad():  # a warm start after the teacher was built (e.g. MONAI Label's CheckpointLoader)
        student.final_conv.weight.add_(0.5)
    start = copy.deepcopy(student.state_dict())
    first_teacher: dict[str, torch.Tensor] = {}
    trainer.add_event_handler(  # the teacher of the first iteration is the network fine-tuning starts from
        Events.ITERATION_STARTED(once=1), lambda e: first_teacher.update(copy.deepcopy(teacher.state_dict())))
    terms: list[tuple[float, float]] = []
    trainer.add_event_handler(
        IterationEvents.LOSS_COMPLETED,
        lambda e: terms.append((float(e.state.output["consistency_loss"]), e.state.output["consistency_weight"])),
    )
    wf.run()
    assert len(terms) == 2 and all(math.isfinite(c) and c > 0 and w == 1.0 for c, w in terms)
    assert all(torch.equal(first_teacher[k], v) for k, v in start.items())
    assert not torch.equal(start["final_conv.weight"], source["final_conv.weight"])
    assert not torch.equal(teacher.final_conv.weight, student.final_conv.weight)
    assert (tmp_path / "models" / "model.pt").is_file()


def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return FeatureUNet(in_channels=1, out_channels=3, features=(4, 4, 4, 4, 4, 4))


def test_mean_teacher_with_zero_weight_trains_exactly_like_the_plain_fine_tune() -> None:
    """With a BatchNorm network: weights **and running statistics** after 3 steps equal the plain trainer's, so the
    unlabeled, T-transformed slices never leak into what validation and inference normalise with."""
    gen = torch.Generator().manual_seed(3)
    labeled = [{"image": torch.rand(2, 1, 16, 16, generator=gen), "label": torch.randint(0, 3, (2, 1, 16, 16),
                                                                                            generator=gen)}
               for _ in range(3)]
    unlabeled = [{"image": torch.rand(2, 1, 16, 16, generator=gen) * 3.0 + 1.0} for _ in range(2)]  # other stats
    plain_net, mt_net = _bn_net(0), _bn_net(0)
    plain = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=labeled, network=plain_net,
                              optimizer=torch.optim.SGD(plain_net.parameters(), lr=0.1),
                              loss_function=segmentation_loss("ce"), decollate=False)
    mt = MeanTeacherTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=labeled, network=mt_net,
                            optimizer=torch.optim.SGD(mt_net.parameters(), lr=0.1),
                            loss_function=segmentation_loss("ce"), teacher=copy.deepcopy(mt_net),
                            unlabeled_data_loader=unlabeled, transform=EquivariantTransform(), consistency_weight=0.0,
                            decollate=False)
    plain.run()
    mt.run()
    for (name, a), (_, b) in zip(plain_net.state_dict().items(), mt_net.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs")


def test_batch_statistics_only_uses_batch_stats_keeps_running_stats_and_restores() -> None:
    bn = nn.BatchNorm2d(2).train()
    net = nn.Sequential(bn)
    x = torch.randn(4, 2, 5, 5) * 3 + 2
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    with batch_statistics_only(net):
        y = net(x)
    expected = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False,
                                                                            keepdim=True) + bn.eps)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and bn.track_running_stats
    with pytest.raises(RuntimeError), batch_statistics_only(net):
        raise RuntimeError("boom")
    assert bn.track_running_stats
    net(x)  # outside the block the running statistics move again
    assert not torch.equal(bn.running_mean, before[0])
