"""SketchTune — Zhang et al., ICML 2025, "Sketch to Adapt: Fine-Tunable Sketches for Efficient LLM Adaptation"
(arXiv 2410.06364; fine-tuning as in the official github.com/LeanModels/SketchTune, whose compressor is not released:
the sketching follows shared/methods/weight-space.md §16).

    forward:  y = x·Ŵᵀ + b0,   Ŵ[i, j] = T[i, g(j), C[i, j]]   (single path: the sketch replaces W0)
              each row i of W0 ∈ R^{d_out×d_in} is cut into G = groups_per_row contiguous groups of n = d_in/G
              weights, g(j) = ⌊j/n⌋; T ∈ R^{d_out×G×2^bits} lookup tables (trained), C frozen integer codes
    init:     per (row, group): 1-D k-means with 2^bits centroids (weighted Lloyd from weighted-quantile seeds),
              T = the centroids, C = the nearest centroid of each weight. calibrate(): weights ω_j = 1/[H⁻¹]_jj from
              the calibration Hessian H = Σ xᵀx + λI (the OBS cost of perturbing column j), then a GPTQ-like greedy
              pass over the columns that assigns each code and spreads the error onto the columns not yet assigned
    merge:    W ← Ŵ = T[C] (de-sketched, dense); unmerge restores the replaced weight exactly

Backward: ∂L/∂T[i,g,k] = Σ_{j∈g, C[i,j]=k} ∂L/∂Ŵ[i,j] (what autograd of ``torch.gather`` computes); grad_x = grad_y·Ŵ.
Trainable: T only — d_out·G·2^bits per layer (LLaMA-2-7B, G = 4, 4-bit: 87.0M). Frozen and saved: C as uint8
(one byte per weight in memory; :func:`sketch_size` counts them packed at ``bits`` bits, as the paper stores them)
and the per-row norms of W0 the sketch was made from, so that loading into another base fails clearly.

The paper discards W0 (the model itself is compressed). Here the user's model keeps W0 in its layer (``disable()``,
other adapters and an exact unmerge need it; every weight-replacing adapter works so, :mod:`peftkit.core.replace`):
:func:`sketch_size` reports what the sketched model costs without it, and ``merge_and_unload`` gives the dense
de-sketched model. Unconfirmed (the spec marks the compressor "secondary"): the exact weighting (LeanQuant's
ω_j = 1/[H⁻¹]_jj with exponent 1 is used), the damping λ = ``damping``·mean(diag H) (GPTQ's), the column order of the
greedy pass (natural order) and that the tables are not re-fitted after it. Bits 1..8 are accepted (codes are
uint8); the paper and its kernels use ≤ 4.
"""

from __future__ import annotations

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
from peftkit.ops.kmeans import compensated_codes, weighted_kmeans

MAX_BITS = 8  # codes are stored as uint8


@dataclass
class SketchTuneConfig(AdapterConfig):
    """SketchTune. ``bits``: codes of 1..8 bits, 2^bits table entries per row-group (paper: ≤ 4, 4 typical);
    ``groups_per_row``: G contiguous groups per row, each with its own table (must divide d_in; paper: 1, 2, 4 or 8,
    default 4); ``kmeans_iters``: the most Lloyd iterations of the sketching k-means."""

    bits: int = 4
    groups_per_row: int = 4
    kmeans_iters: int = 30

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.bits <= MAX_BITS:
            raise PeftkitError(f"SketchTuneConfig.bits must be 1..{MAX_BITS} (codes are stored as uint8; the paper "
                               f"uses <= 4), got {self.bits}")
        if self.groups_per_row < 1:
            raise PeftkitError(f"SketchTuneConfig.groups_per_row must be >= 1, got {self.groups_per_row}")
        if self.kmeans_iters < 0:
            raise PeftkitError(f"SketchTuneConfig.kmeans_iters must be >= 0, got {self.kmeans_iters}")
        if self.dropout != 0.0:
            raise PeftkitError(f"SketchTuneConfig.dropout must be 0 (SketchTune replaces the weight; it has no "
                               f"activation branch to drop), got {self.dropout}")


# -- the compressor -------------------------------------------------------------------------------------------------
def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().norm(dim=1)


