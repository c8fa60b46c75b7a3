"""What the user sees during pre-training: progress bar, per-epoch log lines, TensorBoard, collapse warnings.

``PretrainMonitor`` reads ``engine.state.output`` written by :class:`bundle.engines.PretrainTrainer`:

- every ``log_interval`` iterations: TensorBoard scalars for every loss component, the learning rate, and the
  health of the clustering measured on the first dense head's joint matrix P (mutual-information estimate,
  marginal entropy, number of dead clusters);
- every ``image_interval`` iterations: pictures like the paper's Figures 1-3 -- the transformed input, the
  coloured cluster-assignment map, the cluster-entropy map, the Sobel edge map and the joint matrix P -- in
  TensorBoard and side by side as ``<log_dir>/pictures/iteration_NNNNNNN.png``;
- every epoch: one log line with the mean of each component, the lr and the mutual information (in nats and as a
  fraction of ``log K``), the same figures in ``engine.state.metrics`` (:meth:`PretrainMonitor.epoch_metrics`, for
  MONAI's standard handlers, e.g. MLflow with ``--tracking mlflow``), a warning when the clustering collapses
  (marginal entropy below ``collapse_fraction * log K``) and a warning when, after the lr warm-up, the two views'
  cluster assignments still share almost no information (MI below ``stall_fraction * log K``: the heads sit at the
  uniform assignment, where the MI gradient vanishes, so no cluster forms).
"""

from __future__ import annotations

import colorsys
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from bundle.engines import step_output
from bundle.losses import cluster_statistics, entropy_map, joint_distribution, sobel_edge_map

__all__ = ["PretrainMonitor", "ProgressBar", "cluster_palette"]

logger = logging.getLogger("bundle.pretrain")


def _scalars(output: dict[str, Any]) -> dict[str, float]:
    """The loss components an iteration's output holds: its 0-d tensors (``loss`` and one per active term of the
    objective), in the objective's order."""
    return {k: float(v) for k, v in output.items() if isinstance(v, torch.Tensor) and v.ndim == 0}


def cluster_palette(k: int) -> np.ndarray:
    """``k x 3`` uint8 colours, well separated (golden-angle hues, alternating saturation/value), deterministic."""
    rgb = [
        colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85 if i % 2 == 0 else 0.6, 0.95 if i % 3 == 0 else 0.75)
        for i in range(k)
    ]
    return (np.asarray(rgb) * 255).astype(np.uint8)


def _to_unit(img: torch.Tensor) -> torch.Tensor:
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo).clamp_min(1e-8)


