"""The Mean Teacher's teacher (Tarvainen & Valpola 2017; Perone & Cohen-Adad 2018) for semi-supervised segmentation.

The paper under implementation (Peng et al. 2024, Appendix E) uses Mean Teacher as a semi-supervised baseline: the
teacher's weights are an exponential moving average (EMA) of the student's (decay 0.99). The consistency term
that pulls the student towards the teacher is in :mod:`bundle.losses.consistency`, the training step that uses
both in :class:`bundle.engines.MeanTeacherTrainer`.

The teacher and student are any two ``nn.Module`` objects with the same parameter/buffer names and shapes (the
only bundle piece used is the process-group broadcast of :mod:`bundle.losses.utils`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from bundle.losses.utils import broadcast_from_rank_zero, is_distributed

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine", as_type="decorator"
    )

__all__ = ["EMATeacher", "MeanTeacherHandler"]

_BUFFER_MODES = ("copy", "ema", "keep")


def _check_same_structure(teacher: nn.Module, student: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter or buffer whose name or shape differs."""
    for kind, t_items, s_items in (
        ("parameter", dict(teacher.named_parameters()), dict(student.named_parameters())),
        ("buffer", dict(teacher.named_buffers()), dict(student.named_buffers())),
    ):
        for name, s_tensor in s_items.items():
            if name not in t_items:
                raise ValueError(f"teacher and student differ: {kind} {name!r} is in the student but not the teacher.")
            if t_items[name].shape != s_tensor.shape:
                raise ValueError(
                    f"teacher and student differ: {kind} {name!r} has shape {tuple(t_items[name].shape)} in the "
                    f"teacher and {tuple(s_tensor.shape)} in the student."
                )
        for name in t_items:
            if name not in s_items:
                raise ValueError(f"teacher and student differ: {kind} {name!r} is in the teacher but not the student.")


