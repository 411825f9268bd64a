"""LoLDU's own properties (shared/methods/weight-space.md §10 "Sanity"): P·L·diag(D)·Ū == W0, exact identity at init,
the forward as the weight parametrisation W_res + σ·P·L_r·diag(z)·Ū_r, param count r (+1), merge, rank(ΔW) ≤ r,
persistence without a dense copy of W, and the rank / pivot guards."""

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
from peftkit.methods.loldu import Loldu


def _cfg(**kw):
    return peftkit.config("loldu", **{"target_modules": ["fc"], "r": 4, **kw})


def _pl(ad: Loldu) -> torch.Tensor:
    """P·L_r as a dense matrix, built from the stored permutation vector."""
    p = torch.zeros(len(ad.perm), len(ad.perm))
    p[torch.arange(len(ad.perm)), ad.perm] = 1.0
    return p @ ad.L_r


@pytest.mark.parametrize("d_in,d_out", [(24, 16), (16, 24), (20, 20)])
def test_ldu_factors_rebuild_w0_and_have_unit_triangles(d_in: int, d_out: int) -> None:
    model = _one(d_in, d_out)
    w0 = model.fc.weight.detach().clone()
    k = min(d_in, d_out)
    peftkit.adapt(model, _cfg(r=k))
    ad = model.fc.adapters["default"]
    assert ad.perm.dtype == torch.long and sorted(ad.perm.tolist()) == list(range(d_out))  # a permutation
    assert torch.equal(ad.L_r.diagonal(), torch.ones(k)) and torch.equal(ad.L_r.triu(1), torch.zeros(d_out, k))
    assert torch.equal(ad.U_r.diagonal(), torch.ones(k)) and torch.equal(ad.U_r.tril(-1), torch.zeros(k, d_in))
    _rel_close(_pl(ad) @ torch.diag(ad.z0) @ ad.U_r, w0, 1e-6)  # P·L·diag(D)·Ū == W0


@pytest.mark.parametrize("model_name", ["mlp", "block", "conv1d", "conv2d", "embedding", "gpt2"])
@pytest.mark.parametrize("train_scale", [False, True])
def test_init_is_exactly_the_base(model_name: str, train_scale: bool) -> None:
    spec = MODELS[model_name]
    model, x = spec.build(), spec.input()
    with torch.no_grad():
        y0 = spec.run(model, x)
        peftkit.adapt(model, peftkit.config("loldu", target_modules=spec.targets, train_scale=train_scale))
        assert torch.equal(spec.run(model, x), y0)
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        assert torch.equal(ad.z.detach(), ad.z0)  # z starts at D[:r]
        assert float(torch.as_tensor(ad.scale).detach()) == pytest.approx(1.0 / 8)  # σ0 = α/r with the official α = 1


def test_forward_is_the_weight_parametrisation() -> None:
    model = _one()
    w0, b0 = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    peftkit.adapt(model, _cfg(r=5, alpha=3.0, train_scale=True))
    perturb(model, seed=2)
    ad = model.fc.adapters["default"]
    x = _x(3, 4, 24)
    with torch.no_grad():
        pl, s0 = _pl(ad).double(), 3.0 / 5
        w_res = w0.double() - s0 * pl @ torch.diag(ad.z0.double()) @ ad.U_r.double()
        w = w_res + ad.scale.double() * pl @ torch.diag(ad.z.double()) @ ad.U_r.double()
        _rel_close(model(x), (x.double() @ w.t() + b0.double()).float())
        assert ad.scale.item() != pytest.approx(s0)  # σ itself moved


def test_parameter_count_is_r_plus_optional_scale() -> None:
    for train_scale, extra in ((False, 0), (True, 1)):
        model = _one()
        peftkit.adapt(model, _cfg(r=6, train_scale=train_scale))
        names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
        assert names == ({"z", "scale"} if train_scale else {"z"})
        assert peftkit.summary(model).trainable == 6 + extra
        layer = model.fc
        assert Loldu.expected_params(layer.host, layer.adapters["default"].config) == 6 + extra


