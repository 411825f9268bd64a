"""A layer run through a trainable dense weight: ``y = x·W'ᵀ + b`` where ``W'`` is built from an adapter's
parameters (``W0 + ΔW``, ``W0·T + s·Δ``, …) and autograd differentiates the build.

``F.linear(x, W', b)`` would keep ``x`` for ``∂W' = gᵀ·x``; :func:`weight_linear` keeps it through
:mod:`.saved_input` instead — no copy of ``x`` when its producer (a LayerNorm, GELU, …) already holds what rebuilds
it — so a dense-update method keeps no more activation memory than the frozen model. Its backward is F.linear's:
``∂x = g·W'``, ``∂W' = gᵀ·x``, ``∂b = Σ_rows g``.

:class:`DenseUpdate` is the fused path for adapters whose ``ΔW`` is cheap to build and differentiable: with at least
``d_out`` rows building the d_out×d_in ``W0 + ΔW`` costs less than the activation-sized passes of computing
``x·ΔWᵀ`` from the factors, and one product through it replaces the base GEMM plus the adapter's own.
"""

from __future__ import annotations

import torch

from . import saved_input
from .host import Host
from .lowrank import fold_pays, linear_into


class _WeightLinear(torch.autograd.Function):
    """y = x·Wᵀ + b for a (d_out, d_in) ``W`` that may require grad; x kept through :mod:`.saved_input`."""

    @staticmethod
    def forward(ctx, x, w, bias):  # type: ignore[override]
        y = linear_into(x, w, bias)
        kind, extra, kept = saved_input.pack(x) if ctx.needs_input_grad[1] else ("plain", None, ())
        ctx.save_for_backward(w, *kept)
        ctx.kind, ctx.extra, ctx.shape = kind, extra, x.shape
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        w, *kept = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = torch.mm(g2, w).view(ctx.shape) if ctx.needs_input_grad[0] else None
        grad_w = saved_input.left_matmul(ctx.kind, ctx.extra, tuple(kept), g2) if ctx.needs_input_grad[1] else None
        grad_bias = g2.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_bias


def weight_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x·Wᵀ + b`` (x N-D, features last) — a fresh tensor — differentiable in x, W and b; x is kept for ∂W through
    :mod:`.saved_input`. Plain ``linear_into`` when no gradient is recorded."""
    if not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        return linear_into(x, w, bias)
    return _WeightLinear.apply(x, w, bias)


_LINEAR_KINDS = ("linear", "gpt2_conv1d")


def host_forward(host: Host, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The host's forward with the (d_out, d_in) weight ``w``: :func:`weight_linear` for a Linear / GPT-2 Conv1D
    host (x kept without a copy where it can be), else ``host.apply_weight``."""
    if host.kind in _LINEAR_KINDS and x.dim() >= 2:
        return weight_linear(x, w, bias)
    return host.apply_weight(x, w, bias)


def dense_pays(host: Host, x: torch.Tensor, dropout_active: bool) -> bool:
    """Whether a layer should run through its built ``W0 + ΔW`` rather than the activation path: a Linear / GPT-2
    Conv1D host with a frozen weight of x's dtype, at least d_out rows (float32/64: :func:`~.lowrank.fold_pays`), and
    no active dropout on the update branch (a product through one weight cannot express it)."""
    if dropout_active or host.kind not in _LINEAR_KINDS or x.dim() < 2:
        return False
    w = host.weight_2d()
    return not w.requires_grad and x.dtype == w.dtype and fold_pays(x.numel() // x.shape[-1], host.d_out, w)


class DenseUpdate:
    """Mixin for adapters whose ``delta_weight()`` is a cheap, differentiable ``ΔW`` (d_out, d_in): when it pays
    (Linear / GPT-2 Conv1D host, frozen float32/64 weight, at least d_out rows, no active dropout) the layer runs as
    ``x·(W0 + ΔW)ᵀ + b`` through :func:`weight_linear`; otherwise the generic path (base + ``delta``)."""

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        host = self.host  # type: ignore[attr-defined]
        dropout = self.training and getattr(self.config, "dropout", 0) > 0  # type: ignore[attr-defined]
        if not dense_pays(host, x, dropout):
            return None
        w = host.weight_2d()
        dw = self.delta_weight()  # type: ignore[attr-defined]
        if dw.dtype != w.dtype:
            return None
        return weight_linear(x, w + dw, host.bias)
