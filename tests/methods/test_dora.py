"""DoRA's own properties (shared/methods/weight-space.md §2 "Sanity"): exact identity at init, merged == unmerged,
the magnitude really rescales rows (B = 0, m = 2‖W0‖ doubles x·W0ᵀ), the row norm is detached from the graph,
and the same holds on Conv2d hosts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from conformance.models import MODELS, TinyModel, perturb
from peftkit.core import saved_input
from peftkit.methods.dora import _FusedDora
from tolerance import assert_near

DORA_MODELS = [n for n, spec in sorted(MODELS.items()) if set(spec.hosts) <= set(peftkit.get_method("dora").hosts)]


def _rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * float(expected.abs().max()))


def _adapt(spec: TinyModel, **fields) -> nn.Module:
    model = spec.build()
    peftkit.adapt(model, peftkit.config("dora", target_modules=spec.targets, **fields))
    return model


def test_dora_covers_every_host() -> None:
    assert DORA_MODELS == ["block", "conv1d", "conv2d", "conv3d", "embedding", "gpt2", "mlp"]


@pytest.mark.parametrize("model_name", DORA_MODELS)
def test_init_output_is_exactly_the_base(model_name: str) -> None:
    spec = MODELS[model_name]
    x = spec.input()
    with torch.no_grad():
        y0 = spec.run(spec.build(), x)
        model = _adapt(spec, r=4)
        assert torch.equal(spec.run(model, x), y0)
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        torch.testing.assert_close(ad.magnitude.detach(), layer.host.weight_2d().detach().norm(dim=1))


@pytest.mark.parametrize("model_name", DORA_MODELS)
def test_merged_weight_is_row_rescaled_direction(model_name: str) -> None:
    spec = MODELS[model_name]
    model = _adapt(spec, r=4, alpha=8)
    perturb(model, seed=1)
    x = spec.input()
    w0 = {p: layer.host.weight_2d().detach().clone() for p, layer in peftkit.adapted_layers(model)}
    with torch.no_grad():
        y = spec.run(model, x)
        peftkit.merge(model)
        for p, layer in peftkit.adapted_layers(model):
            ad = layer.adapters["default"]
            v = w0[p] + ad.s * ad.lora_B @ ad.lora_A
            _rel_close(layer.host.weight_2d(), (ad.magnitude / v.norm(dim=1))[:, None] * v)
        _rel_close(spec.run(model, x), y)
        peftkit.unmerge(model)
        for p, layer in peftkit.adapted_layers(model):
            _rel_close(layer.host.weight_2d(), w0[p])


@pytest.mark.parametrize("model_name", ["mlp", "conv2d", "gpt2"])
def test_double_magnitude_with_zero_b_doubles_the_linear_part(model_name: str) -> None:
    spec = MODELS[model_name]
    model = _adapt(spec, r=4)
    layers = dict(peftkit.adapted_layers(model))
    with torch.no_grad():
        for layer in layers.values():
            ad = layer.adapters["default"]
            ad.lora_A.normal_()  # irrelevant while B = 0
            ad.magnitude.copy_(2 * layer.host.weight_2d().norm(dim=1))
    layer = next(iter(layers.values()))
    host = layer.host
    x = spec.input() if model_name != "gpt2" else torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if host.is_conv:
            lin = host.module._conv_forward(x, host.weight, None)
        else:
            lin = x @ host.weight_2d().t()
        expected = 2 * lin + host.out_view(host.bias)
        _rel_close(layer(x), expected)


def test_norm_is_detached_gradients_match_analytic_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6)).eval()
    peftkit.adapt(model, peftkit.config("dora", target_modules=["0"], r=3, alpha=6))
    perturb(model, seed=2, std=0.3)
    layer = model[0]
    ad = layer.adapters["default"]
    w0, b0, s = layer.host.weight.detach(), layer.host.bias.detach(), ad.s
    x = torch.randn(7, 12)
    g = torch.randn(7, 6)
    (model(x) * g).sum().backward()

    m, a, b = ad.magnitude.detach(), ad.lora_A.detach(), ad.lora_B.detach()
    v = w0 + s * b @ a
    n = v.norm(dim=1)  # treated as a constant (paper §4.3)
    xv = x @ v.t()
    gs = g * (m / n)
    assert_near(ad.magnitude.grad, (g * xv / n).sum(0), 64, layers=6)
    assert_near(ad.lora_B.grad, s * gs.t() @ (x @ a.t()), 64, layers=6)
    assert_near(ad.lora_A.grad, s * (gs @ b).t() @ x, 64, layers=6)
    # the check has power: with n inside the graph the gradient of B is different
    b_live = b.clone().requires_grad_(True)
    v_live = w0 + s * b_live @ a
    y_live = (m / v_live.norm(dim=1)) * (x @ v_live.t()) + b0
    (y_live * g).sum().backward()
    assert not torch.allclose(b_live.grad, ad.lora_B.grad, atol=1e-4)


def test_conv2d_dora_trains_and_merges() -> None:
    spec = MODELS["conv2d"]
    model = _adapt(spec, r=4, alpha=4)
    x = spec.input()
    params = peftkit.trainable_parameters(model)
    assert sum(p.numel() for p in params) == (4 * (27 + 16) + 16) + (4 * (16 + 16) + 16)  # conv1 3x3x3, conv2 1x1
    y0 = spec.run(model, x).detach()
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(spec.run(model, x), torch.zeros_like(y0)).backward()
        opt.step()
    with torch.no_grad():
        y = spec.run(model, x)
        assert F.mse_loss(y, torch.zeros_like(y)) < F.mse_loss(y0, torch.zeros_like(y0))
        peftkit.merge(model)
        _rel_close(spec.run(model, x), y)


def test_dora_on_an_embedding_rescales_each_embedding_dimension() -> None:
    """On an Embedding (W = weightᵀ: rows are embedding dimensions) the lookup uses W' = diag(m/n)·(W + s·B·A)."""
    spec = MODELS["embedding"]
    model = _adapt(spec, r=4, alpha=8)
    perturb(model, seed=3)
    layer = dict(peftkit.adapted_layers(model))["emb"]
    ad = layer.adapters["default"]
    with torch.no_grad():
        ad.magnitude.mul_(torch.linspace(0.5, 1.5, ad.magnitude.numel()))
        v = layer.host.weight_2d() + ad.s * ad.lora_B @ ad.lora_A
        w_eff = (ad.magnitude / v.norm(dim=1))[:, None] * v
        ids = torch.tensor([[0, 3, 5, 1]])
        _rel_close(model.emb(ids), F.embedding(ids, w_eff.t()))