def test_merge_formula_rank_and_merged_equals_unmerged() -> None:
    model = _one(d_in=32, d_out=24)
    w0 = model.fc.weight.detach().clone()
    peftkit.adapt(model, _cfg(r=5, train_scale=True))
    perturb(model, seed=3)
    ad = model.fc.adapters["default"]
    x = _x(6, 32)
    with torch.no_grad():
        y = model(x)
        dw = ad.delta_weight()
        _rel_close(dw, _pl(ad) @ torch.diag(ad.scale * ad.z - (1 / 5) * ad.z0) @ ad.U_r)
        assert torch.linalg.matrix_rank(dw).item() == 5  # rank(ΔW) ≤ r, = r for generic z
        peftkit.merge(model)
        _rel_close(model.fc.base_layer.weight, w0 + dw)
        _rel_close(model(x), y)
        peftkit.unmerge(model)
        _rel_close(model.fc.base_layer.weight, w0)


def test_training_moves_only_z_and_never_the_decomposition() -> None:
    model = _one()
    peftkit.adapt(model, _cfg(r=4))
    ad = model.fc.adapters["default"]
    frozen = {k: v.clone() for k, v in ad.named_buffers()}
    x = _x(8, 24)
    y0 = model(x).detach()
    opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in ad.named_buffers())
    assert not torch.equal(ad.z.detach(), ad.z0)
    assert not torch.allclose(model(x), y0)


def test_activation_path_never_builds_the_dense_update(monkeypatch) -> None:
    model = _one()
    peftkit.adapt(model, _cfg(r=4))
    perturb(model, seed=4)

    def boom(self):
        raise AssertionError("forward built ΔW")

    monkeypatch.setattr(Loldu, "delta_weight", boom)
    model(_x(3, 24)).sum().backward()
    assert model.fc.adapters["default"].z.grad.abs().sum() > 0


def test_save_load_into_fresh_base_is_bit_identical_and_stores_no_dense_weight(tmp_path) -> None:
    spec = MODELS["block"]
    model, x = spec.build(), spec.input()
    peftkit.adapt(model, peftkit.config("loldu", target_modules=spec.targets, r=6, train_scale=True))
    perturb(model, seed=5)
    with torch.no_grad():
        y = spec.run(model, x)
    peftkit.save(model, tmp_path / "l")
    shapes = {tuple(t.shape) for t in peftkit.adapter_state_dict(model).values()}
    assert (16, 16) not in shapes and (32, 16) not in shapes and (16, 32) not in shapes  # no d_out×d_in tensor
    fresh = spec.build()
    peftkit.load(fresh, tmp_path / "l")
    with torch.no_grad():
        assert torch.equal(spec.run(fresh, x), y)
    peftkit.delete(fresh, "default")
    with torch.no_grad():  # the host weight was never rewritten
        assert torch.equal(spec.run(fresh, x), spec.run(spec.build(), x))


def test_rank_above_min_dim_is_rejected_and_changes_nothing() -> None:
    model = _one(d_in=24, d_out=6)
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match=r"'fc'.*rank 7 exceeds"):
        peftkit.adapt(model, _cfg(r=7))
    assert same_state(before, state_copy(model))
    assert isinstance(model.fc, nn.Linear)


def test_tiny_pivot_is_rejected_naming_the_module() -> None:
    model = _one()
    with torch.no_grad():
        model.fc.weight[:, 0] = 0.0  # first column zero ⇒ D[0] = 0 whatever the pivoting
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match=r"module 'fc': LU pivot D\[0\]"):
        peftkit.adapt(model, _cfg(r=4))
    assert same_state(before, state_copy(model))
    assert isinstance(model.fc, nn.Linear)


@pytest.mark.parametrize("fields", [{"r": 0}, {"pivot_eps": -1.0}, {"pivot_eps": 1.0}, {"train_scale": "yes"}])
def test_bad_config_is_rejected(fields: dict) -> None:
    with pytest.raises(peftkit.PeftkitError):
        _cfg(**fields)


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
