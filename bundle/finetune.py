"""Few-label fine-tuning pieces used by ``configs/train.json`` and ``configs/mean_teacher.json``.

- The dataset folder and the shared datalist come from :func:`bundle.data.datalist.prepare_datalist`, called only
  when a config actually reads its splits (so a MONAI Label run, which passes its own data, touches neither).
- :func:`load_pretrained`: copies the pre-trained U-Net weights into the segmentation network by name and shape
  (MONAI's ``copy_model_state``), logs what was loaded and skipped, and refuses a file that matches nothing.
- :func:`segmentation_loss`: pixel-wise cross-entropy (the paper's fine-tuning loss) or Dice + CE.
- :class:`FreezeEncoder`: optional warm-up epochs with the encoder frozen, so the randomly initialised decoder head
  does not wreck the pre-trained encoder features in the first updates.
- :class:`MeanTeacherTrainer`: supervised loss on labeled slices plus the Mean Teacher consistency on unlabeled
  slices under the random transform ``T`` (Peng et al. 2024, Appendix E; Perone & Cohen-Adad 2018).

Fine-tuning defaults follow the paper (Appendix F): RAdam, a warm-up of 10 epochs from ``lr / 300`` to ``lr``, then a
cosine decay; ``lr = 3e-5`` for ACDC (``3e-4`` for prostate), weight decay 1e-5, epochs of a fixed number of
iterations drawn with replacement, cross-entropy only, all parameters trained.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader
from monai.losses import DiceCELoss
from monai.networks.utils import copy_model_state
from monai.utils import CommonKeys as Keys
from torch import nn

from bundle.engines import backward_and_step
from bundle.handlers.mean_teacher import ConsistencyWeight, softmax_mse_consistency
from bundle.transforms import EquivariantTransform

__all__ = [
    "ENCODER_MODULES",
    "FreezeEncoder",
    "MeanTeacherTrainer",
    "batch_statistics_only",
    "checkpoint_loader_path",
    "load_pretrained",
    "mean_teacher_seed",
    "segmentation_loss",
]

logger = logging.getLogger(__name__)

#: Children of MONAI's ``BasicUNet`` that form the encoder (input block and the four down-sampling blocks).
ENCODER_MODULES = ("conv_0", "down_1", "down_2", "down_3", "down_4")

#: Strings meaning "no pre-trained weights" for ``pretrained_path`` (``monai.bundle run`` drops a ``None`` override,
#: so the command line needs a string: ``--pretrained_path null`` or ``--pretrained_path ''``).
NO_PATH = ("", "none", "null")

LOSS_TYPES = ("ce", "dice_ce")


# ------------------------------------------------------------------------------------------------------------ data


# ---------------------------------------------------------------------------------------------- pre-trained weights


def _state_dict_of(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint: a plain state dict, or one wrapped as ``{"model": ...}``."""
    if isinstance(obj, Mapping) and len(obj) == 1:
        (key, inner), = obj.items()
        if key in ("model", "network", "state_dict") and isinstance(inner, Mapping):
            obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, Mapping) else f"mapping with keys {list(obj)[:5]}"
        raise ValueError(f"{path}: not a state dict of tensors (got a {kind}); expected the file written by "
                         "pre-training (bundle.handlers.checkpoint.NetworkExport).")
    return obj


def _start_from(warm_start: str | None) -> str:
    if warm_start is None:
        return "training from scratch (no pre-trained weights loaded)."
    return f"the network starts from {warm_start}, which a CheckpointLoader loads when training starts (warm start)."


def checkpoint_loader_path(handlers: Sequence[Any] | None) -> str | None:
    """The file a :class:`monai.handlers.CheckpointLoader` among ``handlers`` will load when training starts (MONAI
    Label inserts one for its warm start from ``models/model.pt``), if it exists; else ``None``."""
    for handler in handlers or []:
        path = getattr(handler, "load_path", None) if isinstance(handler, CheckpointLoader) else None
        if path is not None and Path(path).is_file():
            return str(path)
    return None


