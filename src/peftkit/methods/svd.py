"""CLIP-SVD — Koleilat, Rivaz, Xiao 2025, "Singular Value Few-shot Adaptation of Vision-Language Models" (official
code github.com/HealthX-Lab/CLIP-SVD ``svf_utils/svf_torch.py``: ``SVD_Linear``, ``resolver``).

    forward:  y = ((x·V_k)⊙σ)·U_kᵀ + b0 + x·(W0 − U_k·diag(S_k)·V_kᵀ)ᵀ = base(x) + ((x·V_k)⊙(σ − S_k))·U_kᵀ
    init:     U, S, Vᵀ = svd(W0) (thin, float64);  U_k, V_k, S_k frozen;  σ = S_k (trainable)  ⇒ y = base(x) exactly
    merge:    W ← W0 + ΔW,  ΔW = U_k·diag(σ − S_k)·V_kᵀ

k = min(max(⌊⌊m·ρ⌋/4⌋·4, 1), m), m = min(d_out, d_in), ρ = ``rank_fraction`` (official ``round_to_nearest``; ρ = 1
is full rank when m is divisible by 4). Trainable: σ ∈ R^k — k per layer. U_k, S_k, V_kᵀ are persistent buffers
(k·(d_out + d_in + 1) numbers per layer in the adapter file), so loading never re-runs an SVD and reproduces the
outputs bit for bit. Resolved: the official layer is ((x·V_k)⊙σ)·U_kᵀ + b0 alone, which drops the components past
k; we keep the residual W0 − U_k·S_k·V_kᵀ exact (equal to the official layer when k = rank W0) and compute it as
base(x) plus a rank-k activation-path delta, so ``disable()`` sees W0 — or, as the sole active adapter on a Linear with
at least d_out rows (training batches; no active dropout; float32/64), as x·(W0 + ΔW)ᵀ + b through ``core.dense``:
ΔW costs d_out·k·d_in to build, less than the two rank-k passes over the activations (on MiniLM training 0.76 × the
step time and 0.88 × the step memory of the activation path).
Conv and embedding hosts use their (d_out, d_in) view. Dropout (training only) applies to the delta's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import DenseUpdate
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.registry import register


@dataclass
class SvdConfig(AdapterConfig):
    """CLIP-SVD singular-value tuning. ``rank_fraction``: ρ ∈ (0, 1], the share of singular values kept."""

    rank_fraction: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.rank_fraction <= 1.0:  # also rejects NaN
            raise PeftkitError(f"SvdConfig.rank_fraction must be in (0, 1], got {self.rank_fraction}")


def svd_rank(host: Host, rho: float) -> int:
    """k = min(max(⌊⌊m·ρ⌋/4⌋·4, 1), m) with m = min(d_out, d_in)."""
    m = min(host.d_out, host.d_in)
    return min(max(math.floor(m * rho) // 4 * 4, 1), m)


@register(
    "svd",
    config=SvdConfig,
    family="selective",
    paper="Koleilat, Rivaz, Xiao 2025, CLIP-SVD: Singular Value Few-shot Adaptation of Vision-Language Models",
    description="trains only the top-k singular values of each weight (U, V frozen); the residual is kept exact",
    params="k = min(max(⌊⌊min(d_out, d_in)·ρ⌋/4⌋·4, 1), min(d_out, d_in))",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "embedding", "bnb_4bit", "bnb_8bit"),
    lr_scale=2.5,
)
class Svd(DenseUpdate, Adapter):
    def __init__(self, host: Host, config: SvdConfig) -> None:
        super().__init__(host, config)
        w = host.weight
        dt = w.dtype if w.is_floating_point() else torch.float32
        k = svd_rank(host, config.rank_fraction)
        u, s, vh = torch.linalg.svd(host.weight_2d().detach().double(), full_matrices=False)
        self.register_buffer("U_k", u[:, :k].to(w.device, dt).contiguous())
        self.register_buffer("S_k", s[:k].to(w.device, dt))
        self.register_buffer("Vh_k", vh[:k].to(w.device, dt).contiguous())
        self.sigma = nn.Parameter(self.S_k.clone())
        self.dropout = make_dropout(config.dropout)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        host = self.host
        xd = self.dropout(x).to(self.sigma.dtype) if x.is_floating_point() else x
        h = host.project_in(xd, self.Vh_k) * host.out_view(self.sigma - self.S_k)
        return host.project_out(h, self.U_k)

    def delta_weight(self) -> torch.Tensor:
        return (self.U_k * (self.sigma - self.S_k)) @ self.Vh_k

    @classmethod
    def expected_params(cls, host: Host, config: SvdConfig) -> int:
        return svd_rank(host, config.rank_fraction)
