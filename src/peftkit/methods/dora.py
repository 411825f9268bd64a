"""DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv 2402.09353).

    weight:   V = W0 + s·B·A,  n = ‖V‖ per output row (detached, paper §4.3),  W' = diag(m/n)·V
    forward:  y = x·W'ᵀ + b0 = base(x) + (m/n − 1)⊙(x·W0ᵀ) + (m/n)⊙ s·dropout(x)·Aᵀ·Bᵀ
    init:     m = ‖W0‖ per row (so m/n = 1), A kaiming_uniform(a=√5), B = 0 ⇒ y = base(x)
    merge:    W ← diag(m/n)·(W0 + s·B·A)   (ΔW = W' − W0, full rank in general)

Trainable: magnitude m ∈ R^{d_out}, A, B — r·(d_in + d_out) + d_out per layer.
Dropout (training only) applies to the low-rank branch; the magnitude term uses the undropped x·W0ᵀ, as in the
official NVlabs code (Hugging Face PEFT instead feeds the dropped x to that term when dropout > 0).
The norm needs V (d_out×d_in) every forward — inherent to the method.

Fused path (sole active adapter on a frozen float32/64 Linear or GPT-2 Conv1D): one GEMM through W' and one
autograd function, in :mod:`peftkit.methods._dora_fused`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from peftkit.core import precision
from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor, lowrank_config_from_hf, lowrank_config_to_hf, lowrank_layout
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, init_down_, lowrank_delta, new_factors, pad_factors_
from peftkit.core.peft_names import lora_names
from peftkit.core.registry import register
from peftkit.methods._dora_fused import _dora_linear, _FusedDora


@dataclass
class DoraConfig(LowRankConfig):
    """DoRA. ``init``: ``"kaiming"`` or ``"gaussian"`` for A (B starts at zero). Accepts Hugging Face PEFT
    ``LoraConfig``'s field names with ``use_dora=True`` (``peftkit.LoraConfig(use_dora=True, ...)`` builds this)."""

    init: Literal["kaiming", "gaussian"] = "kaiming"

    peft_type = "LORA"
    peft_names = lora_names(inits=("kaiming", "gaussian"), dora=True)


