"""CLIP-SVD's own properties (shared/methods/weight-space.md §14 "Sanity"): U·diag(S)·Vᵀ reproduces W0 so the init
output is the base, the official rank rule, only σ trains while U, V stay fixed, the forward equals the spec's layer
(with the residual kept), merge, param count, persistence and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy
from one_linear import randn as _x
from one_linear import rel_close as _rel_close
from peftkit.methods.svd import Svd


class One(nn.Module):
    """The one-Linear model with a LayerNorm after it (a layer SVD cannot adapt)."""

    def __init__(self, d_in: int = 24, d_out: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


def _one(d_in: int = 24, d_out: int = 16, seed: int = 0) -> One:
    torch.manual_seed(seed)
    return One(d_in, d_out).eval()


def _cfg(**kw):
    return peftkit.config("svd", **{"target_modules": ["fc"], **kw})


def test_full_rank_svd_reconstructs_w0() -> None:
    model = _one()
    w0 = model.fc.weight.detach().clone()
    peftkit.adapt(model, _cfg())
    ad = model.fc.adapters["default"]
    assert ad.U_k.shape == (16, 16) and ad.Vh_k.shape == (16, 24)
    rebuilt = ad.U_k @ torch.diag(ad.S_k) @ ad.Vh_k
    assert (rebuilt - w0).norm() / w0.norm() < 1e-5
    assert torch.equal(ad.sigma.detach(), ad.S_k)  # σ starts at S[:k]


@pytest.mark.parametrize("model_name", ["mlp", "block", "conv1d", "conv2d", "embedding", "gpt2"])
@pytest.mark.parametrize("rho", [1.0, 0.3])
def test_init_is_exactly_the_base(model_name: str, rho: float) -> None:
    spec = MODELS[model_name]
    model, x = spec.build(), spec.input()
    with torch.no_grad():
        y0 = spec.run(model, x)
        peftkit.adapt(model, peftkit.config("svd", target_modules=spec.targets, rank_fraction=rho))
        assert torch.equal(spec.run(model, x), y0)  # the residual past k is kept exactly


@pytest.mark.parametrize(
    "d_in,d_out,rho,k",
    [
        (24, 16, 1.0, 16),  # ρ = 1, m divisible by 4: full rank
        (10, 24, 1.0, 8),  # m = 10: ⌊10/4⌋·4 = 8
        (24, 16, 0.5, 8),
        (24, 16, 0.725, 8),  # ⌊11.6⌋ = 11 -> 8 (rounding 11.6 to 12 would keep 12)
        (24, 12, 0.5, 4),  # ⌊6/4⌋·4 = 4
        (24, 16, 0.1, 1),  # ⌊1.6⌋ = 1 -> ⌊1/4⌋·4 = 0 -> max(., 1) = 1
        (3, 8, 1.0, 1),  # m = 3 < 4 -> 1
    ],
)
def test_rank_rule(d_in: int, d_out: int, rho: float, k: int) -> None:
    assert min(max(math.floor(math.floor(min(d_in, d_out) * rho) / 4) * 4, 1), min(d_in, d_out)) == k
    model = _one(d_in, d_out)
    peftkit.adapt(model, _cfg(rank_fraction=rho))
    layer = model.fc
    assert layer.adapters["default"].sigma.shape == (k,)
    assert Svd.expected_params(layer.host, layer.adapters["default"].config) == k
    assert peftkit.summary(model).trainable == k
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.adapters.default.sigma"]


def test_forward_is_the_spec_layer_with_exact_residual() -> None:
    model = _one()
    w0, b0 = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    peftkit.adapt(model, _cfg(rank_fraction=0.5))  # k = 8 < 16: the residual matters
    perturb(model, seed=2)
    ad = model.fc.adapters["default"]
    x = _x(3, 5, 24)
    with torch.no_grad():
        u, s, vh, sig = ad.U_k.double(), ad.S_k.double(), ad.Vh_k.double(), ad.sigma.double()
        xd = x.double()
        y = ((xd @ vh.t()) * sig) @ u.t() + b0.double() + xd @ (w0.double() - u @ torch.diag(s) @ vh).t()
        _rel_close(model.fc(x), y.float())
    # at full rank the residual vanishes: the layer is the official ((x·V)⊙σ)·Uᵀ + b0
    full = _one()
    peftkit.adapt(full, _cfg())
    perturb(full, seed=3)
    fa = full.fc.adapters["default"]
    with torch.no_grad():
        _rel_close(full.fc(x), ((x @ fa.Vh_k.t()) * fa.sigma) @ fa.U_k.t() + full.fc.base_layer.bias)


def test_training_changes_only_sigma_and_keeps_u_v() -> None:
    model = _one()
    peftkit.adapt(model, _cfg())
    ad = model.fc.adapters["default"]
    frozen = {k: v.clone() for k, v in ad.named_buffers()}
    x = _x(8, 24)
    y0 = model(x).detach()
    target = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in ad.named_buffers())  # U, S, V unchanged
    assert not torch.equal(ad.sigma.detach(), ad.S_k)
    assert not torch.allclose(model(x), y0)


@pytest.mark.parametrize("model_name", ["mlp", "conv2d", "gpt2"])
def test_merge_formula_and_merged_equals_unmerged(model_name: str) -> None:
    spec = MODELS[model_name]
    model, x = spec.build(), spec.input()
    peftkit.adapt(model, peftkit.config("svd", target_modules=spec.targets, rank_fraction=0.5))
    perturb(model, seed=5)
    layers = list(peftkit.adapted_layers(model))
    w0 = {p: layer.host.weight_2d().detach().clone() for p, layer in layers}
    with torch.no_grad():
        y = spec.run(model, x)
        peftkit.merge(model)
        for p, layer in layers:
            ad = layer.adapters["default"]
            _rel_close(layer.host.weight_2d(), w0[p] + ad.U_k @ torch.diag(ad.sigma - ad.S_k) @ ad.Vh_k)
        _rel_close(spec.run(model, x), y)
        peftkit.unmerge(model)
        for p, layer in layers:
            _rel_close(layer.host.weight_2d(), w0[p])


def test_activation_path_never_builds_the_dense_update(monkeypatch) -> None:
    model = _one()
    peftkit.adapt(model, _cfg())
    perturb(model, seed=6)

    def boom(self):
        raise AssertionError("forward built ΔW")

    monkeypatch.setattr(Svd, "delta_weight", boom)
    model(_x(3, 24)).pow(2).sum().backward()
    assert model.fc.adapters["default"].sigma.grad.abs().sum() > 0


def test_save_load_into_fresh_base_is_bit_identical(tmp_path) -> None:
    spec = MODELS["gpt2"]
    model, x = spec.build(), spec.input()
    peftkit.adapt(model, peftkit.config("svd", target_modules=spec.targets, rank_fraction=0.75))
    perturb(model, seed=7)
    with torch.no_grad():
        y = spec.run(model, x)
    peftkit.save(model, tmp_path / "s")
    fresh = spec.build()
    peftkit.load(fresh, tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(spec.run(fresh, x), y)


@pytest.mark.parametrize("rho", [0.0, -0.5, 1.5, float("nan")])
def test_bad_rank_fraction_is_rejected(rho: float) -> None:
    with pytest.raises(peftkit.PeftkitError, match="rank_fraction"):
        _cfg(rank_fraction=rho)


def test_non_host_layer_is_rejected_and_changes_nothing() -> None:
    model = _one()
    before = state_copy(model)
    # a 1-D weight has no SVD view
    with pytest.raises(peftkit.PeftkitError, match=r"does not support LayerNorm layers \(module 'norm'\)"):
        peftkit.adapt(model, _cfg(target_modules=["norm"]))
    assert same_state(before, state_copy(model)) and peftkit.adapter_names(model) == []


def test_dropout_masks_the_update_input_in_training_only() -> None:
    model = _one()
    peftkit.adapt(model, _cfg(dropout=0.5))
    perturb(model, seed=9)
    ad, fc = model.fc.adapters["default"], model.fc
    x = _x(6, 24)
    with torch.no_grad():
        base = fc.base_layer(x)
        _rel_close(fc(x), base + x @ ad.delta_weight().t())
        fc.train()
        torch.manual_seed(9)
        y = fc(x)
        torch.manual_seed(9)
        _rel_close(y, base + F.dropout(x, 0.5) @ ad.delta_weight().t())
        assert not torch.allclose(y, base + x @ ad.delta_weight().t())
