"""``core.dense``: a layer through a trainable dense weight keeps its input the way the fused low-rank path does
(no copy when a LayerNorm / GELU made it), with F.linear's outputs and gradients; the adapters built on it
(weight-replacing methods, LoCA, TLoRA, the ``DenseUpdate`` mixin) match their activation paths."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from conformance.models import NormFeedForward
from peftkit.bench.timing import kept_storages
from peftkit.core import dense


def _ln() -> nn.LayerNorm:
    torch.manual_seed(3)
    ln = nn.LayerNorm(12)
    with torch.no_grad():
        ln.weight.normal_(1, 0.3)
        ln.bias.normal_(0, 0.3)
    return ln


PRODUCERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "leaf": lambda u: u,
    "layer_norm": _ln(),
    "gelu": F.gelu,
}


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u = (torch.randn(3, 7, 12, generator=g, dtype=dtype) * 2 + 0.5).requires_grad_()
    w0 = torch.randn(10, 12, generator=g, dtype=dtype)
    p = torch.randn(10, 12, generator=g, dtype=dtype).requires_grad_()  # the trained part of W' = W0 + P
    b = torch.randn(10, generator=g, dtype=dtype).requires_grad_()
    return u, w0, p, b


@pytest.mark.parametrize("producer", list(PRODUCERS))
def test_weight_linear_equals_f_linear(producer: str) -> None:
    fn = PRODUCERS[producer]
    results = []
    for op in (F.linear, dense.weight_linear):
        u, w0, p, b = _inputs()
        y = op(fn(u), w0 + p, b)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        (y * g).sum().backward()
        results.append((y.detach(), u.grad, p.grad, b.grad))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("producer", ["layer_norm", "gelu"])
def test_weight_linear_keeps_no_copy_of_a_rebuildable_input(producer: str) -> None:
    u, w0, p, b = _inputs()
    x = PRODUCERS[producer](u)
    ours = kept_storages(dense.weight_linear(x, w0 + p, b).sum())
    theirs = kept_storages(F.linear(x, w0 + p, b).sum())
    ptr = x.untyped_storage().data_ptr()
    assert ptr in theirs and ptr not in ours



@pytest.mark.parametrize("producer", ["layer_norm", "gelu"])
def test_weight_linear_under_autocast_keeps_no_cast_of_a_rebuildable_input(producer: str) -> None:
    """Under bf16 autocast a float32 LayerNorm / GELU output reaches the product as its bf16 cast: that cast is not
    kept (F.linear keeps it), and the gradients are F.linear's under autocast within bf16 rounding (bit for bit for
    the GELU, whose rebuild is the same kernel)."""
    results, kept = [], []
    for op in (F.linear, dense.weight_linear):
        u, w0, p, b = _inputs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = PRODUCERS[producer](u)
            y = op(x, w0 + p, b)
        assert y.dtype == torch.bfloat16
        kept.append(sum(kept_storages(y.sum()).values()))
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        (y.float() * g).sum().backward()
        results.append((y.detach(), u.grad, p.grad, b.grad))
    assert kept[1] <= kept[0] - 3 * 7 * 12 * 2, kept  # at least the bf16 copy of x less
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for ref, got in zip(results[0][1:], results[1][1:]):
        if producer == "gelu":
            assert torch.equal(got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=0, atol=4 * torch.finfo(torch.bfloat16).eps * 21 ** 0.5
                                       * float(ref.abs().max()))

def test_weight_linear_gradcheck_float64() -> None:
    u, w0, p, b = _inputs(torch.float64)
    ln = nn.LayerNorm(12, dtype=torch.float64)

    def f(u: torch.Tensor, p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return dense.weight_linear(ln(u), w0 + p, b)

    assert torch.autograd.gradcheck(f, (u, p, b))


def test_weight_linear_output_may_change_in_place() -> None:
    u, w0, p, b = _inputs()
    y = dense.weight_linear(_ln()(u), w0 + p, b)
    y.mul_(2.0)  # a view made inside a custom Function would refuse this
    y.sum().backward()
    ref_u, ref_p = u.grad.clone(), p.grad.clone()
    u.grad = p.grad = None
    (F.linear(_ln()(u), w0 + p, b) * 2.0).sum().backward()
    torch.testing.assert_close(u.grad, ref_u)
    torch.testing.assert_close(p.grad, ref_p)


def test_weight_linear_without_grad_is_a_plain_product() -> None:
    u, w0, p, b = _inputs()
    with torch.no_grad():
        y = dense.weight_linear(u, w0 + p, b)
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.linear(u.detach(), (w0 + p).detach(), b.detach()))


def _build(w0: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A build with weight-sized intermediates: W' = W0 + tanh(P)·diag(q)."""
    return lambda: w0 + torch.tanh(p) * q


