"""PaCA — Woo et al., ICLR 2025, "PaCA: Partial Connection Adaptation for Efficient Fine-Tuning" (arXiv 2503.01905;
official code github.com/WooSunghyeon/paca ``peft/src/peft/tuners/paca/layer.py``).

    forward:  y = x·Wᵀ + b0,  W = W0 with its columns idx replaced: W[:, idx] = s·P  (idx = randperm(d_in)[:r])
              = base(x) + x[..., idx]·(s·P − W0[:, idx])ᵀ,   P ∈ R^{d_out×r},  s = α/r (``rslora``: α/√r)
    init:     P = W0[:, idx] / s  ⇒  W = W0
    merge:    W[:, idx] ← s·P  (ΔW nonzero on r columns only: ΔW[:, idx] = s·P − W0[:, idx])

Trainable: P — r·d_out per layer. idx is a persistent buffer, drawn from a generator seeded with ``seed`` and a CRC32
of the module name (reproducible across processes); loading reads it from the file. The memory trick of the paper is
the backward: both custom autograd functions save only x[..., idx] (r of the d_in features) as activation, never x:
grad_P = s·gᵀ·x[..., idx] (tokens flattened) and grad_x = g·W (the base path gives g·W0, the adapter g·(s·P − W0[:,
idx]) scattered into the idx columns). ``fused_forward`` (sole active adapter on a frozen Linear / GPT-2 Conv1D)
does base GEMM + column correction in one function; the generic ``delta`` serves mixed batches and stacked adapters.
Resolved: the adapter replaces columns of whatever weight the host holds (so with another adapter merged first, PaCA
still sets W[:, idx] = s·P); merge keeps the overwritten columns to restore them on unmerge. Init output equals the
base bit-exactly when s is a power of two (the default α = 16, r = 8 gives s = 2); otherwise s·(W0/s) may differ from
W0 by one rounding. No dropout: PaCA has no separate adapter branch to drop (``dropout > 0`` is rejected).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core import precision
from peftkit.core.adapter import Adapter, check_first_order
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, linear_into
from peftkit.core.registry import register


@dataclass
class PacaConfig(LowRankConfig):
    """PaCA. ``r``: number of trained input columns per layer; s = ``alpha``/r; ``seed``: column selection seed
    (combined with the module name)."""

    alpha: float = 16.0
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.dropout != 0.0:
            raise PeftkitError(
                f"PacaConfig.dropout must be 0 (PaCA has no separate adapter branch), got {self.dropout}"
            )


def column_seed(seed: int, module_name: str) -> int:
    """A process-independent seed for one module's column draw."""
    return (seed * 1_000_003 + zlib.crc32(module_name.encode("utf-8"))) % (2**63)


class _PacaColumns(torch.autograd.Function):
    """delta = x[..., idx]·(s·P − W0[:, idx])ᵀ, saving x[..., idx] (not x) for the backward (operands in P's dtype,
    autocast off)."""

    @staticmethod
    @precision.kernel
    def forward(ctx, x, p, w0, idx, s):  # type: ignore[override]
        x_idx = x.index_select(-1, idx)
        d = p * s - w0.index_select(1, idx)
        ctx.save_for_backward(x_idx, p, w0, idx)
        ctx.s = s
        ctx.x_shape = x.shape
        return x_idx.matmul(d.t())

    @staticmethod
    @precision.kernel
    def backward(ctx, g):  # type: ignore[override]
        x_idx, p, w0, idx = ctx.saved_tensors
        s = ctx.s
        grad_x = grad_p = grad_w0 = None
        g2 = g.reshape(-1, g.shape[-1])
        gxi = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gxi = torch.mm(g2.t(), x_idx.reshape(-1, x_idx.shape[-1]))  # (d_out, r)
        if ctx.needs_input_grad[0]:
            d = p * s - w0.index_select(1, idx)
            grad_x = g.new_zeros(ctx.x_shape).index_add_(-1, idx, g.matmul(d))
        if ctx.needs_input_grad[1]:
            grad_p = gxi * s
        if ctx.needs_input_grad[2]:
            grad_w0 = torch.zeros_like(w0).index_add_(1, idx, -gxi)
        return grad_x, grad_p, grad_w0, None, None


