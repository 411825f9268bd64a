"""DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv 2402.09353).

    weight:   V = W0 + s·B·A,  n = ‖V‖ per output row (detached, paper §4.3),  W' = diag(m/n)·V
    forward:  y = x·W'ᵀ + b0 = base(x) + (m/n − 1)⊙(x·W0ᵀ) + (m/n)⊙ s·dropout(x)·Aᵀ·Bᵀ
    init:     m = ‖W0‖ per row (so m/n = 1), A kaiming_uniform(a=√5), B = 0 ⇒ y = base(x)
    merge:    W ← diag(m/n)·(W0 + s·B·A)   (ΔW = W' − W0, full rank in general)

Trainable: magnitude m ∈ R^{d_out}, A, B — r·(d_in + d_out) + d_out per layer.
Dropout (training only) applies to the low-rank branch; the magnitude term uses the undropped x·W0ᵀ, as in the
official NVlabs code (Hugging Face PEFT instead feeds the dropped x to that term when dropout > 0).
The norm needs V (d_out×d_in) every forward — inherent to the method.

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

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.core import precision, saved_input
from peftkit.core.adapter import Adapter, check_first_order, make_dropout
from peftkit.core.hf import HFTensor, lowrank_config_from_hf, lowrank_config_to_hf, lowrank_layout
from peftkit.core.host import Host
from peftkit.core.lowrank import (
    LowRankConfig,
    folded_weight,
    init_down_,
    linear_into,
    lowrank_delta,
    new_factors,
    pad_factors_,
)
from peftkit.core.peft_names import lora_names
from peftkit.core.registry import register


def _scaled_direction(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, c: torch.Tensor | None, m: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', c): ``V = W + s·B·A`` (laid out like W), scaled in place to ``W' = diag(c)·V``; ``c = m/‖V‖_row`` when
    not given."""
    v = folded_weight(w, a, b, s)
    if c is None:
        assert m is not None
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


@dataclass
class DoraConfig(LowRankConfig):
    """DoRA. ``init``: ``"kaiming"`` or ``"gaussian"`` for A (B starts at zero). Accepts Hugging Face PEFT
    ``LoraConfig``'s field names with ``use_dora=True`` (``peftkit.LoraConfig(use_dora=True, ...)`` builds this)."""

    init: Literal["kaiming", "gaussian"] = "kaiming"

    peft_type = "LORA"
    peft_names = lora_names(inits=("kaiming", "gaussian"), dora=True)


@register(
    "dora",
    config=DoraConfig,
    family="reparameterized",
    paper="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv 2402.09353)",
    description="LoRA direction update with a learned per-output-row magnitude (weight decomposition)",
    params="r·(d_in + d_out) + d_out",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "conv3d", "bnb_4bit", "bnb_8bit"),
    hf_peft_type="LORA",
)
class Dora(Adapter):
    additive = False  # reads the host output / weight (see Adapter.additive)
    def __init__(self, host: Host, config: DoraConfig) -> None:
        super().__init__(host, config)
        self.r, self.s = config.r, config.scaling
        self.lora_A, self.lora_B = new_factors(host, config.r)
        init_down_(self.lora_A, config.init, config.r)
        self.magnitude = nn.Parameter(host.weight_2d().detach().norm(dim=1).to(self.lora_A.dtype).clone())
        self.dropout = make_dropout(config.dropout)
        self._merge_norm: torch.Tensor | None = None
        self._m_checked: tuple[int, int] | None = None  # (storage, version) of m when _m_nonzero was read
        self._m_nonzero = True

    def _norm(self, w2d: torch.Tensor) -> torch.Tensor:
        return (w2d.to(self.lora_A.dtype) + self.s * (self.lora_B @ self.lora_A)).norm(dim=1).detach()

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole output through ``W' = diag(m/n)·(W + s·B·A)`` (see the module docstring), or None."""
        h = self.host
        if h.kind not in ("linear", "gpt2_conv1d") or (self.training and self.config.dropout > 0) or x.dim() < 2:
            return None
        w, a, b, m = h.weight_2d(), self.lora_A, self.lora_B, self.magnitude
        dt = precision.fused_dtype(x, w, folds=True)  # None in half precision (autocast included): W + s·B·A would
        if w.requires_grad or dt is None or any(t.dtype != dt for t in (x, a, b, m)):  # round the update away
            return None
        bias = h.bias
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad or m.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            if m.requires_grad and not self._magnitude_nonzero():
                return None  # ∂m divides by m
            return _FusedDora.apply(x, w, bias, a, b, m, self.s)
        with torch.no_grad():
            return _dora_linear(x, w, bias, a, b, m, self.s)[0]

    def _magnitude_nonzero(self) -> bool:
        """Whether no magnitude entry is zero (the fused ∂m divides by m). Reading the answer is a device sync, so it
        is read once per change of m — keyed on its storage and version counter, which every in-place write (an
        optimiser step, ``copy_``, a load) bumps — not once per forward: inference and repeated forwards between
        two optimiser steps read nothing."""
        m = self.magnitude
        key = (m.data_ptr(), m._version)
        if self._m_checked != key:
            self._m_nonzero = bool(m.detach().ne(0).all())
            self._m_checked = key
        return self._m_nonzero

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.host
        scale = self.magnitude / self._norm(h.weight_2d())
        lora = lowrank_delta(h, self.dropout(x), self.lora_A, self.lora_B, self.s)
        xw = h.without_bias(base_out).to(scale.dtype)
        return h.out_view(scale - 1) * xw + h.out_view(scale) * lora

    def _merged(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = weight.to(self.lora_A.dtype) + self.s * (self.lora_B @ self.lora_A)
        n = v.norm(dim=1)
        return ((self.magnitude / n)[:, None] * v).to(weight.dtype), n

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        merged, self._merge_norm = self._merged(weight)
        return merged, bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self._merge_norm if self._merge_norm is not None else self.magnitude
        v = weight.to(self.lora_A.dtype) * (n / self.magnitude)[:, None]
        return (v - self.s * (self.lora_B @ self.lora_A)).to(weight.dtype), bias

    def pad_rank(self, r: int, scaling: float | None = None) -> None:
        pad_factors_(self, self.lora_A, self.lora_B, r, scaling)  # V = W + s·B·A, m: unchanged

    def delta_weight(self) -> torch.Tensor:
        w = self.host.weight_2d().detach()
        return self._merged(w)[0] - w

    @classmethod
    def expected_params(cls, host: Host, config: DoraConfig) -> int:
        return config.r * (host.d_in + host.d_out) + host.d_out

    # Hugging Face PEFT: peft_type LORA with use_dora; the magnitude is saved as `lora_magnitude_vector`,
    # shaped (1, d_out, 1[, 1]) for convolutions
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> DoraConfig | None:
        return lowrank_config_from_hf(DoraConfig, hf_config) if hf_config.get("use_dora") else None

    @classmethod
    def to_hf_config(cls, config: DoraConfig, hosts: list[Host]) -> dict[str, Any]:
        return {**lowrank_config_to_hf(config, hosts), "use_dora": True}

    @classmethod
    def hf_layout(cls, host: Host, config: DoraConfig) -> dict[str, HFTensor]:
        hf_shape = (1, host.d_out, *(1,) * (host.weight.dim() - 2)) if host.is_conv else (host.d_out,)
        magnitude = HFTensor("lora_magnitude_vector", hf_shape, (host.d_out,))
        return {**lowrank_layout(host, config.r), "magnitude": magnitude}