@pytest.mark.parametrize("producer", list(PRODUCERS))
def test_built_linear_equals_f_linear_through_the_built_weight(producer: str) -> None:
    fn = PRODUCERS[producer]
    results = []
    for use_built in (False, True):
        u, w0, p, b = _inputs()
        q = torch.linspace(0.5, 1.5, 12).requires_grad_()
        build = _build(w0, p, q)
        y = dense.built_linear(fn(u), build, [p, q], b) if use_built else F.linear(fn(u), build(), b)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        (y * g).sum().backward()
        results.append((y.detach(), u.grad, p.grad, q.grad, b.grad))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_built_linear_gradcheck_float64() -> None:
    u, w0, p, b = _inputs(torch.float64)
    q = torch.linspace(0.5, 1.5, 12, dtype=torch.float64).requires_grad_()
    ln = nn.LayerNorm(12, dtype=torch.float64)

    def f(u: torch.Tensor, p: torch.Tensor, q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return dense.built_linear(ln(u), _build(w0, p, q), [p, q], b)

    assert torch.autograd.gradcheck(f, (u, p, q, b))


def test_built_linear_keeps_neither_the_weight_nor_its_build() -> None:
    """weight_linear keeps W' (and autograd the build's tanh(P)); built_linear keeps only the parameters."""
    u, w0, p, b = _inputs()
    q = torch.linspace(0.5, 1.5, 12).requires_grad_()
    x = PRODUCERS["layer_norm"](u)
    for op, keeps_weight in ((lambda: dense.weight_linear(x, _build(w0, p, q)(), b), True),
                             (lambda: dense.built_linear(x, _build(w0, p, q), [p, q], b), False)):
        kept = kept_storages(op().sum())
        others = {ptr: n for ptr, n in kept.items() if ptr not in (p.untyped_storage().data_ptr(),
                                                                  q.untyped_storage().data_ptr())}
        assert (w0.numel() * 4 in others.values()) == keeps_weight


def test_built_linear_refuses_a_parameter_changed_before_backward() -> None:
    u, w0, p, b = _inputs()
    q = torch.linspace(0.5, 1.5, 12).requires_grad_()
    y = dense.built_linear(u, _build(w0, p, q), [p, q], b)
    with torch.no_grad():
        p.add_(1.0)  # the rebuilt weight would differ from the forward's
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_built_linear_without_grad_and_under_autocast() -> None:
    u, w0, p, b = _inputs()
    q = torch.linspace(0.5, 1.5, 12).requires_grad_()
    with torch.no_grad():
        y = dense.built_linear(u, _build(w0, p, q), [p, q], b)
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.linear(u, _build(w0, p, q)(), b).detach())
    # under autocast: W' built in float32 (autocast off inside, the same in the forward and the backward rebuild),
    # cast once; the product in bfloat16, as F.linear under autocast, and the same gradients within bfloat16's
    # rounding of the d_in = 12 (forward) and 21-row (weight gradient) reductions
    g = torch.randn(3, 7, 10, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(u, _build(w0, p, q)(), b)
    ref_grads = torch.autograd.grad((ref.float() * g).sum(), [u, p, q, b])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dense.built_linear(u, _build(w0, p, q), [p, q], b)
    assert "BuiltLinear" in type(y.grad_fn).__name__ and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=4 * torch.finfo(torch.bfloat16).eps
                               * float(ref.detach().abs().max()))
    grads = torch.autograd.grad((y.float() * g).sum(), [u, p, q, b])
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(torch.bfloat16).eps * 21 ** 0.5
                                   * float(want.abs().max()))


# -- adapters on the dense path ------------------------------------------------------------------------------------
def _train_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


DENSE_METHODS: dict[str, dict] = {
    "tlora": {},
    "tlora_ttv": {"residual": "ttv", "r": 2},
    "tlora_ttm": {"residual": "ttm", "r": 2},
    "loca": {"n": 20},
    "qwha": {"r": 2, "group_size": 16},
    "kron": {},
    "svd": {},
    "randlora": {"r": 4},
    "hydra": {"r_p": 2, "r_s": 2},
    "hydra_bias": {"r_p": 2, "r_s": 2, "branch_bias": True},
}


