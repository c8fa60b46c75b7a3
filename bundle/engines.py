"""Ignite/MONAI engines: every trainer of the bundle.

- :class:`PretrainTrainer`, a :class:`monai.engines.SupervisedTrainer` whose iteration is the paper's self-supervised
  pre-training step (Sec. 2, Fig. 4): for a batch ``x`` of slices with meta-labels it samples one random transform
  ``T``, runs the U-Net **once** on ``[x, T(x)]``, aligns the untransformed view's decoder and encoder features with
  the same ``T``, scores L_MI and L_CC on every dense head and L_con on the global head (validity mask applied),
  and steps. The network and the heads run as one :class:`PretrainingModel` (the module DDP wraps).
- :class:`MeanTeacherTrainer`, few-label fine-tuning plus the Mean Teacher consistency on unlabeled slices under the
  random transform ``T`` (Peng et al. 2024, Appendix E; Perone & Cohen-Adad 2018).

Both fire the standard Ignite and MONAI ``IterationEvents`` so stock handlers keep working, and draw ``T`` from a
generator seeded by :func:`derived_seed` ``(seed, iteration, salt)``, one salt per trainer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from bundle.losses import ConsistencyWeight, PretrainingObjective, softmax_mse_consistency
from bundle.networks import DenseClusterHead, DenseProjectionHead, FeatureUNet, GlobalProjectionHead
from bundle.transforms import EquivariantTransform, TransformParams

__all__ = [
    "MEAN_TEACHER_SALT",
    "PRETRAIN_SALT",
    "MeanTeacherTrainer",
    "NonFiniteLossError",
    "PretrainTrainer",
    "PretrainingModel",
    "backward_and_step",
    "batch_statistics_only",
    "derived_seed",
    "step_output",
    "trainable_parameters",
    "transform_seed",
]

#: salts of :func:`derived_seed`, one per trainer, so the two trainers never draw the same ``T`` for one seed
PRETRAIN_SALT = 17
MEAN_TEACHER_SALT = 29


class NonFiniteLossError(FloatingPointError):
    """Raised before the optimiser step when a loss component is NaN or infinite."""


def derived_seed(seed: int, iteration: int, salt: int) -> int:
    """Seed of a random draw at ``iteration``: a pure function of ``(seed, iteration, salt)``, so a resumed run draws
    what an uninterrupted one draws; each random stream has its own ``salt``."""
    return (int(seed) * 1_000_003 + int(iteration) * 7919 + int(salt)) % (2**63 - 1)


def transform_seed(seed: int, iteration: int) -> int:
    """Seed of the transform ``T`` :class:`PretrainTrainer` draws at ``iteration`` (scripts replay the draws)."""
    return derived_seed(seed, iteration, PRETRAIN_SALT)


def _finite_scalars(values: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in values.items()}


class PretrainingModel(nn.Module):
    """The network and the heads of pre-training as one module: ``forward`` computes, from the two views, the
    objective's inputs that ``required_inputs`` names. It is the module DDP wraps (one forward call, so DDP's
    gradient hooks are armed for every parameter); the network and the heads stay the objects the optimiser, the
    checkpoints and the exported weights use.

    Args:
        network: the U-Net; ``forward_features`` runs once on ``cat([x, T(x)])`` (shared BatchNorm statistics).
        transform: the equivariant transform ``T`` that aligns the untransformed view's features.
        required_inputs: the objective's inputs to compute (:attr:`PretrainingObjective.required_inputs`).
        dense_head: the K-way cluster heads (``p_hat``, ``p_tilde``).
        global_head: the encoder projection head (``z_a``, ``z_b``).
        dense_projector: the dense contrastive projector (``dense_a``, ``dense_b``, ``dense_mask``).
    """

    def __init__(
        self,
        network: FeatureUNet,
        transform: EquivariantTransform,
        required_inputs: frozenset[str],
        dense_head: DenseClusterHead | None = None,
        global_head: GlobalProjectionHead | None = None,
        dense_projector: DenseProjectionHead | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.dense_head = dense_head
        self.global_head = global_head
        self.dense_projector = dense_projector
        self.transform = transform
        self.required_inputs = frozenset(required_inputs)

    def forward(
        self, x: torch.Tensor, x_t: torch.Tensor, valid: torch.Tensor, params: TransformParams
    ) -> dict[str, torch.Tensor]:
        """The objective's inputs for the views ``x`` and ``x_t = T(x)`` (``B,1,H,W`` each), ``T``'s validity mask
        ``valid`` and parameters ``params``."""
        tr, b = self.transform, x.shape[0]
        feats = self.network.forward_features(torch.cat([x, x_t]), with_logits=False)
        out: dict[str, torch.Tensor] = {}
        needs = self.required_inputs
        if needs & {"p_hat", "dense_a"}:
            # split, not slicing: the backward of two slices would allocate and zero-fill the whole 2B decoder
            # gradient twice, the backward of a split concatenates the two halves once
            dec_x, dec_t = feats["decoder"].split(b)
            dec_tx, _ = tr.apply(dec_x, params)  # T(s(x)), aligned with s(T x) = dec_t
            if "p_hat" in needs:
                # two head calls rather than one on the concatenation: slicing an M,2B,K,H,W result would make the
                # backward allocate and fill that whole tensor twice
                out["p_hat"] = self.dense_head(dec_t)  # M,B,K,H,W fp32 softmax
                out["p_tilde"] = self.dense_head(dec_tx)
            if "dense_a" in needs:
                emb = self.dense_projector(torch.cat([dec_t, dec_tx]))
                out["dense_a"], out["dense_b"] = emb[:b], emb[b:]
                grid = emb.shape[-2:]
                out["dense_mask"] = (torch.nn.functional.adaptive_avg_pool2d(valid, grid) > 0.999).to(valid.dtype)
        if "z_a" in needs:
            enc_x, enc_t = feats["encoder"].split(b)
            enc_tx, enc_valid = tr.apply(enc_x, params)  # T(e(x)), aligned with e(T x) = enc_t
            z = self.global_head(torch.cat([enc_tx, enc_t]), torch.cat([enc_valid, enc_valid]))
            out["z_a"], out["z_b"] = z[:b], z[b:]
        return out


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

    During the iteration ``engine.state.output`` is a dict holding ``"loss"`` and every component as detached
    tensors, and, under ``"views"``, detached references to ``x_t``, the valid mask and ``p_hat`` for monitoring
    handlers. From ``ITERATION_COMPLETED`` on it is a one-item list holding that dict (:func:`step_output` reads
    either): the form MONAI's decollating trainers leave, so that ``from_engine(["loss"], first=True)``, the output
    transform of MONAI's stats and experiment-tracking handlers (``--tracking mlflow``), reads the loss.

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
        compile: ``torch.compile`` the step's two parts: the pre-training model (network, ``T``'s alignment of the
            features, heads and softmax; inside the DDP wrapper when there is one) and the objective (entropies,
            joints, L_MI, L_CC, L_con), so that the compiler can fuse their many small element-wise kernels. The
            maths is unchanged (``tests/test_compiled_path.py``); the first iterations pay the compilation. Meant
            for CUDA: on the CPU, torch 2.13's inductor fails on the U-Net's backward (the configs refuse it there,
            :func:`bundle.options.check_compile`).
        parallel: wraps the :class:`PretrainingModel` built from the network and the heads, e.g.
            :func:`bundle.distributed.wrap` (DDP); the unwrapped modules stay the ones handlers and checkpoints see.
        num_replicas: processes that each train on a share of one global batch (DDP); ``T`` is drawn for the global
            batch of ``num_replicas x B`` slices and this process applies rows ``rank x B .. (rank + 1) x B - 1``.
        rank: this process's index among the ``num_replicas``.

    Raises:
        ValueError: when a head needed by an active loss term is missing, or ``rank`` is not below
            ``num_replicas``.
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
        parallel: Callable[[nn.Module], nn.Module] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        **kwargs: Any,
    ) -> None:
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}.")
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
        needs = objective.required_inputs
        for inputs, head, name in (
            (("p_hat", "p_tilde"), dense_head, "dense_head (DenseClusterHead)"),
            (("z_a", "z_b"), global_head, "global_head (GlobalProjectionHead)"),
            (("dense_a", "dense_b"), dense_projector, "dense_projector (DenseProjectionHead)"),
        ):
            if needs.intersection(inputs) and head is None:
                raise ValueError(f"the objective's terms {list(objective.active_terms)} need {', '.join(inputs)}, "
                                 f"which a {name} computes; none was given.")
        if amp_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"amp_dtype must be 'float16' or 'bfloat16', got {amp_dtype!r}.")
        self.objective = objective
        self.seed = int(seed)
        self.amp_dtype = getattr(torch, amp_dtype)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.model = PretrainingModel(network, transform, needs, dense_head, global_head, dense_projector)
        self.forward_model = self.model if parallel is None else parallel(self.model)
        self.compute_losses = objective
        if compile:
            self.forward_model, self.compute_losses = torch.compile(self.forward_model), torch.compile(objective)
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

    # the pre-training model owns the transform and the heads; the trainer reads them from it
    @property
    def transform(self) -> EquivariantTransform:
        return self.model.transform

    @transform.setter
    def transform(self, transform: EquivariantTransform) -> None:
        self.model.transform = transform

    @property
    def dense_head(self) -> DenseClusterHead | None:
        return self.model.dense_head

    @property
    def global_head(self) -> GlobalProjectionHead | None:
        return self.model.global_head

    @property
    def dense_projector(self) -> DenseProjectionHead | None:
        return self.model.dense_projector

    def modules(self) -> dict[str, nn.Module]:
        """The trained modules by name (network and the heads that exist)."""
        return dict(self.model.named_children())

    def _views(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sample T, build both views, and run the pre-training model (once) on them."""
        tr, b = self.transform, x.shape[0]
        self._generator.manual_seed(transform_seed(self.seed, self.state.iteration))
        # T is drawn for the global batch and this process takes its rows: under DDP the processes together draw
        # what one process with the whole batch draws
        params = tr.sample(b * self.num_replicas, generator=self._generator)
        if self.num_replicas > 1:
            params = params.rows(self.rank * b, (self.rank + 1) * b)
        params = params.to(x.device)
        x_t, valid = tr.apply_image(x, params)
        # one autocast region for the network, T and the heads: the heads' 1x1 convolutions take the network's
        # half-precision features under AMP (the dense head returns fp32 probabilities; the losses run in fp32)
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype, enabled=self.amp):
            views = self.forward_model(x, x_t, valid, params)
        return {"image_t": x_t, "mask": valid, **views}

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
        losses = engine.compute_losses(
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
        return [engine.state.output]


def step_output(output: Any) -> dict[str, Any]:
    """A :class:`PretrainTrainer` step's output dict, from ``engine.state.output`` during the iteration (the dict)
    or after it (a one-item list holding it); an empty dict before the first iteration."""
    if isinstance(output, list):
        return output[0] if output else {}
    return output or {}


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


class MeanTeacherTrainer(SupervisedTrainer):
    """Supervised fine-tuning plus the Mean Teacher consistency on unlabeled slices (Peng et al. 2024, Appendix E).

    Per iteration ``t`` (1-based), with a labeled batch ``(x_l, y)`` from ``train_data_loader`` and an unlabeled
    batch ``x_u`` from ``unlabeled_data_loader`` (cycled; its own sampler), and ``T`` drawn from ``transform`` by a
    generator seeded with :func:`derived_seed` ``(seed, t, MEAN_TEACHER_SALT)``:

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
    handlers. Under DDP (``network`` wrapped, one process per device) both student passes run through the wrapper
    and one backward averages their gradients over the processes; each process draws its own unlabeled slices and,
    with its own ``seed``, its own ``T``.

    The standard ``IterationEvents`` are fired, and ``engine.state.output`` holds ``"image"``, ``"label"``,
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
        "train#trainer": {"_target_": "bundle.engines.MeanTeacherTrainer", ..., "teacher": "@teacher",
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
        engine._generator.manual_seed(derived_seed(engine.seed, engine.state.iteration, MEAN_TEACHER_SALT))
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
