"""L4Q — Jeon, Kim, Kim, ACL 2025, "L4Q: Parameter Efficient Quantization-Aware Training on Large Language Models via
LoRA-wise LSQ" (arXiv 2402.04902). No confirmed official repository; the backward follows the authors'-style code
found in the public index (``LSQP_WQuantizer``) and shared/methods/weight-space.md §17.

    forward:  W_c = W0 + s·B·A,  V = (W_c − β)/Δ,  W_q = round(clamp(V, 0, 2^b − 1))·Δ + β,  y = x·W_qᵀ + b0
              Δ, β ∈ R^{d_out×⌈d_in/gs⌉}: a learned step and offset per group of gs consecutive input columns
    init:     A ~ kaiming_uniform(a=√5), B = 0 (⇒ W_c = W0); Δ = (max − min)/(2^b − 1), β = min per group
              ⇒ at init W_q is exactly the asymmetric RTN of W0 (:func:`peftkit.quant.rtn.rtn`)
    merge:    W ← W_q (the quantised weight itself);  :func:`export` gives its integer codes + (Δ, β)

Trainable: A, B, Δ, β — r·(d_in + d_out) + 2·d_out·⌈d_in/gs⌉ per layer; W0, b0 frozen. Backward (custom, LSQ with a
straight-through round inside the clip range, M = [0 ≤ V ≤ Qp], G = gradᵀ_y·x): ∂A = s·Bᵀ(M⊙G), ∂B = s·(M⊙G)Aᵀ,
∂Δ = g·Σ_group (M ? round(V) − V : clamp(V)) ⊙ G, ∂β = g·Σ_group ¬M ⊙ G, ∂x = grad_y·W_q, g = 1/√(gs·Qp)
(:mod:`peftkit.quant.lsq`). On a Linear / GPT-2 Conv1D host with L4Q the only active adapter, forward and backward
run in one autograd function that saves x, W0, A, B, Δ, β only — W_c, W_q and G are re-formed in the backward
and dropped (the paper's memory claim); elsewhere (conv hosts, mixed batches, stacked adapters) the layer is
``base + x·(W_q − W0)ᵀ`` through the same LSQ function.
Unconfirmed: the LSQ gradient scale's N (here the group length; the source passes g in), the min/max init (the
source's docstring also cites LSQ's 2⟨|w|⟩/√Qp), and a warm-up that trains LoRA on a fixed Q(W0) first (a
third-party note; not implemented — the method trains quantize(W0 + s·BA) from step 0). No dropout: the update is
part of a weight, not an activation branch (``dropout > 0`` is rejected).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from peftkit.core import precision
from peftkit.core.adapter import Adapter
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, init_down_, linear_into, new_factors
from peftkit.core.model import adapted_layers, adapter_names
from peftkit.core.registry import register
from peftkit.core.replace import ReplacedWeight
from peftkit.quant import lsq, rtn


@dataclass
class L4qConfig(LowRankConfig):
    """L4Q. ``r``/``alpha``/``rslora``: the LoRA update s·B·A; ``bits``: code width (1..8); ``group_size``: input
    columns per (Δ, β) group; ``init``: A's init, ``"kaiming"`` or ``"gaussian"``."""

    bits: int = 4
    group_size: int = 128
    init: Literal["kaiming", "gaussian"] = "kaiming"

    def validate(self) -> None:
        super().validate()
        rtn.check_bits(self.bits, "L4qConfig")
        rtn.check_group_size(self.group_size, "L4qConfig")
        if self.dropout != 0.0:
            raise PeftkitError(f"L4qConfig.dropout must be 0 (the LoRA update is part of the quantised weight, "
                               f"not an activation branch), got {self.dropout}")


