"""TLoRA — Tao et al., ICCV 2025, "Transformed Low-rank Adaptation via Tensor Decomposition and Its Applications to
Text-to-image Models" (arXiv 2501.08727; official code copied at github.com/marcocst/PEFTDiff
``subject-driven-generation/utils/attention_processor.py``).

    forward:  y = x·W'ᵀ + b0,  W' = W0·T + s·Δ  ⇒  y = host(x·Tᵀ) + s·Δ(x),  T = TRM(A¹..ᴰ) ∈ R^{d_in×d_in},
              T[ī, j̄] = tr(A¹[i₁,j₁]⋯Aᴰ[i_D,j_D]) (R_T = 1: T = A¹⊗⋯⊗Aᴰ),  s = α/√r (rsLoRA, default) or α/r
    init:     Aᵈ[:, :, ρ, ρ'] = I/R_T ⇒ T = I (Prop. 1);  Δ = 0: "lora" B = 0, A ~ kaiming_normal(a=√5);
              "ttv" B¹ = 0, Bᵈ ~ N(0, (√J_d/R²)²), Cᵈ ~ N(0, 1/I_d);  "ttm" first core 0, others kaiming_normal(a=√5)
    merge:    W ← W0·T + s·Δ  (dense; unmerge solves W0 = (W − s·Δ)·T⁻¹);  ΔW = W0·(T − I) + s·Δ

Residual Δ ∈ R^{d_out×d_in} (``residual``): "lora" B·A (B ∈ R^{d_out×r}, A ∈ R^{r×d_in}); "ttv" the paper's
tensor-ring residual Δ[ō, ī] = tr(B¹[o₁]⋯Bᴰ[o_D]·C¹[i₁]⋯Cᴰ[i_D]) with Bᵈ ∈ R^{J_d×R×R}, Cᵈ ∈ R^{I_d×R×R}; "ttm"
tensor-ring matrix cores (J_d, I_d, R, R) — R = ``r`` for both. Trainable: transform cores Σ_d I_d²·R_T² plus residual
r·(d_in + d_out) | R²·(Σ J_d + Σ I_d) | R²·Σ J_d·I_d. ``identity_regularizer(model)`` gives the paper's optional
R_I = Σ_d Σ_{ρ,ρ'} ‖Aᵈ[:, :, ρ, ρ'] − I/R_T‖_F (add it to the loss with a weight of your choice; unconfirmed).

The adapted output is not base + something cheap, so ``delta`` returns host.apply_weight(x·Tᵀ − x) + s·Δ(x) — exact,
and it reuses the frozen weight — while ``fused_forward`` (sole active adapter) computes the layer in one product:
with at least d_out rows (training batches, prompts; float32/64; no active dropout) through W' = W0·T + s·Δ, built
from W0's d_out rows (``effective_weight``) and run by ``core.dense.built_linear`` (W' rebuilt in backward, not kept;
x kept without a copy when a LayerNorm / GELU made it; ∂W' = gᵀ·x flows back into the cores) — on MiniLM training
0.76 × the step time of the activation path; otherwise (few rows, as in token-by-token generation)
host(x·Tᵀ) + s·Δ(x) with x·Tᵀ computed by contracting x (reshaped to (…, I₁, …, I_D)) with one core at a time.
T itself is built only to merge. The "ttv" residual is applied as a rank-R² low-rank product (its two core chains
multiplied out).
Resolved: multi-indices are big-endian (i₁ most significant), as in the official code (the paper writes
little-endian; the choice only permutes which input features each core mixes). Factorisation of d_in (and of d_out
for "ttv"/"ttm"): ``factors_in`` / ``factors_out`` if given, else the official table (320, 640, 768, 1280, 2048 into
3 factors) when ``num_factors`` = 3, else the ``num_factors`` factors (ascending) with the fewest transform
parameters Σ I_d² (factors of 1 allowed, e.g. a prime d_in gives [1, 1, d_in]); "ttm" needs as many out factors as
in factors. T = I holds bit-exactly at init for R_T = 1 or a power of two (1/R_T is exact), otherwise to rounding.
``dropout`` (training only) applies to the residual branch's input, as in LoRA (the official code has none).
Merging several adapters into one layer composes them in order (W ← (W·T₁ + s₁Δ₁)·T₂ + s₂Δ₂), which differs from
their unmerged sum; unmerging reverses the order exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.dense import built_linear, dense_pays, trainable
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, lowrank_delta, new_factors
from peftkit.core.model import adapted_layers
from peftkit.core.registry import register
from peftkit.ops.tensor_ring import balanced_factors, ring_apply, ring_chain, ring_matrix

# official code's TENSOR_SHAPE_DICT (three factors)
FACTOR_TABLE: dict[int, tuple[int, ...]] = {
    320: (4, 8, 10), 640: (8, 8, 10), 768: (8, 8, 12), 1280: (8, 10, 16), 2048: (8, 16, 16),
}


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
        if self.transform_rank < 1:
            raise PeftkitError(f"TloraConfig.transform_rank must be >= 1, got {self.transform_rank}")
        if self.num_factors < 1:
            raise PeftkitError(f"TloraConfig.num_factors must be >= 1, got {self.num_factors}")
        for name in ("factors_in", "factors_out"):
            f = getattr(self, name)
            if f is not None and (not f or any(v < 1 for v in f)):
                raise PeftkitError(f"TloraConfig.{name} must be a non-empty list of positive integers, got {f}")


def factorize(n: int, num: int) -> list[int]:
    """``n`` as ``num`` ascending factors: the official table where it applies, else the fewest Σ f²."""
    if num == 3 and n in FACTOR_TABLE:
        return list(FACTOR_TABLE[n])
    return balanced_factors(n, num)


def factor_shapes(host: Host, config: TloraConfig) -> tuple[list[int], list[int] | None]:
    """(factors of d_in, factors of d_out or None for the "lora" residual); PeftkitError if they do not fit."""

    def pick(given: list[int] | None, dim: int, what: str, num: int) -> list[int]:
        if given is None:
            return factorize(dim, num)
        if math.prod(given) != dim:
            raise PeftkitError(
                f"module {host.name!r}: TLoRA factors_{what} {list(given)} multiply to {math.prod(given)}, but "
                f"d_{what} = {dim} (d_in = {host.d_in}, d_out = {host.d_out}); give factors of {dim} "
                f"(per-module via overrides) or leave factors_{what} unset"
            )
        return list(given)

    f_in = pick(config.factors_in, host.d_in, "in", config.num_factors)
    if config.residual == "lora":
        return f_in, None
    n_out = len(f_in) if config.residual == "ttm" and config.factors_out is None else config.num_factors
    f_out = pick(config.factors_out, host.d_out, "out", n_out)
    if config.residual == "ttm" and len(f_out) != len(f_in):
        raise PeftkitError(
            f"module {host.name!r}: residual 'ttm' pairs out and in factors, but factors_out {f_out} "
            f"(d_out = {host.d_out}) and factors_in {f_in} (d_in = {host.d_in}) differ in length"
        )
    return f_in, f_out


def _identity_core(n: int, rank: int, like: torch.Tensor) -> nn.Parameter:
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    if rank == 1:
        return nn.Parameter(eye)
    return nn.Parameter((eye[:, :, None, None] / rank).expand(n, n, rank, rank).clone())


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
        self.s = config.scaling
        self.residual = config.residual
        w = host.weight
        like = torch.empty(0, device=w.device, dtype=w.dtype if w.is_floating_point() else torch.float32)
        self.transform = nn.ParameterList(
            [_identity_core(n, config.transform_rank, like) for n in self.factors_in]
        )
        R = config.r
        if self.residual == "lora":
            self.lora_A, self.lora_B = new_factors(host, R)
            nn.init.kaiming_normal_(self.lora_A, a=math.sqrt(5))
        elif self.residual == "ttv":
            assert self.factors_out is not None
            self.ttv_out = nn.ParameterList([nn.Parameter(like.new_zeros(j, R, R)) for j in self.factors_out])
            self.ttv_in = nn.ParameterList([nn.Parameter(like.new_empty(i, R, R)) for i in self.factors_in])
            with torch.no_grad():
                for j, core in zip(self.factors_out[1:], list(self.ttv_out)[1:]):
                    core.normal_(std=math.sqrt(j) / R**2)
                for i, core in zip(self.factors_in, self.ttv_in):
                    core.normal_(std=1 / math.sqrt(i))
        else:
            assert self.factors_out is not None
            self.ttm = nn.ParameterList(
                [nn.Parameter(like.new_zeros(j, i, R, R)) for j, i in zip(self.factors_out, self.factors_in)]
            )
            for core in list(self.ttm)[1:]:
                nn.init.kaiming_normal_(core, a=math.sqrt(5))
        self.dropout = make_dropout(config.dropout)

    # -- the transform T and the residual Δ -----------------------------------------------------------
    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x·Tᵀ (T applied to the last dimension, core by core)."""
        return ring_apply(x, list(self.transform))

    def transform_matrix(self) -> torch.Tensor:
        """T ∈ R^{d_in×d_in}."""
        return ring_matrix(list(self.transform))

    def _ttv_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Δ = B·A with A ∈ R^{R²×d_in}, B ∈ R^{d_out×R²}: Δ[o, i] = Σ_{ρσ} Bfull[o]_{ρσ}·Cfull[i]_{σρ}."""
        b_full, c_full = ring_chain(list(self.ttv_out)), ring_chain(list(self.ttv_in))
        rr = b_full.shape[1] * b_full.shape[2]
        return c_full.transpose(1, 2).reshape(-1, rr).t(), b_full.reshape(-1, rr)

    def residual_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·x·Δᵀ."""
        if self.residual == "lora":
            return lowrank_delta(self.host, x, self.lora_A, self.lora_B, self.s)
        if self.residual == "ttv":
            a, b = self._ttv_factors()
            return lowrank_delta(self.host, x, a, b, self.s)
        return self.s * ring_apply(x, list(self.ttm))

    def residual_weight(self) -> torch.Tensor:
        """s·Δ as a (d_out, d_in) matrix."""
        if self.residual == "lora":
            return self.s * (self.lora_B @ self.lora_A)
        if self.residual == "ttv":
            a, b = self._ttv_factors()
            return self.s * (b @ a)
        return self.s * ring_matrix(list(self.ttm))

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.transform[0].dtype
        return x if x.dtype == dt else x.to(dt)

    # -- forward ---------------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        xd = self._cast(x)
        moved = self.host.apply_weight(self.transform_input(xd) - xd, self.host.weight_2d().to(xd.dtype))
        return moved + self.residual_delta(self.dropout(xd))

    def effective_weight(self) -> torch.Tensor:
        """W' = W0·T + s·Δ (d_out, d_in), differentiable in the cores: W0·T = (T ᵀ applied to W0's rows), built by
        :func:`ring_apply` on the d_out rows of W0 with each core's (O_d, I_d) axes swapped — d_out·d_in·Σ I_d
        multiply-adds, the cost of transforming d_out input rows."""
        w = self.host.weight_2d()
        wt = ring_apply(w, [c.transpose(0, 1) for c in self.transform])
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

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        dt = self._wide()
        w = weight.to(dt) @ self.transform_matrix().to(dt) + self.residual_weight().to(dt)
        return w.to(weight.dtype), bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        dt = self._wide()
        m = weight.to(dt) - self.residual_weight().to(dt)
        try:  # W0·T = M  ⇔  Tᵀ·W0ᵀ = Mᵀ
            w = torch.linalg.solve(self.transform_matrix().to(dt).t(), m.t()).t()
        except RuntimeError as e:  # torch.linalg.LinAlgError
            raise PeftkitError(f"module {self.host.name!r}: cannot unmerge TLoRA, its transform T is singular") from e
        if not torch.isfinite(w).all():
            raise PeftkitError(f"module {self.host.name!r}: cannot unmerge TLoRA, its transform T is singular")
        return w.to(weight.dtype), bias

    def delta_weight(self) -> torch.Tensor:
        """ΔW = W·(T − I) + s·Δ relative to the host's current weight W."""
        w = self.host.weight_2d().detach()
        dt = self._wide()
        return (w.to(dt) @ self.transform_matrix().to(dt) + self.residual_weight().to(dt) - w.to(dt)).to(w.dtype)

    # -- bookkeeping -----------------------------------------------------------------------------------
    def identity_distance(self) -> torch.Tensor:
        """Σ_d Σ_{ρ,ρ'} ‖Aᵈ[:, :, ρ, ρ'] − I/R_T‖_F for this layer's transform cores."""
        total = self.transform[0].new_zeros(())
        for core in self.transform:
            n = core.shape[0]
            eye = torch.eye(n, dtype=core.dtype, device=core.device)
            if core.dim() == 4:
                eye = (eye / core.shape[2])[:, :, None, None]
            total = total + torch.linalg.vector_norm(core - eye, dim=(0, 1)).sum()
        return total

    @classmethod
    def expected_params(cls, host: Host, config: TloraConfig) -> int:
        f_in, f_out = factor_shapes(host, config)
        R, RT = config.r, config.transform_rank
        transform = sum(i * i for i in f_in) * RT * RT
        if config.residual == "lora":
            return transform + R * (host.d_in + host.d_out)
        assert f_out is not None
        if config.residual == "ttv":
            return transform + R * R * (sum(f_out) + sum(f_in))
        return transform + R * R * sum(j * i for j, i in zip(f_out, f_in))

    def extra_repr(self) -> str:
        out = f", factors_out={self.factors_out}" if self.factors_out is not None else ""
        return f"{super().extra_repr()}, factors_in={self.factors_in}{out}, residual={self.residual}"


def identity_regularizer(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """The paper's identity regulariser R_I summed over the TLoRA adapter ``name`` (default: the active TLoRA
    adapters of each layer) — add ``λ·identity_regularizer(model)`` to the training loss."""
    terms = [
        a.identity_distance()
        for _, layer in adapted_layers(model)
        for n, a in layer.adapters.items()
        if isinstance(a, Tlora) and (n == name if name is not None else n in layer.active)
    ]
    if not terms:
        which = f"named {name!r}" if name is not None else "active"
        raise PeftkitError(f"identity_regularizer: the model has no {which} TLoRA adapter")
    return torch.stack(terms).sum()
