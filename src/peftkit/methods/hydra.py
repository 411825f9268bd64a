"""Hydra — Kim et al. 2023, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning"
(official code github.com/extremebird/Hydra: ``Hydra_layer`` / ``reparameterize``).

    forward:  y = h + s·P(x) + s·S(h),  h = x·W0ᵀ + b0,  P(x) = x·A_pᵀ·B_pᵀ (+β_p),  S(h) = h·A_sᵀ·B_sᵀ (+β_s)
    init:     A_p, A_s ~ kaiming_uniform(a=√5) (official NLU code), B_p = B_s = 0, branch biases 0  ⇒ y = h
    merge:    W ← W0 + s·(B_p·A_p + B_s·A_s·W0),  b ← b0 + s·(B_s·A_s·b0 + β_p + β_s),  β_· = B_··b_down + b_up

A_p ∈ R^{r_p×d_in}, B_p ∈ R^{d_out×r_p} (parallel, reads the host input); A_s ∈ R^{r_s×d_out}, B_s ∈ R^{d_out×r_s}
(sequential, reads the *bias-included* host output). rank(ΔW) ≤ r_p + r_s. With A_s = 0 (or r_s = 0) Hydra is LoRA
with α/r = s. ``branch_bias`` adds the VTAB code's down/up biases to each branch (b_down ∈ R^{r}, b_up ∈ R^{d_out}).
Trainable: r_p·(d_in + d_out) + 2·r_s·d_out per layer (+ r_p + d_out + r_s + d_out with branch biases); a rank of 0
drops that branch. Dropout (training only) applies to each branch's input (x for P, h for S). As the sole active
adapter on a Linear with at least d_out rows (no active dropout) the layer runs through its merged weight and bias,
built differentiably each step (``fused_forward``; on MiniLM training 0.92 × the step time, 0.64 × the step memory);
the d_out×d_in weight is rebuilt in backward rather than kept (``core.dense.built_linear``).
On conv hosts the sequential branch is a 1×1 channel map on the output, so the 2-D merge formula holds unchanged.
Resolved ambiguities: only the NLU code's kaiming init of the down-projections is offered (not ELEVATER's N(0, 0.02²)
nor VTAB's xavier); merge uses the weight it is given (after any adapters merged before it), i.e. the sequential
branch composes with what is already in the host; unmerge inverts it exactly with the Woodbury identity
(I + s·B_s·A_s)⁻¹ = I − s·B_s·(I_r + s·A_s·B_s)⁻¹·A_s (an r_s×r_s solve, no d_out×d_out inverse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import built_linear, dense_pays, trainable
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import check_rank, init_down_, lowrank_delta, new_factors
from peftkit.core.registry import register


@dataclass
class HydraConfig(AdapterConfig):
    """Hydra. ``r_p``: parallel-branch rank; ``r_s``: sequential-branch rank (0 drops a branch); ``scale``: s;
    ``branch_bias``: trainable down/up biases in both branches (VTAB version). Defaults: RoBERTa-GLUE r_p=4, r_s=8,
    s=1."""

    r_p: int = 4
    r_s: int = 8
    scale: float = 1.0
    branch_bias: bool = False

    def validate(self) -> None:
        super().validate()
        if self.r_p < 0 or self.r_s < 0 or self.r_p + self.r_s == 0:
            raise PeftkitError(
                f"HydraConfig ranks must be >= 0 and not both 0, got r_p={self.r_p}, r_s={self.r_s}"
            )


class _Branch(nn.Module):
    """One low-rank branch: down (r, d_from), up (d_out, r) = 0, optional down/up biases."""

    def __init__(self, host: Host, r: int, d_from: int, bias: bool) -> None:
        super().__init__()
        a, self.up = new_factors(host, r)
        self.down = nn.Parameter(a.new_empty(r, d_from))
        init_down_(self.down, "kaiming", r)
        self.b_down = nn.Parameter(a.new_zeros(r)) if bias else None
        self.b_up = nn.Parameter(a.new_zeros(host.d_out)) if bias else None

    def beta(self) -> torch.Tensor | None:
        """The branch's folded bias β = B·b_down + b_up:  (z·Aᵀ + b_down)·Bᵀ + b_up = z·Aᵀ·Bᵀ + β."""
        return None if self.b_up is None else self.up @ self.b_down + self.b_up