def _combined(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """W_c = W0 + s·B·A in float32 (float64 stays float64): the one expression every path uses, so that they agree
    bit for bit."""
    dt = torch.promote_types(w0.dtype, torch.float32)
    return torch.addmm(w0.to(dt), b.to(dt), a.to(dt), alpha=s)


class _L4QLinear(torch.autograd.Function):
    """y = x·fq(W0 + s·B·A; Δ, β)ᵀ + b, saving x, W0, A, B, Δ, β (no d_out×d_in tensor of its own)."""

    @staticmethod
    def forward(ctx, x, w0, bias, a, b, step, offset, s, bits, group_size, g):  # type: ignore[override]
        w_q = lsq.forward(_combined(w0, a, b, s), step, offset, bits, group_size)
        ctx.save_for_backward(x, w0, a, b, step, offset)
        ctx.cfg = (s, bits, group_size, g, bias is not None)
        return linear_into(x, w_q, bias)  # not a view: the output may be changed in place, as a Linear's

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, w0, a, b, step, offset = ctx.saved_tensors
        s, bits, group_size, g, has_bias = ctx.cfg
        w_c = _combined(w0, a, b, s)
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_bias = grad_a = grad_b = grad_step = grad_offset = None
        if ctx.needs_input_grad[0]:
            grad_x = gy.matmul(lsq.forward(w_c, step, offset, bits, group_size).to(gy.dtype))
        if has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if any(ctx.needs_input_grad[3:7]):
            gw = torch.mm(g2.t(), x.reshape(-1, x.shape[-1])).to(w_c.dtype)  # G, transient
            grad_wc, grad_step, grad_offset = lsq.backward(w_c, step, offset, gw, bits, group_size, g)
            del gw
            grad_a = torch.mm(b.to(w_c.dtype).t(), grad_wc).mul_(s).to(a.dtype)
            grad_b = torch.mm(grad_wc, a.to(w_c.dtype).t()).mul_(s).to(b.dtype)
        return grad_x, None, grad_bias, grad_a, grad_b, grad_step, grad_offset, None, None, None, None


@register(
    "l4q",
    config=L4qConfig,
    family="quantization",
    paper="Jeon, Kim, Kim, ACL 2025, L4Q: Parameter Efficient Quantization-Aware Training on Large Language Models "
    "via LoRA-wise LSQ (arXiv 2402.04902)",
    description="quantisation-aware LoRA: LSQ fake quantisation of W0 + s·BA with a learned step and offset per "
    "group; exports integer codes + per-group scales",
    params="r·(d_in + d_out) + 2·d_out·⌈d_in/group_size⌉",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d"),
    init_is_identity=False,
    lr_scale=0.1,  # trained values sit next to learned quantiser steps: 2e-3 collapsed
)
class L4q(ReplacedWeight, Adapter):
    def __init__(self, host: Host, config: L4qConfig) -> None:
        super().__init__(host, config)
        self.r, self.s = config.r, config.scaling
        self.bits, self.group_size = config.bits, config.group_size
        self.g = lsq.grad_scale(host.d_in, config.group_size, config.bits)
        self.lora_A, self.lora_B = new_factors(host, config.r)
        init_down_(self.lora_A, config.init, config.r)
        step, offset = rtn.minmax_params(host.weight_2d().detach(), config.bits, config.group_size)
        self.l4q_step = nn.Parameter(step)
        self.l4q_offset = nn.Parameter(offset)

    def check_loaded(self) -> None:
        step = self.l4q_step.detach()  # a negative step is still a grid (β + k·Δ, k = 0..Qp); zero is not
        if not (torch.isfinite(step).all() and (step != 0).all() and torch.isfinite(self.l4q_offset).all()):
            raise PeftkitError(f"module {self.host.name!r}: the saved L4Q steps must be finite and nonzero and the "
                               "offsets finite")

    def combined_weight(self, host_weight: torch.Tensor | None = None) -> torch.Tensor:
        """W_c = W0 + s·B·A (float32), W0 = ``host_weight`` or the host's weight."""
        w0 = self.host.weight_2d() if host_weight is None else host_weight
        return _combined(w0, self.lora_A, self.lora_B, self.s)

    def new_weight(self, host_weight: torch.Tensor | None = None) -> torch.Tensor:
        """W_q, the fake-quantised W_c (float32, differentiable in A, B, Δ, β)."""
        with precision.autocast_off(self.lora_A):  # the grid is chosen in float32, also under autocast
            return lsq.fake_quantize(self.combined_weight(host_weight), self.l4q_step, self.l4q_offset, self.bits,
                                     self.group_size, self.g)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.host.kind not in ("linear", "gpt2_conv1d"):
            return super().fused_forward(x)
        w0, bias = self.host.weight_2d(), self.host.bias
        # the fake-quantised W0 + s·B·A is built in float32: in half precision (autocast included) the generic path
        if w0.requires_grad or precision.fused_dtype(x, w0, folds=True) != torch.float32:
            return None
        return _L4QLinear.apply(x, w0, bias, self.lora_A, self.lora_B, self.l4q_step, self.l4q_offset, self.s,
                                self.bits, self.group_size, self.g)

    @torch.no_grad()
    def export(self) -> rtn.QuantizedWeight:
        """The layer as integer codes + per-group (Δ, β): ``export().dequantize()`` is W_q bit for bit."""
        return lsq.export(self.combined_weight(), self.l4q_step, self.l4q_offset, self.bits, self.group_size)

    @classmethod
    def expected_params(cls, host: Host, config: L4qConfig) -> int:
        return config.r * (host.d_in + host.d_out) + 2 * host.d_out * rtn.num_groups(host.d_in, config.group_size)


def export(model: nn.Module, name: str | None = None) -> dict[str, rtn.QuantizedWeight]:
    """Every L4Q layer of adapter ``name`` (default: the only adapter) as integer codes + per-group (Δ, β), keyed by
    module path: the fully quantised model L4Q trains (with the host biases, it reproduces each layer's forward)."""
    names = adapter_names(model)
    if name is None:
        if len(names) != 1:
            raise PeftkitError(f"l4q.export: several adapters loaded ({names}); say which one with name=")
        name = names[0]
    out = {}
    for path, layer in adapted_layers(model):
        ad = layer.adapters[name] if name in layer.adapters else None
        if isinstance(ad, L4q):
            if name in layer.merged:
                raise PeftkitError(f"l4q.export: adapter {name!r} is merged into {path!r}; unmerge before exporting")
            out[path] = ad.export()
    if not out:
        raise PeftkitError(f"l4q.export: adapter {name!r} has no L4Q layers")
    return out
