"""PaCA's own properties (shared/methods/weight-space.md §13 "Sanity"): exact identity at init, the forward equals
the column-replaced weight, the custom backward equals autograd of that weight while saving only x[..., idx]
(last dim r), no gradient for unselected columns, merging writes exactly s·P into the selected columns, reproducible
and persisted column choice, the parameter count, and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy
from peftkit.methods.paca import _PacaColumns, _PacaLinear
from tolerance import assert_near


def _model(seed: int = 0) -> nn.Module:
    """MLP: fc1 16 -> 32, fc2 32 -> 16, head 16 -> 4."""
    return MODELS["mlp"].build(seed=seed)


def _x(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * float(expected.detach().abs().max()))


def _adapted(perturbed: bool = True, **kw) -> nn.Module:
    model = _model()
    peftkit.adapt(model, peftkit.config("paca", target_modules=["fc1", "fc2"], **{"r": 5, **kw}))
    if perturbed:
        perturb(model, seed=3)
    return model


def _replaced_weight(layer) -> torch.Tensor:
    """W0 with W[:, idx] = s·P."""
    ad = layer.adapters["default"]
    w = layer.base_layer.weight.detach().clone()
    w[:, ad.idx] = ad.s * ad.paca_P.detach()
    return w


# -- init ---------------------------------------------------------------------------------------------------------
def test_init_is_exactly_the_base() -> None:
    x = _x(3, 4, 16)
    with torch.no_grad():
        y0 = _model()(x)
        model = _adapted(perturbed=False, r=8)  # default alpha = 16: s = 2
        ad = model.fc1.adapters["default"]
        assert ad.s == 2.0
        assert torch.equal(ad.s * ad.paca_P, model.fc1.base_layer.weight[:, ad.idx])
        assert torch.equal(model(x), y0)  # fused path
        base = model.fc1.base_layer(x)
        assert torch.equal(ad.delta(x, base), torch.zeros_like(base))  # generic path


def test_gpt2_conv1d_host() -> None:
    spec = MODELS["gpt2"]
    x = spec.input()
    with torch.no_grad():
        y0 = spec.run(spec.build(), x)
        model = spec.build()
        peftkit.adapt(model, peftkit.config("paca", target_modules=spec.targets, r=4))
        assert_near(spec.run(model, x), y0, 64, layers=6)
        perturb(model, seed=2)
        layer = model.h[0].mlp.c_fc  # Conv1D: weight stored (d_in, d_out)
        ad = layer.adapters["default"]
        w = layer.base_layer.weight.detach().t().clone()
        w[:, ad.idx] = ad.s * ad.paca_P
        xs = _x(2, 3, 16)
        _close(layer(xs), F.linear(xs, w, layer.base_layer.bias))


# -- forward and backward ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_forward_and_grads_equal_autograd_of_the_column_replaced_weight(path: str) -> None:
    model = _adapted(alpha=3.0)  # s = 0.6: not a power of two
    layer = model.fc1
    ad = layer.adapters["default"]
    x = _x(2, 7, 16)
    gy = _x(2, 7, 32, seed=9)
    # reference: a full trainable weight whose idx columns are s·P
    w = _replaced_weight(layer).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y_ref = F.linear(xr, w, layer.base_layer.bias)
    y_ref.backward(gy)
    xa = x.clone().requires_grad_(True)
    if path == "fused":
        y = layer(xa)
        assert "PacaLinear" in type(y.grad_fn).__name__
    else:
        y = layer.base_layer(xa) + ad.delta(xa, None)
    y.backward(gy)
    _close(y, y_ref)
    _close(ad.paca_P.grad, ad.s * w.grad[:, ad.idx])  # grad_P = s·gᵀ·x[..., idx]
    _close(ad.paca_P.grad, ad.s * gy.reshape(-1, 32).t() @ x.reshape(-1, 16)[:, ad.idx])
    _close(xa.grad, xr.grad)  # grad_x = g·W
    # the unselected columns have no trainable tensor at all: the host weight stays frozen and gets nothing
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "fc1.adapters.default.paca_P", "fc2.adapters.default.paca_P"}


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_saved_activation_is_only_the_r_selected_features(path: str) -> None:
    model = _adapted(r=5)
    model.train()
    layer = model.fc1
    ad = layer.adapters["default"]
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: list[torch.Tensor] = []
    x = _x(3, 6, 16).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x) if path == "fused" else ad.delta(x, None)
    activations = [t for t in saved if t.untyped_storage().data_ptr() not in owned]
    assert [t.shape[-1] for t in activations] == [5]  # exactly one saved activation: x[..., idx]
    assert activations[0].numel() == 3 * 6 * 5
    assert not any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    y.sum().backward()
    assert ad.paca_P.grad is not None


def test_custom_functions_pass_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    idx = torch.tensor([4, 0, 2])
    x, p, w0, bias = t(2, 3, 6).requires_grad_(), t(5, 3).requires_grad_(), t(5, 6), t(5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, p: _PacaLinear.apply(x, w0, bias, p, idx, 1.5), (x, p))
    assert torch.autograd.gradcheck(lambda x, b: _PacaLinear.apply(x, w0, b, p, idx, 0.5), (x, bias))
    w0g = w0.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, p, w: _PacaColumns.apply(x, p, w, idx, 1.5), (x, p, w0g))


# -- merging -------------------------------------------------------------------------------------------------------
def test_merge_writes_s_p_into_the_selected_columns_and_unmerge_restores() -> None:
    model = _adapted(alpha=3.0)
    x = _x(6, 16)
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in peftkit.adapted_layers(model)}
    with torch.no_grad():
        y = model(x)
        peftkit.merge(model)
        for n, layer in peftkit.adapted_layers(model):
            ad = layer.adapters["default"]
            w = layer.base_layer.weight
            assert torch.equal(w[:, ad.idx], ad.s * ad.paca_P)
            keep = torch.ones(w.shape[1], dtype=torch.bool)
            keep[ad.idx] = False
            assert torch.equal(w[:, keep], w0[n][:, keep])  # ΔW is zero outside the r columns
        _close(model(x), y)
        peftkit.unmerge(model)
        for n, layer in peftkit.adapted_layers(model):
            assert torch.equal(layer.base_layer.weight, w0[n])
        _close(model(x), y)


def test_parameter_count() -> None:
    model = _adapted(perturbed=False, r=6)
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        assert ad.paca_P.shape == (layer.host.d_out, 6)
        assert type(ad).expected_params(layer.host, ad.config) == 6 * layer.host.d_out
    assert peftkit.summary(model).trainable == 6 * (32 + 16)


# -- column choice ----------------------------------------------------------------------------------------------------
def test_column_choice_is_seeded_per_module_and_persistent() -> None:
    idx = {}
    for seed in (0, 0, 1):
        model = _model()
        peftkit.adapt(model, peftkit.config("paca", target_modules=["fc1", "fc2"], r=6, seed=seed))
        layers = peftkit.adapted_layers(model)
        idx.setdefault(seed, []).append({n: l.adapters["default"].idx.clone() for n, l in layers})
    assert all(torch.equal(idx[0][0][n], idx[0][1][n]) for n in ("fc1", "fc2"))  # reproducible
    assert not torch.equal(idx[0][0]["fc1"], idx[1][0]["fc1"])  # the seed matters
    assert not torch.equal(idx[0][0]["fc1"], idx[0][0]["fc2"])  # so does the module name
    for d in idx[0]:
        assert len(set(d["fc1"].tolist())) == 6 and 0 <= int(d["fc1"].min()) and int(d["fc1"].max()) < 16
    model = _adapted()
    assert "adapter.fc1.idx" in peftkit.adapter_state_dict(model)


def test_save_load_is_bit_identical_and_uses_the_saved_columns(tmp_path) -> None:
    model = _adapted()
    ad = model.fc1.adapters["default"]
    with torch.no_grad():  # move the columns somewhere the seed would never put them: load must read them
        ad.idx.copy_(torch.tensor([15, 14, 13, 12, 11]))
    x = _x(5, 16)
    with torch.no_grad():
        y = model(x)
    peftkit.save(model, tmp_path / "ad")
    fresh = _model()
    peftkit.load(fresh, tmp_path / "ad")
    assert fresh.fc1.adapters["default"].idx.tolist() == [15, 14, 13, 12, 11]
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def test_corrupt_saved_columns_are_refused(tmp_path) -> None:
    model = _adapted()
    peftkit.save(model, tmp_path / "ad")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors["adapter.fc1.idx"] = torch.tensor([1, 1, 2, 3, 4])
    save_file(tensors, f, metadata={"format": "pt"})
    fresh = _model()
    before = state_copy(fresh)
    with pytest.raises(peftkit.PeftkitError, match="'fc1'.*distinct"):
        peftkit.load(fresh, tmp_path / "ad")
    assert same_state(before, state_copy(fresh)) and peftkit.adapter_names(fresh) == []


# -- errors --------------------------------------------------------------------------------------------------------
def test_rank_above_d_in_raises_and_changes_nothing() -> None:
    model = _model()
    before, types = state_copy(model), [type(m) for m in model.modules()]
    with pytest.raises(peftkit.PeftkitError, match=r"'fc1'.*rank 20 exceeds this layer's limit of 16.*PacaConfig\.r; "
                                                  r"d_in=16"):
        peftkit.adapt(model, peftkit.config("paca", target_modules=["fc1", "fc2"], r=20))
    assert same_state(before, state_copy(model)) and [type(m) for m in model.modules()] == types
    assert peftkit.adapter_names(model) == []


@pytest.mark.parametrize("fields", [{"dropout": 0.1}, {"r": 0}, {"seed": 1.5}])
def test_bad_config_fields(fields: dict) -> None:
    with pytest.raises(peftkit.PeftkitError):
        peftkit.config("paca", target_modules=["fc1"], **fields)


def test_unsupported_host_is_refused() -> None:
    model = MODELS["embedding"].build()
    with pytest.raises(peftkit.PeftkitError, match="does not support Embedding"):
        peftkit.adapt(model, peftkit.config("paca", target_modules=["emb"], r=2))