@dataclass(frozen=True)
class SketchSize:
    """Bytes of sketched weights vs the weights they replace. ``original_bytes``: the weights at the host dtype
    (4 per fp32 weight); ``code_bytes``: the codes packed at ``bits`` bits (⌈weights·bits/8⌉ per layer);
    ``table_bytes``: the tables at their dtype; ``resident_bytes``: what this implementation holds (1 byte a code)."""

    layers: int
    weights: int
    original_bytes: int
    code_bytes: int
    table_bytes: int
    resident_bytes: int

    @property
    def sketched_bytes(self) -> int:
        return self.code_bytes + self.table_bytes

    @property
    def ratio(self) -> float:
        """Sketched bytes / original bytes."""
        return self.sketched_bytes / max(self.original_bytes, 1)

    def __add__(self, other: SketchSize) -> SketchSize:
        return SketchSize(*(a + b for a, b in zip(self._values(), other._values())))

    def _values(self) -> tuple[int, ...]:
        return (self.layers, self.weights, self.original_bytes, self.code_bytes, self.table_bytes,
                self.resident_bytes)

    def __str__(self) -> str:
        mib = 2.0 ** 20
        return (f"sketched {self.weights:,} weights on {self.layers} layers: {self.sketched_bytes / mib:.3f} MiB "
                f"(codes {self.code_bytes / mib:.3f} + tables {self.table_bytes / mib:.3f}) vs "
                f"{self.original_bytes / mib:.3f} MiB original = {100 * self.ratio:.1f}% "
                f"({self.resident_bytes / mib:.3f} MiB in memory with one byte a code)")


# -- the method -----------------------------------------------------------------------------------------------------
def sketch_size(model: nn.Module, name: str | None = None) -> SketchSize:
    """Total bytes of the SketchTune adapter ``name`` (default: the only one): codes at their bit width + tables, vs
    the weights they replace at the host dtype. ``str()`` gives a one-line report."""
    _, layers = adapter_layers(model, SketchTune, name, "sketch_size")
    total = layers[0][1].size()
    for _, a in layers[1:]:
        total = total + a.size()
    return total


def calibrate(
    model: nn.Module, batches: Iterable[Any], name: str | None = None, *, damping: float = 0.01,
    compensate: bool = True,
) -> dict[str, tuple[float, float]]:
    """Re-sketch every layer of SketchTune adapter ``name`` (default: the only adapter) from calibration data.

    Each batch (a tensor: ``model(batch)``; a dict: ``model(**batch)``; a tuple: ``model(*batch)``) runs through the
    base model (adapters disabled, no grad); every layer's Gram G = Σ xᵀx then weighs its k-means and drives the
    error-compensated code assignment (:meth:`SketchTune.initialize`). Returns, per module path, the calibration
    error ``(‖(W0 − Ŵ)·X‖_F before, after)``; the tables restart from the new sketch."""
    if damping <= 0:
        raise PeftkitError(f"sketchtune.calibrate: damping must be > 0, got {damping}")
    name, found = adapter_layers(model, SketchTune, name, "sketchtune.calibrate")
    grams = input_grams(model, SketchTune, batches, name, who="sketchtune.calibrate")
    layers = dict(found)
    out = {}
    for path, gram in grams.items():
        before = layers[path].error(gram)
        out[path] = (before, layers[path].initialize(gram, damping=damping, compensate=compensate))
    return out


