"""DoRA's fused path (the kernel of :mod:`peftkit.methods.dora`, kept apart so the method file stays readable).

Fused path (sole active adapter on a frozen float32/64 Linear or GPT-2 Conv1D, no dropout while training): since V is
built anyway, the output is one GEMM through ``W' = diag(c)·V`` (c = m/n) and one autograd function computes, with
``g`` the output gradient, ``G = g·(c ⊙ B)`` (rows of B scaled, no N×d_out pass) and n held constant:

    ∂x = g·W',   ∂A = s·Gᵀ·x,   ∂B = s·diag(c)·(gᵀ·h),   ∂m = Σ_rows g ⊙ (y − b0) / m,   ∂b0 = Σ_rows g

(h = x·Aᵀ; ``∂m`` uses y − b0 = c ⊙ x·Vᵀ, so it keeps the layer output — which the next op usually keeps anyway —
instead of x·W0ᵀ and the low-rank branch separately; magnitudes with a zero entry take the generic path). The input
is kept through ``core.saved_input`` like LoRA's; W' is rebuilt in backward rather than kept. Code that changes the
layer's output in place before backward (legal for a Linear, whose output autograd does not save) makes backward
recompute ``x·W'ᵀ`` for ``∂m`` instead of failing: the output is kept through an alias with its own version counter
and a probe sharing the output's counter says whether it still holds the forward's values.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from peftkit.core import saved_input
from peftkit.core.adapter import check_first_order
from peftkit.core.lowrank import folded_weight, linear_into


def _scaled_direction(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, c: torch.Tensor | None, m: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', c): ``V = W + s·B·A`` (laid out like W), scaled in place to ``W' = diag(c)·V``; ``c = m/‖V‖_row`` when
    not given."""
    v = folded_weight(w, a, b, s)
    if c is None:
        if m is None:
            raise ValueError("_scaled_direction needs the magnitude m or the scale c")
        c = m / torch.linalg.vector_norm(v, dim=1)
    return v.mul_(c[:, None]), c


def _dora_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
    m: torch.Tensor, s: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, c): ``y = x·W'ᵀ + b0`` in x's shape (a fresh tensor, not a view: ``linear_into``) and ``c = m/n`` — the
    output of the fused path, with or without autograd."""
    w_eff, c = _scaled_direction(w, a, b, s, None, m)
    return linear_into(x, w_eff, bias), c


class _FusedDora(torch.autograd.Function):
    """``y = x·W'ᵀ + b0``, ``W' = diag(m/n)·(W + s·B·A)``, n detached; gradients in the module docstring."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, m, s):  # type: ignore[override]
        shape = x.shape
        y, c = _dora_linear(x, w, bias, a, b, m, s)
        h = torch.mm(x.reshape(-1, shape[-1]), a.t()) if ctx.needs_input_grad[4] else None
        need_x = ctx.needs_input_grad[3] or ctx.needs_input_grad[5]
        kind, extra, kept = saved_input.pack(x) if need_x else ("plain", None, ())
        y_kept = None
        if ctx.needs_input_grad[5]:
            # ∂m reads the output. Kept through an alias with its own version counter, so that code changing the
            # output in place before backward (allowed for a Linear's output, which autograd does not save) does
            # not void this node; the probe shares the output's counter and tells backward whether to recompute.
            y_kept = torch.empty(0, dtype=y.dtype, device=y.device).set_(
                y.untyped_storage(), y.storage_offset(), y.size(), y.stride())
            ctx.y_probe, ctx.y_version = y.detach(), y._version
        ctx.save_for_backward(w, bias, a, b, m, c, h, y_kept, *kept)
        ctx.kind, ctx.extra, ctx.s, ctx.shape = kind, extra, s, shape
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        check_first_order()
        w, bias, a, b, m, c, h, y, *kept = ctx.saved_tensors
        probe, ctx.y_probe = getattr(ctx, "y_probe", None), None  # released here, like the saved tensors
        s = ctx.s
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_bias = grad_a = grad_b = grad_m = None
        recompute = ctx.needs_input_grad[5] and (probe is None or probe._version != ctx.y_version)
        w_eff = _scaled_direction(w, a, b, s, c)[0] if ctx.needs_input_grad[0] or recompute else None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, w_eff).view(ctx.shape)
        g_sum = g2.sum(0) if ctx.needs_input_grad[2] or (ctx.needs_input_grad[5] and bias is not None) else None
        if ctx.needs_input_grad[2]:
            grad_bias = g_sum
        if ctx.needs_input_grad[3]:
            gh = torch.mm(g2, b * c[:, None])  # (g ⊙ c)·B without an N×d_out pass
            grad_a = saved_input.left_matmul(ctx.kind, ctx.extra, tuple(kept), gh).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(h.t(), g2).t().mul_((s * c)[:, None])
        if ctx.needs_input_grad[5]:
            if recompute:  # the output changed in place after forward (or a second backward): y − b0 = x·W'ᵀ
                gy_y = (g2 * F.linear(saved_input.unpack(ctx.kind, ctx.extra, tuple(kept)), w_eff)).sum(0)
            else:
                gy_y = (g2 * y.view(-1, y.shape[-1])).sum(0)
                gy_y = gy_y if bias is None else gy_y.sub_(g_sum * bias)
            grad_m = gy_y.div_(m)
        return grad_x, None, grad_bias, grad_a, grad_b, grad_m, None
