"""Hydra's own properties (shared/methods/weight-space.md §6 "Sanity"): exact identity at init, the two-branch
forward (the sequential branch reads the bias-included output), the merge formula with branch biases and its exact
inverse, reduction to LoRA, rank(ΔW) ≤ r_p + r_s, the parameter formula, persistence and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy
from one_linear import one as _one
from one_linear import randn as _x
from one_linear import rel_close as _rel_close


def _cfg(**kw):
    return peftkit.config("hydra", **{"target_modules": ["fc"], "r_p": 3, "r_s": 4, **kw})


HOST_MODELS = ["mlp", "block", "conv1d", "conv2d", "gpt2"]


@pytest.mark.parametrize("model_name", HOST_MODELS)
@pytest.mark.parametrize("branch_bias", [False, True])
def test_init_is_exactly_the_base(model_name: str, branch_bias: bool) -> None:
    spec = MODELS[model_name]
    model, x = spec.build(), spec.input()
    with torch.no_grad():
        y0 = spec.run(model, x)
        peftkit.adapt(model, peftkit.config("hydra", target_modules=spec.targets, branch_bias=branch_bias))
        assert torch.equal(spec.run(model, x), y0)
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        assert torch.count_nonzero(ad.par.up) == 0 and torch.count_nonzero(ad.seq.up) == 0
        # down-projections: kaiming_uniform(a=√5) = U(±1/√fan_in), fan_in = d_in (parallel) / d_out (sequential)
        assert 0 < ad.par.down.abs().max() <= 1 / math.sqrt(layer.host.d_in)
        assert 0 < ad.seq.down.abs().max() <= 1 / math.sqrt(layer.host.d_out)


def test_forward_is_the_two_branch_formula_on_the_bias_included_output() -> None:
    model = _one()
    peftkit.adapt(model, _cfg(scale=0.7, branch_bias=True))
    perturb(model, seed=2)
    ad = model.fc.adapters["default"]
    p, q = ad.par, ad.seq
    x = _x(3, 5, 24)
    with torch.no_grad():
        h = model.fc.base_layer(x)  # includes b0
        par = (x @ p.down.t() + p.b_down) @ p.up.t() + p.b_up
        seq = (h @ q.down.t() + q.b_down) @ q.up.t() + q.b_up
        _rel_close(model(x), h + 0.7 * par + 0.7 * seq)
        # feeding the sequential branch the bias-free output would be a different function
        seq_nobias = (model.fc.host.without_bias(h) @ q.down.t() + q.b_down) @ q.up.t() + q.b_up
        assert not torch.allclose(model(x), h + 0.7 * par + 0.7 * seq_nobias, atol=1e-4)


@pytest.mark.parametrize("bias,branch_bias", [(True, True), (True, False), (False, True), (False, False)])
def test_merge_formula_merged_equals_unmerged_and_unmerge_restores(bias: bool, branch_bias: bool) -> None:
    model = _one(bias=bias)
    w0 = model.fc.weight.detach().clone()
    b0 = model.fc.bias.detach().clone() if bias else torch.zeros(16)
    peftkit.adapt(model, _cfg(scale=1.5, branch_bias=branch_bias))
    perturb(model, seed=3, std=0.3)
    ad = model.fc.adapters["default"]
    p, q = ad.par, ad.seq
    x = _x(6, 24)
    with torch.no_grad():
        y = model(x)
        bsas = q.up @ q.down
        w_exp = w0 + 1.5 * (p.up @ p.down + bsas @ w0)
        b_exp = b0 + 1.5 * (bsas @ b0)
        if branch_bias:
            b_exp = b_exp + 1.5 * (p.up @ p.b_down + p.b_up + q.up @ q.b_down + q.b_up)
        peftkit.merge(model)
        _rel_close(model.fc.base_layer.weight, w_exp)
        if bias or branch_bias:
            _rel_close(model.fc.base_layer.bias, b_exp)
        else:
            assert model.fc.base_layer.bias is None
        _rel_close(model(x), y)
        peftkit.unmerge(model)
        _rel_close(model.fc.base_layer.weight, w0)
        if bias:
            _rel_close(model.fc.base_layer.bias, b0)
        _rel_close(model(x), y)


@pytest.mark.parametrize("model_name", ["conv2d", "conv1d", "gpt2", "block"])
def test_merged_equals_unmerged_on_every_host(model_name: str) -> None:
    spec = MODELS[model_name]
    model, x = spec.build(), spec.input()
    peftkit.adapt(model, peftkit.config("hydra", target_modules=spec.targets, r_p=2, r_s=3, branch_bias=True))
    perturb(model, seed=4)
    with torch.no_grad():
        y = spec.run(model, x)
        peftkit.merge(model)
        _rel_close(spec.run(model, x), y)


def test_reduces_to_lora_when_the_sequential_branch_is_zero() -> None:
    x = _x(4, 24)
    hydra, lora = _one(), _one()
    peftkit.adapt(hydra, _cfg(r_p=3, r_s=4, scale=0.5))
    peftkit.adapt(lora, peftkit.config("lora", target_modules=["fc"], r=3, alpha=1.5))  # α/r = 0.5 = s
    perturb(hydra, seed=5)
    h, lo = hydra.fc.adapters["default"], lora.fc.adapters["default"]
    with torch.no_grad():
        h.seq.down.zero_()  # A_s = 0 (B_s stays random)
        lo.lora_A.copy_(h.par.down)
        lo.lora_B.copy_(h.par.up)
        assert lo.s == h.s == 0.5
        _rel_close(hydra(x), lora(x), 1e-6)
        _rel_close(h.delta_weight(), lo.delta_weight(), 1e-6)
        assert not torch.allclose(hydra(x), hydra.fc.base_layer(x))
    # r_s = 0 drops the branch: LoRA's parameter count
    only_p = _one()
    peftkit.adapt(only_p, _cfg(r_p=3, r_s=0))
    assert only_p.fc.adapters["default"].seq is None
    assert peftkit.summary(only_p).trainable == 3 * (24 + 16)


def test_rank_of_delta_w_is_at_most_r_p_plus_r_s() -> None:
    model = _one(d_in=40, d_out=32)
    peftkit.adapt(model, _cfg(r_p=3, r_s=4))
    perturb(model, seed=6)
    ad = model.fc.adapters["default"]
    with torch.no_grad():
        dw = ad.delta_weight()  # float32: matrix_rank uses float32 eps as tolerance
        assert torch.linalg.matrix_rank(dw).item() == 7  # = r_p + r_s for generic factors
        ad.seq.up.zero_()
        assert torch.linalg.matrix_rank(ad.delta_weight()).item() == 3


@pytest.mark.parametrize(
    "fields,count",
    [
        ({"r_p": 3, "r_s": 4}, 3 * (24 + 16) + 2 * 4 * 16),
        ({"r_p": 3, "r_s": 4, "branch_bias": True}, 3 * (24 + 16) + 2 * 4 * 16 + 3 + 16 + 4 + 16),
        ({"r_p": 0, "r_s": 2, "branch_bias": True}, 2 * 2 * 16 + 2 + 16),
    ],
)
def test_parameter_count_matches_formula(fields: dict, count: int) -> None:
    model = _one()
    peftkit.adapt(model, _cfg(**fields))
    layer = model.fc
    info = peftkit.get_method("hydra")
    assert info.adapter.expected_params(layer.host, layer.adapters["default"].config) == count
    assert sum(p.numel() for p in peftkit.trainable_parameters(model)) == count


def test_save_load_into_fresh_base_is_bit_identical(tmp_path) -> None:
    spec = MODELS["block"]
    model, x = spec.build(), spec.input()
    peftkit.adapt(model, peftkit.config("hydra", target_modules=spec.targets, branch_bias=True, scale=2.0))
    perturb(model, seed=7)
    with torch.no_grad():
        y = spec.run(model, x)
    peftkit.save(model, tmp_path / "h")
    fresh = spec.build()
    peftkit.load(fresh, tmp_path / "h")
    with torch.no_grad():
        assert torch.equal(spec.run(fresh, x), y)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"r_p": 17}, r"'fc'.*rank 17 exceeds"),  # r_p > min(d_out, d_in) = 16
        ({"r_s": 17}, r"'fc'.*rank 17 exceeds min\(d_out, d_in\) = 16"),  # r_s > d_out
    ],
)
def test_bad_ranks_raise_and_change_nothing(fields: dict, match: str) -> None:
    model = _one()
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match=match):
        peftkit.adapt(model, _cfg(**fields))
    assert same_state(before, state_copy(model))
    assert isinstance(model.fc, nn.Linear) and peftkit.adapter_names(model) == []


@pytest.mark.parametrize("fields", [{"r_p": 0, "r_s": 0}, {"r_p": -1}, {"r_s": 2.5}])
def test_bad_config_is_rejected(fields: dict) -> None:
    with pytest.raises(peftkit.PeftkitError, match="r_p|r_s"):
        _cfg(**fields)


def test_embedding_host_is_refused_cleanly() -> None:
    spec = MODELS["embedding"]
    model = spec.build()
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="does not support Embedding"):
        peftkit.adapt(model, peftkit.config("hydra", target_modules=["emb"]))
    assert same_state(before, state_copy(model))


def test_dropout_masks_each_branch_input_in_training_only() -> None:
    model = _one()
    peftkit.adapt(model, _cfg(dropout=0.5, scale=0.5))
    perturb(model, seed=8)
    ad = model.fc.adapters["default"]
    x = _x(6, 24)
    with torch.no_grad():
        h = model.fc.base_layer(x)
        clean = h + 0.5 * ((x @ ad.par.down.t()) @ ad.par.up.t() + (h @ ad.seq.down.t()) @ ad.seq.up.t())
        _rel_close(model(x), clean)  # eval: no dropout
        model.train()
        torch.manual_seed(9)
        y = model(x)
        torch.manual_seed(9)
        xd, hd = F.dropout(x, 0.5), F.dropout(h, 0.5)  # same order as the adapter: x for P, then h for S
        _rel_close(y, h + 0.5 * ((xd @ ad.par.down.t()) @ ad.par.up.t() + (hd @ ad.seq.down.t()) @ ad.seq.up.t()))
        assert not torch.allclose(y, clean)
