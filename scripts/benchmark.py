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

import functools
import json
import resource
import statistics
import time
from collections.abc import Sequence
from typing import Any

import fire
import torch

from bundle.engines import transform_seed
from bundle.losses import PretrainingObjective
from bundle.networks import PAPER_FEATURES, DenseClusterHead, FeatureUNet, GlobalProjectionHead
from bundle.transforms import EquivariantTransform
from scripts import benchmark_loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn, repeats: int, warmup: int, device: torch.device) -> tuple[float, list[float]]:
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
        seed: seed of the random inputs and weights.
        json_out: also write the result as JSON to this file.
    """
    torch.set_num_threads(int(threads))
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    use_amp = bool(amp) and dev.type == "cuda"
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

    # --- U-Net forward + backward on the 2B views --------------------------------------------------------
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
        ref = net.forward_features(x2, with_logits=False)
    g_dec = torch.randn(ref["decoder"].shape, generator=g).to(dev)
    g_enc = torch.randn(ref["encoder"].shape, generator=g).to(dev)
    del ref

    def unet_step() -> None:
        net.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
            f = net.forward_features(x2, with_logits=False)
        ((f["decoder"].float() * g_dec).sum() + (f["encoder"].float() * g_enc).sum()).backward()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _timed(unet_step, 0, warmup, dev)
    mem_unet = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss_mib()

    # --- T + heads + losses, forward + backward into fixed feature maps ----------------------------------
    dtype = torch.float16 if use_amp else torch.float32
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
        f = net.forward_features(x2, with_logits=False)
    dec0, enc0 = f["decoder"].to(dtype), f["encoder"].to(dtype)
    del f
    counter = {"it": 0}

    def overhead_step() -> None:
        dense_head.zero_grad(set_to_none=True)
        global_head.zero_grad(set_to_none=True)
        dec = dec0.detach().requires_grad_(True)
        enc = enc0.detach().requires_grad_(True)
        counter["it"] += 1
        params = tr.sample(batch, generator=torch.Generator().manual_seed(transform_seed(seed, counter["it"])))
        params = params.to(dev)
        x_t, valid = tr.apply_image(x, params)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
            (dec_x, dec_t), (enc_x, enc_t) = dec.split(batch), enc.split(batch)  # as PretrainTrainer does
            dec_tx, _ = tr.apply(dec_x, params)
            p_hat, p_tilde = dense_head(dec_t), dense_head(dec_tx)
            enc_tx, enc_valid = tr.apply(enc_x, params)
            z = global_head(torch.cat([enc_tx, enc_t]), torch.cat([enc_valid, enc_valid]))
        out = objective(
            p_hat=p_hat,
            p_tilde=p_tilde,
            image=x_t,
            mask=valid,
            z_a=z[:batch],
            z_b=z[batch:],
            meta_labels=labels,
        )
        out["loss"].backward()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _timed(overhead_step, 0, warmup, dev)
    mem_over = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss_mib()

    # --- the same work in three parts: T alone, the heads alone, the losses alone (fwd + bwd each) ----------
    params0 = tr.sample(batch, generator=torch.Generator().manual_seed(transform_seed(seed, 0))).to(dev)

    def t_only() -> None:
        dec = dec0[:batch].detach().requires_grad_(True)
        enc = enc0[:batch].detach().requires_grad_(True)
        x_t, _ = tr.apply_image(x, params0)
        dec_tx, _ = tr.apply(dec, params0)
        enc_tx, _ = tr.apply(enc, params0)
        (dec_tx.float().sum() + enc_tx.float().sum()).backward()

    with torch.no_grad():
        x_t0, valid0 = tr.apply_image(x, params0)
        dec_tx0, _ = tr.apply(dec0[:batch], params0)
        p_hat0, p_tilde0 = dense_head(dec0[batch:].float()), dense_head(dec_tx0.float())
        enc_tx0, enc_valid0 = tr.apply(enc0[:batch], params0)
        z0 = global_head(torch.cat([enc_tx0, enc0[batch:]]).float(), torch.cat([enc_valid0, enc_valid0]).float())
    # the heads' incoming gradient as training produces it: fp32, in the batch-major layout the losses write (an
    # M,B,K,H,W transposed view of a contiguous B,M,K,H,W tensor), fed straight to backward (no extra product)
    g_p = torch.randn(p_hat0.transpose(0, 1).shape, generator=g).to(dev).transpose(0, 1)

    def heads_only() -> None:
        dense_head.zero_grad(set_to_none=True)
        d_a = dec0[batch:].detach().requires_grad_(True)
        d_b = dec_tx0.detach().requires_grad_(True)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
            outputs = [dense_head(d_a), dense_head(d_b)]
        torch.autograd.backward(outputs, [g_p, g_p])

    def losses_only() -> None:
        ph = p_hat0.detach().requires_grad_(True)
        pt = p_tilde0.detach().requires_grad_(True)
        z = z0.detach().requires_grad_(True)
        out = objective(
            p_hat=ph, p_tilde=pt, image=x_t0, mask=valid0, z_a=z[:batch], z_b=z[batch:], meta_labels=labels
        )
        out["loss"].backward()

    # interleaved rounds: on a shared machine the speed drifts over minutes, so every round times every part once
    # and the ratio compares parts measured side by side
    parts = {"unet": unet_step, "overhead": overhead_step, "t": t_only, "heads": heads_only, "losses": losses_only}
    for name, fn in parts.items():
        if name in ("t", "heads", "losses"):
            _timed(fn, 0, warmup, dev)
    rounds: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            rounds[name].append(_timed(fn, 1, 0, dev)[0])
    med = {name: statistics.median(times) for name, times in rounds.items()}
    t_unet, t_over, t_t, t_heads, t_losses = (med[k] for k in ("unet", "overhead", "t", "heads", "losses"))
    all_unet, all_over = rounds["unet"], rounds["overhead"]
    per_round_ratio = [(rounds["t"][i] + rounds["losses"][i]) / rounds["unet"][i] for i in range(repeats)]

    result = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "amp": use_amp,
        "batch_slices": batch,
        "network_images": 2 * batch,
        "size": size,
        "features": list(features),
        "num_clusters": num_clusters,
        "num_heads": num_heads,
        "variant": variant,
        "unet_step_s": round(t_unet, 4),
        "unet_step_all_s": [round(t, 4) for t in all_unet],
        "t_heads_losses_s": round(t_over, 4),
        "t_heads_losses_all_s": [round(t, 4) for t in all_over],
        "ratio_overhead_to_unet": round(t_over / t_unet, 4),
        "t_transform_s": round(t_t, 4),
        "t_dense_heads_s": round(t_heads, 4),
        "t_losses_s": round(t_losses, 4),
        "ratio_t_plus_losses_to_unet": round((t_t + t_losses) / t_unet, 4),
        "ratio_t_plus_losses_to_unet_per_round": [round(r, 4) for r in per_round_ratio],
        "peak_mem_mib_after_unet": round(mem_unet, 1),
        "peak_mem_mib_after_overhead": round(mem_over, 1),
        "memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process peak RSS",
    }
    print(
        f"U-Net fwd+bwd {t_unet:.3f} s | T + heads + losses fwd+bwd {t_over:.3f} s "
        f"({100 * t_over / t_unet:.1f} % of the U-Net step) | parts: T {t_t:.3f} s, dense heads {t_heads:.3f} s, "
        f"losses {t_losses:.3f} s -> T + losses = {100 * (t_t + t_losses) / t_unet:.1f} % (target <= 10 %)"
    )
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    return json.dumps(result, indent=2)


@functools.wraps(benchmark_loader.benchmark)  # the command line shows the loader benchmark's flags
def loader(*args: Any, **kwargs: Any) -> Any:
    return benchmark_loader.benchmark(*args, **kwargs)


if __name__ == "__main__":
    fire.Fire({"step": step, "loader": loader})
