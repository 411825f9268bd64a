"""DiffuseKronA's own properties (shared/methods/weight-space.md §15 "Sanity"): identity at init with the official
init distributions, the reshaped fast path == x @ kron(A, B).T without ever building kron(A, B),
rank(A⊗B) = rank(A)·rank(B), merge, the automatic factor choice, param count, persistence and bad factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy
from one_linear import one as _one
from one_linear import randn as _x
from one_linear import rel_close as _rel_close
from peftkit.core.host import Host
from peftkit.methods.kron import Kron, kron_shape


def _cfg(**kw):
    return peftkit.config("kron", **{"target_modules": ["fc"], **kw})


@pytest.mark.parametrize("model_name", ["mlp", "block", "gpt2"])
def test_init_is_exactly_the_base(model_name: str) -> None:
    spec = MODELS[model_name]
    model, x = spec.build(), spec.input()
    with torch.no_grad():
        y0 = spec.run(model, x)
        peftkit.adapt(model, peftkit.config("kron", target_modules=spec.targets))
        assert torch.equal(spec.run(model, x), y0)


def test_init_distributions() -> None:
    model = _one(d_in=128, d_out=32)
    peftkit.adapt(model, _cfg(a1=8, a2=64))
    ad = model.fc.adapters["default"]
    assert ad.kron_A.shape == (8, 64) and ad.kron_B.shape == (4, 2)
    assert torch.count_nonzero(ad.kron_B) == 0
    a = ad.kron_A.detach()
    assert abs(a.std().item() - 1 / 8) < 0.1 / 8  # A ~ N(0, (1/a1)²)
    assert abs(a.mean().item()) < 0.02


@pytest.mark.parametrize("a1,a2", [(2, 12), (8, 2), (4, 6), (16, 1), (1, 24)])
def test_fast_path_equals_explicit_kron_and_never_builds_it(a1: int, a2: int, monkeypatch) -> None:
    model = _one()
    peftkit.adapt(model, _cfg(a1=a1, a2=a2, scale=0.75))
    perturb(model, seed=2)
    ad = model.fc.adapters["default"]
    x = _x(3, 5, 24)
    with torch.no_grad():
        kron = torch.kron(ad.kron_A, ad.kron_B)
        assert kron.shape == (16, 24)
        expected = model.fc.base_layer(x) + 0.75 * x @ kron.t()
        for order in (True, False):  # both evaluation orders of A·X·Bᵀ
            ad.a_first = order
            _rel_close(ad.delta(x, None), 0.75 * x @ kron.t())

    def no_kron(*args):
        raise AssertionError("the forward built kron(A, B)")

    monkeypatch.setattr(torch, "kron", no_kron)
    y = model(x)
    _rel_close(y.detach(), expected)
    y.sum().backward()
    assert ad.kron_A.grad.abs().sum() > 0 and ad.kron_B.grad.abs().sum() > 0


def test_rank_of_kron_is_product_of_ranks() -> None:
    model = _one(d_in=24, d_out=16)
    peftkit.adapt(model, _cfg(a1=4, a2=4))  # A: 4×4, B: 4×6
    ad = model.fc.adapters["default"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ad.kron_A.copy_(torch.randn(4, 2, generator=g) @ torch.randn(2, 4, generator=g))  # rank 2
        ad.kron_B.copy_(torch.randn(4, 3, generator=g) @ torch.randn(3, 6, generator=g))  # rank 3
        dw = ad.delta_weight()
        ranks = [torch.linalg.matrix_rank(t).item() for t in (ad.kron_A, ad.kron_B, dw)]
        assert ranks == [2, 3, 6]
        ad.kron_A.copy_(torch.randn(4, 4, generator=g))
        ad.kron_B.copy_(torch.randn(4, 6, generator=g))
        assert torch.linalg.matrix_rank(ad.delta_weight()).item() == 16  # full rank from 16 + 24 parameters


def test_merge_formula_and_merged_equals_unmerged() -> None:
    spec = MODELS["gpt2"]
    model, x = spec.build(), spec.input()
    peftkit.adapt(model, peftkit.config("kron", target_modules=spec.targets, scale=2.0))
    perturb(model, seed=4)
    layers = list(peftkit.adapted_layers(model))
    w0 = {p: layer.host.weight_2d().detach().clone() for p, layer in layers}
    with torch.no_grad():
        y = spec.run(model, x)
        peftkit.merge(model)
        for p, layer in layers:
            ad = layer.adapters["default"]
            _rel_close(layer.host.weight_2d(), w0[p] + 2.0 * torch.kron(ad.kron_A, ad.kron_B))
        _rel_close(spec.run(model, x), y)
        peftkit.unmerge(model)
        for p, layer in layers:
            _rel_close(layer.host.weight_2d(), w0[p])


def _brute(d_out: int, d_in: int) -> int:
    return min(a1 * a2 + (d_out // a1) * (d_in // a2) for a1 in range(1, d_out + 1) if d_out % a1 == 0
               for a2 in range(1, d_in + 1) if d_in % a2 == 0)


@pytest.mark.parametrize("d_in,d_out", [(16, 16), (16, 32), (24, 16), (48, 8), (13, 12), (36, 20)])
def test_automatic_factors_minimise_the_parameter_count(d_in: int, d_out: int) -> None:
    model = _one(d_in, d_out)
    peftkit.adapt(model, _cfg())
    ad = model.fc.adapters["default"]
    a1, a2, b1, b2 = ad.a1, ad.a2, ad.b1, ad.b2
    assert d_out % a1 == 0 and d_in % a2 == 0 and (b1, b2) == (d_out // a1, d_in // a2)
    assert a1 * a2 + b1 * b2 == _brute(d_out, d_in)
    assert peftkit.summary(model).trainable == a1 * a2 + b1 * b2
    assert Kron.expected_params(model.fc.host, ad.config) == a1 * a2 + b1 * b2


def test_automatic_choice_prefers_the_larger_rank_bound_and_respects_given_factors() -> None:
    h = Host(_one(16, 16).fc, "fc")
    assert kron_shape(h, _cfg()) == (4, 4, 4, 4)  # ties (1,16), (2,8), … cost 32; (4,4) allows rank 16
    assert kron_shape(h, _cfg(a1=2)) == (2, 8, 8, 2)  # a2 chosen with a1 fixed: 16 + 16
    assert kron_shape(h, _cfg(a1=8, a2=2)) == (8, 2, 2, 8)


def test_save_load_into_fresh_base_is_bit_identical(tmp_path) -> None:
    spec = MODELS["block"]
    model, x = spec.build(), spec.input()
    peftkit.adapt(model, peftkit.config("kron", target_modules=spec.targets, overrides={"fc1": {"a1": 8, "a2": 2}}))
    perturb(model, seed=5)
    assert model.mlp.fc1.adapters["default"].kron_A.shape == (8, 2)
    with torch.no_grad():
        y = spec.run(model, x)
    peftkit.save(model, tmp_path / "k")
    fresh = spec.build()
    peftkit.load(fresh, tmp_path / "k")
    with torch.no_grad():
        assert torch.equal(spec.run(fresh, x), y)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"a1": 5}, r"module 'fc': KronConfig.a1 = 5 must divide d_out = 16"),
        ({"a2": 7}, r"module 'fc': KronConfig.a2 = 7 must divide d_in = 24"),
    ],
)
def test_factors_that_do_not_divide_are_rejected_and_change_nothing(fields: dict, match: str) -> None:
    model = _one()
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match=match):
        peftkit.adapt(model, _cfg(**fields))
    assert same_state(before, state_copy(model))
    assert isinstance(model.fc, nn.Linear) and peftkit.adapter_names(model) == []


@pytest.mark.parametrize("fields", [{"a1": 0}, {"a2": -2}, {"a1": 2.0}])
def test_bad_config_is_rejected(fields: dict) -> None:
    with pytest.raises(peftkit.PeftkitError, match="a1|a2"):
        _cfg(**fields)


def test_conv_host_is_refused_cleanly() -> None:
    model = MODELS["conv2d"].build()
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="does not support Conv2d"):
        peftkit.adapt(model, peftkit.config("kron", target_modules=["conv1"]))
    assert same_state(before, state_copy(model))


def test_dropout_masks_the_update_input_in_training_only() -> None:
    model = _one()
    peftkit.adapt(model, _cfg(dropout=0.5))
    perturb(model, seed=9)
    ad = model.fc.adapters["default"]
    x = _x(6, 24)
    with torch.no_grad():
        base = model.fc.base_layer(x)
        _rel_close(model(x), base + x @ ad.delta_weight().t())
        model.train()
        torch.manual_seed(9)
        y = model(x)
        torch.manual_seed(9)
        _rel_close(y, base + F.dropout(x, 0.5) @ ad.delta_weight().t())
        assert not torch.allclose(y, base + x @ ad.delta_weight().t())
