"""LSQ fake quantisation with a learned step and offset per group (Esser et al. 2020, "Learned Step Size
Quantization"; offset as in LSQ+, Bhalgat et al. 2020), in the form L4Q uses.

For a (d_out, d_in) weight ``W`` with per-group step ``Δ`` and offset ``β`` ((d_out, G), groups of
``group_size`` consecutive input columns as in :mod:`peftkit.quant.rtn`):

    V = (W − β)/Δ,   W_q = round(clamp(V, Qn, Qp))·Δ + β,   Qn = 0, Qp = 2^b − 1

Backward (straight-through inside the clip range; ``G = ∂L/∂W_q``, ``M = [Qn ≤ V ≤ Qp]``):

    ∂L/∂W = M ⊙ G
    ∂L/∂Δ = g · Σ_group (M ? round(V) − V : clamp(V, Qn, Qp)) ⊙ G
    ∂L/∂β = g · Σ_group (¬M) ⊙ G,          g = 1/√(N·Qp)

with N the number of weights that share a step (the group length) — LSQ's gradient scale with N read per step;
the L4Q sources pass g in from outside, so this reading of N is unconfirmed. The forward uses exactly the
expressions of :func:`peftkit.quant.rtn.codes_float` and :func:`peftkit.quant.rtn.dequantize`, so
``dequantize(export(W, Δ, β))`` equals the fake-quantised weight bit for bit.
"""

from __future__ import annotations

import math

import torch

from . import rtn


def grad_scale(d_in: int, group_size: int, bits: int) -> float:
    """LSQ's ``g = 1/√(N·Qp)`` with N = weights per step."""
    return 1.0 / math.sqrt(rtn.group_len(d_in, group_size) * rtn.qmax(bits))


def forward(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The fake-quantised weight ``round(clamp((W − β)/Δ))·Δ + β`` (no autograd graph of its own)."""
    st, of = step.unsqueeze(-1), offset.unsqueeze(-1)
    q = ((rtn.grouped(w, group_size) - of) / st).clamp(0, rtn.qmax(bits)).round()
    return rtn.ungrouped(q * st + of, w.shape[1])


def backward(
    w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, grad: torch.Tensor, bits: int, group_size: int,
    g: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∂L/∂W, ∂L/∂Δ, ∂L/∂β)`` from ``grad = ∂L/∂W_q`` (formulas in the module docstring)."""
    d_in, qp = w.shape[1], rtn.qmax(bits)
    v = (rtn.grouped(w, group_size) - offset.unsqueeze(-1)) / step.unsqueeze(-1)
    gg = rtn.grouped(grad, group_size, fill="zero")  # padding columns carry no gradient
    inside = (v >= 0) & (v <= qp)
    vc = v.clamp(0, qp)
    grad_w = rtn.ungrouped(torch.where(inside, gg, 0.0), d_in)
    grad_step = (torch.where(inside, vc.round() - v, vc) * gg).sum(-1).mul_(g)
    grad_offset = torch.where(inside, 0.0, gg).sum(-1).mul_(g)
    return grad_w, grad_step, grad_offset


class LSQFakeQuant(torch.autograd.Function):
    """``W_q = fq(W; Δ, β)`` with the LSQ backward; saves W, Δ, β (not W_q)."""

    @staticmethod
    def forward(ctx, w, step, offset, bits, group_size, g):  # type: ignore[override]
        ctx.save_for_backward(w, step, offset)
        ctx.cfg = (bits, group_size, g)
        return forward(w, step, offset, bits, group_size)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w, step, offset = ctx.saved_tensors
        gw, gs, go = backward(w, step, offset, grad, *ctx.cfg)
        return gw, gs, go, None, None, None


def fake_quantize(
    w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int, g: float | None = None
) -> torch.Tensor:
    """Differentiable LSQ fake quantisation of a (d_out, d_in) weight (``g`` defaults to :func:`grad_scale`)."""
    rtn.check_bits(bits, "lsq")
    rtn.check_group_size(group_size, "lsq")
    if g is None:
        g = grad_scale(w.shape[1], group_size, bits)
    return LSQFakeQuant.apply(w, step, offset, bits, group_size, g)


@torch.no_grad()
def export(
    w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int
) -> rtn.QuantizedWeight:
    """The integer codes ``round(clamp((W − β)/Δ))`` and the (Δ, β) that dequantise to the fake-quantised ``W``."""
    codes = rtn.codes_float(w, step, offset, bits, group_size).to(torch.uint8)
    return rtn.QuantizedWeight(codes, step.detach().clone(), offset.detach().clone(), bits, group_size)