class EMATeacher:
    """
    Keeps a teacher network as the exponential moving average of a student network (Mean Teacher,
    Tarvainen & Valpola 2017, Sec. 2; used for segmentation by Perone & Cohen-Adad 2018 and as a baseline
    in Peng et al. 2024, Appendix E).

    Each :meth:`update` does, for every parameter, ``t = a * t + (1 - a) * s`` with

    - ``a = min(1 - 1 / (step + 1), decay)`` when ``warmup=True`` (``step`` = number of updates done so far, so the
      first update copies the student (a = 0), the second averages with a = 1/2, ... until ``decay`` is reached),
    - ``a = decay`` when ``warmup=False``.

    Buffers (e.g. BatchNorm running statistics, ``num_batches_tracked``) are not trained by gradients, so they need
    a rule of their own, chosen by ``buffers``:

    - ``"copy"`` (default): the teacher's buffers are overwritten by the student's after each update, so the
      teacher normalises with the statistics the student has accumulated.
    - ``"ema"``: floating-point buffers are averaged with the same ``a`` as the parameters; integer buffers
      (``num_batches_tracked``) are copied.
    - ``"keep"``: buffers are left alone. This is what the authors' code does in effect: their teacher runs in
      train mode, so its BatchNorm layers keep their own running statistics.

    The teacher's parameters get ``requires_grad = False``. The teacher's train/eval mode is not changed.
    The authors' extra ``(1 - 1e-6)`` shrink of the teacher weights is not applied.

    Only the update count is state (:meth:`state_dict`); checkpoint the teacher module itself separately.

    Args:
        teacher: the EMA network; same parameter and buffer names and shapes as ``student``.
        student: the network trained by the optimiser.
        decay: EMA decay in [0, 1]; 0.99 in the paper.
        warmup: use ``min(1 - 1/(step+1), decay)`` instead of a fixed ``decay``.
        buffers: ``"copy"``, ``"ema"`` or ``"keep"`` (see above).

    Raises:
        TypeError: when ``teacher`` or ``student`` is not an ``nn.Module``.
        ValueError: when ``teacher`` is ``student``, ``decay`` is outside [0, 1], ``buffers`` is unknown, or the
            structures differ (the message names the first mismatching parameter or buffer).

    Example::

        student = monai.networks.nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=4)
        ema = EMATeacher.from_student(student, decay=0.99)
        ...  # after each optimiser step:
        ema.update()
        teacher_logits = ema.teacher(x)
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        decay: float = 0.99,
        warmup: bool = True,
        buffers: str = "copy",
    ) -> None:
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise TypeError(
                f"teacher and student must be torch.nn.Module, got {type(teacher).__name__} and "
                f"{type(student).__name__}."
            )
        if teacher is student:
            raise ValueError("teacher and student must be two distinct modules (use EMATeacher.from_student).")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}.")
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"Unsupported buffers mode: {buffers!r}, available options are {list(_BUFFER_MODES)}.")
        _check_same_structure(teacher, student)
        self.teacher = teacher
        self.student = student
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.buffers = buffers
        self.step = 0
        for param in self.teacher.parameters():
            param.requires_grad_(False)

    @classmethod
    def from_student(cls, student: nn.Module, **kwargs: Any) -> EMATeacher:
        """Build the teacher as a deep copy of ``student``; ``kwargs`` go to the constructor."""
        return cls(copy.deepcopy(student), student, **kwargs)

    def current_decay(self) -> float:
        """The ``a`` the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        return min(1.0 - 1.0 / (self.step + 1), self.decay)

    @torch.no_grad()
    def update(self) -> float:
        """Move the teacher towards the student by one EMA step; returns the ``a`` used."""
        a = self.current_decay()
        student_params = dict(self.student.named_parameters())
        for name, t_param in self.teacher.named_parameters():
            s_param = student_params[name].detach().to(device=t_param.device, dtype=t_param.dtype)
            t_param.mul_(a).add_(s_param, alpha=1.0 - a)
        if self.buffers != "keep":
            student_buffers = dict(self.student.named_buffers())
            for name, t_buf in self.teacher.named_buffers():
                s_buf = student_buffers[name].detach().to(device=t_buf.device, dtype=t_buf.dtype)
                if self.buffers == "ema" and t_buf.is_floating_point():
                    t_buf.mul_(a).add_(s_buf, alpha=1.0 - a)
                else:
                    t_buf.copy_(s_buf)
        self.step += 1
        return a

    def state_dict(self) -> dict[str, int]:
        """The number of updates done, so that the warm-up schedule resumes where it stopped."""
        return {"step": self.step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the update count saved by :meth:`state_dict`.

        Raises:
            ValueError: when ``"step"`` is missing or not a non-negative integer.
        """
        step = state_dict.get("step") if isinstance(state_dict, Mapping) else None
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict must hold a non-negative integer 'step', got {state_dict!r}.")
        self.step = step


class MeanTeacherHandler(EMATeacher):
    """
    Ignite/MONAI handler form of :class:`EMATeacher`: :meth:`attach` registers it on
    ``Events.ITERATION_COMPLETED``, which in MONAI's ``SupervisedTrainer`` fires after the optimiser step, so the
    teacher follows the freshly updated student once per iteration.

    Same arguments as :class:`EMATeacher`. To resume training, put the handler in the checkpoint's ``save_dict``
    (e.g. ``{"model": student, "teacher": teacher, "mean_teacher": handler}``); it saves its update count.

    When the run starts (``Events.STARTED``, after the handlers attached before it, e.g. a warm-start
    ``CheckpointLoader``) the teacher becomes a copy of the student, parameters and buffers, unless it was restored
    with a non-zero update count: the teacher of the first iterations is the network fine-tuning starts from,
    whenever its weights were loaded.

    Under a process group (torchrun, the student wrapped in DDP) the teacher is the same on every rank: the
    replicas of the student are equal, so are their copies and the EMAs of their parameters; the teacher's buffers
    (BatchNorm statistics, which each rank's own batches move, in the student after DDP's broadcast and in a
    train-mode teacher) are copied from rank 0 to every rank after each update, in one coalesced broadcast.

    Example (config)::

        "teacher": "$copy.deepcopy(@network)",
        "train#handlers": [..., {"_target_": "bundle.handlers.MeanTeacherHandler",
                                 "teacher": "@teacher", "student": "@network", "decay": 0.99}]
    """

    def attach(self, engine: Engine) -> None:
        """Register on ``Events.ITERATION_COMPLETED`` of ``engine`` (once, even if called twice), and the copy of the
        student on ``Events.STARTED``."""
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if not engine.has_event_handler(self.start_from_student, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.start_from_student)

    def __call__(self, engine: Engine) -> None:
        self.update()
        if is_distributed():
            broadcast_from_rank_zero(list(self.teacher.buffers()))

    @torch.no_grad()
    def start_from_student(self, engine: Engine | None = None) -> None:
        """Make the teacher a copy of the student (parameters and buffers), unless it has been updated already (a
        resumed run whose teacher and update count were restored keeps its teacher)."""
        if self.step == 0:
            self.teacher.load_state_dict(self.student.state_dict())
