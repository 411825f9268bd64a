"""LoHa — Hyeon-Woo, Ye-Bin & Oh, ICLR 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning" (arXiv 2108.06098), as LyCORIS and Hugging Face PEFT (``peft/tuners/loha``) define it; reads and
writes PEFT's ``LOHA`` files.

    forward:  y = base(x) + x·ΔWᵀ (a convolution: conv(x, ΔW)), ΔW built from the factors (PEFT's LycorisLayer)
    ΔW:       s·(W1a·W1b) ⊙ (W2a·W2b),  W·a ∈ R^{d_out×r}, W·b ∈ R^{r×d_in},  s = α/r  (rank ≤ r², not r)
              effective conv (Tucker): s·(T1 ×₁ W1aᵀ ×₂ W1bᵀ) ⊙ (T2 ×₁ W2aᵀ ×₂ W2bᵀ), T· ∈ R^{r×r×kh×kw},
              W·a ∈ R^{r×c_out}, W·b ∈ R^{r×c_in}
    init:     W1a, W1b, W2a (and T1, T2) kaiming_uniform(a=√5), W2b = 0  ⇒ ΔW = 0  (PEFT's init_weights=True;
              init="random": W2b kaiming too, PEFT's False)
    merge:    W ← W0 + ΔW

Trainable per layer: 2·r·(d_out + d_in) (d_in = c_in·kh·kw for a convolution); with the effective conv
2·(r²·kh·kw + r·(c_out + c_in)). Conv1d kernels are cores of shape (r, r, k, 1), as PEFT stores them. Rank and module
dropout: see ``_lycoris.py``. As the sole active adapter with at least d_out rows (training batches, no dropout,
float32/64) a Linear layer runs as x·(W0 + ΔW)ᵀ + b through ``core.dense``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftkit.core.host import Host
from peftkit.core.registry import register
from peftkit.methods._lycoris import LYCORIS_HOSTS, LycorisConfig, LycorisUpdate, effective_conv, kernel, lycoris_names

_INIT_TO_PEFT = {"default": True, "random": False}


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa. ``init``: ``"default"`` (ΔW = 0) or ``"random"`` (ΔW ≠ 0, for tests). Accepts Hugging Face PEFT
    ``LoHaConfig``'s field names (``init_weights``, ``rank_pattern``, ``alpha_pattern``, ...)."""

    peft_type = "LOHA"
    peft_names = lycoris_names({True: "default", False: "random"})


def hadamard_weight(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                    s: float) -> torch.Tensor:
    """s·(W1a·W1b) ⊙ (W2a·W2b)."""
    return ((w1a @ w1b) * (w2a @ w2b)) * s


def tucker_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """The (c_out, c_in, kh, kw) kernel T ×₁ Waᵀ ×₂ Wbᵀ of a Tucker core T (r, r, kh, kw), Wa (r, c_out),
    Wb (r, c_in)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


@register(
    "loha",
    config=LoHaConfig,
    family="reparameterized",
    paper="Hyeon-Woo et al., ICLR 2022, FedPara (arXiv 2108.06098), as LyCORIS / Hugging Face PEFT's LoHa",
    description="Hadamard product of two low-rank products s·(W1a·W1b)⊙(W2a·W2b) (rank up to r²); Tucker cores "
                "for conv kernels",
    params="2·r·(d_out + d_in)  (effective conv: 2·(r²·kh·kw + r·(c_out + c_in)))",
    hosts=LYCORIS_HOSTS,
    hf_peft_type="LOHA",
)
class LoHa(LycorisUpdate):
    def __init__(self, host: Host, config: LoHaConfig) -> None:
        super().__init__(host, config)
        self.cp = effective_conv(host, config)
        with torch.no_grad():  # PEFT's order: w1_a, w1_b, w2_a, (w2_b), t1, t2
            self._kaiming("hada_w1_a", "hada_w1_b", "hada_w2_a")
            if config.init == "random":
                self._kaiming("hada_w2_b")
            else:
                self._zeros("hada_w2_b")
            self._kaiming("hada_t1", "hada_t2")

    @classmethod
    def shapes(cls, host: Host, config: LoHaConfig) -> dict[str, tuple[int, ...]]:
        r = config.r
        if effective_conv(host, config):
            core, c_in = (r, r, *kernel(host)), host.module.in_channels
            return {"hada_w1_a": (r, host.d_out), "hada_w1_b": (r, c_in), "hada_w2_a": (r, host.d_out),
                    "hada_w2_b": (r, c_in), "hada_t1": core, "hada_t2": core}
        return {"hada_w1_a": (host.d_out, r), "hada_w1_b": (r, host.d_in), "hada_w2_a": (host.d_out, r),
                "hada_w2_b": (r, host.d_in)}

    def delta_weight(self) -> torch.Tensor:
        if self.cp:
            w1 = tucker_weight(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            w2 = tucker_weight(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
            return (w1 * w2 * self.s).reshape(self.host.d_out, self.host.d_in)
        return hadamard_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.s)

    @classmethod
    def config_class(cls) -> type[LoHaConfig]:
        return LoHaConfig

    @classmethod
    def to_hf_config(cls, config: LoHaConfig, hosts: list[Host]) -> dict[str, Any]:
        return cls.lycoris_to_hf(config, _INIT_TO_PEFT)