# -- the fused path ---------------------------------------------------------------------------------------
def _train_grads(model: nn.Module, spec: TinyModel, x: torch.Tensor, bias_trains: bool) -> tuple[torch.Tensor, dict]:
    layers = dict(peftkit.adapted_layers(model))
    for layer in layers.values():
        if layer.host.bias is not None:
            layer.host.bias.requires_grad_(bias_trains)
    xin = x.clone().requires_grad_(x.is_floating_point())
    y = spec.run(model, xin)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(9)))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if xin.is_floating_point():
        grads["input"] = xin.grad
    return y.detach(), grads


@pytest.mark.parametrize("model_name", ["mlp", "block", "gpt2"])
@pytest.mark.parametrize("bias_trains", [False, True])
def test_fused_path_matches_the_generic_path(model_name: str, bias_trains: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spec = MODELS[model_name]
    x = spec.input()
    fused, generic = _adapt(spec, r=4, alpha=8), _adapt(spec, r=4, alpha=8)
    perturb(fused, seed=1, std=0.3)
    generic.load_state_dict(fused.state_dict())
    calls: list[int] = []
    real_apply = _FusedDora.apply
    monkeypatch.setattr(_FusedDora, "apply", lambda *args: calls.append(1) or real_apply(*args))
    y1, g1 = _train_grads(fused, spec, x, bias_trains)
    assert len(calls) == len(list(peftkit.adapted_layers(fused))) > 0
    monkeypatch.setattr(peftkit.get_method("dora").adapter, "fused_forward", lambda self, x: None)
    y2, g2 = _train_grads(generic, spec, x, bias_trains)
    assert len(calls) == len(list(peftkit.adapted_layers(fused)))
    _rel_close(y1, y2)
    assert g1.keys() == g2.keys()
    assert any("magnitude" in n for n in g1) and any(".bias" in n for n in g1) == bias_trains
    scale = max(float(g.abs().max()) for g in g2.values())
    for n in g1:  # relative to the largest gradient: a key bias's gradient is zero up to rounding (softmax shift)
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-6 * scale)


