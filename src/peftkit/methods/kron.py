"""DiffuseKronA — Marjit et al., WACV 2025, "DiffuseKronA: A Parameter Efficient Fine-tuning Method for Personalized
Diffusion Model" (official code github.com/IBM/DiffuseKronA ``diffusekrona/krona.py``: ``KronALinearLayer``).

    forward:  y = base(x) + c·x·(A⊗B)ᵀ,  A ∈ R^{a1×a2}, B ∈ R^{b1×b2}, b1 = d_out/a1, b2 = d_in/a2;
              computed as X = x.view(N, a2, b2), Y = A·X·Bᵀ (N×a1×b1) reshaped to (N, d_out) — never building A⊗B
    init:     A ~ N(0, (1/a1)²), B = 0  ⇒ ΔW = 0
    merge:    W ← W0 + c·A⊗B  (torch.kron;  rank(A⊗B) = rank(A)·rank(B), can be full rank)

Trainable: A, B — a1·a2 + b1·b2 per layer. c = ``scale`` (1 in the official code). ``a1``/``a2`` left as None are
chosen per layer among the divisors of d_out / d_in to minimise a1·a2 + b1·b2 (reached near a1·a2 ≈ √(d_out·d_in));
ties go to the larger rank bound min(a1,a2)·min(b1,b2), then to the smaller (a1, a2). A given a1 (a2) must divide d_out
(d_in). Resolved: the official 3-D input path realises a fixed row permutation of A⊗B; we use the canonical kron
(same expressivity). The product is evaluated in the cheaper order ((A·X)·Bᵀ or A·(X·Bᵀ)). Dropout (training only)
applies to the update branch's input. As the sole active adapter with at least d_out rows (training batches; no active
dropout; float32/64) the layer instead runs as x·(W0 + c·A⊗B)ᵀ + b through ``core.dense`` (A⊗B built, d_out·d_in; x
kept without a copy where a LayerNorm / GELU made it): on MiniLM training 0.90 × the step time and 0.66 × the step
memory of the activation path above.
"""

from __future__ import annotations

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
class KronConfig(AdapterConfig):
    """DiffuseKronA. ``a1``: rows of A (divides d_out), ``a2``: columns of A (divides d_in); None = automatic;
    ``scale``: c. Per-layer shapes go in ``overrides`` (e.g. ``{"attn.q": {"a1": 32, "a2": 16}}``)."""

    a1: int | None = None
    a2: int | None = None
    scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        for name in ("a1", "a2"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise PeftkitError(f"KronConfig.{name} must be a positive integer or None, got {v}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def kron_shape(host: Host, config: KronConfig) -> tuple[int, int, int, int]:
    """(a1, a2, b1, b2) for ``host``: the given factors checked, the missing ones chosen (see module docstring)."""
    d_out, d_in = host.d_out, host.d_in
    for name, v, d, what in (("a1", config.a1, d_out, "d_out"), ("a2", config.a2, d_in, "d_in")):
        if v is not None and d % v:
            raise PeftkitError(
                f"module {host.name!r}: KronConfig.{name} = {v} must divide {what} = {d} "
                f"(ΔW = A⊗B needs A: a1×a2 with a1 | d_out, a2 | d_in)"
            )
    a1s = [config.a1] if config.a1 is not None else _divisors(d_out)
    a2s = [config.a2] if config.a2 is not None else _divisors(d_in)

    def key(a: tuple[int, int]) -> tuple[int, int, int, int]:
        b1, b2 = d_out // a[0], d_in // a[1]
        return a[0] * a[1] + b1 * b2, -min(a) * min(b1, b2), a[0], a[1]

    a1, a2 = min(((x, y) for x in a1s for y in a2s), key=key)
    return a1, a2, d_out // a1, d_in // a2


@register(
    "kron",
    config=KronConfig,
    family="reparameterized",
    paper="Marjit et al., WACV 2025, DiffuseKronA: Kronecker-product adaptation (github.com/IBM/DiffuseKronA)",
    description="additive Kronecker-product update c·A⊗B, applied by reshaping the input (never materialised)",
    params="a1·a2 + (d_out/a1)·(d_in/a2)",
    hosts=("linear", "gpt2_conv1d", "bnb_4bit", "bnb_8bit"),
)
class Kron(DenseUpdate, Adapter):
    def __init__(self, host: Host, config: KronConfig) -> None:
        super().__init__(host, config)
        self.a1, self.a2, self.b1, self.b2 = kron_shape(host, config)
        w = host.weight
        dt = w.dtype if w.is_floating_point() else torch.float32
        self.kron_A = nn.Parameter(torch.empty(self.a1, self.a2, device=w.device, dtype=dt))
        self.kron_B = nn.Parameter(torch.zeros(self.b1, self.b2, device=w.device, dtype=dt))
        with torch.no_grad():
            nn.init.normal_(self.kron_A, std=1.0 / self.a1)
        self.s = config.scale
        self.dropout = make_dropout(config.dropout)
        # (A·X)·Bᵀ costs a1·b2·(a2 + b1) per row, A·(X·Bᵀ) costs a2·b1·(b2 + a1): pick the cheaper order
        self.a_first = self.a1 * self.b2 * (self.a2 + self.b1) <= self.a2 * self.b1 * (self.b2 + self.a1)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.kron_A, self.kron_B
        a1, a2, b1, b2 = self.a1, self.a2, self.b1, self.b2
        xm = self.dropout(x).to(a.dtype).reshape(-1, a2, b2)  # X[n, j1, j2] = x[n, j1·b2 + j2]
        n = xm.shape[0]
        # Y = A·X·Bᵀ with plain 2-D products (their rounding does not depend on requires_grad, unlike batched matmul)
        if self.a_first:
            z = xm.transpose(1, 2).reshape(-1, a2).mm(a.t())  # (N·b2, a1): (A·X)ᵀ per n
            y = z.view(n, b2, a1).transpose(1, 2).reshape(-1, b2).mm(b.t())  # (N·a1, b1)
        else:
            z = xm.reshape(-1, b2).mm(b.t())  # (N·a2, b1): X·Bᵀ per n, then (A·X·Bᵀ)ᵀ below
            y = z.view(n, a2, b1).transpose(1, 2).reshape(-1, a2).mm(a.t())  # (N·b1, a1)
            y = y.view(n, b1, a1).transpose(1, 2)
        y = y.reshape(*x.shape[:-1], a1 * b1)  # Y[n, i1, i2] = y[n, i1·b1 + i2]
        return y * self.s if self.s != 1.0 else y

    def delta_weight(self) -> torch.Tensor:
        return self.s * torch.kron(self.kron_A, self.kron_B)

    @classmethod
    def expected_params(cls, host: Host, config: KronConfig) -> int:
        a1, a2, b1, b2 = kron_shape(host, config)
        return a1 * a2 + b1 * b2
