"""What the low-rank family shares: the config fields r/α/rsLoRA, the scaling rule, factor init, and the fused
activation-path kernel ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` with a hand-written backward.

The fused function keeps the input once (plus the r-wide ``h = x·Aᵀ`` when B trains) — or nothing new at all when
the input's producer already holds what rebuilds it (:mod:`.saved_input`) — and adds no activation-sized pass the
base layer does not make: with many rows (N ≥ the product's inner width, float32/64) the update is folded into a
transient ``W_eff = W + s·B·A`` (one layer's d_out×d_in at a time, for the input gradient, and for the output when
``h`` is not needed, as in inference); otherwise the r-wide GEMM writes the output (bias folded in) or the input
gradient first and the base GEMM accumulates into it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import precision, saved_input
from .adapter import check_first_order, drops
from .config import AdapterConfig
from .errors import PeftkitError
from .host import Host


def lowrank_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """LoRA's ``s = α/r``; rsLoRA's ``s = α/√r``."""
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclass
class LowRankConfig(AdapterConfig):
    """``r``: rank; ``alpha``: scale numerator; ``rslora``: use α/√r instead of α/r."""

    r: int = 8
    alpha: float = 8.0
    rslora: bool = False

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise PeftkitError(f"{type(self).__name__}.r (rank) must be a positive integer, got {self.r}")

    @property
    def scaling(self) -> float:
        return lowrank_scaling(self.alpha, self.r, self.rslora)


def check_rank(host: Host, r: int, limit: int | None = None) -> None:
    limit = min(host.d_in, host.d_out) if limit is None else limit
    if r > limit:
        raise PeftkitError(f"module {host.name!r}: rank {r} exceeds min(d_out, d_in) = {limit} ({host!r})")


def init_down_(a: torch.Tensor, how: str, r: int) -> None:
    """Init a (r, d_in) down-projection: ``kaiming`` = kaiming_uniform(a=√5) = U(±1/√d_in);
    ``gaussian`` = N(0, 1/r²)."""
    with torch.no_grad():
        if how == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))


def new_factors(host: Host, r: int, dtype: torch.dtype | None = None) -> tuple[nn.Parameter, nn.Parameter]:
    """Empty ``A ∈ R^{r×d_in}`` and zero ``B ∈ R^{d_out×r}`` on the host's device; on a grouped convolution (G
    groups) B is grouped, ``R^{d_out×r/G}`` (:meth:`Host.dense_up`), so r must be a multiple of G; on a stack of E
    experts A is (E·r, d_in) and B (d_out/E, E·r) (:meth:`Host.lowrank_weight`)."""
    w = host.weight
    if r % host.groups:
        raise PeftkitError(f"module {host.name!r} is a grouped convolution (groups={host.groups}): the rank must be "
                           f"a multiple of the groups, got r={r}")
    dt = dtype or host.param_dtype
    e = host.experts  # a 3-D expert stack: a pair per expert, stacked as Hugging Face PEFT stacks them
    a = nn.Parameter(torch.empty(e * r, host.d_in, device=w.device, dtype=dt))
    b = nn.Parameter(torch.zeros(host.d_out // e, e * r // host.groups, device=w.device, dtype=dt))
    return a, b


@torch.no_grad()
def pad_factors_(owner: nn.Module, a: nn.Parameter, b: nn.Parameter, r: int, scaling: float | None = None) -> None:
    """``A`` (r₀, d_in) and ``B`` (d_out, r₀) of ``owner`` (scale ``owner.s``) zero-padded to rank ``r`` in place
    (``.data`` replaced: the same Parameter objects), and with ``scaling`` B multiplied by ``owner.s / scaling`` and
    ``owner.s`` set to it — ``s·B·A`` unchanged either way. ``owner.r`` follows."""
    r0 = a.shape[0]
    if owner.host.experts > 1 and r != r0:
        raise PeftkitError(f"{type(owner).__name__} on {owner.host.name!r}: cannot pad the rank of an update on a "
                           f"stack of experts")
    if owner.host.groups > 1 and r != r0:
        raise PeftkitError(f"{type(owner).__name__} on {owner.host.name!r}: cannot pad the rank of an update on a "
                           f"grouped convolution (its up-projection is grouped)")
    if r < r0:
        raise PeftkitError(f"{type(owner).__name__} on {owner.host.name!r}: cannot pad rank {r0} down to {r}")
    if r > r0:
        a.data = torch.cat([a.data, a.data.new_zeros(r - r0, a.shape[1])])
        b.data = torch.cat([b.data, b.data.new_zeros(b.shape[0], r - r0)], 1)
    if scaling is not None and scaling != owner.s:
        b.data.mul_(owner.s / scaling)
        owner.s = scaling
    owner.r = r


def lowrank_delta(host: Host, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``s · (x·Aᵀ)·Bᵀ`` through the host's activation path (x cast to the factor dtype, result cast back)."""
    xd = x if (not x.is_floating_point() or x.dtype == a.dtype) else x.to(a.dtype)
    out = host.project_out(host.project_in(xd, a), b)
    return out * s if s != 1.0 else out


