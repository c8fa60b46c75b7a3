"""Checks that need a CUDA device; run by ``scripts/device_check.sh`` (never by the tests).

Usage (python-fire)::

    python -m scripts.device_check losses          # the pre-training objective on CUDA equals the CPU one

``losses`` scores the same inputs with :class:`bundle.losses.PretrainingObjective` (the paper's variant: fused
MI + CC path, contrastive term) on the CPU and on CUDA, and compares values and gradients: once in fp32 and once
with fp16 probabilities under autocast, as training feeds them (the CPU then scores the same fp16-rounded values in
fp32).  It exits non-zero on a mismatch.
"""

from __future__ import annotations

import json

import torch

from bundle.losses import PretrainingObjective
from bundle.transforms import EquivariantTransform
from scripts.fire_cli import fire_main


def _inputs(batch: int, k: int, heads: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (heads, batch, k, size, size)
    tr = EquivariantTransform()
    image, valid = tr.apply_image(torch.rand(batch, 1, size, size, generator=g), tr.sample(batch, generator=g))
    return {
        "p_hat": (3.0 * torch.randn(shape, generator=g)).softmax(dim=2),
        "p_tilde": (3.0 * torch.randn(shape, generator=g)).softmax(dim=2),
        "image": image,
        "mask": valid,
        "z_a": torch.nn.functional.normalize(torch.randn(batch, 32, generator=g), dim=1),
        "z_b": torch.nn.functional.normalize(torch.randn(batch, 32, generator=g), dim=1),
        "meta_labels": torch.arange(batch) % 3,
    }


def _score(objective: PretrainingObjective, inputs: dict[str, torch.Tensor], device: str, half: bool):
    grads = ("p_hat", "p_tilde", "z_a", "z_b")
    leaves = {}
    for name, value in inputs.items():
        value = value.to(device)
        if half and name in ("p_hat", "p_tilde"):  # fp16 as the heads give them under AMP; fp32 copies on the CPU
            value = value.half() if device == "cuda" else value.half().float()
        leaves[name] = value.detach().requires_grad_(True) if name in grads else value
    with torch.autocast(device_type=device, dtype=torch.float16, enabled=half and device == "cuda"):
        out = objective(**leaves)
    out["loss"].backward()
    values = {k: v.detach().double().cpu() for k, v in out.items()}
    gradients = {name: leaves[name].grad.double().cpu() for name in grads}
    return values, gradients


def losses(batch: int = 6, num_clusters: int = 40, num_heads: int = 3, size: int = 96, seed: int = 0) -> str:
    """Compare the objective's values and gradients on CPU and CUDA (fp32, then fp16 inputs under autocast).

    Args:
        batch: slices per view.
        num_clusters: clusters K of each dense head.
        num_heads: dense heads.
        size: square image size in pixels.
        seed: seed of the random inputs.
    """
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    objective = PretrainingObjective.from_variant("ours")
    inputs = _inputs(batch, num_clusters, num_heads, size, seed)
    report, ok = {}, True
    for half in (False, True):
        cpu_values, cpu_grads = _score(objective, inputs, "cpu", half=half)
        gpu_values, gpu_grads = _score(objective, inputs, "cuda", half=half)
        # same input values on both sides: the values differ only by the order of floating-point sums; an fp16 leaf
        # also gets its gradient rounded to fp16 (relative error <= 2^-11 of each element)
        diffs = {f"value {k}": abs(float(gpu_values[k] - cpu_values[k])) for k in cpu_values}
        grad_diffs = {}
        for name in cpu_grads:
            scale = float(cpu_grads[name].abs().max()) or 1.0
            grad_diffs[f"grad {name} (rel. to max)"] = float((gpu_grads[name] - cpu_grads[name]).abs().max()) / scale
        finite = all(bool(torch.isfinite(g).all()) for g in gpu_grads.values())
        grad_tol = 2e-3 if half else 1e-4
        passed = finite and all(d <= 1e-4 for d in diffs.values()) and all(d <= grad_tol for d in grad_diffs.values())
        diffs.update(grad_diffs)
        ok = ok and passed
        report["fp16 under autocast" if half else "fp32"] = {"passed": passed, "finite": finite, **diffs}
    text = json.dumps(report, indent=2)
    print(text)
    if not ok:
        raise SystemExit("CUDA and CPU disagree")
    return "ok"


if __name__ == "__main__":
    fire_main({"losses": losses})
