"""VB-LoRA: top-k mixtures of one shared vector bank, ΔW = B·A, PEFT's draws, and Hugging Face PEFT's VBLORA files
both directions."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import peftkit
from conformance.models import MODELS, same_state, state_copy, tiny_gpt2
from peft_interop import check_both_directions, peft_model
from tolerance import assert_near

peft = pytest.importorskip("peft")

X = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
T = ["fc1", "fc2"]
SMALL = {"r": 3, "num_vectors": 10, "vector_length": 8, "topk": 3}


def _adapted(**fields):
    model = MODELS["mlp"].build()
    peftkit.adapt(model, peftkit.config("vblora", target_modules=T, **{**SMALL, **fields}))
    return model


def test_factors_are_topk_softmax_mixtures_of_one_bank() -> None:
    model = _adapted()
    layers = list(peftkit.adapted_layers(model))
    bank = layers[0][1].adapters["default"].shared.vector_bank
    assert bank.shape == (10, 8)
    for _, layer in layers:
        ad = layer.adapters["default"]
        assert ad.shared.vector_bank is bank  # one bank for every layer
        la, lb = ad.vblora_logits_A.detach(), ad.vblora_logits_B.detach()
        a = torch.zeros(3, layer.host.d_in)
        for i in range(3):  # written out: every 8-long piece of row i of A, from its own logits
            for t in range(layer.host.d_in // 8):
                top = la[i, t].topk(3)
                w = torch.softmax(top.values, 0)
                a[i, 8 * t: 8 * t + 8] = sum(w[j] * bank.detach()[top.indices[j]] for j in range(3))
        b = torch.zeros(layer.host.d_out, 3)
        for t in range(layer.host.d_out // 8):
            for i in range(3):
                top = lb[t, i].topk(3)
                w = torch.softmax(top.values, 0)
                b[8 * t: 8 * t + 8, i] = sum(w[j] * bank.detach()[top.indices[j]] for j in range(3))
        assert_near(ad.delta_weight().detach(), b @ a, 8)
        xin = torch.randn(5, layer.host.d_in)
        assert_near(ad.delta(xin, None).detach(), xin @ (b @ a).t(), 32)  # no scaling, as PEFT


def test_init_draws_are_peft_s_and_the_bank_is_trained_once() -> None:
    base = MODELS["mlp"].build()
    torch.manual_seed(5)
    pm = peft_model(base, peft.VBLoRAConfig(target_modules=T, **SMALL))
    torch.manual_seed(5)
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config("vblora", target_modules=T, **SMALL))
    with torch.no_grad():
        assert_near(model(X), pm(X), 16, layers=2)  # same bank (the last draw) and logits, same order (fp32 rounding)
        assert not torch.equal(model(X), base(X))  # ΔW ≠ 0 at init (PEFT's random bank and logits)
    assert peftkit.summary(model).trainable == 10 * 8 + 3 * (16 + 32) // 8 * 10 + 3 * (32 + 16) // 8 * 10
    model(X).square().sum().backward()
    bank = next(iter(peftkit.adapted_layers(model)))[1].adapters["default"].shared.vector_bank
    assert bank.grad is not None and bank.grad.abs().sum() > 0


@pytest.mark.parametrize("fields", [SMALL, {"r": 4, "num_vectors": 6, "vector_length": 16, "topk": 2}])
def test_matches_peft_both_directions(fields, tmp_path) -> None:
    check_both_directions(MODELS["mlp"].build(), X, peft.VBLoRAConfig(target_modules=T, **fields), "vblora",
                          {"target_modules": T, **fields}, tmp_path)
    f = load_file(str(tmp_path / "to_peft" / "adapter_model.safetensors"))
    assert f["base_model.vblora_vector_bank"].shape == (fields["num_vectors"], fields["vector_length"])


def test_matches_peft_on_gpt2_conv1d(tmp_path) -> None:
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    targets = ["c_attn", "c_proj", "c_fc"]
    check_both_directions(
        tiny_gpt2(), ids, peft.VBLoRAConfig(target_modules=targets, fan_in_fan_out=True, **SMALL), "vblora",
        {"target_modules": targets, **SMALL}, tmp_path, run=lambda m, x: m(x).last_hidden_state,
    )


def test_peftkit_save_round_trip_keeps_the_bank(tmp_path) -> None:
    model = _adapted()
    with torch.no_grad():
        next(iter(peftkit.adapted_layers(model)))[1].adapters["default"].shared.vector_bank.mul_(3)
    peftkit.save(model, tmp_path / "ad")
    other = MODELS["mlp"].build()
    peftkit.load(other, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(other(X), model(X))


def test_bad_files_and_widths_are_refused(tmp_path) -> None:
    with pytest.raises(peftkit.PeftkitError, match="vector_length 5 must divide"):
        _adapted(vector_length=5)
    pm = peft_model(MODELS["mlp"].build(), peft.VBLoRAConfig(target_modules=T, save_only_topk_weights=True, **SMALL))
    pm.save_pretrained(str(tmp_path / "topk"))
    fresh = MODELS["mlp"].build()
    before = state_copy(fresh)
    with pytest.raises(peftkit.PeftkitError, match="save_only_topk_weights"):
        peftkit.load(fresh, tmp_path / "topk")
    model = _adapted()
    peftkit.save(model, tmp_path / "hf", format="hf")
    cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    cfg["num_vectors"] = 12
    (tmp_path / "hf" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(peftkit.PeftkitError):
        peftkit.load(fresh, tmp_path / "hf")
    assert same_state(state_copy(fresh), before) and not list(peftkit.adapted_layers(fresh))


def test_dropout_is_on_the_input() -> None:
    model = _adapted(dropout=0.5)
    ad = next(iter(peftkit.adapted_layers(model)))[1].adapters["default"]
    ad.train()
    torch.manual_seed(0)
    xin = torch.randn(4, 16)
    torch.manual_seed(1)
    got = ad.delta(xin, None)
    torch.manual_seed(1)
    a, b = ad.factors()
    assert_near(got.detach(), F.linear(F.linear(F.dropout(xin, 0.5), a), b).detach(), 32)