@register(
    "sketchtune",
    config=SketchTuneConfig,
    family="quantization",
    paper="Zhang et al., ICML 2025, Sketch to Adapt: Fine-Tunable Sketches for Efficient LLM Adaptation "
    "(arXiv 2410.06364)",
    description="the weight sketched into per-row-group lookup tables and frozen integer codes, Ŵ = T[C] (weighted "
    "1-D k-means; calibrate() for Hessian-weighted, error-compensated codes); only the tables train",
    params="d_out·groups_per_row·2^bits",
    init_is_identity=False,
    calibrate=calibrate,
    lr_scale=0.025,  # the trained values are the weights themselves (sketch tables): 2e-3 collapsed
    float32_params=False,  # the tables replace the weights: they keep the model's dtype (its memory claim)
)
class SketchTune(ReplacedWeight, Adapter):
    def __init__(self, host: Host, config: SketchTuneConfig) -> None:
        super().__init__(host, config)
        d_out, d_in, g = host.d_out, host.d_in, config.groups_per_row
        if d_in % g:
            raise PeftkitError(f"module {host.name!r}: SketchTuneConfig.groups_per_row = {g} does not divide the "
                               f"row of d_in = {d_in} weights into equal groups; use a divisor of {d_in}")
        self.bits, self.groups, self.k = config.bits, g, 1 << config.bits
        w0 = host.weight_2d().detach()
        dt = host.param_dtype
        self.sketch_tables = nn.Parameter(torch.zeros(d_out, g, self.k, dtype=dt, device=w0.device))
        self.register_buffer("sketch_codes", torch.zeros(d_out, d_in, dtype=torch.uint8, device=w0.device))
        self.register_buffer("sketch_w0_norms", _row_norms(w0))
        self.initialize()

    # -- weights ------------------------------------------------------------------------------------------------
    def new_weight(self, host_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Ŵ = T[C] (d_out, d_in); the host weight plays no part (the sketch replaces it)."""
        d_out, d_in = self.sketch_codes.shape
        idx = self.sketch_codes.long().view(d_out, self.groups, d_in // self.groups)
        return self.sketch_tables.gather(2, idx).view(d_out, d_in)

    # -- init ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, gram: torch.Tensor | None = None, *, damping: float = 0.01,
                   compensate: bool = True) -> float:
        """(Re-)sketch the host weight W0. ``gram`` = Σ xᵀx (d_in×d_in) of calibration inputs: k-means weighted by
        ω_j = 1/[H⁻¹]_jj (H = G + λI, λ = ``damping``·mean diag G), then (``compensate``) the error-compensated code
        assignment; None: plain k-means. Returns ‖(W0 − Ŵ)·X‖_F (‖W0 − Ŵ‖_F without ``gram``)."""
        h = self.host
        if self._replaced is not None:
            raise PeftkitError(f"module {h.name!r}: SketchTune is merged into the layer; unmerge before re-sketching")
        w0 = h.weight_2d().detach().float()
        weight = hinv_chol = None
        if gram is not None:
            hmat = self._hessian(gram, damping)
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(hmat))
            weight = (1.0 / hinv.diagonal()).float().view(1, self.groups, -1).expand(h.d_out, -1, -1)
            weight = weight.reshape(h.d_out * self.groups, -1)
            if compensate:
                hinv_chol = torch.linalg.cholesky(hinv, upper=True)
        x = w0.reshape(h.d_out * self.groups, -1)
        tables, codes = weighted_kmeans(x, self.k, weight, self.config.kmeans_iters)
        tables = tables.view(h.d_out, self.groups, self.k)
        codes = codes.view(h.d_out, h.d_in) if hinv_chol is None else compensated_codes(w0, tables, hinv_chol)
        self.sketch_tables.copy_(tables.to(self.sketch_tables.dtype))
        self.sketch_codes.copy_(codes.to(torch.uint8))
        self.sketch_w0_norms.copy_(_row_norms(w0))
        return self.error(gram)

    def _hessian(self, gram: torch.Tensor, damping: float) -> torch.Tensor:
        if damping <= 0:
            raise PeftkitError(f"sketchtune: damping must be > 0, got {damping}")
        g = checked_gram(self.host, gram, self.sketch_tables.device)
        return g + torch.eye(g.shape[0], dtype=g.dtype, device=g.device) * (damping * float(g.diagonal().mean()))

    @torch.no_grad()
    def error(self, gram: torch.Tensor | None = None) -> float:
        """‖(W0 − Ŵ)·X‖_F = √tr((W0 − Ŵ)·G·(W0 − Ŵ)ᵀ) for the Gram G = XᵀX (None: ‖W0 − Ŵ‖_F), W0 the host weight."""
        d = self.host.weight_2d().detach().double() - self.new_weight().double()
        if gram is None:
            return float(d.norm())
        return float(((d @ gram.to(d)) * d).sum().clamp_min(0).sqrt())

    # -- persistence and reporting --------------------------------------------------------------------------------
    def check_loaded(self) -> None:
        name, codes = self.host.name, self.sketch_codes
        if codes.dtype != torch.uint8 or (codes.numel() and int(codes.max()) >= self.k):
            raise PeftkitError(f"module {name!r}: the saved SketchTune codes must be uint8 values below 2^bits = "
                               f"{self.k}")
        now, saved = _row_norms(self.host.weight_2d()), self.sketch_w0_norms.float()
        tol = 1e-2 * now + 1e-6 * float(now.max().clamp_min(1e-30))  # tolerant to a cast to 16-bit floats
        if not torch.isfinite(saved).all() or bool(((now - saved).abs() > tol).any()):
            raise PeftkitError(f"module {name!r}: this SketchTune sketch was made from another base weight (its row "
                               f"norms differ from this model's); load it into the base it was trained on")

    def size(self) -> SketchSize:
        """What this layer's sketch costs vs the weight it replaces (see :class:`SketchSize`)."""
        n, t = self.sketch_codes.numel(), self.sketch_tables
        table = t.numel() * t.element_size()
        return SketchSize(1, n, n * self.host.weight.element_size(), math.ceil(n * self.bits / 8), table,
                          n * self.sketch_codes.element_size() + table)

    @classmethod
    def expected_params(cls, host: Host, config: SketchTuneConfig) -> int:
        return host.d_out * config.groups_per_row * (1 << config.bits)
