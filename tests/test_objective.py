"""The unified pre-training objective (eq. 11) and its ablation variants."""

from __future__ import annotations

import pytest
import torch

from bundle.losses import (
    VARIANTS,
    BoundaryCrossCorrelationLoss,
    ClusterMutualInformationLoss,
    DenseContrastiveLoss,
    IMSATLoss,
    MetaLabelContrastiveLoss,
    PretrainingObjective,
)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "p_hat": (2 * torch.randn(2, 3, 4, 8, 8, generator=g)).softmax(2),
        "p_tilde": (2 * torch.randn(2, 3, 4, 8, 8, generator=g)).softmax(2),
        "image": torch.rand(3, 1, 8, 8, generator=g),
        "mask": (torch.rand(3, 1, 8, 8, generator=g) > 0.2).float(),
        "z_a": torch.randn(3, 6, generator=g),
        "z_b": torch.randn(3, 6, generator=g),
        "meta_labels": torch.tensor([0, 1, 0]),
        "dense_a": torch.randn(3, 5, 2, 2, generator=g),
        "dense_b": torch.randn(3, 5, 2, 2, generator=g),
        "dense_mask": torch.ones(3, 1, 2, 2),
    }


def test_total_is_weighted_sum_of_components() -> None:
    x = _inputs()
    objective = PretrainingObjective(
        alpha=0.25, mi_weight=0.5, cc_weight=0.1, con_weight=2.0, imsat_weight=0.3, dense_con_weight=0.7,
        temperature=0.2, cc_window=3, cc_edge_power=1.5, imsat_lambda=2.0,
    )
    out = objective(**x)
    assert set(out) == {"loss", "mi", "cc", "con", "imsat", "dense_con"}
    expected = {
        "mi": ClusterMutualInformationLoss(alpha=0.25)(x["p_hat"], x["p_tilde"], x["mask"]),
        # CC on all 2 + 2 heads of both predictions, against the transformed image, in one call
        "cc": BoundaryCrossCorrelationLoss(window=3, edge_power=1.5)(
            torch.cat([x["p_hat"], x["p_tilde"]]), x["image"], x["mask"]
        ),
        "con": MetaLabelContrastiveLoss(0.2)(x["z_a"], x["z_b"], x["meta_labels"]),
        "imsat": (IMSATLoss(2.0)(x["p_hat"], x["mask"]) + IMSATLoss(2.0)(x["p_tilde"], x["mask"])) / 2,
        "dense_con": DenseContrastiveLoss(0.2)(x["dense_a"], x["dense_b"], x["dense_mask"]),
    }
    for term, value in expected.items():
        torch.testing.assert_close(out[term], value)
    total = 0.5 * out["mi"] + 0.1 * out["cc"] + 2.0 * out["con"] + 0.3 * out["imsat"] + 0.7 * out["dense_con"]
    torch.testing.assert_close(out["loss"], total)


def test_default_is_eq_11_and_backpropagates() -> None:
    x = _inputs(1)
    x["p_hat"].requires_grad_()
    x["z_a"].requires_grad_()
    objective = PretrainingObjective()
    assert objective.active_terms == ("mi", "cc", "con")
    out = objective(p_hat=x["p_hat"], p_tilde=x["p_tilde"], image=x["image"], z_a=x["z_a"], z_b=x["z_b"],
                    meta_labels=x["meta_labels"])
    assert set(out) == {"loss", "mi", "cc", "con"}
    torch.testing.assert_close(out["loss"], out["con"] + out["cc"] + out["mi"])
    out["loss"].backward()
    assert torch.isfinite(x["p_hat"].grad).all() and torch.isfinite(x["z_a"].grad).all()


def test_zero_weight_terms_are_not_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("an inactive term was computed")

    objective = PretrainingObjective(cc_weight=0.0, con_weight=0.0)
    monkeypatch.setattr(objective.cc, "forward", fail)
    monkeypatch.setattr(objective.con, "forward", fail)
    x = _inputs(2)
    out = objective(p_hat=x["p_hat"], p_tilde=x["p_tilde"])  # no image, no embeddings needed
    assert set(out) == {"loss", "mi"}
    torch.testing.assert_close(out["loss"], out["mi"])