def load_pretrained(
    network: nn.Module,
    path: str | os.PathLike | None,
    required: bool = False,
    exclude_vars: str | None = None,
    warm_start: str | None = None,
) -> dict[str, Any]:
    """Copy pre-trained weights into ``network`` wherever a tensor of the same name and shape exists.

    Uses ``monai.networks.utils.copy_model_state``, so a checkpoint whose segmentation head has another number of
    classes still loads every other tensor (MONAI's ``CheckpointLoader(strict_shape=False)`` would load nothing
    from a plain state dict). Logs how many tensors were loaded and names every network tensor left at its
    initial value and every file tensor that was not used.

    Args:
        network: the segmentation network (modified in place).
        path: the pre-trained weights (a plain state dict, or ``{"model": state_dict}``); ``None``, ``""``,
            ``"none"`` or ``"null"`` mean "train from scratch".
        required: raise instead of training from scratch when ``path`` is empty or the file does not exist.
        exclude_vars: regular expression of network tensor names never to load (e.g. ``"final_conv"``).
        warm_start: the file a training handler will load instead (see :func:`checkpoint_loader_path`), named in
            the message when there are no pre-trained weights.

    Returns:
        ``{"path": str | None, "loaded": [names], "skipped": [network tensors not loaded], "unused": [file tensors
        not loaded]}``.

    Raises:
        FileNotFoundError: when ``required`` and the file is missing.
        ValueError: when ``required`` and no path is given, when the file is not a state dict, or when it exists
            but **no** tensor matches the network by name and shape (a wrong file is never skipped silently).

    Example:
        >>> load_pretrained(net, "models/pretrained/unet_ssl.pt")  # doctest: +SKIP
        {'path': 'models/pretrained/unet_ssl.pt', 'loaded': [...80 names], 'skipped': ['final_conv.conv.weight', ...]}
    """
    names = list(network.state_dict())
    if path is None or str(path).strip().lower() in NO_PATH:
        if required:
            raise ValueError("pre-trained weights are required (pretrained_required=true) but pretrained_path is empty")
        logger.warning(f"pretrained_path is empty: {_start_from(warm_start)}")
        return {"path": None, "loaded": [], "skipped": names, "unused": []}
    file = Path(path).expanduser()
    if not file.is_file():
        if required:
            raise FileNotFoundError(f"{file}: pre-trained weights not found (pretrained_required=true).")
        logger.warning(f"{file}: no pre-trained weights there: {_start_from(warm_start)}")
        return {"path": None, "loaded": [], "skipped": names, "unused": []}
    source = _state_dict_of(torch.load(file, map_location="cpu", weights_only=True), file)
    _, loaded, skipped = copy_model_state(network, source, exclude_vars=exclude_vars, inplace=True)
    unused = sorted(k for k in source if k not in set(loaded))
    if not loaded:
        raise ValueError(
            f"{file}: none of its {len(source)} tensors matches the network's {len(names)} by name and shape "
            f"(file keys start {list(source)[:3]}, network keys start {names[:3]}); refusing to fine-tune from "
            "a file that loads nothing. Fix pretrained_path, or set it to null to train from scratch."
        )
    logger.info(f"pre-trained weights {file}: loaded {len(loaded)} of {len(names)} network tensors.")
    if skipped:
        logger.info(f"kept their initial values ({len(skipped)}): {', '.join(skipped)}")
    if unused:
        logger.info(f"unused tensors of the file ({len(unused)}): {', '.join(unused)}")
    return {"path": str(file), "loaded": list(loaded), "skipped": list(skipped), "unused": unused}


# ------------------------------------------------------------------------------------------------------------ loss


