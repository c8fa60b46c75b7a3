"""The best-model file is replaced atomically: a crash while the new best is written leaves the previous best."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from bundle.handlers import AtomicCheckpointSaver


class _Killed(RuntimeError):
    pass


def _evaluator(scores: list[float]) -> Engine:
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _score(e: Engine) -> None:
        e.state.metrics["val_mean_dice"] = scores[e.state.epoch - 1]

    engine.state.key_metric_name = "val_mean_dice"
    return engine


def _run(saver_cls: type, folder: Path, net: torch.nn.Module, scores: list[float], weights: list[float]) -> None:
    saver = saver_cls(save_dir=str(folder), save_dict={"model": net}, save_key_metric=True,
                      key_metric_name="val_mean_dice", key_metric_filename="model.pt")
    engine = _evaluator(scores)

    @engine.on(Events.EPOCH_COMPLETED)
    def _set_weights(e: Engine) -> None:  # runs before the saver's handler: the weights of this epoch
        with torch.no_grad():
            net.weight.fill_(weights[e.state.epoch - 1])

    saver.attach(engine)
    engine.run([0], max_epochs=len(scores))


def _kill_the_second_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.save`` works once, then the process "dies" while writing (half a file, then an exception)."""
    real_save, calls = torch.save, []

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        calls.append(f)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        with open(f, "wb") as fh:  # type: ignore[arg-type]
            fh.write(b"half a file")
        raise _Killed("killed while writing")

    monkeypatch.setattr(torch, "save", save)


def test_a_crash_while_writing_the_new_best_keeps_the_previous_best(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    _kill_the_second_save(monkeypatch)
    with pytest.raises(_Killed):  # epoch 1: best 0.5 saved; epoch 2: a new best, killed while it is written
        _run(AtomicCheckpointSaver, tmp_path, net, scores=[0.5, 0.9], weights=[1.0, 2.0])
    monkeypatch.undo()
    assert torch.load(tmp_path / "model.pt")["weight"].item() == 1.0  # the previous best, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left behind


def test_monai_checkpoint_saver_loses_the_best_model_in_that_window(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the bundle does not use MONAI's saver as it is: the same crash leaves no usable model."""
    net = torch.nn.Linear(1, 1, bias=False)
    _kill_the_second_save(monkeypatch)
    with pytest.raises(_Killed):
        _run(CheckpointSaver, tmp_path, net, scores=[0.5, 0.9], weights=[1.0, 2.0])
    monkeypatch.undo()
    # the previous best was deleted before the write began; what is left is the half-written file
    assert (tmp_path / "model.pt").read_bytes() == b"half a file"


def test_atomic_saver_writes_every_new_best_and_keeps_one_file(tmp_path: Path) -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    _run(AtomicCheckpointSaver, tmp_path, net, scores=[0.2, 0.6, 0.4, 0.7], weights=[1.0, 2.0, 3.0, 4.0])
    assert torch.load(tmp_path / "model.pt")["weight"].item() == 4.0  # epoch 4 is the best
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    _run(AtomicCheckpointSaver, tmp_path, net, scores=[0.2, 0.6, 0.4], weights=[1.0, 2.0, 3.0])
    assert torch.load(tmp_path / "model.pt")["weight"].item() == 2.0  # a new run's best replaces the file


def test_temporary_files_of_killed_writers_are_removed(tmp_path: Path) -> None:
    from bundle.handlers import atomic_save

    host = socket.gethostname().replace("-", "_")
    dead = tmp_path / f".model.pt.tmp-{host}-999999999"  # no such process on this host
    dead.write_bytes(b"left by kill -9")
    other = tmp_path / f".other.pt.tmp-{host}-999999999"  # another file's: not ours to remove
    other.write_bytes(b"")
    elsewhere = tmp_path / ".model.pt.tmp-othernode-999999999"  # another node's writer on a shared disk: unknown
    elsewhere.write_bytes(b"")
    atomic_save({"x": torch.ones(1)}, tmp_path / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, elsewhere.name, "model.pt"])