class PretrainMonitor:
    """Scalars, pictures, epoch summaries and collapse warnings for pre-training.

    Args:
        log_dir: TensorBoard folder (created on first write). ``None`` disables TensorBoard.
        log_interval: iterations between scalar writes.
        image_interval: iterations between picture writes (also written at the first iteration).
        collapse_fraction: warn when the marginal cluster entropy is below this fraction of ``log K``.
        optimizer: read the learning rate from its first parameter group.
        stall_fraction: warn when the MI is below this fraction of ``log K`` after ``warmup_epochs``.
        warmup_epochs: epochs of lr warm-up, during which a low MI is expected and not warned about.
    """

    def __init__(
        self,
        log_dir: str | Path | None,
        log_interval: int = 10,
        image_interval: int = 200,
        collapse_fraction: float = 0.5,
        optimizer: torch.optim.Optimizer | None = None,
        stall_fraction: float = 0.05,
        warmup_epochs: int = 0,
    ) -> None:
        if log_interval < 1 or image_interval < 1:
            raise ValueError(f"intervals must be >= 1, got log {log_interval}, image {image_interval}.")
        if not 0.0 <= collapse_fraction <= 1.0:
            raise ValueError(f"collapse_fraction must be in [0, 1], got {collapse_fraction}.")
        if not 0.0 <= stall_fraction <= 1.0:
            raise ValueError(f"stall_fraction must be in [0, 1], got {stall_fraction}.")
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.log_interval = int(log_interval)
        self.image_interval = int(image_interval)
        self.collapse_fraction = float(collapse_fraction)
        self.optimizer = optimizer
        self.stall_fraction = float(stall_fraction)
        self.warmup_epochs = int(warmup_epochs)
        self._writer = None
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._last_health: dict[str, float] = {}

    # -- plumbing -------------------------------------------------------------------------------------------
    @property
    def writer(self):
        if self._writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._close_on_error)

    def _lr(self, engine: Engine) -> float | None:
        opt = self.optimizer or getattr(engine, "optimizer", None)
        return None if opt is None else float(opt.param_groups[0]["lr"])

    # -- events ---------------------------------------------------------------------------------------------
    def iteration_completed(self, engine: Engine) -> None:
        out = step_output(engine.state.output)
        it = engine.state.iteration
        values = _scalars(out)
        for k, v in values.items():
            self._sums[k] += v
        self._count += 1
        if it % self.log_interval == 0 or it == 1:
            views = out.get("views", {})
            health = self.health(views) if "p_hat" in views else {}
            self._last_health = health or self._last_health
            if self.writer is not None:
                for k, v in values.items():
                    self.writer.add_scalar(f"pretrain/{k}", v, it)
                for k, v in health.items():
                    self.writer.add_scalar(f"clusters/{k}", v, it)
                lr = self._lr(engine)
                if lr is not None:
                    self.writer.add_scalar("pretrain/lr", lr, it)
        if self.writer is not None and (it % self.image_interval == 0 or it == 1) and "p_hat" in out.get("views", {}):
            self.write_images(out["views"], it)

    def epoch_completed(self, engine: Engine) -> None:
        n = max(self._count, 1)
        means = {k: v / n for k, v in self._sums.items()}
        parts = [f"{k}={v:.4f}" for k, v in means.items()]
        lr = self._lr(engine)
        if lr is not None:
            parts.append(f"lr={lr:.3e}")
        if self._last_health:
            h = self._last_health
            parts.append(
                f"clusters: MI={h['mutual_information']:.3f} nat ({h['mutual_information'] / h['log_k']:.1%} of log K) "
                f"H(marg)={h['marginal_entropy']:.3f}/"
                f"{h['log_k']:.3f} dead={int(h['dead_clusters'])}"
            )
        logger.info(f"epoch {engine.state.epoch}/{engine.state.max_epochs}: " + " ".join(parts))
        if self._last_health:
            h = self._last_health
            if h["marginal_entropy"] < self.collapse_fraction * h["log_k"]:
                logger.warning(
                    f"cluster collapse at epoch {engine.state.epoch}: marginal entropy {h['marginal_entropy']:.3f} "
                    f"< {self.collapse_fraction:g} x log K = {self.collapse_fraction * h['log_k']:.3f} "
                    f"({int(h['dead_clusters'])} of {int(h['k'])} clusters dead). Consider a larger alpha, a lower "
                    "lr, or checking the input normalisation."
                )
            stalled = h["mutual_information"] < self.stall_fraction * h["log_k"]
            if stalled and engine.state.epoch > self.warmup_epochs:
                logger.warning(
                    f"no clusters yet at epoch {engine.state.epoch}: MI {h['mutual_information']:.3f} nat < "
                    f"{self.stall_fraction:g} x log K = {self.stall_fraction * h['log_k']:.3f} after the warm-up. The "
                    "heads are still near the uniform assignment; consider a lower cluster_temperature, a higher lr "
                    "or more iterations."
                )
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"epoch/{k}", v, engine.state.epoch)
            self.writer.flush()
        engine.state.metrics.update(self.epoch_metrics(means, self._last_health))
        self._sums.clear()
        self._count = 0

    def close(self, engine: Engine | None = None) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def _close_on_error(self, engine: Engine, e: Exception) -> None:
        self.close()
        raise e

    @staticmethod
    def epoch_metrics(means: dict[str, float], health: dict[str, float]) -> dict[str, float]:
        """What goes to ``engine.state.metrics`` at the end of an epoch, for MONAI's and ignite's standard handlers
        (``MLFlowHandler``, ``TensorBoardStatsHandler``, ``StatsHandler`` log ``state.metrics`` per epoch): the
        epoch mean of every loss component (``loss``, ``mi``, ``cc``, ``con``, ...) and the last clustering health
        (``mutual_information`` in nats, ``mutual_information_fraction`` of log K, ``marginal_entropy``,
        ``dead_clusters``)."""
        metrics = dict(means)
        if health:
            metrics.update(
                mutual_information=health["mutual_information"],
                mutual_information_fraction=health["mutual_information"] / health["log_k"],
                marginal_entropy=health["marginal_entropy"],
                dead_clusters=health["dead_clusters"],
            )
        return metrics

    # -- measurements ---------------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def health(views: dict[str, torch.Tensor]) -> dict[str, float]:
        """Clustering health on the first head: MI estimate, marginal entropy, dead clusters, K, log K."""
        p_hat, p_tilde = views["p_hat"][:1], views["p_tilde"][:1]
        joint = joint_distribution(p_hat, p_tilde, views.get("mask"))
        stats = cluster_statistics(joint)
        k = p_hat.shape[-3]
        out = {name: float(torch.as_tensor(v).float().reshape(-1)[0]) for name, v in stats.items()}
        out.update(k=float(k), log_k=math.log(k))
        return out

    @torch.no_grad()
    def write_images(self, views: dict[str, torch.Tensor], step: int) -> None:
        """Input, cluster map, entropy map, edge map (first slice, first head) and the joint matrix P."""
        image = views["image_t"][:1].float().cpu()  # 1,C,H,W
        probs = views["p_hat"][0, :1].float().cpu()  # 1,K,H,W (head 0)
        mask = views.get("mask")
        k = probs.shape[1]
        assign = probs.argmax(dim=1)[0].numpy()  # H,W
        colours = cluster_palette(k)[assign]  # H,W,3
        if mask is not None:
            colours = colours * mask[0, 0].cpu().numpy()[..., None].astype(np.uint8)
        ent = entropy_map(probs)[0, 0]
        edges = sobel_edge_map(image)[0, 0]
        joint = joint_distribution(views["p_hat"][:1], views["p_tilde"][:1], mask)[0].float().cpu()
        joint_img = torch.nn.functional.interpolate(
            _to_unit(joint)[None, None], scale_factor=max(1, 160 // k), mode="nearest"
        )[0]
        panels = {
            "input": _to_unit(image[0, :1]),
            "clusters": torch.from_numpy(colours).permute(2, 0, 1).float() / 255.0,
            "entropy": _to_unit(ent)[None],
            "edges": _to_unit(edges)[None],
            "joint_P": joint_img,
        }
        for name, panel in panels.items():
            self.writer.add_image(f"pictures/{name}", panel, step)
        if self.log_dir is not None:
            self.save_png(panels, self.log_dir / "pictures" / f"iteration_{step:07d}.png")

    @staticmethod
    def save_png(panels: dict[str, torch.Tensor], path: Path) -> Path:
        """Panels side by side (each ``C,H,W`` in [0, 1], grey or RGB), rescaled to a common height, as one PNG."""
        from PIL import Image

        height = max(p.shape[-2] for p in panels.values())
        tiles = []
        for panel in panels.values():
            rgb = panel.expand(3, -1, -1) if panel.shape[0] == 1 else panel
            scale = height / rgb.shape[-2]
            size = (height, max(1, round(rgb.shape[-1] * scale)))
            tiles.append(torch.nn.functional.interpolate(rgb[None], size=size, mode="nearest")[0])
            tiles.append(torch.ones(3, height, 4))  # white separator
        grid = (torch.cat(tiles[:-1], dim=-1).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        return path


class ProgressBar:
    """Ignite's tqdm progress bar with the running-average loss (the step output's ``"loss"``).

    Args:
        output_key: output entry to average and show.
        alpha: running-average smoothing.
        disable: turn the bar off (e.g. in non-interactive logs); the per-epoch log lines remain.
    """

    def __init__(self, output_key: str = "loss", alpha: float = 0.98, disable: bool = False) -> None:
        self.output_key = output_key
        self.alpha = alpha
        self.disable = disable

    def attach(self, engine: Engine) -> None:
        if self.disable:
            return
        from ignite.handlers import ProgressBar as IgniteBar

        # the running average is kept here rather than by ignite's RunningAverage, which all-reduces its value over
        # the processes: with the bar on rank 0 only (torchrun) that collective would wait for ranks that never call it
        key, running = self.output_key, {}

        def smoothed(out: Any) -> dict[str, float]:
            value = float(step_output(out)[key])
            running[key] = value if key not in running else self.alpha * running[key] + (1 - self.alpha) * value
            return dict(running)

        IgniteBar(persist=True).attach(engine, output_transform=smoothed)
