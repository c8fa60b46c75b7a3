"""Few-label fine-tuning pieces used by ``configs/train.json`` and ``configs/mean_teacher.json``.

- The dataset folder and the shared datalist come from :func:`bundle.data.datalist.prepare_datalist`, called only
  when a config actually reads its splits (so a MONAI Label run, which passes its own data, touches neither).
- :func:`load_pretrained`: copies the pre-trained U-Net weights into the segmentation network by name and shape
  (MONAI's ``copy_model_state``), logs what was loaded and skipped, and refuses a file that matches nothing.
- :func:`segmentation_loss`: pixel-wise cross-entropy (the paper's fine-tuning loss) or Dice + CE.

The Mean Teacher trainer is :class:`bundle.engines.MeanTeacherTrainer`, the encoder warm-up handler
:class:`bundle.handlers.FreezeEncoder`.

Fine-tuning defaults follow the paper (Appendix F): RAdam, a warm-up of 10 epochs from ``lr / 300`` to ``lr``, then a
cosine decay; ``lr = 3e-5`` for ACDC (``3e-4`` for prostate), weight decay 1e-5, epochs of a fixed number of
iterations drawn with replacement, cross-entropy only, all parameters trained.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.handlers import CheckpointLoader
from monai.losses import DiceCELoss
from monai.networks.utils import copy_model_state
from torch import nn

from bundle.data.checks import check_entries

__all__ = ["check_teacher_update", "check_validation_scans", "checkpoint_loader_path", "load_pretrained",
           "segmentation_loss"]

logger = logging.getLogger(__name__)

#: Strings meaning "no pre-trained weights" for ``pretrained_path`` (``monai.bundle run`` drops a ``None`` override,
#: so the command line needs a string: ``--pretrained_path null`` or ``--pretrained_path ''``).
NO_PATH = ("", "none", "null")

LOSS_TYPES = ("ce", "dice_ce")


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
                         "pre-training (bundle.handlers.NetworkExport).")
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


def check_validation_scans(entries: Sequence[Mapping[str, Any]], num_classes: int, channel: int | None) -> None:
    """Check the validation scans like the training ones; an empty list (MONAI Label's ``val_split`` 0) is allowed:
    fine-tuning then runs without validation and keeps its final weights as ``model.pt``, and says so."""
    if not entries:
        logger.warning("no validation scans: validation is off, and models/model.pt will hold the final weights "
                       "(not the best-validation ones).")
        return
    check_entries(entries, num_classes=num_classes, require_label=True, channel=channel, name="validation scans")


def check_teacher_update(handlers: Sequence[Any] | None, teacher: nn.Module) -> None:
    """Mean Teacher's train handlers must include one that updates ``teacher`` (a
    :class:`bundle.handlers.MeanTeacherHandler`): ``configs/mean_teacher.json`` adds it to ``train#handlers``, and a
    later override of ``train#handlers`` (command line, args file, an application) would drop it, leaving the
    teacher a frozen copy without a word.

    Raises:
        ValueError: when no handler updates ``teacher``.
    """
    if not any(getattr(h, "teacher", None) is teacher and callable(getattr(h, "update", None)) for h in handlers or []):
        message = ("Mean Teacher: no train handler updates the teacher (a bundle.handlers.MeanTeacherHandler with "
                   "teacher @teacher); train#handlers was probably overridden after configs/mean_teacher.json added "
                   "it: add it to the new list.")
        logger.error(message)
        raise ValueError(message)


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
