"""A layer run through a trainable dense weight: ``y = x·W'ᵀ + b`` where ``W'`` is built from an adapter's
parameters (``W0 + ΔW``, ``W0·T + s·Δ``, …) and autograd differentiates the build.

``F.linear(x, W', b)`` would keep ``x`` for ``∂W' = gᵀ·x``; :func:`weight_linear` keeps it through
:mod:`.saved_input` instead — no copy of ``x`` when its producer (a LayerNorm, GELU, …) already holds what rebuilds
it — so a dense-update method keeps no more activation memory than the frozen model. Its backward is F.linear's:
``∂x = g·W'``, ``∂W' = gᵀ·x``, ``∂b = Σ_rows g``.

:func:`built_linear` goes one step further for a ``W'`` that is a function of the adapter's parameters: it builds
``W'`` without autograd in the forward and again, with autograd, in the backward (where ``∂W' = gᵀ·x`` is pulled
back through the build onto the parameters), so neither ``W'`` nor the build's intermediates (often several
weight-sized products per layer) stay alive between the forward and the backward — activation checkpointing
applied to the weight build alone. The price is one extra build per step, a d_out×d_in-sized computation against
the N×d activation passes of the layer itself.

:class:`DenseUpdate` is the fused path for adapters whose ``ΔW`` is cheap to build and differentiable: with at least
``d_out`` rows building the d_out×d_in ``W0 + ΔW`` costs less than the activation-sized passes of computing
``x·ΔWᵀ`` from the factors, and one product through it replaces the base GEMM plus the adapter's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import precision, saved_input
from .adapter import check_first_order
from .host import Host
from .lowrank import fold_pays, linear_into


class _WeightLinear(torch.autograd.Function):
    """y = x·Wᵀ + b for a (d_out, d_in) ``W`` that may require grad; x kept through :mod:`.saved_input`."""

    @staticmethod
    @precision.kernel
    def forward(ctx, x, w, bias):  # type: ignore[override]
        y = linear_into(x, w, bias)
        kind, extra, kept = saved_input.pack(x) if ctx.needs_input_grad[1] else ("plain", None, ())
        ctx.save_for_backward(w, *kept)
        ctx.kind, ctx.extra, ctx.shape = kind, extra, x.shape
        return y

    @staticmethod
    @precision.kernel
    def backward(ctx, gy):  # type: ignore[override]
        check_first_order()
        w, *kept = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = torch.mm(g2, w).view(ctx.shape) if ctx.needs_input_grad[0] else None
        grad_w = saved_input.left_matmul(ctx.kind, ctx.extra, tuple(kept), g2) if ctx.needs_input_grad[1] else None
        grad_bias = g2.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_bias


def weight_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x·Wᵀ + b`` (x N-D, features last) — a fresh tensor — differentiable in x, W and b; x is kept for ∂W through
    :mod:`.saved_input`. Plain ``linear_into`` when no gradient is recorded. Runs in the compute dtype
    (:func:`~.precision.compute_dtype`: the autocast dtype under autocast, else x's), W and b cast to it."""
    x, w, bias = precision.cast(precision.compute_dtype(x), x, w, bias)
    if not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        with precision.autocast_off(x):
            return linear_into(x, w, bias)
    return _WeightLinear.apply(x, w, bias)


class _BuiltLinear(torch.autograd.Function):
    """y = x·W'ᵀ + b with ``W' = build()``, a function of ``params``: built without autograd here and rebuilt with
    it in backward; only the parameters (and x through :mod:`.saved_input`) are kept. Autocast is off in both
    (:func:`~.precision.kernel`), so the two builds compute the same ``W'``."""

    @staticmethod
    @precision.kernel
    def forward(ctx, build, built, x, bias, *params):  # type: ignore[override]
        if built is None:
            with torch.no_grad():
                built = build()
        y = linear_into(x, built, bias)
        need_w = any(ctx.needs_input_grad[4:])
        kind, extra, kept = saved_input.pack(x) if need_w else ("plain", None, ())
        ctx.save_for_backward(*params, *kept)  # params: version-checked, so a change before backward is an error
        ctx.build, ctx.n_params, ctx.kind, ctx.extra, ctx.shape = build, len(params), kind, extra, x.shape
        return y

    @staticmethod
    @precision.kernel
    def backward(ctx, gy):  # type: ignore[override]
        check_first_order()
        saved = ctx.saved_tensors
        params, kept = saved[:ctx.n_params], tuple(saved[ctx.n_params:])
        g2 = gy.reshape(-1, gy.shape[-1])
        wanted = [i for i in range(len(params)) if ctx.needs_input_grad[4 + i]]
        with torch.enable_grad() if wanted else torch.no_grad():
            w = ctx.build()
        grad_x = torch.mm(g2, w.detach()).view(ctx.shape) if ctx.needs_input_grad[2] else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        if wanted:
            grad_w = saved_input.left_matmul(ctx.kind, ctx.extra, kept, g2)
            got = torch.autograd.grad(w, [params[i] for i in wanted], grad_w, allow_unused=True)
            for i, g in zip(wanted, got):
                grads[i] = g
        grad_bias = g2.sum(0) if ctx.needs_input_grad[3] else None
        return (None, None, grad_x, grad_bias, *grads)