@register(
    "hydra",
    config=HydraConfig,
    family="reparameterized",
    paper="Kim et al. 2023, Hydra: Multi-head Low-rank Adaptation for PEFT (github.com/extremebird/Hydra)",
    description="parallel low-rank branch on the input plus sequential low-rank branch on the base output",
    params="r_p·(d_in + d_out) + 2·r_s·d_out (+ r_p + r_s + 2·d_out with branch biases)",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "bnb_4bit", "bnb_8bit"),
)
class Hydra(Adapter):
    additive = False  # reads the host output / weight (see Adapter.additive)
    def __init__(self, host: Host, config: HydraConfig) -> None:
        super().__init__(host, config)
        check_rank(host, config.r_p)
        check_rank(host, config.r_s, limit=host.d_out)
        self.s = config.scale
        self.par = _Branch(host, config.r_p, host.d_in, config.branch_bias) if config.r_p else None
        self.seq = _Branch(host, config.r_s, host.d_out, config.branch_bias) if config.r_s else None
        self.dropout = make_dropout(config.dropout)

    @property
    def dtype(self) -> torch.dtype:
        return (self.par or self.seq).up.dtype

    def _beta(self) -> torch.Tensor | None:
        """β_p + β_s (None without branch biases)."""
        betas = [b.beta() for b in (self.par, self.seq) if b is not None and b.b_up is not None]
        return sum(betas[1:], betas[0]) if betas else None

    def _bs_as(self) -> torch.Tensor | None:
        """B_s·A_s (d_out × d_out, rank ≤ r_s): the sequential branch as a map on the output."""
        return None if self.seq is None else self.seq.up @ self.seq.down

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        host, out = self.host, 0.0
        if self.par is not None:  # x·A_pᵀ·B_pᵀ
            out = lowrank_delta(host, self.dropout(x), self.par.down, self.par.up, 1.0)
        if self.seq is not None:  # h·A_sᵀ·B_sᵀ, channel-wise on the bias-included host output
            h = self.dropout(base_out.to(self.dtype))
            out = out + host.project_out(host.project_out(h, self.seq.down), self.seq.up)
        beta = self._beta()
        if beta is not None:
            out = out + host.out_view(beta)
        return self.s * out

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer through its merged weight and bias, as a differentiable product (``core.dense``): with at least
        d_out rows (training batches; no active dropout; float32/64, adapter and host in one dtype),
        ``W' = W0 + s·(B_p·A_p + B_s·(A_s·W0))`` and ``b' = b0 + s·(B_s·(A_s·b0) + β)`` cost r·d_out·d_in to build, and
        the sequential branch no longer keeps the host output h for its gradient."""
        host, w = self.host, self.host.weight_2d()
        if not dense_pays(host, x, self.training and self.config.dropout > 0) or self.dtype != w.dtype:
            return None
        bias, db = host.bias, self._beta()
        if self.seq is not None and bias is not None:  # the bias is d_out values: built with autograd here
            mb = self.seq.up @ (self.seq.down @ bias)
            db = mb if db is None else db + mb
        if db is not None:
            bias = self.s * db if bias is None else bias + self.s * db
        return built_linear(x, lambda: self._merged_weight(w), trainable(self), bias)

    def _merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W0 + s·(B_p·A_p + B_s·(A_s·W0)) as r-inner GEMMs accumulating onto W0 (no d_out×d_in temporary per branch);
        rebuilt in backward by ``core.dense.built_linear`` rather than kept."""
        w_new = w
        if self.par is not None:
            w_new = torch.addmm(w_new, self.par.up, self.par.down, alpha=self.s)
        if self.seq is not None:
            w_new = torch.addmm(w_new, self.seq.up, self.seq.down @ w, alpha=self.s)
        return w_new

    def _dw(self, w: torch.Tensor) -> torch.Tensor:
        """s·(B_p·A_p + B_s·A_s·w) for a (d_out, d_in) weight ``w`` (in the adapter dtype)."""
        m = self._bs_as()
        dw = m @ w if m is not None else None
        if self.par is not None:
            pa = self.par.up @ self.par.down
            dw = pa if dw is None else dw + pa
        return self.s * dw

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·(B_p·A_p + B_s·A_s·W0) on the host's current weight (the branch biases change only the bias)."""
        return self._dw(self.host.weight_2d().detach().to(self.dtype))

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = weight.to(self.dtype)
        m, db = self._bs_as(), self._beta()
        if bias is not None and m is not None:
            mb = m @ bias.to(self.dtype)
            db = mb if db is None else db + mb
        if db is not None:
            bias = self.s * db if bias is None else bias + (self.s * db).to(bias.dtype)
        return (w + self._dw(w)).to(weight.dtype), bias

    def _solve_seq(self, m: torch.Tensor) -> torch.Tensor:
        """(I + s·B_s·A_s)⁻¹·m by Woodbury: I − s·B_s·(I_r + s·A_s·B_s)⁻¹·A_s, an r_s×r_s solve."""
        if self.seq is None:
            return m
        a, b = self.seq.down, self.seq.up
        small = torch.eye(a.shape[0], dtype=a.dtype, device=a.device) + self.s * (a @ b)
        return m - self.s * (b @ torch.linalg.solve(small, a @ m))

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = weight.to(self.dtype)
        if self.par is not None:
            w = w - self.s * (self.par.up @ self.par.down)
        w0 = self._solve_seq(w).to(weight.dtype)
        if bias is None:
            return w0, None
        b, beta = bias.to(self.dtype), self._beta()
        if beta is not None:
            b = b - self.s * beta
        return w0, self._solve_seq(b[:, None])[:, 0].to(bias.dtype)

    @classmethod
    def expected_params(cls, host: Host, config: HydraConfig) -> int:
        n = config.r_p * (host.d_in + host.d_out) + 2 * config.r_s * host.d_out
        if config.branch_bias:
            n += (config.r_p + host.d_out if config.r_p else 0) + (config.r_s + host.d_out if config.r_s else 0)
        return n
