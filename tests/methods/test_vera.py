"""VeRA: the shared seeded pair, ΔW = diag(b)·B·diag(d)·A, and Hugging Face PEFT's VERA files both directions."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from conformance.models import MODELS, same_state, state_copy, tiny_gpt2
from peft_interop import check_both_directions, peft_model
from peftkit.methods.vera import projections
from tolerance import assert_near

peft = pytest.importorskip("peft")

X = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))


def _adapted(**fields):
    model = MODELS["mlp"].build()
    peftkit.adapt(model, peftkit.config("vera", target_modules=["fc1", "fc2"], **fields))
    return model


def test_init_is_the_base_and_delta_weight_is_the_formula() -> None:
    base = MODELS["mlp"].build()
    model = _adapted(r=8, d_initial=0.3)
    with torch.no_grad():
        assert torch.equal(model(X), base(X))  # b = 0 exactly
    a_max, b_max = projections(8, 32, 32, 0)  # fc1: 16 -> 32, fc2: 32 -> 16: the pair spans d_in 32, d_out 32
    first = next(iter(peftkit.adapted_layers(model)))[1].adapters["default"]
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        assert torch.equal(ad.vera_lambda_d.detach(), torch.full((8,), 0.3))
        assert torch.equal(ad.vera_lambda_b.detach(), torch.zeros(layer.host.d_out))
        with torch.no_grad():
            ad.vera_lambda_b.normal_()
            ad.vera_lambda_d.normal_()
        a, b = a_max[:, : layer.host.d_in], b_max[: layer.host.d_out]
        explicit = torch.diag(ad.vera_lambda_b.detach()) @ b @ torch.diag(ad.vera_lambda_d.detach()) @ a
        assert_near(ad.delta_weight().detach(), explicit, 8)
        xin = torch.randn(5, layer.host.d_in)
        assert_near(ad.delta(xin, None).detach(), xin @ explicit.t(), 32)  # the activation path, not ΔW
        assert ad.shared.A.data_ptr() == first.shared.A.data_ptr()  # one pair for every layer


def test_projections_are_peft_s_and_never_in_peftkit_saves(tmp_path) -> None:
    pm = peft_model(MODELS["mlp"].build(), peft.VeraConfig(r=8, target_modules=["fc1", "fc2"], projection_prng_key=5))
    model = _adapted(r=8, projection_seed=5)
    shared = next(iter(peftkit.adapted_layers(model)))[1].adapters["default"].shared
    assert torch.equal(shared.A, pm.base_model.vera_A["default"])  # same generator, same draws
    assert torch.equal(shared.B, pm.base_model.vera_B["default"])
    peftkit.save(model, tmp_path / "ad", format="peftkit")
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sorted(keys) == ["adapter.fc1.vera_lambda_b", "adapter.fc1.vera_lambda_d", "adapter.fc2.vera_lambda_b",
                            "adapter.fc2.vera_lambda_d"]
    other = MODELS["mlp"].build()
    peftkit.load(other, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(other(X), model(X))


@pytest.mark.parametrize("save_projection", [True, False])
def test_matches_peft_both_directions(save_projection: bool, tmp_path) -> None:
    check_both_directions(
        MODELS["mlp"].build(), X,
        peft.VeraConfig(r=8, target_modules=["fc1", "fc2"], projection_prng_key=3, save_projection=save_projection,
                        d_initial=0.2),
        "vera", {"target_modules": ["fc1", "fc2"], "r": 8, "projection_seed": 3, "d_initial": 0.2,
                 "save_projection": save_projection}, tmp_path,
    )
    assert ("base_model.vera_A" in load_file(str(tmp_path / "to_peft" / "adapter_model.safetensors"))) \
        == save_projection


def test_matches_peft_on_gpt2_conv1d_with_rank_above_the_width(tmp_path) -> None:
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    targets = ["c_attn", "c_proj", "c_fc"]
    check_both_directions(
        tiny_gpt2(), ids, peft.VeraConfig(r=40, target_modules=targets, fan_in_fan_out=True),
        "vera", {"target_modules": targets, "r": 40}, tmp_path, run=lambda m, x: m(x).last_hidden_state,
    )


def test_a_file_with_other_projections_is_refused_and_changes_nothing(tmp_path) -> None:
    model = _adapted(r=8)
    peftkit.save(model, tmp_path / "hf", format="hf")
    f = tmp_path / "hf" / "adapter_model.safetensors"
    t = load_file(str(f))
    t["base_model.vera_A"] = t["base_model.vera_A"] * 1.01
    save_file(t, str(f), metadata={"format": "pt"})
    fresh = MODELS["mlp"].build()
    before = state_copy(fresh)
    with pytest.raises(peftkit.PeftkitError, match="vera_A.*regenerates"):
        peftkit.load(fresh, tmp_path / "hf")
    assert same_state(state_copy(fresh), before) and not list(peftkit.adapted_layers(fresh))


def test_per_module_rank_is_refused() -> None:
    with pytest.raises(peftkit.PeftkitError, match="one r"):
        peftkit.config("vera", target_modules=["fc1"], overrides={"fc1": {"r": 4}})


def test_trains_only_the_vectors() -> None:
    model = _adapted(r=8)
    names = sorted(n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad)
    assert names == ["vera_lambda_b", "vera_lambda_b", "vera_lambda_d", "vera_lambda_d"]
    assert peftkit.summary(model).trainable == (8 + 32) + (8 + 16)