def _count_dense_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the products run through a trainable dense weight (kept or rebuilt in backward)."""
    calls: list[int] = []
    for fn in (dense._WeightLinear, dense._BuiltLinear):
        monkeypatch.setattr(fn, "apply", lambda *a, real=fn.apply: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("name", list(DENSE_METHODS))
@pytest.mark.parametrize("rows", [64, 4], ids=["dense_path", "activation_path"])
def test_dense_fused_path_equals_the_generic_path(name: str, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path (through W' when there are ≥ d_out rows) gives the generic path's outputs and gradients —
    the generic path is what runs with a second adapter active."""
    method = name.split("_")[0]
    # float64 (the two paths round differently; the comparison is about the math) — except RandLoRA, whose
    # parameters and shared bases are float32 whatever the host (its dense path needs matching dtypes)
    dtype = torch.float32 if method == "randlora" else torch.float64
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    model = NormFeedForward().to(dtype)
    peftkit.adapt(model, peftkit.config(method, target_modules=["up", "down"], **DENSE_METHODS[name]))
    _perturb(model)
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(2), dtype=dtype)
    model.train()
    dense_calls = _count_dense_calls(monkeypatch)
    y_fused, g_fused = _train_outputs(model, x)
    # ≥ d_out rows: every method here runs its layers through W'; LoCA and QWHA always do, TLoRA / Hydra / the mixin
    # not with fewer rows
    assert len(dense_calls) == (2 if rows == 64 or method in ("loca", "qwha") else 0)
    calls = []
    for _, layer in peftkit.core.model.adapted_layers(model):
        ad = layer.adapters["default"]
        orig = ad.fused_forward
        ad.fused_forward = lambda x, orig=orig: calls.append(1) or None  # force the generic path
    y_ref, g_ref = _train_outputs(model, x)
    assert calls
    torch.testing.assert_close(y_fused, y_ref, rtol=tol, atol=tol)
    for k in g_ref:
        torch.testing.assert_close(g_fused[k], g_ref[k], rtol=10 * tol, atol=tol, msg=k)


@pytest.mark.parametrize("name", ["tlora", "tlora_ttm", "loca", "qwha", "kron", "svd", "randlora", "hydra"])
def test_dense_adapters_keep_no_copy_of_layer_norm_and_gelu_outputs(name: str) -> None:
    method = name.split("_")[0]
    model = NormFeedForward()
    peftkit.adapt(model, peftkit.config(method, target_modules=["up", "down"], **DENSE_METHODS[name]))
    seen: dict[str, torch.Tensor] = {}
    model.ln.register_forward_hook(lambda m, a, out: seen.__setitem__("ln", out))
    model.down.register_forward_pre_hook(lambda m, a: seen.__setitem__("gelu", a[0]))
    model.train()
    # an input that requires grad (as a middle layer's does), so the frozen LayerNorm records its node
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)).requires_grad_()
    kept = kept_storages(model(x).sum())
    assert set(seen) == {"ln", "gelu"}
    for what, t in seen.items():
        assert t.untyped_storage().data_ptr() not in kept, what
    if method != "loca":  # W' (and its build's intermediates) rebuilt in backward, not kept
        own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        assert 32 * 16 * 4 not in [n for ptr, n in kept.items() if ptr not in own]


def test_dense_update_steps_aside_for_dropout_and_few_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Active dropout applies to the update branch only, which a product through W0 + ΔW cannot express: the mixin
    leaves training with dropout (and batches of fewer than d_out rows) to the generic path, and takes eval."""
    calls = _count_dense_calls(monkeypatch)
    model = NormFeedForward()
    peftkit.adapt(model, peftkit.config("kron", target_modules=["up", "down"], dropout=0.1))
    x = torch.randn(64, 16, requires_grad=True)
    model.train()
    model(x).sum().backward()
    assert calls == []
    model(x[:8]).sum().backward()
    assert calls == []
    model.eval()
    model(x).sum().backward()
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["kron", "randlora", "tlora", "qwha"])
def test_frozen_dense_adapter_passes_only_the_input_gradient(name: str) -> None:
    """Adapter parameters frozen (an adapter under evaluation with an input that needs grad, or a float64 host with
    RandLoRA's float32 parameters): the layer still runs, and ∂x equals the generic path's."""
    method = name.split("_")[0]
    model = NormFeedForward().double()
    peftkit.adapt(model, peftkit.config(method, target_modules=["up", "down"], **DENSE_METHODS[name]))
    _perturb(model)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    model(x).sum().backward()
    fused = x.grad.clone()
    x.grad = None
    for _, layer in peftkit.core.model.adapted_layers(model):
        layer.adapters["default"].fused_forward = lambda x: None
    model(x).sum().backward()
    torch.testing.assert_close(fused, x.grad, rtol=1e-6 if method == "randlora" else 1e-10, atol=1e-8)
