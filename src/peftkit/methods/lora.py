"""LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685),
with rsLoRA scaling (Kalajdzievski 2023) and PiSSA init (Meng et al. 2024).

    forward:  y = x·W0ᵀ + b0 + s · dropout(x)·Aᵀ·Bᵀ,   A ∈ R^{r×d_in}, B ∈ R^{d_out×r},  s = α/r (rsLoRA: α/√r)
    init:     A ~ kaiming_uniform(a=√5) = U(±1/√d_in) (or N(0, 1/r²) "gaussian"), B = 0  ⇒ ΔW = 0
              PiSSA: U,S,Vᵀ = svd(W0); A = diag(√(S_r/s))·Vᵀ_r, B = U_r·diag(√(S_r/s)); W0 ← W_res = W0 − s·B·A
    merge:    W ← W0 + s·B·A  (ΔW = s·B·A, rank ≤ r)

Trainable: A, B — r·(d_in + d_out) per layer. PiSSA keeps its initial factors (A0, B0) as saved buffers so that
loading into a fresh base rebuilds the residual W_res exactly, and deleting the adapter restores W0.
With ``dropout = 0`` on a Linear / GPT-2 Conv1D host the forward and backward run in one fused autograd function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import (
    LowRankConfig,
    check_rank,
    fused_lowrank_forward,
    init_down_,
    lowrank_delta,
    new_factors,
)
from peftkit.core.registry import register

_INIT = re.compile(r"kaiming|gaussian|pissa|pissa_niter_\d+")


@dataclass
class LoraConfig(LowRankConfig):
    """LoRA. ``init``: ``"kaiming"`` (default), ``"gaussian"``, ``"pissa"`` or ``"pissa_niter_K"`` (randomised SVD
    with K subspace iterations)."""

    init: str = "kaiming"

    def validate(self) -> None:
        super().validate()
        if not _INIT.fullmatch(self.init):
            raise PeftkitError(
                f"LoraConfig.init must be kaiming, gaussian, pissa or pissa_niter_K, got {self.init!r}"
            )


@register(
    "lora",
    config=LoraConfig,
    paper="Hu et al. 2021, LoRA (arXiv 2106.09685); rsLoRA (arXiv 2312.03732); PiSSA (arXiv 2404.02948)",
    description="additive low-rank update s·BA; α/r or rsLoRA α/√r scaling; kaiming, gaussian or PiSSA init",
    params="r·(d_in + d_out)",
    hf_peft_type="LORA",
)
class Lora(Adapter):
    def __init__(self, host: Host, config: LoraConfig) -> None:
        super().__init__(host, config)
        self.r, self.s = config.r, config.scaling
        self.lora_A, self.lora_B = new_factors(host, config.r)
        self.dropout = make_dropout(config.dropout)
        self.pissa = config.init.startswith("pissa")
        if self.pissa:
            check_rank(host, config.r)
            self._pissa_init(int(config.init.rsplit("_", 1)[1]) if "niter" in config.init else None)
        else:
            init_down_(self.lora_A, config.init, config.r)

    @torch.no_grad()
    def _pissa_init(self, niter: int | None) -> None:
        w = self.host.weight_2d().detach().float()
        r = self.r
        if niter is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        else:
            u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
            vh = v.t()
        sr = (s[:r] / self.s).sqrt()
        a = sr[:, None] * vh[:r]
        b = u[:, :r] * sr[None, :]
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.register_buffer("pissa_A0", a.to(self.lora_A.dtype).clone())
        self.register_buffer("pissa_B0", b.to(self.lora_B.dtype).clone())

    def _pissa_principal(self) -> torch.Tensor:
        return self.host.to_native(self.s * (self.pissa_B0 @ self.pissa_A0)).to(self.host.weight.dtype)

    @torch.no_grad()
    def on_install(self) -> None:
        if self.pissa:  # base becomes the residual W_res = W0 − s·B0·A0
            self.host.weight.sub_(self._pissa_principal())

    @torch.no_grad()
    def on_remove(self) -> None:
        if self.pissa:
            self.host.weight.add_(self._pissa_principal())

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return lowrank_delta(self.host, self.dropout(x), self.lora_A, self.lora_B, self.s)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.config.dropout > 0 and self.training:
            return None
        return fused_lowrank_forward(self.host, x, self.lora_A, self.lora_B, self.s)

    def delta_weight(self) -> torch.Tensor:
        return self.s * (self.lora_B @ self.lora_A)

    @classmethod
    def expected_params(cls, host: Host, config: LoraConfig) -> int:
        return config.r * (host.d_in + host.d_out)
