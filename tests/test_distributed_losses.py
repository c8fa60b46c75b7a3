"""The method's statistics are global under torchrun: 2 CPU processes (gloo), each with its own half of a batch,
give the loss and gradients of 1 process with the whole batch (L_MI's joint all-reduced, L_con's items
all-gathered, L_CC local), and the per-process option does not."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bundle.losses import PretrainingObjective

WORLD = 2
B, M, K, H, W = 3, 2, 5, 16, 16  # per process


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole batch (WORLD x B images, every image different), fp64 for tight comparisons."""
    g = torch.Generator().manual_seed(seed)
    n = WORLD * B
    return {
        "p_hat": torch.randn(M, n, K, H, W, generator=g, dtype=torch.float64).softmax(2),
        "p_tilde": torch.randn(M, n, K, H, W, generator=g, dtype=torch.float64).softmax(2),
        "image": torch.rand(n, 1, H, W, generator=g, dtype=torch.float64),
        "mask": (torch.rand(n, 1, H, W, generator=g) > 0.2).double(),
        "z_a": torch.randn(n, 8, generator=g, dtype=torch.float64),
        "z_b": torch.randn(n, 8, generator=g, dtype=torch.float64),
        "meta_labels": torch.tensor([0, 1, 2, 1, 2, 0]),
    }


_LEAVES = ("p_hat", "p_tilde", "z_a", "z_b")
_BATCH_DIM = {"p_hat": 1, "p_tilde": 1}  # the rest are batch-first


def _part(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in batch.items():
        dim = _BATCH_DIM.get(key, 0)
        out[key] = value.narrow(dim, rank * B, B).clone()
    return out


def _run(objective: PretrainingObjective, inputs: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    for key in _LEAVES:
        inputs[key].requires_grad_(True)
    out = objective(**inputs)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, {k: inputs[k].grad for k in _LEAVES}


def _worker(rank: int, init_file: str, out_dir: str, global_statistics: bool, compiled: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        objective = PretrainingObjective.from_variant("ours", global_statistics=global_statistics)
        if compiled:  # pre-training's --compile true: the collectives inside a compiled objective (graph capture of
            # inductor, without its C++ generation; see tests/test_compiled_path.py)
            objective = torch.compile(objective, backend="aot_eager", dynamic=False)
        values, grads = _run(objective, _part(_batch(), rank))
        torch.save({"values": values, "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_processes(global_statistics: bool, compiled: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        mp.spawn(_worker, args=(init_file, folder, global_statistics, compiled), nprocs=WORLD, join=True)
        return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> tuple[dict, dict]:
    return _run(PretrainingObjective.from_variant("ours"), _batch())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_processes_equal_one_process_with_the_whole_batch(single: tuple[dict, dict], compiled: bool) -> None:
    values, grads = single
    ranks = _two_processes(global_statistics=True, compiled=compiled)
    # L_MI of the pooled joint: the same value on every process
    for r in ranks:
        torch.testing.assert_close(r["values"]["mi"], values["mi"], rtol=1e-10, atol=1e-12)
    # L_CC and L_con: each process scores its own images / anchors; DDP averages, so the mean is the whole batch's
    for term in ("cc", "con", "loss"):
        mean = sum(r["values"][term] for r in ranks) / WORLD
        torch.testing.assert_close(mean, values[term], rtol=1e-10, atol=1e-12)
    # gradients: each process's backward includes what the other process's loss sends through the collectives;
    # DDP's division by the number of processes then gives the single-process gradient of that process's rows
    for rank, r in enumerate(ranks):
        for key in _LEAVES:
            expected = grads[key].narrow(_BATCH_DIM.get(key, 0), rank * B, B)
            torch.testing.assert_close(r["grads"][key] / WORLD, expected, rtol=1e-9, atol=1e-12)


def test_per_process_statistics_are_a_different_method(single: tuple[dict, dict]) -> None:
    values, _ = single
    ranks = _two_processes(global_statistics=False)
    assert not torch.allclose(ranks[0]["values"]["mi"], values["mi"])
    assert not torch.allclose(sum(r["values"]["con"] for r in ranks) / WORLD, values["con"])