def test_fused_function_gradients_float64() -> None:
    g = torch.Generator().manual_seed(4)

    def t(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, w, bias, a, b, m = t(2, 3, 5), t(4, 5, grad=False), t(4), t(2, 5), t(4, 2), t(4)
    # x, b0, m do not enter n: the numerical gradient is the true one
    # nondet_tol: gradcheck's repeated backward on one graph takes ∂m's recompute path (the output probe is released
    # by the first backward), equal up to rounding
    assert torch.autograd.gradcheck(lambda x, bias, m: _FusedDora.apply(x, w, bias, a.detach(), b.detach(), m, 1.5),
                                    (x, bias, m), nondet_tol=1e-12)
    # A and B do: against autograd through the formula with n detached (paper §4.3)
    gy = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    _FusedDora.apply(x, w, bias, a, b, m, 1.5).backward(gy)
    fused = [v.grad.clone() for v in (x, bias, a, b, m)]
    for v in (x, bias, a, b, m):
        v.grad = None
    v_ = w + 1.5 * b @ a
    ((m / v_.norm(dim=1).detach()) * (x @ v_.t()) + bias).backward(gy)
    for u, v in zip(fused, (x, bias, a, b, m)):
        torch.testing.assert_close(u, v.grad, rtol=1e-10, atol=1e-12)


def test_fused_path_at_init_is_the_base_bit_for_bit_with_grad_enabled() -> None:
    for name in ("mlp", "gpt2"):
        spec = MODELS[name]
        x = spec.input()
        with torch.no_grad():
            y0 = spec.run(spec.build(), x)
        model = _adapt(spec, r=4)
        y = spec.run(model, x)
        assert y.requires_grad and torch.equal(y.detach(), y0)


def test_fused_path_falls_back_for_half_precision_and_zero_magnitudes() -> None:
    def grad_fn_name(model: nn.Module, x: torch.Tensor) -> str:
        return type(model[0](x).grad_fn).__name__

    model = nn.Sequential(nn.Linear(8, 6))
    peftkit.adapt(model, peftkit.config("dora", target_modules=["0"], r=2))
    x = torch.randn(5, 8)
    assert "FusedDora" in grad_fn_name(model, x)
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.magnitude[2] = 0.0
    assert "FusedDora" not in grad_fn_name(model, x)  # ∂m divides by m
    model[0](x).sum().backward()
    assert torch.isfinite(ad.magnitude.grad).all()
    half = nn.Sequential(nn.Linear(8, 6)).bfloat16()
    peftkit.adapt(half, peftkit.config("dora", target_modules=["0"], r=2))
    assert "FusedDora" not in grad_fn_name(half, x.bfloat16())


def test_fused_path_keeps_less_for_backward_than_the_generic_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftkit.bench.timing import kept_storages

    spec = MODELS["block"]
    x = spec.input()

    def kept(model: nn.Module) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for ptr, n in kept_storages(spec.run(model, x).sum()).items() if ptr not in params)

    model = _adapt(spec, r=4)
    fused = kept(model)
    monkeypatch.setattr(peftkit.get_method("dora").adapter, "fused_forward", lambda self, x: None)
    generic = kept(model)
    assert fused < 0.8 * generic


class _InPlaceOutput(nn.Module):
    """A Linear whose output the model changes in place before backward (legal: autograd does not save a Linear's
    output), fed by a plain input, a LayerNorm or a GELU — the three ways the fused path keeps its input."""

    def __init__(self, producer: str) -> None:
        super().__init__()
        self.pre = {"plain": nn.Identity(), "layer_norm": nn.LayerNorm(6), "gelu": nn.GELU()}[producer]
        self.lin = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(self.pre(x))
        y.mul_(2.0).add_(1.0)
        return y.tanh()


@pytest.mark.parametrize("producer", ["plain", "layer_norm", "gelu"])
def test_fused_path_survives_an_in_place_change_of_its_output(producer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    unpacked: list[int] = []
    real_unpack = saved_input.unpack
    monkeypatch.setattr(saved_input, "unpack", lambda *a: unpacked.append(1) or real_unpack(*a))

    def grads(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = _InPlaceOutput(producer)
        for p in model.parameters():
            p.requires_grad_(False)
        peftkit.adapt(model, peftkit.config("dora", target_modules=["lin"], r=2))
        perturb(model, seed=1, std=0.3)
        if not fused:
            monkeypatch.setattr(peftkit.get_method("dora").adapter, "fused_forward", lambda self, x: None)
        x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
        y = model(x)
        assert ("FusedDora" in type(model.lin(model.pre(x)).grad_fn).__name__) == fused
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out["input"] = x.grad
        if not fused:
            monkeypatch.undo()
        return y.detach(), out

    y1, g1 = grads(True)
    assert unpacked == [1]  # the changed output was noticed: ∂m recomputed from the input
    y2, g2 = grads(False)
    _rel_close(y1, y2)
    assert g1.keys() == g2.keys() and any("magnitude" in n for n in g1)
    for n in g1:
        assert_near(g1[n], g2[n], 64, layers=6)


def test_fused_path_second_backward_with_retained_graph_recomputes_the_output_term() -> None:
    model = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 5))
    for p in model.parameters():
        p.requires_grad_(False)
    peftkit.adapt(model, peftkit.config("dora", target_modules=["1"], r=2))
    perturb(model, seed=1, std=0.3)
    m = model[1].adapters["default"].magnitude
    y = model(torch.randn(4, 6, generator=torch.Generator().manual_seed(5)))
    assert "FusedDora" in type(y.grad_fn).__name__
    y.pow(2).sum().backward(retain_graph=True)
    first = m.grad.clone()
    m.grad = None
    calls: list[int] = []
    real_unpack = saved_input.unpack
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(saved_input, "unpack", lambda *a: calls.append(1) or real_unpack(*a))
        y.pow(2).sum().backward()  # the probe was released by the first backward: the term is recomputed
    assert calls == [1]
    assert_near(m.grad, first, 64, layers=6)
