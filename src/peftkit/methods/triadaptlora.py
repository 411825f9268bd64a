"""TriAdaptLoRA — Liang, Wang, Zeng 2025, "TriAdaptLoRA: Brain-Inspired Triangular Adaptive Low-Rank Adaptation for
Parameter-Efficient Fine-Tuning" (arXiv 2501.08008; author code: github.com/YaoLiang2023/DiverValue-Bench
``peft/src/peft/tuners/triadaptlora.py``).

    forward:  y = base(x) + s·dropout(x)·Aᵀ·Cᵀ·Bᵀ,   A ∈ R^{r×d_in}, C ∈ R^{r×r}, B ∈ R^{d_out×r},   s = α/r_ref
    init:     A_k, B_k ~ N(0, 0.02²), C_row_k = C_col_k = 0  ⇒  ΔW = 0 at init and right after every growth
    merge:    W ← W0 + s·B·C·A   (ΔW = s·B·C·A at the current rank)

The rank grows in blocks. Block k (Δr_k ranks, cumulative rank r_k) owns A_k (Δr_k×d_in), B_k (d_out×Δr_k), a row
strip C_row_k (Δr_k×r_k) and a column strip C_col_k (r_k×Δr_k). Triangular split: C = L + U, where L stacks the row
strips (each zero-padded on the right to width r) and U the column strips (zero-padded below to height r), so L is
zero above its block diagonal, U below it, and a growth only appends one strip to each (old entries are kept).
Params at rank r = Σ_k Δr_k: r·(d_in + d_out) + Σ_k 2·Δr_k·r_k.

Training (:class:`TriAdaptGrowth`, attached by the trainer): after optimiser step t (= step + 1) with t > t_warm,
t % Δt == 0 and R_total < R_target (= Σ r_ref over the modules unless ``target_total_rank`` is set), every module's
importance is n_t = ‖C‖_F / K (K = its number of blocks; "normalised Frobenius norm") and its score n_t − n_prev
(n_prev: its n at the previous evaluation, 0 at init). k = max(1, ⌊(R_target − R_total)·φ⌋) with
φ = (t − t_warm)/(T − t_warm) ("linear"; "nonlinear": k = max(1, ⌊exp(φ·ln(R_target − R_total))⌋)), capped at the
number of modules; the threshold is the k-th largest score and every module scoring ≥ it appends a block of
Δr = ``growth_rank`` (default max(1, r_ref // 2), the author code's table) ranks. The new tensors are appended to the
optimiser param group that holds the layer's existing tensors (so the LR schedule covers them). ``extra_loss`` adds
λ_orth · mean over the 2M factor matrices of (‖A·Aᵀ − I‖_F, ‖Bᵀ·B − I‖_F).

Persistence: a growth records the layer's block sizes in the adapter config (``block_ranks``: module path -> [Δr_0,
Δr_1, ...]), which ``save`` writes to ``adapter_config.json``; the adapter is built from it, so ``load`` rebuilds
the grown shapes before it checks and loads the tensors (no resizing on load).

Where this follows the author code over the spec, or resolves it (say so): the spec asks for s = α/r_current but also
for an output-preserving growth step, which α/r_current breaks (it rescales the old blocks at every growth); the
author's final code uses a constant scale (2), so s = α/r_ref is constant here (α = 16, r_ref = 8 gives the code's 2).
The regulariser is averaged over the 2M factor matrices as in the code (the spec's "mean over modules" would be twice
that). The spec's "budget never exceeded by more than (#grown − 1)·Δr" does not follow from the author's rule (a
growth event starts whenever R_total < R_target); what holds is R_total < R_target + (#grown)·Δr after an event and
no growth once R_total ≥ R_target. Paper hyperparameters (GLUE/SQuAD) are unconfirmed; the defaults are the code's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, LowRankUpdate, new_factors
from peftkit.core.registry import HOST_KINDS, QUANTIZED_HOSTS, register
from peftkit.methods.triadaptlora_growth import (  # the rank-growth procedure: its own module
    TriAdaptGrowth,
    budget_fraction,
    growth_count,
)

INIT_STD = 0.02


@dataclass
class TriAdaptLoraConfig(LowRankConfig):
    """TriAdaptLoRA. ``r``: reference rank r_ref (average target rank; s = α/r_ref); ``init_rank``: rank of every
    module at init; ``growth_rank``: Δr per growth (default max(1, r // 2)); ``target_total_rank``: R_target (default
    Σ r over the modules); ``total_steps``: T of the threshold schedule (None: the run's length, which the trainer
    tells the procedure); ``warmup_steps``: t_warm;
    ``interval``: Δt; ``schedule``: ``"linear"`` or ``"nonlinear"``; ``orth_reg``: λ_orth; ``block_ranks``: grown
    block sizes per module path, written by :class:`TriAdaptGrowth` (leave empty)."""

    alpha: float = 16.0
    init_rank: int = 1
    growth_rank: int | None = None
    target_total_rank: int | None = None
    total_steps: int | None = None
    warmup_steps: int = 0
    interval: int = 1
    schedule: Literal["linear", "nonlinear"] = "linear"
    orth_reg: float = 0.5
    block_ranks: dict[str, list[int]] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        for key in ("init_rank", "growth_rank", "target_total_rank", "interval"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise PeftkitError(f"{name}.{key} must be a positive integer, got {v}")
        if self.warmup_steps < 0:
            raise PeftkitError(f"{name}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps is not None and self.total_steps <= self.warmup_steps:
            raise PeftkitError(
                f"{name}.total_steps (T) must be > warmup_steps = {self.warmup_steps}, got {self.total_steps}"
            )
        if self.orth_reg < 0:
            raise PeftkitError(f"{name}.orth_reg must be >= 0, got {self.orth_reg}")
        for path, blocks in self.block_ranks.items():
            if not blocks or any(b < 1 for b in blocks):
                raise PeftkitError(f"{name}.block_ranks[{path!r}] must be a non-empty list of positive ranks, "
                                   f"got {blocks}")

    def blocks_for(self, path: str) -> list[int]:
        """The block sizes [Δr_0, Δr_1, ...] of module ``path`` (grown ones if recorded, else [init_rank])."""
        return list(self.block_ranks.get(path, [self.init_rank]))

    @property
    def delta_rank(self) -> int:
        """Δr of one growth."""
        return self.growth_rank or max(1, self.r // 2)


def block_params(host: Host, blocks: list[int]) -> int:
    """r·(d_in + d_out) + Σ_k 2·Δr_k·r_k for block sizes ``blocks``."""
    total, r_k = 0, 0
    for dr in blocks:
        r_k += dr
        total += dr * (host.d_in + host.d_out) + 2 * dr * r_k
    return total


@register(
    "triadaptlora",
    config=TriAdaptLoraConfig,
    family="procedure",
    paper="Liang, Wang, Zeng 2025, TriAdaptLoRA: Brain-Inspired Triangular Adaptive Low-Rank Adaptation "
          "(arXiv 2501.08008)",
    description="s·B·C·A with C split into block-lower/upper triangles; ranks grow in blocks during training where "
                "the normalised Frobenius norm of C rises fastest (linear threshold schedule)",
    params="r·(d_in + d_out) + Σ_k 2·Δr_k·r_k  (r = Σ Δr_k; init: init_rank)",
    hosts=HOST_KINDS + QUANTIZED_HOSTS,
    procedure=TriAdaptGrowth,
    lr_scale=2.5,
)
class TriAdaptLora(LowRankUpdate, Adapter):
    def __init__(self, host: Host, config: TriAdaptLoraConfig) -> None:
        super().__init__(host, config)
        self.s = config.scaling
        self.dropout = make_dropout(config.dropout)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.lora_C_row = nn.ParameterList()
        self.lora_C_col = nn.ParameterList()
        for dr in config.blocks_for(host.name):
            self.grow(dr)

    @property
    def blocks(self) -> list[int]:
        """Block sizes [Δr_0, Δr_1, ...]."""
        return [a.shape[0] for a in self.lora_A]

    @property
    def rank(self) -> int:
        return sum(self.blocks)

    @torch.no_grad()
    def grow(self, dr: int) -> list[nn.Parameter]:
        """Append a block of ``dr`` ranks (A_k, B_k ~ N(0, 0.02²); zero C strips: the output is unchanged)."""
        a, b = new_factors(self.host, dr, self.lora_A[0].dtype if len(self.lora_A) else None)
        a.normal_(0.0, INIT_STD)
        b.normal_(0.0, INIT_STD)
        r_new = self.rank + dr
        c_row = nn.Parameter(a.new_zeros(dr, r_new))
        c_col = nn.Parameter(a.new_zeros(r_new, dr))
        new = [a, b, c_row, c_col]
        if len(self.lora_A):
            for p in new:
                p.requires_grad_(self.lora_A[0].requires_grad)
        self.lora_A.append(a)
        self.lora_B.append(b)
        self.lora_C_row.append(c_row)
        self.lora_C_col.append(c_col)
        return new

    def triangles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, U), both r×r: L stacks the row strips (zero right of each), U the column strips (zero below each)."""
        r = self.rank
        low = torch.cat([F.pad(c, (0, r - c.shape[1])) for c in self.lora_C_row], 0)
        up = torch.cat([F.pad(c, (0, 0, 0, r - c.shape[0])) for c in self.lora_C_col], 1)
        return low, up

    def transform(self) -> torch.Tensor:
        """C = L + U."""
        low, up = self.triangles()
        return low + up

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B·C): the update s·B·C·A through the shared low-rank path (C folded into B, r×r extra work)."""
        a = self.lora_A[0] if len(self.lora_A) == 1 else torch.cat(list(self.lora_A), 0)
        b = self.lora_B[0] if len(self.lora_B) == 1 else torch.cat(list(self.lora_B), 1)
        return a, b @ self.transform()

    @torch.no_grad()
    def importance(self) -> float:
        """n = ‖C‖_F / K (K: number of blocks)."""
        return float(torch.linalg.matrix_norm(self.transform().float())) / len(self.lora_A)

    def orth_penalty(self) -> torch.Tensor:
        """‖A·Aᵀ − I‖_F + ‖Bᵀ·B − I‖_F."""
        a = torch.cat(list(self.lora_A), 0)
        b = torch.cat(list(self.lora_B), 1)
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        return torch.linalg.matrix_norm(a @ a.t() - eye) + torch.linalg.matrix_norm(b.t() @ b - eye)

    @classmethod
    def expected_params(cls, host: Host, config: TriAdaptLoraConfig) -> int:
        return block_params(host, config.blocks_for(host.name))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.blocks}, s={self.s:g}"


__all__ = ["INIT_STD", "TriAdaptGrowth", "TriAdaptLora", "TriAdaptLoraConfig", "block_params", "budget_fraction",
           "growth_count"]