def segmentation_loss(loss_type: str = "ce", lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> DiceCELoss:
    """The fine-tuning loss on logits ``B,C,H,W`` and integer labels ``B,1,H,W``.

    ``"ce"`` is pixel-wise cross-entropy, the paper's fine-tuning loss (the authors' code has no Dice term); it is a
    MONAI ``DiceCELoss`` with ``lambda_dice=0``, so both choices share one implementation (softmax and one-hot
    inside). ``"dice_ce"`` adds the soft Dice loss over all classes.

    Args:
        loss_type: ``"ce"`` or ``"dice_ce"``.
        lambda_dice: weight of the Dice term for ``"dice_ce"``.
        lambda_ce: weight of the cross-entropy term.

    Raises:
        ValueError: for another ``loss_type``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unsupported loss_type: {loss_type!r}, available options are {list(LOSS_TYPES)}.")
    dice = 0.0 if loss_type == "ce" else float(lambda_dice)
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=dice, lambda_ce=float(lambda_ce))


# --------------------------------------------------------------------------------------------------------- handlers


class FreezeEncoder:
    """Freeze the U-Net encoder (``conv_0``, ``down_1`` .. ``down_4``) during the first ``epochs`` epochs.

    At every epoch start the encoder parameters get ``requires_grad = epoch > epochs``; a frozen parameter gets no
    gradient, so the optimiser (RAdam, weight decay included) leaves it unchanged. BatchNorm running statistics
    of the encoder still follow the data (the network is in train mode). ``epochs = 0`` does nothing.

    Args:
        network: the segmentation network (a ``BasicUNet``).
        epochs: number of warm-up epochs with a frozen encoder (>= 0).
        modules: names of the encoder children.

    Raises:
        ValueError: when ``epochs`` is negative or a module name is not a child of ``network``.
    """

    def __init__(self, network: nn.Module, epochs: int = 0, modules: Sequence[str] = ENCODER_MODULES) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"freeze_encoder_epochs must be an integer >= 0, got {epochs!r}.")
        net = getattr(network, "module", network)
        missing = [m for m in modules if not isinstance(getattr(net, m, None), nn.Module)]
        if missing:
            raise ValueError(f"{type(net).__name__} has no encoder module(s) {missing}; expected {list(modules)}.")
        self.epochs = epochs
        self.encoder_parameters = [p for m in modules for p in getattr(net, m).parameters()]

    def attach(self, engine: Engine) -> None:
        if self.epochs > 0 and not engine.has_event_handler(self, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        frozen = engine.state.epoch <= self.epochs
        for param in self.encoder_parameters:
            param.requires_grad_(not frozen)
        if engine.state.epoch in (1, self.epochs + 1):
            logger.info(f"epoch {engine.state.epoch}: encoder {'frozen' if frozen else 'trainable'}.")


# ---------------------------------------------------------------------------------------------------- Mean Teacher


@contextlib.contextmanager
def batch_statistics_only(network: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers in train mode normalise with the batch's statistics and do not update
    their running statistics (nor ``num_batches_tracked``); every layer is restored afterwards, also on error."""
    layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def mean_teacher_seed(seed: int, iteration: int) -> int:
    """Seed of the transform ``T`` drawn at ``iteration``: a pure function, so every run draws the same T."""
    return (int(seed) * 1_000_003 + int(iteration) * 7919 + 29) % (2**63 - 1)


class MeanTeacherTrainer(SupervisedTrainer):
    """Supervised fine-tuning plus the Mean Teacher consistency on unlabeled slices (Peng et al. 2024, Appendix E).

    Per iteration ``t`` (1-based), with a labeled batch ``(x_l, y)`` from ``train_data_loader`` and an unlabeled
    batch ``x_u`` from ``unlabeled_data_loader`` (cycled; its own sampler), and ``T`` drawn from ``transform`` by a
    generator seeded with :func:`mean_teacher_seed` ``(seed, t)``:

    - a student pass on ``x_l``, exactly as in plain fine-tuning, and a second one on ``T(x_u)`` (``T`` on images
      includes the gamma correction) under :func:`batch_statistics_only`: BatchNorm normalises the unlabeled batch
      with its own statistics but leaves the running statistics, which validation and inference use, to the
      labeled slices. One pass on ``cat([x_l, T(x_u)])`` would blend the gamma-corrected, zero-padded unlabeled
      slices into the statistics the labeled ones are trained and evaluated with; on real cardiac MRI that alone
      (with the consistency weight at 0) halved the validation Dice of the plain fine-tune. With
      ``consistency_weight=0`` the student is trained exactly as by the plain fine-tune;
    - the teacher's logits on ``x_u`` (no gradient), moved by the geometric part of ``T`` with its validity mask;
    - ``loss = loss_function(student(x_l), y) + w(t - 1) * softmax_mse_consistency(student(T x_u), T(teacher(x_u)),
      mask)`` with ``w = ConsistencyWeight(consistency_weight, rampup_iterations)`` (sigmoid ramp-up).

    The teacher is not updated here: add :class:`bundle.handlers.MeanTeacherHandler` (EMA, decay 0.99) to the train
    handlers. The standard ``IterationEvents`` are fired, and ``engine.state.output`` holds ``"image"``, ``"label"``,
    ``"pred"`` (labeled predictions only, so the usual post-processing and metrics work), ``"loss"``, and
    ``"supervised_loss"``, ``"consistency_loss"``, ``"consistency_weight"``.

    Args:
        device, max_epochs, train_data_loader, network, optimizer, loss_function: as ``SupervisedTrainer``.
        teacher: the EMA network (e.g. a deep copy of ``network`` made after the pre-trained weights are loaded).
        unlabeled_data_loader: yields dicts with ``"image"`` ``B,1,H,W`` (labels, if any, are ignored).
        transform: the random transform ``T``.
        consistency_weight: largest weight of the consistency term (grid-searched in the paper, 1e-4 .. 10).
        rampup_iterations: iterations of the sigmoid ramp-up of the weight (0: full weight at once).
        seed: seed of the per-iteration draws of ``T``.
        teacher_mode: ``"train"`` (batch statistics, as the authors' and Tarvainen & Valpola's code) or ``"eval"``
            (BatchNorm running statistics) for the teacher's forward pass.
        kwargs: other ``SupervisedTrainer`` arguments (``epoch_length``, ``inferer``, ``postprocessing``,
            ``key_train_metric``, ``train_handlers``, ``amp``, ...).

    Raises:
        ValueError: when the teacher is the student, ``teacher_mode`` is unknown, the weights are negative, or a
            batch lacks an ``"image"``.

    Example (config)::

        "teacher": "$copy.deepcopy(@network)",
        "train#trainer": {"_target_": "bundle.finetune.MeanTeacherTrainer", ..., "teacher": "@teacher",
                          "unlabeled_data_loader": "@mean_teacher#dataloader", "transform": "@mean_teacher#transform"}
    """

    TEACHER_MODES = ("train", "eval")

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        teacher: nn.Module,
        unlabeled_data_loader: Iterable,
        transform: EquivariantTransform,
        consistency_weight: float = 1.0,
        rampup_iterations: int = 0,
        seed: int = 0,
        teacher_mode: str = "train",
        **kwargs: Any,
    ) -> None:
        if teacher is network:
            raise ValueError("the teacher must be a separate copy of the network (e.g. copy.deepcopy(network)).")
        if teacher_mode not in self.TEACHER_MODES:
            raise ValueError(f"Unsupported teacher_mode: {teacher_mode!r}, available options are "
                             f"{list(self.TEACHER_MODES)}.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            **kwargs,
        )
        self.teacher = teacher
        self.unlabeled_data_loader = unlabeled_data_loader
        self.transform = transform
        self.consistency_weight = ConsistencyWeight(float(consistency_weight), int(rampup_iterations))
        self.seed = int(seed)
        self.teacher_mode = teacher_mode
        self._generator = torch.Generator(device="cpu")
        self._unlabeled_iter: Iterator | None = None

    def next_unlabeled(self) -> torch.Tensor:
        """The next unlabeled image batch ``B,1,H,W`` (the loader is restarted when exhausted)."""
        for attempt in range(2):
            if self._unlabeled_iter is None:
                self._unlabeled_iter = iter(self.unlabeled_data_loader)
            try:
                batch = next(self._unlabeled_iter)
                break
            except StopIteration:
                self._unlabeled_iter = None
                if attempt == 1:
                    raise ValueError("unlabeled_data_loader yields no batch (empty dataset?).") from None
        image = batch.get("image") if isinstance(batch, Mapping) else None
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(batch).__name__
            raise ValueError(f"unlabeled batches must be dicts with 'image' of shape B,C,H,W, got {got}.")
        image = image.as_tensor() if isinstance(image, MetaTensor) else image
        return image.to(self.state.device, non_blocking=self.non_blocking).float()

    def _iteration(self, engine: MeanTeacherTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        x_l = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        x_u = engine.next_unlabeled()
        if x_u.shape[1:] != x_l.shape[1:]:
            raise ValueError(f"unlabeled slices {tuple(x_u.shape)} and labeled slices {tuple(x_l.shape)} must have "
                             "the same channels and size.")
        engine._generator.manual_seed(mean_teacher_seed(engine.seed, engine.state.iteration))
        params = engine.transform.sample(x_u.shape[0], generator=engine._generator).to(x_u.device)
        x_u_t, _ = engine.transform.apply_image(x_u, params)
        weight = engine.consistency_weight(engine.state.iteration - 1)

        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.teacher.train(engine.teacher_mode == "train")
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = engine.amp and engine.scaler is not None

        with torch.autocast("cuda", **engine.amp_kwargs) if use_amp else contextlib.nullcontext():
            with torch.no_grad():
                teacher_logits = engine.teacher(x_u)
            teacher_t, valid = engine.transform.apply(teacher_logits.float(), params)
            pred = engine.inferer(x_l, engine.network)
            with batch_statistics_only(engine.network):
                student_u = engine.inferer(x_u_t, engine.network)
            engine.state.output[Keys.PRED] = pred
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            supervised = engine.loss_function(pred, targets).mean()
            consistency = softmax_mse_consistency(student_u, teacher_t, mask=valid)
            loss = supervised + weight * consistency
            engine.state.output[Keys.LOSS] = loss
            engine.state.output["supervised_loss"] = supervised.detach()
            engine.state.output["consistency_loss"] = consistency.detach()
            engine.state.output["consistency_weight"] = weight
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        backward_and_step(engine, loss)
        return engine.state.output
