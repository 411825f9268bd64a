"""TLoRA — Tao et al., ICCV 2025, "Transformed Low-rank Adaptation via Tensor Decomposition and Its Applications to
Text-to-image Models" (arXiv 2501.08727; official code copied at github.com/marcocst/PEFTDiff
``subject-driven-generation/utils/attention_processor.py``).

    forward:  y = x·W'ᵀ + b0,  W' = W0·T + s·Δ  ⇒  y = host(x·Tᵀ) + s·Δ(x),  T = TRM(A¹..ᴰ) ∈ R^{d_in×d_in},
              T[ī, j̄] = tr(A¹[i₁,j₁]⋯Aᴰ[i_D,j_D]) (R_T = 1: T = A¹⊗⋯⊗Aᴰ),  s = α/√r (rsLoRA, default) or α/r
    init:     Aᵈ[:, :, ρ, ρ'] = I/R_T ⇒ T = I (Prop. 1);  Δ = 0: "lora" B = 0, A ~ kaiming_normal(a=√5);
              "ttv" B¹ = 0, Bᵈ ~ N(0, (√J_d/R²)²), Cᵈ ~ N(0, 1/I_d);  "ttm" first core 0, others kaiming_normal(a=√5)
    merge:    W ← W0·T + s·Δ  (dense; unmerge solves W0 = (W − s·Δ)·T⁻¹);  ΔW = W0·(T − I) + s·Δ

Residual Δ ∈ R^{d_out×d_in} (``residual``, R = ``r``): "lora" B·A (B ∈ R^{d_out×r}, A ∈ R^{r×d_in}); "ttv" the
paper's tensor ring Δ[ō, ī] = tr(B¹[o₁]⋯Bᴰ[o_D]·C¹[i₁]⋯Cᴰ[i_D]), Bᵈ ∈ R^{J_d×R×R}, Cᵈ ∈ R^{I_d×R×R}; "ttm"
tensor-ring matrix cores (J_d, I_d, R, R). Trainable: Σ_d I_d²·R_T² (transform) plus r·(d_in + d_out) |
R²·(Σ J_d + Σ I_d) | R²·Σ J_d·I_d. :func:`identity_regularizer` gives the paper's optional loss term R_I.
``delta`` is host.apply_weight(x·Tᵀ − x) + s·Δ(x). ``fused_forward`` (sole active adapter): with ≥ d_out rows (same
dtypes, no active dropout) one product with W' = W0·T + s·Δ by ``core.dense.built_linear`` (MiniLM training: 0.76 × the
activation path's step), else host(x·Tᵀ) + s·Δ(x), x·Tᵀ contracted core by core; T is built only to merge.
Resolved: multi-indices are big-endian (i₁ most significant), as in the official code (the paper writes
little-endian; it permutes which input features a core mixes). d_in (and d_out for "ttv"/"ttm") is factored
as ``factors_in`` / ``factors_out`` if given, else by the official table (320, 640, 768, 1280, 2048 into 3 factors)
when ``num_factors`` = 3, else into ``num_factors`` ascending factors with the fewest Σ I_d² (1s allowed: a prime
d_in gives [1, 1, d_in]); "ttm" needs as many out factors as in factors. T = I bit-exactly at init for R_T = 1 or
a power of two, else to rounding. ``dropout`` (training only) applies to the residual branch's input, as in LoRA
(the official code has none). Several adapters merged into one layer compose in order (W ← (W·T₁ + s₁Δ₁)·T₂ + s₂Δ₂,
not their unmerged sum); unmerging reverses the order exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from peftkit.core import precision
from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.dense import built_linear, dense_pays, trainable
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, lowrank_delta, new_factors
from peftkit.core.model import adapted_layers
from peftkit.core.registry import register
from peftkit.ops import tensor_ring as tr

FACTOR_TABLE: dict[int, tuple[int, ...]] = {  # official code's TENSOR_SHAPE_DICT (three factors)
    320: (4, 8, 10), 640: (8, 8, 10), 768: (8, 8, 12), 1280: (8, 10, 16), 2048: (8, 16, 16)}


@dataclass
class TloraConfig(LowRankConfig):
    """TLoRA. ``r``: residual rank (LoRA rank or tensor-ring rank R); ``transform_rank``: R_T of the transform;
    ``residual``: ``"lora"``, ``"ttv"`` (tensor-ring residual) or ``"ttm"`` (tensor-ring matrix residual);
    ``num_factors``: D of the automatic factorisations; ``factors_in`` / ``factors_out``: explicit factors of
    d_in / d_out (use ``overrides`` for layers of other widths)."""

    alpha: float = 1.0
    rslora: bool = True
    transform_rank: int = 1
    residual: Literal["lora", "ttv", "ttm"] = "lora"
    num_factors: int = 3
    factors_in: list[int] | None = None
    factors_out: list[int] | None = None

    def validate(self) -> None:
        super().validate()
        self.at_least("TloraConfig.transform_rank", self.transform_rank, 1)
        self.at_least("TloraConfig.num_factors", self.num_factors, 1)
        for name in ("factors_in", "factors_out"):
            f = getattr(self, name)
            if f is not None and (not f or any(v < 1 for v in f)):
                raise PeftkitError(f"TloraConfig.{name} must be a non-empty list of positive integers, got {f}")


def factorize(n: int, num: int) -> list[int]:
    """``n`` as ``num`` ascending factors: the official table where it applies, else the fewest Σ f²."""
    return list(FACTOR_TABLE[n]) if num == 3 and n in FACTOR_TABLE else tr.balanced_factors(n, num)


def factor_shapes(host: Host, config: TloraConfig) -> tuple[list[int], list[int] | None]:
    """(factors of d_in, factors of d_out or None for the "lora" residual); PeftkitError if they do not fit."""

    def pick(given: list[int] | None, dim: int, what: str, num: int) -> list[int]:
        if given is None:
            return factorize(dim, num)
        if math.prod(given) != dim:
            raise PeftkitError(f"module {host.name!r}: TLoRA factors_{what} {list(given)} multiply to "
                               f"{math.prod(given)}, but d_{what} = {dim} (d_in = {host.d_in}, d_out = {host.d_out}); "
                               f"give factors of {dim} (per-module via overrides) or leave factors_{what} unset")
        return list(given)

    f_in = pick(config.factors_in, host.d_in, "in", config.num_factors)
    if config.residual == "lora":
        return f_in, None
    n_out = len(f_in) if config.residual == "ttm" and config.factors_out is None else config.num_factors
    f_out = pick(config.factors_out, host.d_out, "out", n_out)
    if config.residual == "ttm" and len(f_out) != len(f_in):
        raise PeftkitError(f"module {host.name!r}: residual 'ttm' pairs out and in factors, but factors_out {f_out} "
                           f"(d_out = {host.d_out}) and factors_in {f_in} (d_in = {host.d_in}) differ in length")
    return f_in, f_out


@register(
    "tlora",
    config=TloraConfig,
    family="reparameterized",
    paper="Tao et al., ICCV 2025, Transformed Low-rank Adaptation via Tensor Decomposition (arXiv 2501.08727)",
    description="full-rank input transform T (Kronecker / tensor-ring cores, T = I at init) plus a LoRA, "
    "tensor-ring or TT-matrix residual: W' = W0·T + s·Δ",
    params="Σ I_d²·R_T² + r·(d_in + d_out) | R²·(Σ J_d + Σ I_d) | R²·Σ J_d·I_d",
    hosts=("linear", "gpt2_conv1d", "bnb_4bit", "bnb_8bit"),
)
class Tlora(Adapter):
    additive = False  # reads the host output / weight (see Adapter.additive)
    def __init__(self, host: Host, config: TloraConfig) -> None:
        super().__init__(host, config)
        self.factors_in, self.factors_out = factor_shapes(host, config)
        self.s, self.residual = config.scaling, config.residual
        like = torch.empty(0, device=host.weight.device, dtype=host.param_dtype)
        self.transform = nn.ParameterList(map(nn.Parameter, tr.identity_cores(self.factors_in, config.transform_rank,
                                                                              like)))
        R = config.r
        if self.residual == "lora":
            self.lora_A, self.lora_B = new_factors(host, R)
            nn.init.kaiming_normal_(self.lora_A, a=math.sqrt(5))
        elif self.residual == "ttv":
            self.ttv_out = nn.ParameterList([nn.Parameter(like.new_zeros(j, R, R)) for j in self.factors_out])
            self.ttv_in = nn.ParameterList([nn.Parameter(like.new_empty(i, R, R)) for i in self.factors_in])
            with torch.no_grad():
                for j, core in zip(self.factors_out[1:], list(self.ttv_out)[1:]):
                    core.normal_(std=math.sqrt(j) / R**2)
                for i, core in zip(self.factors_in, self.ttv_in):
                    core.normal_(std=1 / math.sqrt(i))
        else:
            self.ttm = nn.ParameterList([nn.Parameter(like.new_zeros(j, i, R, R))
                                         for j, i in zip(self.factors_out, self.factors_in)])
            for core in list(self.ttm)[1:]:
                nn.init.kaiming_normal_(core, a=math.sqrt(5))
        self.dropout = make_dropout(config.dropout)

    # -- the transform T and the residual Δ -----------------------------------------------------------
    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x·Tᵀ (T applied to the last dimension, core by core)."""
        return tr.ring_apply(x, list(self.transform))

    def transform_matrix(self) -> torch.Tensor:
        """T ∈ R^{d_in×d_in}."""
        return tr.ring_matrix(list(self.transform))

    def _lowrank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with Δ = B·A for the "lora" and "ttv" residuals (the latter a rank-R² product of its core chains)."""
        if self.residual == "lora":
            return self.lora_A, self.lora_B
        return tr.ring_lowrank(list(self.ttv_out), list(self.ttv_in))

    def residual_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·x·Δᵀ."""
        if self.residual == "ttm":
            return self.s * tr.ring_apply(x, list(self.ttm))
        return lowrank_delta(self.host, x, *self._lowrank(), self.s)

    def residual_weight(self) -> torch.Tensor:
        """s·Δ as a (d_out, d_in) matrix."""
        if self.residual == "ttm":
            return self.s * tr.ring_matrix(list(self.ttm))
        a, b = self._lowrank()
        return self.s * (b @ a)

    # -- forward ---------------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        (xd,) = precision.cast(self.transform[0].dtype, x)
        moved = self.host.apply_weight(self.transform_input(xd) - xd, self.host.weight_2d().to(xd.dtype))
        return moved + self.residual_delta(self.dropout(xd))

    def effective_weight(self) -> torch.Tensor:
        """W' = W0·T + s·Δ (d_out, d_in), differentiable in the cores; W0·T is Tᵀ applied to W0's d_out rows (the
        cores' axes swapped): d_out·d_in·Σ I_d multiply-adds, the cost of transforming d_out input rows."""
        w = self.host.weight_2d()
        wt = tr.ring_apply(w, [c.transpose(0, 1) for c in self.transform])
        if self.residual == "lora":  # W0·T + s·B·A in one r-inner GEMM
            return torch.addmm(wt, self.lora_B, self.lora_A, alpha=self.s)
        return wt + self.residual_weight()

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        host, w = self.host, self.host.weight_2d()
        if x.dtype != w.dtype or x.dtype != self.transform[0].dtype:
            return None
        if dense_pays(host, x, self.training and self.config.dropout > 0):
            return built_linear(x, self.effective_weight, trainable(self), host.bias)
        return host.apply_weight(self.transform_input(x), w, host.bias) + self.residual_delta(self.dropout(x))

    # -- merging ---------------------------------------------------------------------------------------
    def _wide(self) -> torch.dtype:
        return torch.float64 if self.transform[0].dtype in (torch.float32, torch.float64) else torch.float32

    def _merged(self, w: torch.Tensor) -> torch.Tensor:
        """W·T + s·Δ in float64 (float32 for half-precision cores)."""
        dt = self._wide()
        return w.to(dt) @ self.transform_matrix().to(dt) + self.residual_weight().to(dt)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._merged(weight).to(weight.dtype), bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        dt = self._wide()
        m = weight.to(dt) - self.residual_weight().to(dt)
        try:  # W0·T = M  ⇔  Tᵀ·W0ᵀ = Mᵀ
            w = torch.linalg.solve(self.transform_matrix().to(dt).t(), m.t()).t()
        except RuntimeError:  # torch.linalg.LinAlgError
            w = None
        if w is None or not torch.isfinite(w).all():
            raise PeftkitError(f"module {self.host.name!r}: cannot unmerge TLoRA, its transform T is singular")
        return w.to(weight.dtype), bias

    def delta_weight(self) -> torch.Tensor:
        """ΔW = W·(T − I) + s·Δ relative to the host's current weight W."""
        w = self.host.weight_2d().detach()
        return (self._merged(w) - w.to(self._wide())).to(w.dtype)

    # -- bookkeeping -----------------------------------------------------------------------------------
    @classmethod
    def expected_params(cls, host: Host, config: TloraConfig) -> int:
        f_in, f_out = factor_shapes(host, config)
        R, transform = config.r, sum(i * i for i in f_in) * config.transform_rank**2
        if config.residual == "lora":
            return transform + R * (host.d_in + host.d_out)
        if config.residual == "ttv":
            return transform + R * R * (sum(f_out) + sum(f_in))
        return transform + R * R * sum(j * i for j, i in zip(f_out, f_in))

    def extra_repr(self) -> str:
        out = f", factors_out={self.factors_out}" if self.factors_out is not None else ""
        return f"{super().extra_repr()}, factors_in={self.factors_in}{out}, residual={self.residual}"


def identity_regularizer(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """The paper's identity regulariser R_I = Σ_d Σ_{ρ,ρ'} ‖Aᵈ[:, :, ρ, ρ'] − I/R_T‖_F summed over the TLoRA adapter
    ``name`` (default: the active TLoRA adapters of each layer) — add ``λ·identity_regularizer(model)`` to the
    training loss, with a weight of your choice (the paper's use of it is unconfirmed)."""
    terms = [
        tr.identity_distance(list(a.transform))
        for _, layer in adapted_layers(model)
        for n, a in layer.adapters.items()
        if isinstance(a, Tlora) and (n == name if name is not None else n in layer.active)
    ]
    if not terms:
        which = f"named {name!r}" if name is not None else "active"
        raise PeftkitError(f"identity_regularizer: the model has no {which} TLoRA adapter")
    return torch.stack(terms).sum()
