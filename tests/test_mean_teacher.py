"""Mean Teacher pieces: EMA update, handler, softmax-MSE consistency and ramp-up, against hand-computed values."""

from __future__ import annotations

import io
import math

import pytest
import torch
from ignite.engine import Engine
from torch import nn

from bundle.handlers import EMATeacher, MeanTeacherHandler
from bundle.losses import ConsistencyWeight, sigmoid_rampup, softmax_mse_consistency


def _linear(weight: list[float], bias: float) -> nn.Linear:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
        layer.bias.fill_(bias)
    return layer


def _set(layer: nn.Linear, weight: list[float], bias: float) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
        layer.bias.fill_(bias)


def _assert_params(layer: nn.Linear, weight: list[float], bias: float) -> None:
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([weight]), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.bias.detach(), torch.tensor([bias]), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------- EMA


def test_ema_warmup_two_steps_by_hand() -> None:
    teacher, student = _linear([10.0, 20.0], -1.0), _linear([1.0, 2.0], 0.5)
    ema = EMATeacher(teacher, student, decay=0.99, warmup=True)
    # step 0: a = min(1 - 1/1, 0.99) = 0 -> teacher becomes the student
    assert ema.update() == 0.0
    _assert_params(teacher, [1.0, 2.0], 0.5)
    _set(student, [3.0, -1.0], 1.5)
    # step 1: a = 1/2 -> mean of the two
    assert ema.update() == pytest.approx(0.5)
    _assert_params(teacher, [2.0, 0.5], 1.0)
    assert ema.step == 2


def test_ema_fixed_decay_two_steps_by_hand() -> None:
    teacher, student = _linear([10.0, 20.0], -1.0), _linear([1.0, 2.0], 0.5)
    ema = EMATeacher(teacher, student, decay=0.9, warmup=False)
    assert ema.update() == pytest.approx(0.9)
    # 0.9*10 + 0.1*1 = 9.1 ; 0.9*20 + 0.1*2 = 18.2 ; 0.9*(-1) + 0.1*0.5 = -0.85
    _assert_params(teacher, [9.1, 18.2], -0.85)
    _set(student, [3.0, -1.0], 1.5)
    ema.update()
    # 0.9*9.1 + 0.1*3 = 8.49 ; 0.9*18.2 - 0.1 = 16.28 ; 0.9*(-0.85) + 0.15 = -0.615
    _assert_params(teacher, [8.49, 16.28], -0.615)


def test_warmup_is_capped_by_decay() -> None:
    ema = EMATeacher(_linear([0.0, 0.0], 0.0), _linear([0.0, 0.0], 0.0), decay=0.6)
    assert [ema.update() for _ in range(4)] == pytest.approx([0.0, 0.5, 0.6, 0.6])
    ema99 = EMATeacher(_linear([0.0, 0.0], 0.0), _linear([0.0, 0.0], 0.0), decay=0.99)
    ema99.step = 3
    assert ema99.current_decay() == pytest.approx(0.75)
    ema99.step = 500
    assert ema99.current_decay() == pytest.approx(0.99)