@pytest.mark.parametrize(
    ("name", "terms", "alpha"),
    [
        ("ours", {"mi", "cc", "con"}, 0.5),
        ("contrast_enc_ours", {"mi", "cc", "con"}, 0.5),
        ("iic", {"mi"}, 0.0),
        ("mi_only", {"mi"}, 0.5),
        ("cc_only", {"cc"}, 0.5),
        ("mi_cc", {"mi", "cc"}, 0.5),
        ("contrast_enc", {"con"}, 0.5),
        ("imsat", {"imsat"}, 0.5),
        ("dense_contrast", {"dense_con"}, 0.5),
    ],
)
def test_variants_switch_terms(name: str, terms: set[str], alpha: float) -> None:
    objective = PretrainingObjective.from_variant(name)
    assert set(objective.active_terms) == terms
    assert objective.mi.alpha == alpha
    out = objective(**_inputs(3))
    assert set(out) == terms | {"loss"}
    assert torch.isfinite(out["loss"])
    assert set(VARIANTS) >= {name}


def test_variant_overrides_and_unknown_names() -> None:
    objective = PretrainingObjective.from_variant("ours", cc_weight=0.1, cc_edge_power=1.5, mi_symmetric=True)
    assert objective.weights["cc"] == 0.1 and objective.cc.edge_power == 1.5 and objective.mi.symmetric
    with pytest.raises(ValueError, match="valid variants: .*contrast_enc.*iic"):
        PretrainingObjective.from_variant("simclr")
    with pytest.raises(ValueError, match="lamda"):
        PretrainingObjective.from_variant("ours", lamda=1.0)


def test_a_value_the_variant_would_replace_is_rejected() -> None:
    assert PretrainingObjective.from_variant("iic", alpha=0.5).mi.alpha == 0.0  # the default every config passes
    assert PretrainingObjective.from_variant("iic", alpha=0.0).mi.alpha == 0.0
    with pytest.raises(ValueError, match="variant 'iic' fixes alpha = 0.0; got alpha = 0.3"):
        PretrainingObjective.from_variant("iic", alpha=0.3)
    assert PretrainingObjective.from_variant("mi_only", alpha=0.3).mi.alpha == 0.3


def test_missing_inputs_raise_naming_them() -> None:
    x = _inputs(4)
    with pytest.raises(ValueError, match="'con'.*z_b, meta_labels"):
        PretrainingObjective()(p_hat=x["p_hat"], p_tilde=x["p_tilde"], image=x["image"], z_a=x["z_a"])
    with pytest.raises(ValueError, match="'cc'.*image"):
        PretrainingObjective.from_variant("mi_cc")(p_hat=x["p_hat"], p_tilde=x["p_tilde"])
    with pytest.raises(ValueError, match="'dense_con'.*dense_b"):
        PretrainingObjective.from_variant("dense_contrast")(dense_a=x["dense_a"])


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="alpha"):
        PretrainingObjective(alpha=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        PretrainingObjective(alpha=1.5)
    with pytest.raises(ValueError, match="cc_weight"):
        PretrainingObjective(cc_weight=-1.0)
    with pytest.raises(ValueError, match="mi_weight"):
        PretrainingObjective(mi_weight=float("nan"))
    with pytest.raises(ValueError, match="all loss weights are 0"):
        PretrainingObjective(mi_weight=0.0, cc_weight=0.0, con_weight=0.0)
    with pytest.raises(ValueError, match="window"):
        PretrainingObjective(cc_window=4)
    with pytest.raises(ValueError, match="temperature"):
        PretrainingObjective(temperature=0.0)


def test_fp32_under_autocast() -> None:
    x = {name: value.bfloat16() if value.is_floating_point() else value for name, value in _inputs(5).items()}
    objective = PretrainingObjective(imsat_weight=1.0, dense_con_weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective(**x)
    assert all(value.dtype == torch.float32 for value in out.values())


def test_variant_decides_terms_and_weight_overrides_only_scale_active_terms() -> None:
    # a config passes every weight; the variant alone decides which terms run
    all_weights = {"mi_weight": 2.0, "cc_weight": 0.1, "con_weight": 3.0, "imsat_weight": 1.0, "dense_con_weight": 1.0}
    ours = PretrainingObjective.from_variant("ours", alpha=0.25, **all_weights)
    assert ours.weights == {"mi": 2.0, "cc": 0.1, "con": 3.0, "imsat": 0.0, "dense_con": 0.0}
    assert ours.mi.alpha == 0.25
    iic = PretrainingObjective.from_variant("iic", alpha=0.5, **all_weights)
    assert set(iic.active_terms) == {"mi"} and iic.mi.alpha == 0.0  # IIC is alpha = 0 whatever the config says
    imsat = PretrainingObjective.from_variant("imsat", **all_weights)
    assert set(imsat.active_terms) == {"imsat"}
