"""LoKr: ΔW = s·W1⊗W2 with PEFT's factorisation and decomposition rules, PEFT's inits and dropouts, and Hugging Face
PEFT's LOKR files both directions on Linear, Conv1d and Conv2d hosts (peftkit's ``kron`` is DiffuseKronA, untouched)."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from conformance.models import MODELS
from peft_interop import (
    CONV_TARGETS,
    ConvLinearNet,
    check_both_directions,
    conv_input,
    same_init,
    same_training_draws,
)
from peftkit.methods.lokr import factorization
from tolerance import assert_near

peft = pytest.importorskip("peft")

PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
CASES = {  # peftkit fields (PEFT's names where they differ are given by the config's own translation)
    "whole": {"r": 8},
    "low_rank_w2": {"r": 1},
    "decompose_both": {"r": 1, "decompose_both": True},
    "factor": {"r": 2, "decompose_factor": 2},
    "effective_conv": {"r": 2, "use_effective_conv2d": True},
    "effective_conv_decompose_both": {"r": 3, "use_effective_conv2d": True, "decompose_both": True, "alpha": 3.0},
}


def test_factorization_is_peft_s() -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for n in range(1, 300):
        for f in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(n, f) == peft_factorization(n, f), (n, f)
    assert factorization(256) == (16, 16) and factorization(128) == (8, 16) and factorization(127) == (1, 127)


def test_delta_weight_is_the_scaled_kronecker_product() -> None:
    model = MODELS["mlp"].build()  # fc1: 16 -> 32: d_out = 4·8, d_in = 4·4
    peftkit.adapt(model, peftkit.config("lokr", target_modules=["fc1"], r=2, alpha=3, init="random"))
    ad = next(iter(peftkit.adapted_layers(model)))[1].adapters["default"]
    assert tuple(ad.lokr_w1.shape) == (4, 4)  # whole W1 (a × c); W2 = W2a·W2b since r = 2 < max(8, 4)/2
    assert tuple(ad.lokr_w2_a.shape) == (8, 2) and tuple(ad.lokr_w2_b.shape) == (2, 4)
    w1, w2 = ad.lokr_w1.detach(), (ad.lokr_w2_a @ ad.lokr_w2_b).detach()
    expected = torch.zeros(32, 16)
    for i in range(4):
        for j in range(4):
            expected[8 * i:8 * (i + 1), 4 * j:4 * (j + 1)] = w1[i, j] * w2
    assert_near(ad.delta_weight().detach(), 1.5 * expected, 2)
    x = torch.randn(5, 16)
    assert_near(ad.delta(x, None).detach(), x @ (1.5 * expected).t(), 16)


@pytest.mark.parametrize("init", [True, False, "lycoris"])
def test_init_matches_peft_draws(init) -> None:
    for fields in (CASES["decompose_both"], CASES["effective_conv"], CASES["whole"]):
        same_init(peft.LoKrConfig(target_modules=CONV_TARGETS, init_weights=init, **fields), "lokr",
                  {"target_modules": CONV_TARGETS, "init_weights": init, **fields}, PARAMS)


@pytest.mark.parametrize("init", ["default", "lycoris"])
def test_init_is_the_base(init: str) -> None:
    base = ConvLinearNet().eval()
    for fields in CASES.values():
        model = copy.deepcopy(base)
        peftkit.adapt(model, peftkit.config("lokr", target_modules=CONV_TARGETS, init=init, **fields))
        with torch.no_grad():
            assert torch.equal(model(conv_input()), base(conv_input()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft_both_directions(case: str, tmp_path) -> None:
    fields = CASES[case]
    check_both_directions(
        ConvLinearNet().eval(), conv_input(), peft.LoKrConfig(target_modules=CONV_TARGETS, **fields),
        "lokr", {"target_modules": CONV_TARGETS, **fields}, tmp_path, std=0.3,
    )


def test_rank_patterns_match_peft(tmp_path) -> None:
    fields = {"target_modules": CONV_TARGETS, "r": 1, "overrides": {"lin": {"r": 4}, "c3": {"alpha": 2.0}}}
    check_both_directions(
        ConvLinearNet().eval(), conv_input(),
        peft.LoKrConfig(target_modules=CONV_TARGETS, r=1, rank_pattern={"lin": 4}, alpha_pattern={"c3": 2}),
        "lokr", fields, tmp_path, std=0.3,
    )


@pytest.mark.parametrize("scale", [False, True])
def test_rank_and_module_dropout_follow_peft_in_training(scale: bool) -> None:
    cfg = dict(r=1, rank_dropout=0.4, module_dropout=0.3, rank_dropout_scale=scale)
    same_training_draws(peft.LoKrConfig(target_modules=CONV_TARGETS, **cfg), "lokr",
                        {"target_modules": CONV_TARGETS, **cfg})


def test_kron_is_still_diffusekrona() -> None:
    assert peftkit.get_method("kron").hf_peft_type is None and peftkit.get_method("lokr").hf_peft_type == "LOKR"
    assert peftkit.from_peft_config(peft.LoKrConfig(target_modules=["fc1"], r=4)).method == "lokr"


def test_effective_conv_cases_use_tucker_cores() -> None:
    for case in ("effective_conv", "effective_conv_decompose_both"):
        model = ConvLinearNet().eval()
        peftkit.adapt(model, peftkit.config("lokr", target_modules=CONV_TARGETS, **CASES[case]))
        layers = dict(peftkit.adapted_layers(model))
        for path in ("c1", "c2"):  # 3-tap / 3×3 kernels: cores; the 1×1 conv and the Linears: none
            assert "lokr_t2" in dict(layers[path].adapters["default"].named_parameters()), (case, path)
        assert "lokr_t2" not in dict(layers["c3"].adapters["default"].named_parameters())


def test_conv1d_core_at_rank_one_where_peft_s_kron_fails() -> None:
    """r = 1 on a Conv1d: PEFT's torch.kron raises on the core's strides; peftkit builds the kernel (checked against
    the Kronecker product written out)."""
    model = ConvLinearNet().eval()
    peftkit.adapt(model, peftkit.config("lokr", target_modules=["c1"], r=1, use_effective_conv2d=True,
                                        init="random"))
    ad = next(iter(peftkit.adapted_layers(model)))[1].adapters["default"]
    w1 = ad.lokr_w1.detach()  # (4, 2): d_out 32 = 4·8, c_in 4 = 2·2
    t, wa, wb = ad.lokr_t2.detach(), ad.lokr_w2_a.detach(), ad.lokr_w2_b.detach()
    w2 = t[0, 0, :, 0][None, None, :] * (wa[0][:, None] * wb[0][None, :])[:, :, None]  # (8, 2, 3)
    expected = (w1[:, None, :, None, None] * w2[None, :, None, :, :]).reshape(32, 4, 3)
    assert_near(ad.delta_weight().detach(), 8.0 * expected.reshape(32, 12), 2)  # s = α/r = 8
