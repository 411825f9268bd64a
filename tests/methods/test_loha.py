"""LoHa: ΔW = s·(W1a·W1b)⊙(W2a·W2b) (Tucker cores for conv kernels), PEFT's init and dropouts, and Hugging Face
PEFT's LOHA files both directions on Linear, Conv1d and Conv2d hosts."""

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
from tolerance import assert_near

peft = pytest.importorskip("peft")

PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def test_delta_weight_is_the_hadamard_product_of_two_low_rank_products() -> None:
    model = MODELS["mlp"].build()
    peftkit.adapt(model, peftkit.config("loha", target_modules=["fc1"], r=3, alpha=6, init="random"))
    ad = next(iter(peftkit.adapted_layers(model)))[1].adapters["default"]
    w1 = ad.hada_w1_a.detach() @ ad.hada_w1_b.detach()
    w2 = ad.hada_w2_a.detach() @ ad.hada_w2_b.detach()
    expected = 2.0 * torch.einsum("ij,ij->ij", w1, w2)
    assert_near(ad.delta_weight().detach(), expected, 3)
    assert torch.linalg.matrix_rank(expected) > 3  # the Hadamard product goes past rank r (up to r²)


def test_effective_conv_rebuilds_the_kernel_from_tucker_cores() -> None:
    model = ConvLinearNet().eval()
    peftkit.adapt(model, peftkit.config("loha", target_modules=["c2"], r=2, use_effective_conv2d=True,
                                        init="random"))
    ad = next(iter(peftkit.adapted_layers(model)))[1].adapters["default"]
    t1, a1, b1 = ad.hada_t1.detach(), ad.hada_w1_a.detach(), ad.hada_w1_b.detach()
    t2, a2, b2 = ad.hada_t2.detach(), ad.hada_w2_a.detach(), ad.hada_w2_b.detach()
    k1 = torch.zeros(64, 2, 3, 3)
    k2 = torch.zeros(64, 2, 3, 3)
    for i in range(2):
        for j in range(2):  # K[o, c] = Σ_ij T[i, j]·Wa[i, o]·Wb[j, c]
            k1 += t1[i, j][None, None] * (a1[i][:, None] * b1[j][None, :])[:, :, None, None]
            k2 += t2[i, j][None, None] * (a2[i][:, None] * b2[j][None, :])[:, :, None, None]
    assert_near(ad.delta_weight().detach(), 4.0 * (k1 * k2).reshape(64, 18), 8)  # s = α/r = 8/2


def test_init_is_zero_update_and_matches_peft_draws() -> None:
    for effective in (False, True):
        for init in (True, False):
            same_init(peft.LoHaConfig(r=2, target_modules=CONV_TARGETS, use_effective_conv2d=effective,
                                      init_weights=init),
                      "loha", {"target_modules": CONV_TARGETS, "r": 2, "use_effective_conv2d": effective,
                               "init": "default" if init else "random"}, PARAMS)
    base = ConvLinearNet().eval()
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config("loha", target_modules=CONV_TARGETS))
    with torch.no_grad():
        assert torch.equal(model(conv_input()), base(conv_input()))


@pytest.mark.parametrize("effective", [False, True])
def test_matches_peft_both_directions(effective: bool, tmp_path) -> None:
    fields = {"target_modules": CONV_TARGETS, "r": 3, "alpha": 5.0, "use_effective_conv2d": effective,
              "overrides": {"lin": {"r": 2}, "c3": {"alpha": 2.0}}}
    check_both_directions(
        ConvLinearNet().eval(), conv_input(),
        peft.LoHaConfig(target_modules=CONV_TARGETS, r=3, alpha=5, use_effective_conv2d=effective,
                        rank_pattern={"lin": 2}, alpha_pattern={"c3": 2}),
        "loha", fields, tmp_path, std=0.3,
    )


def test_rank_and_module_dropout_follow_peft_in_training() -> None:
    cfg = dict(r=2, rank_dropout=0.4, module_dropout=0.3)
    same_training_draws(peft.LoHaConfig(target_modules=CONV_TARGETS, **cfg), "loha",
                        {"target_modules": CONV_TARGETS, **cfg})
