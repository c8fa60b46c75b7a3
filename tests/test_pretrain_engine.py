"""PretrainTrainer on in-memory batches: alignment of the two views, NaN guard, events, per-iteration T."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents

from bundle.engines import (
    MEAN_TEACHER_SALT,
    PRETRAIN_SALT,
    NonFiniteLossError,
    PretrainTrainer,
    derived_seed,
    step_output,
    trainable_parameters,
    transform_seed,
)
from bundle.losses import PretrainingObjective
from bundle.networks import DenseClusterHead, DenseProjectionHead, FeatureUNet, GlobalProjectionHead
from bundle.transforms import EquivariantTransform

FEATURES = (4, 8, 8, 16, 16, 4)


def _batches(n: int, b: int = 4, size: int = 32):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(b, 1, size, size, generator=g), "meta_label": torch.arange(b) % 2} for _ in range(n)]


def _trainer(objective: PretrainingObjective, data, **kw) -> PretrainTrainer:
    torch.manual_seed(0)
    net = FeatureUNet(out_channels=2, features=FEATURES)
    heads = {
        "dense_head": DenseClusterHead(FEATURES[5], num_clusters=5, num_heads=2),
        "global_head": GlobalProjectionHead(FEATURES[4], hidden_dim=8, out_dim=8),
        "dense_projector": DenseProjectionHead(FEATURES[5], hidden_dim=8, out_dim=8, grid=4),
    }
    opt = torch.optim.RAdam(trainable_parameters(net, *heads.values()), lr=1e-3)
    return PretrainTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=opt,
        objective=objective,
        transform=EquivariantTransform(),
        epoch_length=len(data),
        **heads,
        **kw,
    )


def test_nan_loss_stops_before_the_step_naming_iteration_and_component(monkeypatch):
    objective = PretrainingObjective.from_variant("ours")
    trainer = _trainer(objective, _batches(3))
    original = objective.forward

    def poisoned(**kwargs):
        out = original(**kwargs)
        if trainer.state.iteration == 2:
            out["cc"] = out["cc"] * float("nan")
            out["loss"] = out["loss"] + out["cc"]
        return out

    monkeypatch.setattr(objective, "forward", poisoned)
    snapshot = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _keep(engine):
        snapshot.update({k: v.detach().clone() for k, v in engine.network.named_parameters()})

    with pytest.raises(NonFiniteLossError, match=r"iteration 2 .*cc=nan"):
        trainer.run()
    # the weights are those after iteration 1: the poisoned step never reached the optimiser
    for k, v in trainer.network.named_parameters():
        assert torch.equal(v, snapshot[k]), k


def test_fires_iteration_events_and_reports_components():
    objective = PretrainingObjective.from_variant("ours")
    trainer = _trainer(objective, _batches(2))
    fired = []
    for ev in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):
        trainer.add_event_handler(ev, lambda e, ev=ev: fired.append(ev))
    trainer.run()
    assert fired.count(IterationEvents.MODEL_COMPLETED) == 2 and len(fired) == 8
    out = step_output(trainer.state.output)
    assert {"loss", "mi", "cc", "con"} <= set(out) and "imsat" not in out
    expected = out["mi"] + out["cc"] + out["con"]
    torch.testing.assert_close(out["loss"], expected)
    assert out["views"]["p_hat"].shape == (2, 4, 5, 32, 32)  # heads, B, K, H, W


def test_final_conv_gets_no_gradient_and_heads_train():
    objective = PretrainingObjective.from_variant("ours")
    trainer = _trainer(objective, _batches(1))
    before = {k: v.clone() for k, v in trainer.network.final_conv.state_dict().items()}
    head_before = trainer.dense_head.proj.weight.clone()
    trainer.run()
    for k, v in trainer.network.final_conv.state_dict().items():
        assert torch.equal(v, before[k])
    assert not torch.equal(trainer.dense_head.proj.weight, head_before)


def test_p_tilde_is_T_of_untransformed_features():
    """With identity T (no geometry, gamma 1), p_hat and p_tilde come from the same image: they must agree."""
    objective = PretrainingObjective.from_variant("mi_only")
    trainer = _trainer(objective, _batches(1), seed=3)
    trainer.transform = EquivariantTransform(
        scale_range=(1.0, 1.0), rotate_range=0.0, translate_range=0.0, flip_prob=0.0, gamma_range=(1.0, 1.0)
    )
    trainer.network.eval()  # same BN statistics for both halves of the batch
    x = _batches(1)[0]["image"]
    views = trainer._views(x)
    torch.testing.assert_close(views["p_hat"], views["p_tilde"], atol=1e-5, rtol=1e-5)


def test_transform_seed_is_a_pure_function_of_seed_and_iteration():
    assert transform_seed(0, 5) == transform_seed(0, 5)
    assert len({transform_seed(s, i) for s in range(3) for i in range(100)}) == 300


def test_each_trainer_draws_its_own_seed_stream_and_the_values_never_change():
    # the integers of runs made before the two trainers shared derived_seed: (seed * 1000003 + it * 7919 + salt)
    assert [transform_seed(s, i) for s, i in ((0, 0), (1, 2), (5, 1000))] == [17, 1015858, 12919032]
    assert [derived_seed(s, i, MEAN_TEACHER_SALT) for s, i in ((0, 0), (1, 2), (5, 1000))] == [29, 1015870, 12919044]
    assert transform_seed(3, 7) == derived_seed(3, 7, PRETRAIN_SALT) != derived_seed(3, 7, MEAN_TEACHER_SALT)


def test_missing_head_for_active_term_raises():
    objective = PretrainingObjective.from_variant("ours")
    with pytest.raises(ValueError, match="global_head"):
        PretrainTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=_batches(1),
            network=FeatureUNet(features=FEATURES),
            optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
            objective=objective,
            transform=EquivariantTransform(),
            dense_head=DenseClusterHead(FEATURES[5], 5, 1),
        )


def test_monitor_warns_on_collapse_and_writes_pictures(tmp_path, caplog):
    import logging

    from bundle.handlers import PretrainMonitor

    monitor = PretrainMonitor(log_dir=tmp_path, log_interval=1, image_interval=1, collapse_fraction=0.5)
    b, k, s = 2, 4, 16
    collapsed = torch.zeros(1, b, k, s, s)
    collapsed[:, :, 0] = 1.0  # every pixel in cluster 0: marginal entropy 0 < 0.5 log K
    views = {
        "image_t": torch.rand(b, 1, s, s),
        "mask": torch.ones(b, 1, s, s),
        "p_hat": collapsed,
        "p_tilde": collapsed,
    }

    class _State:
        iteration, epoch, max_epochs = 1, 1, 1
        metrics: dict = {}
        output = {"loss": torch.tensor(1.0), "mi": torch.tensor(0.5), "views": views}

    class _Engine:
        state = _State()
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    with caplog.at_level(logging.INFO, logger="bundle.pretrain"):
        monitor.iteration_completed(_Engine())
        monitor.epoch_completed(_Engine())
    monitor.close()
    assert any("cluster collapse" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert any("epoch 1/1: loss=1.0000 mi=0.5000" in r.message for r in caplog.records)
    metrics = _Engine.state.metrics  # the same figures for MONAI's standard handlers (MLflow, TensorBoard)
    assert metrics["loss"] == 1.0 and metrics["mi"] == 0.5 and metrics["dead_clusters"] == k - 1
    assert metrics["marginal_entropy"] == pytest.approx(0.0, abs=1e-6)
    health = PretrainMonitor.health(views)
    assert health["marginal_entropy"] == pytest.approx(0.0, abs=1e-6) and health["dead_clusters"] == k - 1
    pngs = list((tmp_path / "pictures").glob("iteration_*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 0


@pytest.mark.parametrize("variant", ["ours", "dense_contrast"])
def test_views_under_autocast_feed_half_precision_features_to_the_heads(variant):
    # on CUDA the trainer runs with float16 autocast; bfloat16 autocast on the CPU exercises the same path: the
    # network's low-precision features must reach T and every head inside the autocast region
    trainer = _trainer(PretrainingObjective.from_variant(variant), _batches(1))
    trainer.amp, trainer.amp_dtype = True, torch.bfloat16
    trainer.state.iteration = 1
    views = trainer._views(_batches(1)[0]["image"])
    heads = ("p_hat", "p_tilde", "z_a", "z_b") if variant == "ours" else ("dense_a", "dense_b")
    for name in heads:
        assert torch.isfinite(views[name].float()).all(), name
    if variant == "ours":
        assert views["p_hat"].dtype == torch.float32  # the dense head's softmax is fp32
        assert views["p_hat"].shape == (2, 4, 5, 32, 32)


def test_monitor_warns_when_mi_stalls_after_warmup_only(caplog):
    import logging

    from bundle.handlers import PretrainMonitor

    b, k, s = 2, 4, 8
    uniform = torch.full((1, b, k, s, s), 1.0 / k)  # MI exactly 0, marginal entropy log K: no collapse, no cluster
    views = {"image_t": torch.rand(b, 1, s, s), "mask": torch.ones(b, 1, s, s), "p_hat": uniform, "p_tilde": uniform}

    def _engine(epoch):
        class _State:
            iteration, max_epochs = 1, 3
            metrics: dict = {}
            output = {"loss": torch.tensor(1.0), "views": views}

        _State.epoch = epoch

        class _Engine:
            state = _State()
            optimizer = None

        return _Engine()

    monitor = PretrainMonitor(log_dir=None, log_interval=1, warmup_epochs=1, stall_fraction=0.05)
    with caplog.at_level(logging.INFO, logger="bundle.pretrain"):
        for epoch in (1, 2):
            monitor.iteration_completed(_engine(epoch))
            monitor.epoch_completed(_engine(epoch))
    stalls = [r for r in caplog.records if "no clusters yet" in r.message]
    assert [r.levelno for r in stalls] == [logging.WARNING] and "epoch 2" in stalls[0].message
    assert any("MI=0.000 nat (0.0% of log K)" in r.message for r in caplog.records)
    assert not any("cluster collapse" in r.message for r in caplog.records)