def fold_pays(n: int, k: int, w: torch.Tensor | torch.dtype) -> bool:
    """Whether an N-row product through ``W + s·B·A`` with inner width ``k`` folds the update into the weight:
    building the d_out×d_in ``W_eff`` costs about d_out·d_in, the r-wide pass it replaces writes the N × (d_out·d_in
    / k) result — so fold when N ≥ k. float32/64 only (``w``: the weight, or the dtype the product runs in): in
    half precision ``W + s·B·A`` would round the update away."""
    return n >= k and (w if isinstance(w, torch.dtype) else w.dtype) in precision.WIDE


def folded_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``W + s·B·A`` — one r-inner GEMM into a fresh d_out×d_in tensor laid out like ``W`` (a GPT-2 Conv1D weight's
    transposed view stays transposed, so a product through it runs the base layer's GEMM and a zero B reproduces
    the base output bit for bit). Transient: one layer at a time."""
    return torch.addmm(w, b, a, alpha=s, out=torch.empty_like(w))


def linear_into(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for an N-D ``x``, computed into a fresh N-D tensor. F.linear on N-D input returns a
    view of its 2-D result, and autograd forbids changing in place a view made inside a custom autograd function —
    so a fused path returning that view would fail where the plain layer's output may be changed in place (a
    model's ``y.mul_(…)``). Same kernel as F.linear (bias copied in, then one GEMM)."""
    out = x.new_empty(*x.shape[:-1], w.shape[0])
    out2, x2 = out.view(-1, w.shape[0]), x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(x2, w.t(), out=out2)
    else:
        torch.addmm(bias, x2, w.t(), out=out2)
    return out


def _lowrank_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, s: float,
    need_h: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, h) for an N-D ``x`` (features last): ``y = x·Wᵀ + b + s·h·Bᵀ`` in x's shape (a fresh tensor, not a view —
    see :func:`linear_into`) and ``h = x·Aᵀ`` over the rows (None when not ``need_h`` and the path does not make it).

    * no ``h`` needed (inference, or B frozen), N ≥ d_in, float32/64: ``y = x·W_effᵀ + b`` with
      ``W_eff = W + s·B·A`` — the base GEMM alone touches the activations; the update costs a d_out×d_in build
      instead of an r-wide pass over the input and one over the output.
    * otherwise (training B, where the forward fold measured 2 % slower a step on BERT and on a bias-free Llama;
      few rows, as in token-by-token generation; half precision): the r-wide GEMM writes the output first — with
      the bias folded in as ``[h, 1]·[s·B, b]ᵀ`` — and the base GEMM accumulates into it (β = 1), so the output is
      written once, as by the base layer alone (which copies the bias in, then accumulates).

    Either way B = 0 gives the base layer's output bit for bit."""
    x2 = x.reshape(-1, x.shape[-1])
    if not need_h and fold_pays(x2.shape[0], w.shape[1], w):
        return linear_into(x, folded_weight(w, a, b, s), bias), None
    h = torch.mm(x2, a.t())
    y = x.new_empty(*x.shape[:-1], w.shape[0])
    y2 = y.view(-1, w.shape[0])
    if bias is None:
        torch.mm(h, (b * s).t(), out=y2)
    else:
        torch.mm(torch.cat([h, h.new_ones(h.shape[0], 1)], 1), torch.cat([b * s, bias[:, None]], 1).t(), out=y2)
    y2.addmm_(x2, w.t())
    return y, h