class _PacaLinear(torch.autograd.Function):
    """y = x·W0ᵀ + b + x[..., idx]·(s·P − W0[:, idx])ᵀ for a frozen W0, saving x[..., idx] (not x); operands in
    one dtype (:func:`~peftkit.core.precision.fused_dtype`: no fold, so half precision too), autocast off."""

    @staticmethod
    @precision.kernel
    def forward(ctx, x, w0, bias, p, idx, s):  # type: ignore[override]
        x_idx = x.index_select(-1, idx)
        y = linear_into(x, w0, bias)  # not a view: the output may be changed in place, as a Linear's
        y += x_idx.matmul((p * s - w0.index_select(1, idx)).t())
        ctx.save_for_backward(x_idx, w0, p, idx)
        ctx.s = s
        return y

    @staticmethod
    @precision.kernel
    def backward(ctx, g):  # type: ignore[override]
        check_first_order()
        x_idx, w0, p, idx = ctx.saved_tensors
        grad_x = grad_bias = grad_p = None
        if ctx.needs_input_grad[0]:  # g·W: g·W0 with the idx columns' share replaced
            grad_x = g.matmul(w0).index_add_(-1, idx, g.matmul(p * ctx.s - w0.index_select(1, idx)))
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            grad_p = torch.mm(g2.t(), x_idx.reshape(-1, x_idx.shape[-1])).mul_(ctx.s)
        return grad_x, None, grad_bias, grad_p, None, None


@register(
    "paca",
    config=PacaConfig,
    family="selective",
    paper="Woo et al., ICLR 2025, PaCA: Partial Connection Adaptation for Efficient Fine-Tuning (arXiv 2503.01905)",
    description="trains r randomly chosen input columns of W in place (W[:, idx] = s·P); the backward saves "
    "only those r input features",
    params="r·d_out",
    hosts=("linear", "gpt2_conv1d", "bnb_4bit", "bnb_8bit"),
)
class Paca(Adapter):
    additive = False  # reads the host output / weight (see Adapter.additive)
    @classmethod
    def rank_limits(cls, host: Host, config: PacaConfig) -> dict[str, int]:
        return {"r": host.d_in}  # r counts trained input columns, not a rank

    def __init__(self, host: Host, config: PacaConfig) -> None:
        super().__init__(host, config)
        self.r, self.s = config.r, config.scaling
        g = torch.Generator(device="cpu").manual_seed(column_seed(config.seed, host.name))  # same on any device
        w = host.weight_2d().detach()
        idx = torch.randperm(host.d_in, generator=g)[: config.r].to(w.device)
        self.register_buffer("idx", idx)
        dt = w.dtype if w.is_floating_point() else torch.float32
        self.paca_P = nn.Parameter((w.index_select(1, idx).to(dt) / self.s).clone())
        self._replaced: torch.Tensor | None = None  # the columns a merge overwrote

    def check_loaded(self) -> None:
        idx = self.idx
        if (idx.dtype != torch.long or idx.numel() != self.r or len(torch.unique(idx)) != self.r
                or int(idx.min()) < 0 or int(idx.max()) >= self.host.d_in):
            raise PeftkitError(
                f"module {self.host.name!r}: the saved PaCA column indices are not {self.r} distinct integers in "
                f"[0, {self.host.d_in})"
            )

    def columns(self) -> torch.Tensor:
        """s·P: the trained columns W[:, idx]."""
        return self.paca_P * self.s

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        p = self.paca_P
        xd = x if x.dtype == p.dtype else x.to(p.dtype)
        return _PacaColumns.apply(xd, p, self.host.weight_2d().to(p.dtype), self.idx, self.s)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        w = self.host.weight_2d()
        dt = None if w.requires_grad else precision.fused_dtype(x, w)
        if dt is None:
            return None
        x, w, bias, p = precision.cast(dt, x, w, self.host.bias, self.paca_P)
        return _PacaLinear.apply(x, w, bias, p, self.idx, self.s)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._replaced = weight.index_select(1, self.idx).clone()
        return weight.index_copy(1, self.idx, self.columns().detach().to(weight.dtype)), bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._replaced is None:
            raise PeftkitError(f"module {self.host.name!r}: PaCA was not merged here, nothing to unmerge")
        w = weight.index_copy(1, self.idx, self._replaced.to(weight.dtype))
        self._replaced = None
        return w, bias

    def delta_weight(self) -> torch.Tensor:
        """ΔW relative to the host's current weight W: s·P − W[:, idx] on the idx columns, zero elsewhere."""
        w = self.host.weight_2d().detach()
        d = self.columns().detach().to(w.dtype) - w.index_select(1, self.idx)
        return torch.zeros_like(w).index_copy(1, self.idx, d)

    @classmethod
    def expected_params(cls, host: Host, config: PacaConfig) -> int:
        return config.r * host.d_out
