"""The compiled pre-training step (``compile=True``) computes what the eager step computes.

``torch.compile`` captures the step's two parts, the pre-training model (network, T's alignment, heads, softmax)
and the objective (entropies, joints, L_MI, L_CC, L_con with their hand-written backward functions), with
TorchDynamo and AOTAutograd. The tests compare both parts, values and gradients, against the eager reference on the
CPU with the ``aot_eager`` backend: the same graph capture the default backend (inductor) compiles, without its
minutes of C++ code generation on a 2-core machine. What inductor then generates is PyTorch's to get right.

In float64, so that agreement means the same maths: in float32 the captured graph's other summation orders move
L_CC's gradient by up to 5e-4 of its largest value (its normalised cross-correlation is ill-conditioned in flat
windows), against 3e-13 in float64.
"""

from __future__ import annotations

import pytest
import torch

from bundle.engines import PretrainingModel, PretrainTrainer
from bundle.losses import PretrainingObjective
from bundle.networks import DenseClusterHead, FeatureUNet, GlobalProjectionHead
from bundle.transforms import EquivariantTransform

FEATURES = (4, 8, 8, 16, 16, 4)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _objective_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    heads, batch, k, size = 2, 4, 6, 24
    f64 = torch.float64
    p_hat = torch.randn(heads, batch, k, size, size, generator=g, dtype=f64).mul(3).softmax(2).requires_grad_()
    p_tilde = torch.randn(heads, batch, k, size, size, generator=g, dtype=f64).mul(3).softmax(2).requires_grad_()
    z_a = torch.nn.functional.normalize(torch.randn(batch, 8, generator=g, dtype=f64), dim=1).requires_grad_()
    z_b = torch.nn.functional.normalize(torch.randn(batch, 8, generator=g, dtype=f64), dim=1).requires_grad_()
    return {"p_hat": p_hat, "p_tilde": p_tilde, "image": torch.rand(batch, 1, size, size, generator=g, dtype=f64),
            "mask": (torch.rand(batch, 1, size, size, generator=g) > 0.2).to(f64), "z_a": z_a, "z_b": z_b,
            "meta_labels": torch.tensor([0, 1, 0, 1])}


def _assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: float = 1e-9) -> None:
    scale = float(expected.abs().max()) or 1.0
    assert float((actual - expected).abs().max()) <= tol * scale, name


@pytest.mark.parametrize("variant", ["ours", "iic"])
def test_compiled_objective_equals_the_eager_objective(variant: str) -> None:
    objective = PretrainingObjective.from_variant(variant)
    compiled = torch.compile(objective, backend="aot_eager", dynamic=False)
    eager_in, compiled_in = _objective_inputs(0), _objective_inputs(0)
    eager_out, compiled_out = objective(**eager_in), compiled(**compiled_in)
    assert eager_out.keys() == compiled_out.keys()
    for name in eager_out:
        _assert_close_relative(compiled_out[name].detach(), eager_out[name].detach(), name)
    eager_out["loss"].backward()
    compiled_out["loss"].backward()
    for name in ("p_hat", "p_tilde", "z_a", "z_b"):
        if eager_in[name].grad is not None:
            _assert_close_relative(compiled_in[name].grad, eager_in[name].grad, f"d loss / d {name}")


def test_compiled_pretraining_model_equals_the_eager_model() -> None:
    torch.manual_seed(0)
    network = FeatureUNet(features=FEATURES)
    transform = EquivariantTransform()
    model = PretrainingModel(network, transform, PretrainingObjective.from_variant("ours").required_inputs,
                             dense_head=DenseClusterHead(FEATURES[5], 5, 2),
                             global_head=GlobalProjectionHead(FEATURES[4]))
    model.double().eval()  # the same normalisation in both calls (train mode would move BatchNorm's statistics)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = transform.sample(2, generator=torch.Generator().manual_seed(2))
    x_t, valid = transform.apply_image(x, params)
    eager = model(x, x_t, valid, params)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)(x, x_t, valid, params)
    assert eager.keys() == compiled.keys() == {"p_hat", "p_tilde", "z_a", "z_b"}
    grads = []
    for out in (eager, compiled):
        model.zero_grad()
        sum(v.square().mean() for v in out.values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in eager:
        _assert_close_relative(compiled[name].detach(), eager[name].detach(), name)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        _assert_close_relative(grads[1][name], grads[0][name], name)


def test_the_trainer_compiles_both_parts_only_when_asked() -> None:
    objective = PretrainingObjective.from_variant("ours")
    network = FeatureUNet(features=FEATURES)
    heads = {"dense_head": DenseClusterHead(FEATURES[5], 5, 2), "global_head": GlobalProjectionHead(FEATURES[4])}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

    def trainer(compile: bool) -> PretrainTrainer:
        return PretrainTrainer(device="cpu", max_epochs=1, train_data_loader=[], network=network, optimizer=optimizer,
                               objective=objective, transform=EquivariantTransform(), compile=compile, **heads)

    eager, compiled = trainer(False), trainer(True)
    assert eager.forward_model is eager.model and eager.compute_losses is objective
    assert compiled.forward_model._orig_mod is compiled.model and compiled.compute_losses._orig_mod is objective
