"""Ignite/MONAI engines: the two-view self-supervised pre-training trainer.

``PretrainTrainer`` is a :class:`monai.engines.SupervisedTrainer` whose iteration is the paper's pre-training
step (Sec. 2, Fig. 4): for a batch ``x`` of slices with meta-labels it samples one random transform ``T``,
runs the U-Net **once** on ``[x, T(x)]``, aligns the untransformed view's decoder and encoder features with
the same ``T``, scores L_MI and L_CC on every dense head and L_con on the global head (validity mask applied),
and steps.  It fires the standard Ignite and MONAI ``IterationEvents`` so stock handlers keep working.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from torch import nn
from torch.optim import Optimizer

from bundle.losses import PretrainingObjective
from bundle.networks import DenseClusterHead, DenseProjectionHead, FeatureUNet, GlobalProjectionHead
from bundle.transforms import EquivariantTransform, TransformParams

__all__ = ["PretrainTrainer", "NonFiniteLossError", "backward_and_step", "trainable_parameters", "transform_seed"]


class NonFiniteLossError(FloatingPointError):
    """Raised before the optimiser step when a loss component is NaN or infinite."""


def transform_seed(seed: int, iteration: int) -> int:
    """Seed of the transform ``T`` drawn at ``iteration``: a pure function, so a resumed run draws the same T."""
    return (int(seed) * 1_000_003 + int(iteration) * 7919 + 17) % (2**63 - 1)


def _finite_scalars(values: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in values.items()}


class PretrainTrainer(SupervisedTrainer):
    """Self-supervised pre-training of a :class:`FeatureUNet` with the paper's losses (eq. 11).

    Batches are dicts with ``"image"`` ``B,1,H,W`` and ``"meta_label"`` ``B`` (slice-position partition).
    Per iteration, with ``T`` sampled from ``transform`` by a generator seeded from ``(seed, iteration)``:

    - ``x_t = T(x)`` (gamma + geometry) and its validity mask;
    - one forward pass of ``network.forward_features`` on ``cat([x, x_t])`` (shared BatchNorm statistics);
    - ``p_hat = g(s(T x))`` and ``p_tilde = g(T(s(x)))`` for every dense head ``g`` (one conv for all heads);
    - ``z_a = h(T(e(x)))``, ``z_b = h(e(T x))`` from the encoder bottleneck ``e`` through the global head ``h``,
      pooled over the valid region only;
    - optional dense-contrastive embeddings (the "Contrast (Dec)" baseline) from ``dense_projector``;
    - ``objective(...)`` returns the total and each component; a NaN/Inf component stops the run with
      :class:`NonFiniteLossError` naming the iteration and the component, before the optimiser step.

    ``engine.state.output`` holds ``"loss"`` and every component as detached tensors, and, under
    ``"views"``, detached references to ``x_t``, the valid mask and ``p_hat`` for monitoring handlers.

    Args:
        device: the device to train on.
        max_epochs: number of epochs.
        train_data_loader: yields pre-training batches.
        network: the segmentation U-Net (its ``final_conv`` is not used and gets no gradient).
        optimizer: optimiser over the network's and the heads' parameters.
        objective: the combined loss.
        transform: the random equivariant transform ``T``.
        dense_head: the K-way cluster heads (needed when MI, CC or IMSAT are active).
        global_head: the encoder projection head (needed when L_con is active).
        dense_projector: the dense contrastive projector (needed when the dense contrastive term is active).
        epoch_length: iterations per epoch (the paper samples with replacement, a fixed number per epoch).
        seed: seed of the per-iteration transform draws.
        amp: mixed precision for the network on CUDA (losses stay fp32); ignored on CPU.
        amp_dtype: ``"float16"`` or ``"bfloat16"``.
        train_handlers: Ignite/MONAI handlers.
        compile: wrap the network's feature pass in ``torch.compile``.

    Raises:
        ValueError: when a head needed by an active loss term is missing.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: FeatureUNet,
        optimizer: Optimizer,
        objective: PretrainingObjective,
        transform: EquivariantTransform,
        dense_head: DenseClusterHead | None = None,
        global_head: GlobalProjectionHead | None = None,
        dense_projector: DenseProjectionHead | None = None,
        epoch_length: int | None = None,
        seed: int = 0,
        amp: bool = False,
        amp_dtype: str = "float16",
        train_handlers: Sequence | None = None,
        compile: bool = False,
        **kwargs: Any,
    ) -> None:
        device = torch.device(device)
        amp = bool(amp) and device.type == "cuda"
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=objective,
            epoch_length=epoch_length,
            train_handlers=train_handlers,
            amp=amp,
            decollate=False,
            **kwargs,
        )
        needs = set(objective.active_terms)
        if needs & {"mi", "cc", "imsat"} and dense_head is None:
            raise ValueError(f"active terms {sorted(needs)} need a dense_head (DenseClusterHead).")
        if "con" in needs and global_head is None:
            raise ValueError("the contrastive term 'con' needs a global_head (GlobalProjectionHead).")
        if "dense_con" in needs and dense_projector is None:
            raise ValueError("the dense contrastive term needs a dense_projector (DenseProjectionHead).")
        if amp_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"amp_dtype must be 'float16' or 'bfloat16', got {amp_dtype!r}.")
        self.objective = objective
        self.transform = transform
        self.dense_head = dense_head
        self.global_head = global_head
        self.dense_projector = dense_projector
        self.seed = int(seed)
        self.amp_dtype = getattr(torch, amp_dtype)
        self.features = torch.compile(network.forward_features) if compile else network.forward_features
        self._generator = torch.Generator(device="cpu")
        self.scaler = torch.amp.GradScaler("cuda") if amp else None
        # batches of epoch e are a pure function of (seed, e): tell an epoch-aware batch sampler which epoch runs,
        # so a resumed run draws the same slices as an uninterrupted one
        batch_sampler = getattr(train_data_loader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_epoch"):
            self.add_event_handler(Events.EPOCH_STARTED, lambda e: batch_sampler.set_epoch(e.state.epoch))

    def run(self) -> None:  # type: ignore[override]
        # ``Trainer.run`` would replace the GradScaler (and its restored state) by a fresh one.
        Workflow.run(self)

    def modules(self) -> dict[str, nn.Module]:
        """The trained modules by name (network and the heads that exist)."""
        mods: dict[str, nn.Module] = {"network": self.network}
        for name in ("dense_head", "global_head", "dense_projector"):
            mod = getattr(self, name)
            if mod is not None:
                mods[name] = mod
        return mods

    def _views(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sample T, build both views, run the network once, and align the untransformed view's features."""
        tr = self.transform
        self._generator.manual_seed(transform_seed(self.seed, self.state.iteration))
        params = tr.sample(x.shape[0], generator=self._generator).to(x.device)
        x_t, valid = tr.apply_image(x, params)
        # one autocast region for the network, T and the heads: the heads' 1x1 convolutions take the network's
        # half-precision features under AMP (the dense head returns fp32 probabilities; the losses run in fp32)
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype, enabled=self.amp):
            return self._aligned_views(x, x_t, valid, params)

    def _aligned_views(
        self, x: torch.Tensor, x_t: torch.Tensor, valid: torch.Tensor, params: TransformParams
    ) -> dict[str, torch.Tensor]:
        tr, b = self.transform, x.shape[0]
        feats = self.features(torch.cat([x, x_t]), with_logits=False)
        out: dict[str, torch.Tensor] = {"image_t": x_t, "mask": valid}
        terms = set(self.objective.active_terms)
        if terms & {"mi", "cc", "imsat", "dense_con"}:
            # split, not slicing: the backward of two slices would allocate and zero-fill the whole 2B decoder
            # gradient twice, the backward of a split concatenates the two halves once
            dec_x, dec_t = feats["decoder"].split(b)
            dec_tx, _ = tr.apply(dec_x, params)  # T(s(x)), aligned with s(T x) = dec_t
            if self.dense_head is not None and terms & {"mi", "cc", "imsat"}:
                # two head calls rather than one on the concatenation: slicing an M,2B,K,H,W result would make the
                # backward allocate and fill that whole tensor twice
                out["p_hat"] = self.dense_head(dec_t)  # M,B,K,H,W fp32 softmax
                out["p_tilde"] = self.dense_head(dec_tx)
            if self.dense_projector is not None and "dense_con" in terms:
                emb = self.dense_projector(torch.cat([dec_t, dec_tx]))
                out["dense_a"], out["dense_b"] = emb[:b], emb[b:]
                grid = emb.shape[-2:]
                out["dense_mask"] = (torch.nn.functional.adaptive_avg_pool2d(valid, grid) > 0.999).to(valid.dtype)
        if "con" in terms and self.global_head is not None:
            enc_x, enc_t = feats["encoder"].split(b)
            enc_tx, enc_valid = tr.apply(enc_x, params)  # T(e(x)), aligned with e(T x) = enc_t
            z = self.global_head(torch.cat([enc_tx, enc_t]), torch.cat([enc_valid, enc_valid]))
            out["z_a"], out["z_b"] = z[:b], z[b:]
        return out

    def _iteration(self, engine: PretrainTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if not isinstance(batchdata, dict) or "image" not in batchdata:
            raise ValueError("pre-training batches must be dicts with an 'image' entry (B,1,H,W).")
        x = torch.as_tensor(batchdata["image"]).to(engine.state.device, non_blocking=engine.non_blocking).float()
        labels = batchdata.get("meta_label")
        if labels is not None:
            labels = torch.as_tensor(labels).to(engine.state.device)
        engine.state.output = {"image": x}
        for mod in engine.modules().values():
            mod.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        views = engine._views(x)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        losses = engine.objective(
            p_hat=views.get("p_hat"),
            p_tilde=views.get("p_tilde"),
            image=views["image_t"],
            mask=views["mask"],
            z_a=views.get("z_a"),
            z_b=views.get("z_b"),
            meta_labels=labels,
            dense_a=views.get("dense_a"),
            dense_b=views.get("dense_b"),
            dense_mask=views.get("dense_mask"),
        )
        total = losses["loss"]
        scalars = _finite_scalars(losses)
        bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(
                f"non-finite pre-training loss at iteration {engine.state.iteration} (epoch {engine.state.epoch}): "
                + ", ".join(f"{k}={v}" for k, v in bad.items())
                + "; stopping before the optimiser step so no poisoned weights are written."
            )
        engine.state.output.update({k: v.detach() for k, v in losses.items()})
        engine.state.output["views"] = {
            k: views[k].detach() for k in ("image_t", "mask", "p_hat", "p_tilde") if k in views
        }
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        backward_and_step(engine, total)
        return engine.state.output


def backward_and_step(engine: SupervisedTrainer, loss: torch.Tensor) -> None:
    """Backward (through the engine's GradScaler when it has one) and optimiser step, firing ``BACKWARD_COMPLETED``
    and ``MODEL_COMPLETED`` like :class:`monai.engines.SupervisedTrainer`; shared by this bundle's trainers."""
    if engine.scaler is not None:
        engine.scaler.scale(loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
    engine.fire_event(IterationEvents.MODEL_COMPLETED)


def trainable_parameters(*modules: nn.Module | None) -> list[torch.nn.Parameter]:
    """Parameters of the given modules (``None`` skipped), for building one optimiser in a config."""
    params: list[torch.nn.Parameter] = []
    for mod in modules:
        if mod is not None:
            params.extend(p for p in mod.parameters() if p.requires_grad)
    return params