def test_teacher_grads_off_student_untouched() -> None:
    student = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    ema = EMATeacher.from_student(student)
    assert ema.teacher is not student
    assert all(not p.requires_grad for p in ema.teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    before = [p.detach().clone() for p in student.parameters()]
    ema.update()
    for b, p in zip(before, student.parameters(), strict=True):
        assert torch.equal(b, p.detach())


def _bn(mean: list[float], var: list[float], tracked: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(2)
    bn.running_mean.copy_(torch.tensor(mean))
    bn.running_var.copy_(torch.tensor(var))
    bn.num_batches_tracked.fill_(tracked)
    return bn


def test_buffers_copy_ema_keep() -> None:
    teacher, student = _bn([5.0, 5.0], [4.0, 4.0], 0), _bn([1.0, 2.0], [2.0, 0.0], 7)
    EMATeacher(teacher, student, buffers="copy").update()
    torch.testing.assert_close(teacher.running_mean, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(teacher.running_var, torch.tensor([2.0, 0.0]))
    assert int(teacher.num_batches_tracked) == 7

    teacher, student = _bn([5.0, 5.0], [4.0, 4.0], 0), _bn([1.0, 2.0], [2.0, 0.0], 7)
    EMATeacher(teacher, student, decay=0.75, warmup=False, buffers="ema").update()
    # 0.75*5 + 0.25*[1, 2] = [4, 4.25] ; 0.75*4 + 0.25*[2, 0] = [3.5, 3] ; integer buffer copied
    torch.testing.assert_close(teacher.running_mean, torch.tensor([4.0, 4.25]))
    torch.testing.assert_close(teacher.running_var, torch.tensor([3.5, 3.0]))
    assert int(teacher.num_batches_tracked) == 7

    teacher, student = _bn([5.0, 5.0], [4.0, 4.0], 0), _bn([1.0, 2.0], [2.0, 0.0], 7)
    EMATeacher(teacher, student, buffers="keep").update()
    torch.testing.assert_close(teacher.running_mean, torch.tensor([5.0, 5.0]))
    assert int(teacher.num_batches_tracked) == 0


def test_state_dict_round_trip() -> None:
    ema = EMATeacher(_linear([0.0, 0.0], 0.0), _linear([1.0, 1.0], 1.0))
    for _ in range(3):
        ema.update()
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = EMATeacher(_linear([0.0, 0.0], 0.0), _linear([1.0, 1.0], 1.0))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.step == 3
    assert restored.current_decay() == pytest.approx(0.75)  # min(1 - 1/4, 0.99)
    for bad in ({}, {"step": -1}, {"step": 1.5}):
        with pytest.raises(ValueError, match="step"):
            restored.load_state_dict(bad)


def test_structure_mismatch_names_first_key() -> None:
    with pytest.raises(ValueError, match=r"parameter 'weight' has shape \(1, 3\)"):
        EMATeacher(nn.Linear(3, 1), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"'1\.weight' is in the teacher but not the student"):
        EMATeacher(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"'0\.weight' is in the student but not the teacher"):
        EMATeacher(nn.Sequential(nn.ReLU(), nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"buffer 'running_mean'"):
        EMATeacher(nn.BatchNorm1d(2, track_running_stats=False), nn.BatchNorm1d(2))


def test_bad_options() -> None:
    layer = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="distinct"):
        EMATeacher(layer, layer)
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(nn.Linear(2, 1), layer, decay=1.5)
    with pytest.raises(ValueError, match="buffers"):
        EMATeacher(nn.Linear(2, 1), layer, buffers="mean")
    with pytest.raises(TypeError):
        EMATeacher(torch.zeros(1), layer)  # type: ignore[arg-type]


def test_handler_updates_once_per_iteration() -> None:
    teacher, student = _linear([0.0, 0.0], 0.0), _linear([0.0, 0.0], 0.0)
    handler = MeanTeacherHandler(teacher, student, decay=0.99)

    def step(engine: Engine, value: float) -> None:  # stands in for an optimiser step
        _set(student, [value, value], value)

    engine = Engine(step)
    handler.attach(engine)
    handler.attach(engine)  # attaching twice must not double the updates
    engine.run([1.0, 2.0, 4.0], max_epochs=1)
    assert handler.step == 3
    # a = 0, 1/2, 2/3: 1 -> 0.5*1 + 0.5*2 = 1.5 -> (2/3)*1.5 + (1/3)*4 = 7/3
    _assert_params(teacher, [7 / 3, 7 / 3], 7 / 3)


# --------------------------------------------------------------------------------------------------- consistency


def test_consistency_zero_for_equal_logits() -> None:
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert softmax_mse_consistency(logits, logits.clone()).item() == 0.0


def test_consistency_two_class_one_pixel_by_hand() -> None:
    student = torch.zeros(1, 2, 1, 1, requires_grad=True)  # softmax -> (1/2, 1/2)
    teacher = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1).requires_grad_(True)  # -> (3/4, 1/4)
    loss = softmax_mse_consistency(student, teacher)
    # ((1/2 - 3/4)^2 + (1/2 - 1/4)^2) / 2 = 1/16
    assert loss.item() == pytest.approx(0.0625, abs=1e-7)
    loss.backward()
    assert teacher.grad is None  # teacher side detached
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_consistency_mask_excludes_pixels() -> None:
    # pixel 0: equal logits (difference 0); pixel 1: the 1/16 case above
    student = torch.zeros(1, 2, 1, 2)
    teacher = torch.zeros(1, 2, 1, 2)
    teacher[0, 0, 0, 1] = math.log(3.0)
    assert softmax_mse_consistency(student, teacher).item() == pytest.approx(0.0625 / 2, abs=1e-7)
    only_second = torch.tensor([[[[False, True]]]])
    assert softmax_mse_consistency(student, teacher, only_second).item() == pytest.approx(0.0625, abs=1e-7)
    only_first = torch.tensor([[[[1.0, 0.0]]]])
    assert softmax_mse_consistency(student, teacher, only_first).item() == 0.0
    student.requires_grad_(True)
    empty = softmax_mse_consistency(student, teacher, torch.zeros(1, 1, 1, 2))
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(student.grad).all()


def test_consistency_fp32_under_autocast() -> None:
    student = torch.zeros(1, 2, 1, 1, dtype=torch.bfloat16)
    teacher = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = softmax_mse_consistency(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.0625, abs=2e-3)  # bf16 rounding of log(3) only


def test_consistency_bad_input() -> None:
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        softmax_mse_consistency(x, torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="single channel"):
        softmax_mse_consistency(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="B,C,H,W"):
        softmax_mse_consistency(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 1, 4, 4\)"):
        softmax_mse_consistency(x, x, torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match="non-negative"):
        softmax_mse_consistency(x, x, -torch.ones(2, 1, 4, 4))


# ------------------------------------------------------------------------------------------------------ ramp-up


def test_sigmoid_rampup_values() -> None:
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))  # t = 1/2: exp(-5 * 1/4)
    assert sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(25, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    with pytest.raises(ValueError):
        sigmoid_rampup(-1, 10)
    with pytest.raises(ValueError):
        sigmoid_rampup(1, -10)


def test_consistency_weight() -> None:
    weight = ConsistencyWeight(max_weight=2.0, rampup_iterations=10)
    assert weight(0) == pytest.approx(2.0 * math.exp(-5.0))
    assert weight(5) == pytest.approx(2.0 * math.exp(-1.25))
    assert weight(100) == 2.0
    with pytest.raises(ValueError):
        ConsistencyWeight(max_weight=-1.0, rampup_iterations=10)
