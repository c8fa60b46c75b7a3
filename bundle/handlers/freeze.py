"""Warm-up epochs of fine-tuning with the pre-trained U-Net encoder frozen.

``FreezeEncoder`` keeps the encoder fixed during the first epochs, so the randomly initialised decoder head does not
wreck the pre-trained encoder features in the first updates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ignite.engine import Engine, Events
from torch import nn

__all__ = ["ENCODER_MODULES", "FreezeEncoder"]

#: fine-tuning's log, where these messages were written before the handler had a module of its own
logger = logging.getLogger("bundle.finetune")

#: Children of MONAI's ``BasicUNet`` that form the encoder (input block and the four down-sampling blocks).
ENCODER_MODULES = ("conv_0", "down_1", "down_2", "down_3", "down_4")


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

    Example (config)::

        {"_target_": "bundle.handlers.FreezeEncoder", "network": "@network", "epochs": "@freeze_encoder_epochs"}
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