class _FusedLowRankLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ for a frozen (d_out, d_in) ``W``. The input is kept through
    :mod:`~peftkit.core.saved_input` (no copy of x when its producer — LayerNorm, GELU, SiLU, a gated product, a
    Llama RMSNorm — already holds what rebuilds it); ``h = x·Aᵀ`` is kept only when B trains.

    Backward, with ``G = g·B``: ∂x = g·W + s·G·A (for N ≥ d_out in float32/64 as one GEMM ``g·W_eff``, rebuilding
    ``W_eff``; else the r-wide GEMM writes ∂x and the base GEMM accumulates), ∂A = s·Gᵀ·x, ∂B = s·gᵀ·h (computed
    as (hᵀ·g)ᵀ, the fast layout for a skinny GEMM), ∂bias = Σ_rows g. All operands but ``W`` arrive in one dtype
    (:func:`~.precision.fused_dtype`); ``W`` arrives as stored and is cast to it inside, in forward and again in
    backward, so what is kept is the parameter itself, not a half-precision copy of it (under autocast with a
    float32 base, 2 bytes × d_out × d_in per adapted layer held from forward to backward, for a d_out×d_in cast
    per layer per backward — a cast, not a GEMM, against the N-row GEMMs around it). Autocast is off inside
    (:func:`~.precision.kernel`)."""

    @staticmethod
    @precision.kernel
    def forward(ctx, x, w, bias, a, b, s):  # type: ignore[override]
        y, h = _lowrank_linear(x, w.to(x.dtype), bias, a, b, s, need_h=ctx.needs_input_grad[4])
        kind, extra, kept = saved_input.pack(x) if ctx.needs_input_grad[3] else ("plain", None, ())
        ctx.save_for_backward(w, a, b, h, *kept)  # w as stored: a float32 weight under autocast is cast again
        ctx.kind, ctx.extra = kind, extra
        ctx.s = s
        ctx.shape = x.shape
        return y

    @staticmethod
    @precision.kernel
    def backward(ctx, gy):  # type: ignore[override]
        check_first_order()
        w, a, b, h, *kept = ctx.saved_tensors
        w = w.to(a.dtype)
        s = ctx.s
        g2 = gy.reshape(-1, gy.shape[-1])
        fold = fold_pays(g2.shape[0], w.shape[0], w)
        gh = torch.mm(g2, b) if ctx.needs_input_grad[3] or not fold else None  # (N, r), unscaled
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            if fold:
                grad_x = torch.mm(g2, folded_weight(w, a, b, s))
            else:
                grad_x = torch.mm(gh * s, a)
                grad_x.addmm_(g2, w)  # the base GEMM accumulates into the r-wide one's output (one write)
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            grad_a = saved_input.left_matmul(ctx.kind, ctx.extra, tuple(kept), gh).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(h.t(), g2).t().mul_(s)
        return grad_x, None, grad_bias, grad_a, grad_b, None


def fused_lowrank_forward(
    host: Host, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float
) -> torch.Tensor | None:
    """The fused path when it applies (Linear/GPT-2 Conv1D host, frozen weight), else None. It runs in the host's
    compute dtype (:func:`~.precision.fused_dtype`: the autocast dtype under autocast, else the weight's), the
    factors cast to it (float32 factors of a half-precision base get float32 gradients); in half precision the
    r-wide path keeps the update off the weight (no fold)."""
    if host.kind not in ("linear", "gpt2_conv1d"):
        return None
    w = host.weight
    if w.requires_grad or x.dim() < 2:
        return None
    dt = precision.fused_dtype(x, w)
    if dt is None:
        return None
    x, bias, a, b = precision.cast(dt, x, host.bias, a, b)
    w2 = host.weight_2d()
    if not torch.is_grad_enabled() or not (x.requires_grad or a.requires_grad or b.requires_grad):
        with precision.autocast_off(x):
            return _lowrank_linear(x, w2.to(dt), bias, a, b, s, need_h=False)[0]
    return _FusedLowRankLinear.apply(x, w2, bias, a, b, s)


class LowRankUpdate:
    """Mixin for adapters whose update is ``s·B·A``: define ``factors() -> (A, B)``, ``self.s`` and
    ``self.dropout``; this supplies the activation path, the fused path and ΔW. An adapter whose up-projection
    has a bias ``c`` (update ``s·(B·A·x + c)``) returns it from :meth:`out_bias`: merge adds ``s·c`` to the host's
    bias (and refuses on a host without one)."""

    def out_bias(self) -> torch.Tensor | None:
        """The up-projection's bias ``c`` (d_out), or None."""
        return None

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        k = self.undropped_rank() if self.training and self.config.dropout > 0 else 0
        if not k:
            out = lowrank_delta(self.host, self.dropout(x), a, b, self.s)
        else:
            out = (lowrank_delta(self.host, self.dropout(x), a[:-k], b[:, :-k], self.s)
                   + lowrank_delta(self.host, x, a[-k:], b[:, -k:], self.s))
        c = self.out_bias()
        return out if c is None else out + self.host.out_view(c * self.s).to(out.dtype)

    def undropped_rank(self) -> int:
        """Trailing rank of ``factors()`` that the input dropout does not reach: a frozen part of the update that
        stands for a rewritten base weight (PiSSA's −B0·A0, the residual W_res = W0 − s·B0·A0 seeing x itself)."""
        return 0

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if drops(self, self.host) or self.out_bias() is not None:
            return None
        a, b = self.factors()
        return fused_lowrank_forward(self.host, x, a, b, self.s)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.s * self.host.lowrank_weight(a, b)

    def _moved_bias(self, bias: torch.Tensor | None, sign: int) -> torch.Tensor | None:
        c = self.out_bias()
        if c is None:
            return bias
        if bias is None:
            raise PeftkitError(f"{type(self).__name__} on {self.host.name!r}: the update's bias (on B) cannot be "
                               f"merged into a layer without a bias; keep the adapter unmerged")
        return bias + sign * self.s * c.detach().to(bias.dtype)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight + self.delta_weight().to(weight.dtype), self._moved_bias(bias, 1)

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight - self.delta_weight().to(weight.dtype), self._moved_bias(bias, -1)

    @classmethod
    def batched_delta(
        cls, adapters: Sequence[LowRankUpdate], x: torch.Tensor, index: torch.Tensor, out: torch.Tensor,
        inplace: bool = False,
    ) -> torch.Tensor | None:
        """Many low-rank adapters in one mixed batch (Punica's BGMV as gather + batched matmul): the factors are
        stacked with ranks zero-padded to r_max, A_allᵀ (N+1, d_in, r_max) and (s·B_all)ᵀ (N+1, r_max, d_out)
        (slot N is all zeros, for samples with ``index == -1``); sample i gets
        ``out_i + (x_i·A_all[idx_i]ᵀ)·(s·B_all[idx_i])ᵀ`` as one ``baddbmm``. Zero padding adds exact zeros, so
        the result equals each adapter's own ``delta``. None (per-adapter path) for embedding / conv hosts,
        adapters that override ``delta``, dropout while training, or mixed dtypes."""
        host = adapters[0].host
        if host.kind == "embedding" or host.is_conv or x.dim() < 2:
            return None
        for ad in adapters:
            if (type(ad).delta is not LowRankUpdate.delta or (ad.training and ad.config.dropout > 0)
                    or ad.out_bias() is not None):
                return None
        pairs = [ad.factors() for ad in adapters]
        dt = pairs[0][0].dtype
        if any(t.dtype != dt for pair in pairs for t in pair) or out.dtype != dt or x.dtype != dt:
            return None
        r_max = max(a.shape[0] for a, _ in pairs)
        a_all = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])).t() for a, _ in pairs]
                            + [pairs[0][0].new_zeros(host.d_in, r_max)])
        b_all = torch.stack([F.pad(b * ad.s, (0, r_max - b.shape[1])).t() for ad, (_, b) in zip(adapters, pairs)]
                            + [pairs[0][1].new_zeros(r_max, host.d_out)])
        idx = torch.where(index < 0, len(adapters), index)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        h = torch.bmm(x3, a_all.index_select(0, idx))
        out3 = out.reshape(out.shape[0], -1, out.shape[-1])
        if inplace and not torch.is_grad_enabled() and out3.data_ptr() == out.data_ptr():
            return out3.baddbmm_(h, b_all.index_select(0, idx)).view(out.shape)
        return torch.baddbmm(out3, h, b_all.index_select(0, idx)).view(out.shape)
