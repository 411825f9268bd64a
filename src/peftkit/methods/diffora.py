"""DiffoRA — Jiang, Wang, Yuan 2025, "DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential
Low-Rank Matrix Adaptation" (arXiv 2502.08905; v2: "…via Differential Module Selection").

    forward:  y = base(x) + Γ·s·dropout(x)·Aᵀ·Bᵀ,   A ∈ R^{r×d_in}, B ∈ R^{d_out×r},  s = α/r (rsLoRA: α/√r)
              search: Γ → γ = σ(θ) (= the LoRA weight of softmax([θ, 0]) over {LoRA, zero}); after it Γ ∈ {0, 1}
    init:     A ~ kaiming_uniform(a=√5), B = 0, θ = 0 (γ = ½)  ⇒  ΔW = 0
    merge:    W ← W0 + Γ·s·B·A   (the current γ while searching; nothing for a dropped module)

Every targeted module is a candidate with its own LoRA branch of rank r and its own selection logit θ (a saved
buffer, not a parameter: the task optimiser never sees it). :class:`DifforaSearch` (attached by the trainer) runs
the bi-level search as alternating first-order DARTS steps: the trainer's optimiser step trains the LoRA weights on
the training batch, then the procedure takes one Adam step on the θ's alone from the loss of a held-out batch
(``held_out=``, cycled). After ``search_steps`` optimiser steps — by default the first ``search_share`` = ½ of the
run, whose length the trainer tells the procedure — it discretises: the top-⌈ρ·n⌉ of the n candidate modules by γ
(ties: model order) keep the LoRA weights learned during the search (weight sharing, no re-init) with γ folded into
B (B ← γ·B, so a kept module's ΔW does not jump at discretisation) and Γ = 1 — plain LoRA, fine-tuned for the rest of
the run — and the others are switched off for good: their tensors are deleted (and dropped from the optimiser) and
the layer runs the base module alone. The output therefore changes at discretisation by the dropped modules'
contribution only. The kept module paths are recorded in the
config (``selected``), which ``save`` writes, so ``load`` rebuilds the discretised adapter.
Params: r·(d_in + d_out) per candidate while searching (+ one logit each, a buffer); Σ_selected r·(d_in + d_out) after.

UNCONFIRMED: no code exists and the paper body was not readable; this is the spec's best reading (DARTS-style).
Choices made here that the paper may do differently: σ(θ) per module (the spec allows a 2-way softmax; the two are the
same function), θ = 0 at init, one θ step after every weight step, Adam(lr=``theta_lr``, betas (0.5, 0.999),
weight decay 1e-3) for θ (the DARTS architecture optimiser), ⌈ρ·n⌉ kept over all candidates of the adapter, search
for half the run then fine-tuning (``search_share``), and γ folded into the kept B (weight sharing "to reduce the
relaxation/discretisation gap": with Γ = 1 and B unchanged every kept ΔW would double from γ ≈ ½). Held-out data: the
procedure asks its run for ``held_out_share`` = 10 % of the training examples (:class:`~peftkit.core.procedure.
Procedure`; ``peftkit train`` honours it); given no held-out batches at all (e.g. driven by hand) the θ step uses
the step's own training batch (seen through ``extra_loss``) after the weight step — alternating, but single-split, a
documented fallback. Under data-parallel
training (``torchrun``) the θ gradients are averaged over the processes (weighted by their batch slices) before the
θ step, so every process keeps the same θ and selects the same modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, LowRankUpdate, init_down_, new_factors
from peftkit.core.registry import HOST_KINDS, QUANTIZED_HOSTS, register
from peftkit.methods.diffora_search import (  # the search procedure and the discretisation: their own module
    THETA_BETAS,
    THETA_WEIGHT_DECAY,
    DifforaSearch,
    apply_selection,
    discretize,
)


@dataclass
class DifforaConfig(LowRankConfig):
    """DiffoRA. ``rho``: fraction of candidate modules kept; ``search_steps``: optimiser steps of relaxed search
    before discretising (None: ``search_share`` of the run's steps, or the end of training when the run's length is
    unknown); ``search_share``: that share (the rest fine-tunes the kept modules as plain LoRA); ``theta_lr``:
    learning rate of the selection logits; ``selected``: the kept module paths, written at discretisation (None while
    searching)."""

    rho: float = 0.5
    search_steps: int | None = None
    search_share: float = 0.5
    theta_lr: float = 3e-4
    selected: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if not 0.0 < self.rho <= 1.0:
            raise PeftkitError(f"{name}.rho (fraction of modules kept) must be in (0, 1], got {self.rho}")
        if self.search_steps is not None and self.search_steps < 1:
            raise PeftkitError(f"{name}.search_steps must be >= 1, got {self.search_steps}")
        if not 0.0 < self.search_share <= 1.0:
            raise PeftkitError(f"{name}.search_share (share of the run spent searching) must be in (0, 1], got "
                               f"{self.search_share}")
        if not self.theta_lr > 0:
            raise PeftkitError(f"{name}.theta_lr must be > 0, got {self.theta_lr}")

    def kept(self, n: int) -> int:
        """⌈ρ·n⌉ (at least one)."""
        return max(1, math.ceil(self.rho * n - 1e-9))

    def search_limit(self, run_steps: int | None) -> int | None:
        """Optimiser steps of search in a run of ``run_steps``: ``search_steps``, else ⌈share·run⌉ (None: unknown)."""
        if self.search_steps is not None:
            return self.search_steps
        return None if run_steps is None else max(1, math.ceil(self.search_share * run_steps - 1e-9))


def relaxation_weights(theta: torch.Tensor) -> torch.Tensor:
    """softmax([θ, 0]) over {LoRA, zero}: (γ, 1 − γ) along the last dimension, γ = σ(θ)."""
    return torch.softmax(torch.stack([theta, torch.zeros_like(theta)], -1), -1)


@register(
    "diffora",
    config=DifforaConfig,
    family="procedure",
    paper="Jiang, Wang, Yuan 2025, DiffoRA: Differential Low-Rank Matrix Adaptation / Module Selection "
          "(arXiv 2502.08905) — unconfirmed reading",
    description="LoRA on every candidate module gated by σ(θ); θ learned on held-out batches (alternating "
                "DARTS), then the top ρ fraction of modules keep LoRA and the rest are switched off",
    params="r·(d_in + d_out) per candidate; Σ_selected r·(d_in + d_out) after discretisation",
    hosts=HOST_KINDS + QUANTIZED_HOSTS,
    procedure=DifforaSearch,
)
class Diffora(LowRankUpdate, Adapter):
    def __init__(self, host: Host, config: DifforaConfig) -> None:
        super().__init__(host, config)
        self.s = config.scaling
        self.dropout = make_dropout(config.dropout)
        if config.selected is None:
            self.mode = "search"
        else:
            self.mode = "on" if host.name in config.selected else "off"
        if self.mode != "off":
            self.lora_A, self.lora_B = new_factors(host, config.r)
            init_down_(self.lora_A, "kaiming", config.r)
        if self.mode == "search":
            self.register_buffer("theta", torch.zeros((), device=self.lora_A.device, dtype=torch.float32))
        self._merged_gate: torch.Tensor | None = None

    def gate(self) -> torch.Tensor | float:
        """Γ: σ(θ) while searching, then 1 (kept) or 0 (dropped)."""
        if self.mode == "search":
            return torch.sigmoid(self.theta)
        return 1.0 if self.mode == "on" else 0.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, Γ·B)."""
        if self.mode == "search":
            return self.lora_A, self.lora_B * self.gate().to(self.lora_B.dtype)
        return self.lora_A, self.lora_B

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return torch.zeros_like(base_out)
        return super().delta(x, base_out)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.mode == "off":
            return self.host.module(x)  # a dropped module costs nothing: the base layer alone
        return super().fused_forward(x)

    def delta_weight(self, gate: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "off":
            w = self.host.weight
            return torch.zeros(self.host.d_out, self.host.d_in, device=w.device,
                               dtype=w.dtype if w.is_floating_point() else torch.float32)
        if self.mode == "on":
            return self.s * (self.lora_B @ self.lora_A)
        g = torch.sigmoid(self.theta) if gate is None else gate
        return self.s * ((self.lora_B * g.to(self.lora_B.dtype)) @ self.lora_A)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mode == "search":  # remember γ: unmerge subtracts the same ΔW even if θ moved in between
            self._merged_gate = torch.sigmoid(self.theta).detach().clone()
        return weight + self.delta_weight(self._merged_gate).to(weight.dtype), bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        gate, self._merged_gate = self._merged_gate, None
        return weight - self.delta_weight(gate).to(weight.dtype), bias

    @torch.no_grad()
    def switch(self, keep: bool, fold: bool = False) -> list[nn.Parameter]:
        """End the search for this module: Γ = 1 (``keep``; ``fold``: B ← γ·B first, so ΔW stays the same) or off for
        good. Returns the deleted parameters."""
        if self.mode != "search":
            raise PeftkitError(f"module {self.host.name!r}: this DiffoRA adapter is already discretised")
        if keep and fold:
            self.lora_B.mul_(torch.sigmoid(self.theta).to(self.lora_B.dtype))
        del self.theta
        if keep:
            self.mode = "on"
            return []
        removed = [self.lora_A, self.lora_B]
        del self.lora_A, self.lora_B
        self.mode = "off"
        return removed

    @classmethod
    def expected_params(cls, host: Host, config: DifforaConfig) -> int:
        if config.selected is not None and host.name not in config.selected:
            return 0
        return config.r * (host.d_in + host.d_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.config.r}, mode={self.mode}"


__all__ = ["THETA_BETAS", "THETA_WEIGHT_DECAY", "Diffora", "DifforaConfig", "DifforaSearch", "apply_selection",
           "discretize", "relaxation_weights"]
