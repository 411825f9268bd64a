"""DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv 2402.09353).

    weight:   V = W0 + s·B·A,  n = ‖V‖ per output row (detached, paper §4.3),  W' = diag(m/n)·V
    forward:  y = x·W'ᵀ + b0 = base(x) + (m/n − 1)⊙(x·W0ᵀ) + (m/n)⊙ s·dropout(x)·Aᵀ·Bᵀ
    init:     m = ‖W0‖ per row (so m/n = 1), A kaiming_uniform(a=√5), B = 0 ⇒ y = base(x)
    merge:    W ← diag(m/n)·(W0 + s·B·A)   (ΔW = W' − W0, full rank in general)

Trainable: magnitude m ∈ R^{d_out}, A, B — r·(d_in + d_out) + d_out per layer.
Dropout (training only) applies to the low-rank branch; the magnitude term uses the undropped x·W0ᵀ, as in the
official NVlabs code (Hugging Face PEFT instead feeds the dropped x to that term when dropout > 0).
The norm needs V (d_out×d_in) every forward — inherent to the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.hf import HFTensor, lowrank_config_from_hf, lowrank_config_to_hf, lowrank_layout
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, init_down_, lowrank_delta, new_factors
from peftkit.core.registry import register


@dataclass
class DoraConfig(LowRankConfig):
    """DoRA. ``init``: ``"kaiming"`` or ``"gaussian"`` for A (B starts at zero)."""

    init: Literal["kaiming", "gaussian"] = "kaiming"


@register(
    "dora",
    config=DoraConfig,
    paper="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv 2402.09353)",
    description="LoRA direction update with a learned per-output-row magnitude (weight decomposition)",
    params="r·(d_in + d_out) + d_out",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "bnb_4bit", "bnb_8bit"),
    hf_peft_type="LORA",
)
class Dora(Adapter):
    def __init__(self, host: Host, config: DoraConfig) -> None:
        super().__init__(host, config)
        self.r, self.s = config.r, config.scaling
        self.lora_A, self.lora_B = new_factors(host, config.r)
        init_down_(self.lora_A, config.init, config.r)
        self.magnitude = nn.Parameter(host.weight_2d().detach().norm(dim=1).to(self.lora_A.dtype).clone())
        self.dropout = make_dropout(config.dropout)
        self._merge_norm: torch.Tensor | None = None

    def _norm(self, w2d: torch.Tensor) -> torch.Tensor:
        return (w2d.to(self.lora_A.dtype) + self.s * (self.lora_B @ self.lora_A)).norm(dim=1).detach()

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.host
        scale = self.magnitude / self._norm(h.weight_2d())
        lora = lowrank_delta(h, self.dropout(x), self.lora_A, self.lora_B, self.s)
        xw = h.without_bias(base_out).to(scale.dtype)
        return h.out_view(scale - 1) * xw + h.out_view(scale) * lora

    def _merged(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = weight.to(self.lora_A.dtype) + self.s * (self.lora_B @ self.lora_A)
        n = v.norm(dim=1)
        return ((self.magnitude / n)[:, None] * v).to(weight.dtype), n

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        merged, self._merge_norm = self._merged(weight)
        return merged, bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self._merge_norm if self._merge_norm is not None else self.magnitude
        v = weight.to(self.lora_A.dtype) * (n / self.magnitude)[:, None]
        return (v - self.s * (self.lora_B @ self.lora_A)).to(weight.dtype), bias

    def delta_weight(self) -> torch.Tensor:
        w = self.host.weight_2d().detach()
        return self._merged(w)[0] - w

    @classmethod
    def expected_params(cls, host: Host, config: DoraConfig) -> int:
        return config.r * (host.d_in + host.d_out) + host.d_out

    # Hugging Face PEFT: peft_type LORA with use_dora; the magnitude is saved as `lora_magnitude_vector`,
    # shaped (1, d_out, 1[, 1]) for convolutions
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> DoraConfig | None:
        return lowrank_config_from_hf(DoraConfig, hf_config) if hf_config.get("use_dora") else None

    @classmethod
    def to_hf_config(cls, config: DoraConfig, hosts: list[Host]) -> dict[str, Any]:
        return {**lowrank_config_to_hf(config, hosts), "use_dora": True}

    @classmethod
    def hf_layout(cls, host: Host, config: DoraConfig) -> dict[str, HFTensor]:
        hf_shape = (1, host.d_out, *(1,) * (host.weight.dim() - 2)) if host.is_conv else (host.d_out,)
        magnitude = HFTensor("lora_magnitude_vector", hf_shape, (host.d_out,))
        return {**lowrank_layout(host, config.r), "magnitude": magnitude}