def trainable(module: nn.Module) -> list[torch.Tensor]:
    """The parameters of ``module`` that require grad (what a build from it is differentiated in)."""
    return [p for p in module.parameters() if p.requires_grad]


def built_linear(
    x: torch.Tensor, build: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], bias: torch.Tensor | None,
    built: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x·W'ᵀ + b`` with ``W' = build()`` (d_out, d_in), differentiable in x, b and the ``params`` the build reads
    (they must be every tensor requiring grad that ``build`` depends on, and the build must be deterministic).
    ``W'`` and its build's intermediates are not kept for backward — it rebuilds ``W'`` instead (see the module
    docstring). Under ``torch.compile`` tracing (where a rebuild in backward may not trace) and when nothing needs a
    gradient it is :func:`weight_linear` / a plain product. ``built``: ``build()`` already computed under
    ``torch.no_grad`` (a caller that needed it, e.g. to check its dtype), used for the forward. The product runs in
    the compute dtype (:func:`~.precision.compute_dtype`), ``W'`` built in its parameters' dtype and cast once."""
    dt = precision.compute_dtype(x)
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)
                                           or (bias is not None and bias.requires_grad)):
        return weight_linear(x, build() if built is None else built, bias)
    if torch.compiler.is_compiling():
        return weight_linear(x, build(), bias)
    x, bias = precision.cast(dt, x, bias)
    return _BuiltLinear.apply(lambda: build().to(dt), None if built is None else built.to(dt), x, bias, *params)


_LINEAR_KINDS = ("linear", "gpt2_conv1d")


def host_forward(
    host: Host, x: torch.Tensor, build: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
    bias: torch.Tensor | None, built: torch.Tensor | None = None, rebuild: bool = True,
) -> torch.Tensor:
    """The host's forward with the (d_out, d_in) weight ``build()``: for a Linear / GPT-2 Conv1D host,
    :func:`built_linear` (x kept without a copy where it can be; the weight rebuilt in backward) or, with
    ``rebuild=False`` (a build that costs more time than its memory is worth), :func:`weight_linear` (W' and its
    build's graph kept); else ``host.apply_weight``."""
    if host.kind in _LINEAR_KINDS and x.dim() >= 2:
        return built_linear(x, build, params, bias, built) if rebuild else weight_linear(x, build(), bias)
    return host.apply_weight(x, build(), bias)


def dense_pays(host: Host, x: torch.Tensor, dropout_active: bool) -> bool:
    """Whether a layer should run through its built ``W0 + ΔW`` rather than the activation path: a Linear / GPT-2
    Conv1D host with a frozen weight of x's dtype, at least d_out rows (float32/64: :func:`~.lowrank.fold_pays`), and
    no active dropout on the update branch (a product through one weight cannot express it). Never in half precision,
    autocast included (:func:`~.precision.fused_dtype` with ``folds``: ``W0 + ΔW`` would round the update away)."""
    if dropout_active or host.kind not in _LINEAR_KINDS or x.dim() < 2:
        return False
    w = host.weight_2d()
    dt = precision.fused_dtype(x, w, folds=True)
    return not w.requires_grad and dt is not None and fold_pays(x.numel() // x.shape[-1], host.d_out, dt)


class DenseUpdate:
    """Mixin for adapters whose ``delta_weight()`` is a cheap, differentiable ``ΔW`` (d_out, d_in): when it pays
    (Linear / GPT-2 Conv1D host, frozen float32/64 weight, at least d_out rows, no active dropout) the layer runs as
    ``x·(W0 + ΔW)ᵀ + b`` through :func:`built_linear` (``W0 + ΔW`` rebuilt in backward, not kept); otherwise the
    generic path (base + ``delta``)."""

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        host = self.host  # type: ignore[attr-defined]
        dropout = self.training and getattr(self.config, "dropout", 0) > 0  # type: ignore[attr-defined]
        if not dense_pays(host, x, dropout):
            return None
        w = host.weight_2d()
        if any(p.dtype != w.dtype for p in self.parameters()):  # type: ignore[attr-defined]
            return None
        return built_linear(x, lambda: self.dense_weight(w), trainable(self), host.bias)  # type: ignore[arg-type]

    def dense_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W0 + ΔW`` for the frozen (d_out, d_in) ``w`` — override to build it with fewer temporaries."""
        return w + self.delta_weight()  # type: ignore[attr-defined]
