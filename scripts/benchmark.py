"""Speed and memory of one pre-training step, split into the U-Net and everything the method adds.

Usage (python-fire)::

    python -m scripts.benchmark step                       # paper setting: 2 views x 18 slices, 224x224, K=40, 3 heads
    python -m scripts.benchmark step --batch 6 --size 96 --features "[8,16,32,64,128,8]"   # a quick look
    python -m scripts.benchmark loader                     # the pre-training loader (scripts/benchmark_loader.py)

``step`` measures, in one process and with the same inputs:

- **U-Net**: ``forward_features`` + backward on ``2B`` images (``x`` and ``T(x)`` in one batch), the cost any
  pre-training of this network pays;
- **T + heads + losses**: sampling ``T``, ``T(x)`` with gamma, ``T`` on the decoder (``B,C5,H,W``) and encoder
  features, the dense cluster heads and the global head, and L_MI + L_CC + L_con forward and backward (gradients
  flowing into the feature maps), i.e. everything the method adds to the U-Net step;

and prints both times (median of ``repeats``), their ratio and the peak memory (CPU: peak RSS of the process;
CUDA: ``torch.cuda.max_memory_allocated`` per part). On CUDA the network runs under AMP (fp16) and the losses in
fp32, as in training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from bundle.engines import transform_seed
from bundle.losses import PretrainingObjective
from bundle.networks import PAPER_FEATURES, DenseClusterHead, FeatureUNet, GlobalProjectionHead
from bundle.options import flag
from bundle.transforms import EquivariantTransform, TransformParams
from scripts import benchmark_loader
from scripts.fire_cli import fire_main


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn: Callable[[], None], repeats: int, warmup: int, device: torch.device) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return (statistics.median(times) if times else float("nan")), times


@dataclass(frozen=True)
class _Setup:
    """What every part of the step shares: device and precision, the networks, the objective, T and the inputs."""

    dev: torch.device
    use_amp: bool
    batch: int
    seed: int
    net: FeatureUNet
    dense_head: DenseClusterHead
    global_head: GlobalProjectionHead
    objective: PretrainingObjective
    tr: EquivariantTransform
    g: torch.Generator  # the random inputs' generator; the parts draw from it in a fixed order
    x: torch.Tensor  # B,1,H,W images T acts on
    labels: torch.Tensor  # meta-labels of L_con
    x2: torch.Tensor  # 2B,1,H,W images of the U-Net step (x and T(x) in one batch)
    compiled: bool = False  # the U-Net, the heads and the objective under torch.compile

    def autocast(self) -> torch.autocast:
        """fp16 autocast of the network on CUDA with ``amp``; a no-op otherwise."""
        return torch.autocast(self.dev.type, dtype=torch.float16, enabled=self.use_amp)


def _make_setup(batch: int, size: int, features: Sequence[int], num_clusters: int, num_heads: int, variant: str,
           seed: int, dev: torch.device, use_amp: bool) -> _Setup:
    """Seeded networks (in training mode), objective, T and random inputs of one benchmark."""
    torch.manual_seed(seed)
    net = FeatureUNet(out_channels=4, features=tuple(features)).to(dev).train()
    dense_head = DenseClusterHead(features[5], num_clusters, num_heads).to(dev).train()
    global_head = GlobalProjectionHead(features[4]).to(dev).train()
    objective = PretrainingObjective.from_variant(variant)
    tr = EquivariantTransform()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, size, size, generator=g).to(dev)
    labels = (torch.arange(batch) % 3).to(dev)
    x2 = torch.rand(2 * batch, 1, size, size, generator=g).to(dev)
    return _Setup(dev=dev, use_amp=use_amp, batch=batch, seed=seed, net=net, dense_head=dense_head,
                  global_head=global_head, objective=objective, tr=tr, g=g, x=x, labels=labels, x2=x2)


def _warm_up_peak_memory_mib(fn: Callable[[], None], warmup: int, device: torch.device) -> float:
    """Run ``fn``'s untimed warm-up rounds; the peak memory after them (CUDA: of this part alone, MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _timed(fn, 0, warmup, device)
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mib()


