"""QWHA — Jeon et al., ICLR 2026, "QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient
Fine-Tuning on Large Language Models" (arXiv 2509.17428; official code github.com/vantaa89/qwha, not read: the
method follows the paper text, Alg. 1 and Eq. 4–9, as summarised in shared/methods/weight-space.md §9).

    forward:  y = x·W_Qᵀ + b0 + α·(x·H)·Fᵀ = x·(W_Q + α·F·Hᵀ)ᵀ + b0,   W_Q = dequant(RTN(W0)) (frozen codes)
              F = Scatter(c, E) ∈ R^{d_out×d_in} with p nonzeros at the frozen positions E, values c (trained)
              H = (H_{2^k} ⊗ H_m)/√d_in: normalised Sylvester Walsh–Hadamard (H₂ = [[1,1],[1,−1]],
              H_{2N} = H₂ ⊗ H_N), with a Paley Hadamard H_m when d_in is not a power of two
    init:     ΔW_Q = W0 − W_Q, G = Σ xᵀx over calibration tokens (G = I without data); AdaAlloc:
              e_i = ‖(ΔW_Q·R)_{i,:}‖ (R·Rᵀ = G), p_i = ⌊p·e_i/Σe⌋ (≤ d_in), leftover one at a time to the rows with
              the smallest p_i; E_i = TopK_{p_i}|(ΔW_Q·H)_{i,:}|; refinement: c_i = argmin ‖(ΔW_Q − F_i·Hᵀ)_{i,:}·R‖,
              i.e. (Hᵀ·G·H)[E_i,E_i]·c_i = (ΔW_Q·G·H)[i, E_i]; c ← c/α
    merge:    W ← W_Q + α·F·Hᵀ (full precision: the merged layer is no longer quantised)

Trainable: c only — p = r·(d_in + d_out) per layer (LoRA's count at rank r). Frozen: E (saved), W_Q as uint8 codes +
per-group step/offset (rebuilt from the host weight, never saved), H (not stored: applied as a fast transform).
The fast transform costs O(d_in·(log d_in + m)) per vector: log₂ butterflies for H_{2^k}, a small m×m product for
H_m. Training computes the layer's weight W_Q + α·F·Hᵀ (one transform of the d_out rows of F) and one matrix
product with x, which is cheaper than the activation path α·(x·H)·Fᵀ when a batch has more tokens than log₂ d_in.

Calibration: :func:`calibrate` ``(model, batches)`` runs batches through the model with its adapters disabled (the
full-precision activations), accumulates each QWHA layer's Gram G and re-initialises E and c from it; without
it the init is the data-free special case G = I (E = largest WHT coefficients of ΔW_Q, c = those coefficients).
Either way the init is not the identity: the layer starts as the quantised base with its error partly corrected.
Resolved: the quantiser is group-wise asymmetric RTN (:mod:`peftkit.quant.rtn`, the paper uses GPTQ+MagR; RTN is
the spec's CPU substitute); α defaults to 1 with the orthonormal H (the paper's "effective α ≈ 1"); λ·I
(λ = ``damping``·tr(G)/d_in) is added to G only when G is singular; the refinement solves the normal equations
above in float64 (the same solution as the spec's lstsq form c_i = v·B'ᵀ(B'·B'ᵀ)⁻¹); H_m is Paley II (symmetric)
when it exists, else Paley I (orthonormal, not symmetric: then H⁻¹ = Hᵀ ≠ H), prime q only — a d_in with no such
factor (e.g. 11008 = 2^8·43) is refused. Like every weight-replacing adapter (:mod:`peftkit.core.replace`), QWHA
quantises the weight the host holds when it is built.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.adapter import Adapter
from peftkit.core.calibration import checked_gram, input_grams
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.procedure import adapter_layers
from peftkit.core.registry import register
from peftkit.core.replace import ReplacedWeight
from peftkit.ops.hadamard import hadamard_factor, hadamard_matrix, paley_hadamard, wht  # re-exported (tests, users)
from peftkit.quant import rtn

__all__ = ["Qwha", "QwhaConfig", "allocate", "calibrate", "hadamard_factor", "hadamard_matrix", "paley_hadamard", "wht"]


@dataclass
class QwhaConfig(AdapterConfig):
    """QWHA. ``r``: budget p = r·(d_in + d_out) coefficients per layer; ``alpha``: scale of F; ``bits`` /
    ``group_size``: the RTN quantiser of the base; ``refine``: least-squares value refinement at init (else the
    plain WHT coefficients); ``damping``: λ = damping·tr(G)/d_in added to a singular calibration Gram G."""

    r: int = 8
    alpha: float = 1.0
    bits: int = 4
    group_size: int = 64
    refine: bool = True
    damping: float = 1e-4

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise PeftkitError(f"QwhaConfig.r must be a positive integer, got {self.r}")
        self.positive("QwhaConfig.alpha", self.alpha)
        self.positive("QwhaConfig.damping", self.damping)
        rtn.check_bits(self.bits, "QwhaConfig")
        rtn.check_group_size(self.group_size, "QwhaConfig")
        if self.dropout != 0.0:
            raise PeftkitError(f"QwhaConfig.dropout must be 0 (QWHA adapts the weight, it has no activation "
                               f"branch to drop), got {self.dropout}")


def allocate(p: int, e: torch.Tensor, cap: int) -> torch.Tensor:
    """AdaAlloc: p_i = ⌊p·e_i/Σe⌋ capped at ``cap``, then the leftover one at a time to the row with the smallest p_i
    (lowest index on ties) that is below the cap. Σ p_i = p."""
    total = float(e.sum())
    share = e / total if total > 0 else torch.full_like(e, 1.0 / e.numel())
    alloc = torch.floor(p * share.double()).long().clamp_(max=cap).tolist()
    heap = [(a, i) for i, a in enumerate(alloc) if a < cap]
    heapq.heapify(heap)
    for _ in range(p - sum(alloc)):
        a, i = heapq.heappop(heap)
        alloc[i] = a + 1
        if a + 1 < cap:
            heapq.heappush(heap, (a + 1, i))
    return torch.tensor(alloc, dtype=torch.long)


def calibrate(
    model: nn.Module, batches: Iterable[Any], name: str | None = None, *, refine: bool | None = None
) -> dict[str, tuple[float, float]]:
    """Re-initialise every QWHA layer of adapter ``name`` (default: the only adapter) from calibration data.

    Each batch (a tensor: ``model(batch)``; a dict: ``model(**batch)``; a tuple: ``model(*batch)``) runs through the
    model with its adapters disabled, under ``no_grad``; each QWHA layer accumulates G = Σ xᵀx over the tokens it
    sees, then :meth:`Qwha.initialize` chooses E (AdaAlloc + top-k) and c (refined) for it. Returns, per module
    path, the calibration quantisation error ``(‖ΔW_Q·X‖_F, ‖(ΔW_Q − α·F·Hᵀ)·X‖_F)`` before and after."""
    grams = input_grams(model, Qwha, batches, name, who="qwha.calibrate")  # checks the adapter first
    _, layers = adapter_layers(model, Qwha, name, "qwha.calibrate")
    return {p: a.initialize(grams[p], refine) for p, a in layers}


@register(
    "qwha",
    config=QwhaConfig,
    family="quantization",
    paper="Jeon et al., ICLR 2026, QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient "
    "Fine-Tuning on Large Language Models (arXiv 2509.17428)",
    description="sparse Walsh–Hadamard-domain update α·F·Hᵀ on an RTN-quantised base, initialised to cancel the "
    "quantisation error (AdaAlloc + refinement; calibrate() for data-aware init)",
    params="r·(d_in + d_out)",
    hosts=("linear", "gpt2_conv1d"),
    init_is_identity=False,
    calibrate=calibrate,
)
class Qwha(ReplacedWeight, Adapter):
    def __init__(self, host: Host, config: QwhaConfig) -> None:
        super().__init__(host, config)
        d_out, d_in = host.d_out, host.d_in
        try:
            _, m = hadamard_factor(d_in)
        except ValueError as e:
            raise PeftkitError(f"module {host.name!r}: QWHA's Walsh–Hadamard transform needs d_in = 2^k·m with m a "
                               f"known Hadamard order; d_in = {d_in}: {e}") from None
        self.p = config.r * (d_in + d_out)
        if self.p > d_out * d_in:
            raise PeftkitError(f"module {host.name!r}: QWHA's budget p = r·(d_in + d_out) = {self.p} exceeds the "
                               f"d_out·d_in = {d_out * d_in} entries of F; use r <= {d_out * d_in // (d_in + d_out)}")
        self.alpha, self.bits, self.group_size = config.alpha, config.bits, config.group_size
        w0 = host.weight_2d().detach()
        dt = host.param_dtype
        q = rtn.rtn(w0.float(), config.bits, config.group_size)
        self.register_buffer("qwha_codes", q.codes, persistent=False)
        self.register_buffer("qwha_qstep", q.step, persistent=False)
        self.register_buffer("qwha_qoffset", q.offset, persistent=False)
        self.register_buffer("qwha_hm", paley_hadamard(m).div(math.sqrt(m)).to(dt) if m > 1 else None,
                             persistent=False)
        self.register_buffer("qwha_idx", torch.zeros(self.p, dtype=torch.long, device=w0.device))
        self.qwha_c = nn.Parameter(torch.zeros(self.p, dtype=dt, device=w0.device))
        self.initialize()

    # -- weights ------------------------------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        """W_Q = dequant(RTN(W0)), (d_out, d_in) in the adapter's dtype."""
        return rtn.dequantize(self.qwha_codes, self.qwha_qstep, self.qwha_qoffset, self.group_size,
                              self.qwha_c.dtype)

    def sparse_f(self) -> torch.Tensor:
        """F = Scatter(c, E), dense (d_out, d_in)."""
        h = self.host
        f = self.qwha_c.new_zeros(h.d_out * h.d_in).scatter(0, self.qwha_idx, self.qwha_c)
        return f.view(h.d_out, h.d_in)

    def adapter_weight(self) -> torch.Tensor:
        """α·F·Hᵀ (the rows of F through the fast transform)."""
        return wht(self.sparse_f(), self.qwha_hm, transpose=True) * self.alpha

    def new_weight(self, host_weight: torch.Tensor | None = None) -> torch.Tensor:
        """W_Q + α·F·Hᵀ (W_Q was fixed when the adapter was built: the host weight plays no part)."""
        return self.quantized_weight() + self.adapter_weight()

    # -- init ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, gram: torch.Tensor | None = None, refine: bool | None = None) -> tuple[float, float]:
        """(Re-)choose E and c for the calibration Gram ``gram`` = Σ xᵀx (d_in×d_in; None: G = I). Returns
        ``(‖ΔW_Q·X‖_F, ‖(ΔW_Q − α·F·Hᵀ)·X‖_F)``, the quantisation error on the calibration data before and after."""
        h, refine = self.host, self.config.refine if refine is None else refine
        d_out, d_in = h.d_out, h.d_in
        if self._replaced is not None:
            raise PeftkitError(f"module {h.name!r}: QWHA is merged into the layer; unmerge before re-initialising")
        dev = self.qwha_c.device
        dwq = h.weight_2d().detach().double() - rtn.dequantize(self.qwha_codes, self.qwha_qstep,
                                                                self.qwha_qoffset, self.group_size).double()
        hm = None if self.qwha_hm is None else self.qwha_hm.double()
        g = g_raw = None
        if gram is not None:
            g = g_raw = checked_gram(h, gram, dev)
            ev = torch.linalg.eigvalsh(g_raw)
            if float(ev[0]) <= d_in * torch.finfo(torch.float64).eps * float(ev[-1]):  # singular: damp
                g = g_raw + torch.eye(d_in, dtype=g.dtype, device=dev) * (self.config.damping * float(g_raw.trace())
                                                                           / d_in)
        dwq_g = dwq if g is None else dwq @ g
        alloc = allocate(self.p, (dwq_g * dwq).sum(1).clamp_min(0).sqrt(), d_in)
        x0 = wht(dwq, hm)  # dense coefficients: ΔW_Q = x0·Hᵀ
        order = x0.abs().argsort(dim=1, descending=True, stable=True)
        keep = torch.arange(d_in, device=dev)[None, :] < alloc.to(dev)[:, None]
        rows = torch.arange(d_out, device=dev)[:, None].expand(d_out, d_in)[keep]
        idx = (rows * d_in + order[keep]).sort().values
        if g is None or not refine:
            c = x0.reshape(-1)[idx]
        else:
            c = self._refine(idx, alloc, g, wht(dwq_g, hm), hm)
        self.qwha_idx.copy_(idx)
        self.qwha_c.copy_((c / self.alpha).to(self.qwha_c.dtype))
        resid = dwq - wht(self.sparse_f().double(), hm, transpose=True) * self.alpha
        if g_raw is None:
            return float(dwq.norm()), float(resid.norm())
        return float(((dwq @ g_raw) * dwq).sum().sqrt()), float(((resid @ g_raw) * resid).sum().sqrt())

    def _refine(self, idx: torch.Tensor, alloc: torch.Tensor, g: torch.Tensor, y: torch.Tensor,
                hm: torch.Tensor | None) -> torch.Tensor:
        """Per row: solve (Hᵀ·G·H)[E_i, E_i]·c_i = (ΔW_Q·G·H)[i, E_i], batched over rows with equal p_i."""
        d_in, dev = self.host.d_in, idx.device
        k_mat = wht(wht(g, hm).t().contiguous(), hm).t()  # Hᵀ·G·H (G symmetric)
        cols = idx % d_in
        alloc = alloc.to(dev)
        starts = torch.cumsum(alloc, 0) - alloc  # where each row's block starts in the row-major idx
        c = torch.empty(idx.numel(), dtype=torch.float64, device=dev)
        for k in alloc.unique().tolist():
            if k == 0:
                continue
            sel = (alloc == k).nonzero().squeeze(1)
            for chunk in sel.split(max(1, (1 << 22) // (k * k))):  # bounded (b, k, k) systems
                pos = starts[chunk][:, None] + torch.arange(k, device=dev)[None, :]
                e = cols[pos]  # (b, k): each row's positions E_i
                c[pos] = torch.linalg.solve(k_mat[e[:, :, None], e[:, None, :]], y[chunk[:, None], e])
        return c

    def check_loaded(self) -> None:
        idx, n = self.qwha_idx, self.host.d_out * self.host.d_in
        if (idx.dtype != torch.long or idx.numel() != self.p or (idx.numel() and (int(idx.min()) < 0
                or int(idx.max()) >= n)) or not bool((idx[1:] > idx[:-1]).all())):
            raise PeftkitError(f"module {self.host.name!r}: the saved QWHA positions must be {self.p} distinct "
                               f"increasing integers in [0, {n})")

    @classmethod
    def expected_params(cls, host: Host, config: QwhaConfig) -> int:
        return config.r * (host.d_in + host.d_out)