@register(
    "dora",
    config=DoraConfig,
    family="reparameterized",
    paper="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv 2402.09353)",
    description="LoRA direction update with a learned per-output-row magnitude (weight decomposition)",
    params="r·(d_in + d_out) + d_out",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "conv3d", "grouped_conv", "embedding", "bnb_4bit",
           "bnb_8bit"),
    hf_peft_type="LORA",
)
class Dora(Adapter):
    additive = False  # reads the host output / weight (see Adapter.additive)
    def __init__(self, host: Host, config: DoraConfig) -> None:
        super().__init__(host, config)
        self.r, self.s = config.r, config.scaling
        self.lora_A, self.lora_B = new_factors(host, config.r)
        init_down_(self.lora_A, config.init, config.r)
        self.magnitude = nn.Parameter(host.weight_2d().detach().norm(dim=1).to(self.lora_A.dtype).clone())
        self.dropout = make_dropout(config.dropout)
        self._merge_norm: torch.Tensor | None = None
        self._m_checked: tuple[int, int] | None = None  # (storage, version) of m when _m_nonzero was read
        self._m_nonzero = True

    def _ba(self) -> torch.Tensor:
        return self.host.dense_up(self.lora_B) @ self.lora_A  # B grouped on a grouped convolution

    def _norm(self, w2d: torch.Tensor) -> torch.Tensor:
        return (w2d.to(self.lora_A.dtype) + self.s * (self._ba())).norm(dim=1).detach()

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole output through ``W' = diag(m/n)·(W + s·B·A)`` (see the module docstring), or None."""
        h = self.host
        if h.kind not in ("linear", "gpt2_conv1d") or (self.training and self.config.dropout > 0) or x.dim() < 2:
            return None
        w, a, b, m = h.weight_2d(), self.lora_A, self.lora_B, self.magnitude
        dt = precision.fused_dtype(x, w, folds=True)  # None in half precision (autocast included): W + s·B·A would
        if w.requires_grad or dt is None or any(t.dtype != dt for t in (x, a, b, m)):  # round the update away
            return None
        bias = h.bias
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad or m.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            if m.requires_grad and not self._magnitude_nonzero():
                return None  # ∂m divides by m
            return _FusedDora.apply(x, w, bias, a, b, m, self.s)
        with torch.no_grad():
            return _dora_linear(x, w, bias, a, b, m, self.s)[0]

    def _magnitude_nonzero(self) -> bool:
        """Whether no magnitude entry is zero (the fused ∂m divides by m). Reading the answer is a device sync, so it
        is read once per change of m — keyed on its storage and version counter, which every in-place write (an
        optimiser step, ``copy_``, a load) bumps — not once per forward: inference and repeated forwards between
        two optimiser steps read nothing."""
        m = self.magnitude
        key = (m.data_ptr(), m._version)
        if self._m_checked != key:
            self._m_nonzero = bool(m.detach().ne(0).all())
            self._m_checked = key
        return self._m_nonzero

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.host
        scale = self.magnitude / self._norm(h.weight_2d())
        lora = lowrank_delta(h, self.dropout(x), self.lora_A, self.lora_B, self.s)
        xw = h.without_bias(base_out).to(scale.dtype)
        return h.out_view(scale - 1) * xw + h.out_view(scale) * lora

    def _merged(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = weight.to(self.lora_A.dtype) + self.s * (self._ba())
        n = v.norm(dim=1)
        return ((self.magnitude / n)[:, None] * v).to(weight.dtype), n

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        merged, self._merge_norm = self._merged(weight)
        return merged, bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self._merge_norm if self._merge_norm is not None else self.magnitude
        v = weight.to(self.lora_A.dtype) * (n / self.magnitude)[:, None]
        return (v - self.s * (self._ba())).to(weight.dtype), bias

    def pad_rank(self, r: int, scaling: float | None = None) -> None:
        pad_factors_(self, self.lora_A, self.lora_B, r, scaling)  # V = W + s·B·A, m: unchanged

    def delta_weight(self) -> torch.Tensor:
        w = self.host.weight_2d().detach()
        return self._merged(w)[0] - w

    @classmethod
    def expected_params(cls, host: Host, config: DoraConfig) -> int:
        return config.r * host.d_in + host.d_out * config.r // host.groups + host.d_out

    # Hugging Face PEFT: peft_type LORA with use_dora; the magnitude is saved as `lora_magnitude_vector`,
    # shaped (1, d_out, 1[, 1]) for convolutions
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> DoraConfig | None:
        return lowrank_config_from_hf(DoraConfig, hf_config) if hf_config.get("use_dora") else None

    @classmethod
    def to_hf_config(cls, config: DoraConfig, hosts: list[Host]) -> dict[str, Any]:
        _peft_grouped(hosts, "written for")
        return {**lowrank_config_to_hf(config, hosts), "use_dora": True}

    @classmethod
    def from_hf_state(cls, config: DoraConfig, tensors: dict[str, torch.Tensor], hosts: list[Host]) -> Any:
        _peft_grouped(hosts, "read from")
        return tensors

    @classmethod
    def hf_layout(cls, host: Host, config: DoraConfig) -> dict[str, HFTensor]:
        hf_shape = (1, host.d_out, *(1,) * (host.weight.dim() - 2)) if host.is_conv else (host.d_out,)
        magnitude = HFTensor("lora_magnitude_vector", hf_shape, (host.d_out,))
        return {**lowrank_layout(host, config.r), "magnitude": magnitude}


def _peft_grouped(hosts: list[Host], how: str) -> None:
    """Hugging Face PEFT's DoRA on a grouped convolution normalises ``B.view(-1, r) @ A.view(r, -1)`` reshaped to
    the kernel (rows mixing the groups' output channels), not the adapted weight: refused both ways."""
    if any(h.groups > 1 for h in hosts):
        h = next(h for h in hosts if h.groups > 1)
        raise PeftkitError(f"DoRA on {h.name!r}, a grouped convolution (groups={h.groups}), cannot be {how} Hugging "
                           f"Face PEFT: PEFT normalises a reshaped B·A that mixes the groups' output channels, not the "
                           f"layer's adapted weight, so the outputs differ")