def _unet_part(s: _Setup) -> Callable[[], None]:
    """U-Net forward + backward on the 2B views, driven by fixed random gradients on its decoder and encoder maps."""
    with torch.no_grad(), s.autocast():
        ref = s.net.forward_features(s.x2, with_logits=False)
    g_dec = torch.randn(ref["decoder"].shape, generator=s.g).to(s.dev)
    g_enc = torch.randn(ref["encoder"].shape, generator=s.g).to(s.dev)
    del ref

    features = torch.compile(s.net.forward_features, dynamic=False) if s.compiled else s.net.forward_features

    def unet_step() -> None:
        s.net.zero_grad(set_to_none=True)
        with s.autocast():
            f = features(s.x2, with_logits=False)
        ((f["decoder"].float() * g_dec).sum() + (f["encoder"].float() * g_enc).sum()).backward()

    return unet_step


def _fixed_features(s: _Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder and encoder maps of the 2B views, computed once: what the method's parts start from."""
    dtype = torch.float16 if s.use_amp else torch.float32
    with torch.no_grad(), s.autocast():
        f = s.net.forward_features(s.x2, with_logits=False)
    return f["decoder"].to(dtype), f["encoder"].to(dtype)


def _overhead_part(s: _Setup, dec0: torch.Tensor, enc0: torch.Tensor) -> Callable[[], None]:
    """The method's whole addition to an iteration: a new T, T(x) with gamma, T on the decoder and encoder maps, the
    dense and global heads, and L_MI + L_CC + L_con forward and backward (gradients flowing into the feature maps)."""
    counter = {"it": 0}

    def overhead_step() -> None:
        s.dense_head.zero_grad(set_to_none=True)
        s.global_head.zero_grad(set_to_none=True)
        dec = dec0.detach().requires_grad_(True)
        enc = enc0.detach().requires_grad_(True)
        counter["it"] += 1
        params = s.tr.sample(s.batch, generator=torch.Generator().manual_seed(transform_seed(s.seed, counter["it"])))
        params = params.to(s.dev)
        x_t, valid = s.tr.apply_image(s.x, params)
        with s.autocast():
            (dec_x, dec_t), (enc_x, enc_t) = dec.split(s.batch), enc.split(s.batch)  # as PretrainTrainer does
            dec_tx, _ = s.tr.apply(dec_x, params)
            p_hat, p_tilde = s.dense_head(dec_t), s.dense_head(dec_tx)
            enc_tx, enc_valid = s.tr.apply(enc_x, params)
            z = s.global_head(torch.cat([enc_tx, enc_t]), torch.cat([enc_valid, enc_valid]))
        out = s.objective(
            p_hat=p_hat,
            p_tilde=p_tilde,
            image=x_t,
            mask=valid,
            z_a=z[:s.batch],
            z_b=z[s.batch:],
            meta_labels=s.labels,
        )
        out["loss"].backward()

    return overhead_step


class _FixedOutputs(NamedTuple):
    """One fixed T's outputs and the heads' outputs on them, computed once without gradients: the inputs of the
    heads-only and losses-only parts."""

    x_t: torch.Tensor  # T(x) with gamma
    valid: torch.Tensor  # its mask
    dec_tx: torch.Tensor  # T on the decoder maps of x
    p_hat: torch.Tensor  # dense heads on the decoder maps of T(x)
    p_tilde: torch.Tensor  # dense heads on dec_tx
    z: torch.Tensor  # global head on T(encoder maps of x) and the encoder maps of T(x)


def _fixed_outputs(s: _Setup, dec0: torch.Tensor, enc0: torch.Tensor, params0: TransformParams) -> _FixedOutputs:
    """T(x) and T on the maps of x by ``params0``, and the heads on both views, without gradients."""
    b = s.batch
    with torch.no_grad():
        x_t0, valid0 = s.tr.apply_image(s.x, params0)
        dec_tx0, _ = s.tr.apply(dec0[:b], params0)
        p_hat0, p_tilde0 = s.dense_head(dec0[b:].float()), s.dense_head(dec_tx0.float())
        enc_tx0, enc_valid0 = s.tr.apply(enc0[:b], params0)
        z0 = s.global_head(torch.cat([enc_tx0, enc0[b:]]).float(), torch.cat([enc_valid0, enc_valid0]).float())
    return _FixedOutputs(x_t=x_t0, valid=valid0, dec_tx=dec_tx0, p_hat=p_hat0, p_tilde=p_tilde0, z=z0)


def _transform_part(s: _Setup, dec0: torch.Tensor, enc0: torch.Tensor, params0: TransformParams
                    ) -> Callable[[], None]:
    """T alone: T(x) with gamma and T on the decoder and encoder maps of x, forward + backward."""

    def t_only() -> None:
        dec = dec0[:s.batch].detach().requires_grad_(True)
        enc = enc0[:s.batch].detach().requires_grad_(True)
        x_t, _ = s.tr.apply_image(s.x, params0)
        dec_tx, _ = s.tr.apply(dec, params0)
        enc_tx, _ = s.tr.apply(enc, params0)
        (dec_tx.float().sum() + enc_tx.float().sum()).backward()

    return t_only


def _heads_part(s: _Setup, dec0: torch.Tensor, fixed: _FixedOutputs) -> Callable[[], None]:
    """The dense heads alone, forward + backward on both views."""
    # the heads' incoming gradient as training produces it: fp32, in the batch-major layout the losses write (an
    # M,B,K,H,W transposed view of a contiguous B,M,K,H,W tensor), fed straight to backward (no extra product)
    g_p = torch.randn(fixed.p_hat.transpose(0, 1).shape, generator=s.g).to(s.dev).transpose(0, 1)

    def heads_only() -> None:
        s.dense_head.zero_grad(set_to_none=True)
        d_a = dec0[s.batch:].detach().requires_grad_(True)
        d_b = fixed.dec_tx.detach().requires_grad_(True)
        with s.autocast():
            outputs = [s.dense_head(d_a), s.dense_head(d_b)]
        torch.autograd.backward(outputs, [g_p, g_p])

    return heads_only


def _losses_part(s: _Setup, fixed: _FixedOutputs) -> Callable[[], None]:
    """L_MI + L_CC + L_con alone, forward + backward into the heads' outputs."""

    def losses_only() -> None:
        ph = fixed.p_hat.detach().requires_grad_(True)
        pt = fixed.p_tilde.detach().requires_grad_(True)
        z = fixed.z.detach().requires_grad_(True)
        out = s.objective(
            p_hat=ph, p_tilde=pt, image=fixed.x_t, mask=fixed.valid, z_a=z[:s.batch], z_b=z[s.batch:],
            meta_labels=s.labels
        )
        out["loss"].backward()

    return losses_only


def _interleaved_rounds(parts: dict[str, Callable[[], None]], repeats: int, device: torch.device
                        ) -> dict[str, list[float]]:
    """Times of ``repeats`` rounds, each timing every part once: on a shared machine the speed drifts over minutes,
    so ratios compare parts measured side by side."""
    rounds: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            rounds[name].append(_timed(fn, 1, 0, device)[0])
    return rounds


def _timing_fields(rounds: dict[str, list[float]], med: dict[str, float]) -> dict[str, Any]:
    """The result's timing entries: medians, the rounds of the U-Net step and the overhead, and the ratios."""
    per_round_ratio = [(t + losses) / unet for t, losses, unet in zip(rounds["t"], rounds["losses"], rounds["unet"],
                                                                       strict=True)]
    return {
        "unet_step_s": round(med["unet"], 4),
        "unet_step_all_s": [round(t, 4) for t in rounds["unet"]],
        "t_heads_losses_s": round(med["overhead"], 4),
        "t_heads_losses_all_s": [round(t, 4) for t in rounds["overhead"]],
        "ratio_overhead_to_unet": round(med["overhead"] / med["unet"], 4),
        "t_transform_s": round(med["t"], 4),
        "t_dense_heads_s": round(med["heads"], 4),
        "t_losses_s": round(med["losses"], 4),
        "ratio_t_plus_losses_to_unet": round((med["t"] + med["losses"]) / med["unet"], 4),
        "ratio_t_plus_losses_to_unet_per_round": [round(r, 4) for r in per_round_ratio],
    }


def _summary(med: dict[str, float]) -> str:
    """The printed line: both times, their ratio, the three parts."""
    t_unet, t_over, t_t, t_heads, t_losses = (med[k] for k in ("unet", "overhead", "t", "heads", "losses"))
    return (
        f"U-Net fwd+bwd {t_unet:.3f} s | T + heads + losses fwd+bwd {t_over:.3f} s "
        f"({100 * t_over / t_unet:.1f} % of the U-Net step) | parts: T {t_t:.3f} s, dense heads {t_heads:.3f} s, "
        f"losses {t_losses:.3f} s -> T + losses = {100 * (t_t + t_losses) / t_unet:.1f} % (target <= 10 %)"
    )


def step(
    batch: int = 18,
    size: int = 224,
    features: Sequence[int] = PAPER_FEATURES,
    num_clusters: int = 40,
    num_heads: int = 3,
    variant: str = "ours",
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 2,
    device: str = "auto",
    amp: bool = True,
    compile: bool = False,
    seed: int = 0,
    json_out: str | None = None,
) -> str:
    """Time the U-Net step and the method's overhead (T + heads + losses) at the given scale; print the ratio.

    Args:
        batch: slices per view (the paper: 18 = 6 scans x 3 partitions).
        size: square crop size in pixels.
        features: the U-Net's six widths.
        num_clusters: clusters K of each dense head.
        num_heads: dense heads.
        variant: objective variant (``ours``, ``iic``, ...; see ``bundle.losses.VARIANTS``).
        repeats: timed rounds (each round times every part once); medians are reported.
        warmup: untimed rounds first.
        threads: torch CPU threads.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        amp: fp16 autocast for the network on CUDA.
        compile: ``torch.compile`` the U-Net's feature pass, the heads and the objective, each on its own (T's
            alignment stays eager; pre-training's ``--compile true`` compiles the network, T's alignment and the
            heads as one module, so this approximates it); the warm-up rounds pay the compilation (give ``warmup``
            >= 2). CUDA only in practice (on the CPU, torch 2.13's inductor fails on the U-Net's backward).
        seed: seed of the random inputs and weights.
        json_out: also write the result as JSON to this file.
    """
    torch.set_num_threads(int(threads))
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    use_amp, compile = flag(amp, "amp") and dev.type == "cuda", flag(compile, "compile")  # fire passes "false"
    s = _make_setup(batch, size, features, num_clusters, num_heads, variant, seed, dev, use_amp)
    if compile:
        s = dataclasses.replace(s, compiled=True, dense_head=torch.compile(s.dense_head, dynamic=False),
                                global_head=torch.compile(s.global_head, dynamic=False),
                                objective=torch.compile(s.objective, dynamic=False))

    unet = _unet_part(s)
    mem_unet = _warm_up_peak_memory_mib(unet, warmup, dev)
    dec0, enc0 = _fixed_features(s)
    overhead = _overhead_part(s, dec0, enc0)
    mem_over = _warm_up_peak_memory_mib(overhead, warmup, dev)

    # the same work in three parts: T alone, the heads alone, the losses alone (fwd + bwd each), with one fixed T
    params0 = s.tr.sample(batch, generator=torch.Generator().manual_seed(transform_seed(seed, 0))).to(dev)
    fixed = _fixed_outputs(s, dec0, enc0, params0)
    parts = {"unet": unet, "overhead": overhead, "t": _transform_part(s, dec0, enc0, params0),
             "heads": _heads_part(s, dec0, fixed), "losses": _losses_part(s, fixed)}
    for name in ("t", "heads", "losses"):
        _timed(parts[name], 0, warmup, dev)
    rounds = _interleaved_rounds(parts, repeats, dev)
    med = {name: statistics.median(times) for name, times in rounds.items()}

    result = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "amp": use_amp,
        "compile": compile,
        "batch_slices": batch,
        "network_images": 2 * batch,
        "size": size,
        "features": list(features),
        "num_clusters": num_clusters,
        "num_heads": num_heads,
        "variant": variant,
        **_timing_fields(rounds, med),
        "peak_mem_mib_after_unet": round(mem_unet, 1),
        "peak_mem_mib_after_overhead": round(mem_over, 1),
        "memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process peak RSS",
    }
    print(_summary(med))
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    return json.dumps(result, indent=2)


@functools.wraps(benchmark_loader.benchmark)  # the command line shows the loader benchmark's flags
def loader(*args: Any, **kwargs: Any) -> Any:
    return benchmark_loader.benchmark(*args, **kwargs)


if __name__ == "__main__":
    fire_main({"step": step, "loader": loader})
