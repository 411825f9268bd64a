"""RandLoRA — Albert et al., ICLR 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models"
(arXiv 2502.00987; official code PaulAlbert31/RandLoRA and its Hugging Face PEFT port).

    forward:  y = base(x) + dropout(x)·ΔWᵀ,  ΔW_{M×m} = s·Σ_{i=1..N} B_i·diag(λ_i)·A·diag(γ_i)  (ᵀ if d_out < d_in)
    init:     frozen shared bases A ∈ R^{r×m}, B_i ∈ R^{M×r} from one seeded generator (kaiming_uniform(a=√5) or
              ternary {−1,0,+1}, each divided by its std); trainable λ_i = 0, γ_i = 1/M  ⇒ ΔW = 0
    merge:    W ← W0 + ΔW   (rank(ΔW) = m = min(d_in, d_out) for generic λ, γ: full rank with N = ⌈m/r⌉ terms)

m = min(d_in, d_out), M = max, N = ⌈m/r⌉; s = α/r (Hugging Face PEFT; the official NLG code uses α/(r·√N)).
Trainable: λ ∈ R^{N×r}, γ ∈ R^{N×m} — N·(r + m) per layer. The bases are one set for the whole model, sized to the
largest (M, m) over the targets and sliced per layer; they are never saved: they are regenerated from
``projection_seed`` at load and verified against a saved checksum. The activation path builds the scaled basis
Ã = [A·diag(γ_1); …; A·diag(γ_N)] (N·r×m ≈ m×m, the size of one weight, not of the activations) and computes
x·ΔWᵀ = s·((x·Ãᵀ)⊙λ)·[B_1 … B_N]ᵀ (or the transposed chain when d_out < d_in). As the sole active adapter with at
least d_out rows (training batches; no active dropout; float32 hosts, matching its float32 parameters) the layer
instead runs as x·(W0 + ΔW)ᵀ + b through ``core.dense`` — ΔW built once (≈ d_out·d_in·m), no activation-sized
intermediate kept: on MiniLM training 0.77 × the step time and 0.86 × the step memory of the activation path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.adapter import Adapter, PlanContext, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import DenseUpdate
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import lowrank_scaling
from peftkit.core.peft_names import TARGETING, alias, inert
from peftkit.core.registry import register


@dataclass
class RandLoraConfig(AdapterConfig):
    """RandLoRA. ``r``: rank of each random basis; ``alpha``: s = α/r (PEFT default 640 with r = 32);
    ``projection_seed``: seed of the shared bases; ``sparse``: ternary bases with P(±1) = 1/6 each;
    ``very_sparse``: ternary with P(±1) = 1/(2√m). Accepts Hugging Face PEFT ``RandLoraConfig``'s field names
    (``randlora_alpha``, ``randlora_dropout``, ``projection_prng_key``, ...)."""

    r: int = 32
    alpha: float = 640.0
    projection_seed: int = 0
    sparse: bool = False
    very_sparse: bool = False

    peft_type = "RANDLORA"
    peft_names = {
        **TARGETING,
        "randlora_alpha": alias("alpha"),
        "randlora_dropout": alias("dropout"),
        "projection_prng_key": alias("projection_seed"),
        # peftkit never saves the bases: it regenerates them from the seed and checks a saved checksum
        "save_projection": inert(),
        "init_weights": inert(True, "peftkit's RandLoRA starts at ΔW = 0 (λ = 0); PEFT's False draws λ at random, "
                                    "for tests"),
    }

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise PeftkitError(f"RandLoraConfig.r must be a positive integer, got {self.r}")


def _dims(host: Host) -> tuple[int, int]:
    return max(host.d_in, host.d_out), min(host.d_in, host.d_out)


def make_bases(cfg: RandLoraConfig, big: int, small: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bases: A (r, small) and B (N_max, big, r), from one seeded generator, each divided by its std.
    Drawn in fp32 on the CPU with a generator of their own (the global RNG is untouched), so that the same
    ``projection_seed`` gives the same bases whatever the device and dtype of the model; the caller moves them."""
    r = cfg.r
    n = math.ceil(small / r)
    g = torch.Generator(device="cpu").manual_seed(cfg.projection_seed)
    if cfg.sparse or cfg.very_sparse:
        s = math.sqrt(small) if cfg.very_sparse else 3.0

        def draw(*shape: int) -> torch.Tensor:
            u = torch.rand(*shape, generator=g, dtype=torch.float32, device="cpu")
            t = torch.zeros(*shape, dtype=torch.float32, device="cpu")
            t[u < 1 / (2 * s)] = -1.0
            t[u > 1 - 1 / (2 * s)] = 1.0
            return t
    else:

        def draw(*shape: int) -> torch.Tensor:
            t = torch.empty(*shape, dtype=torch.float32, device="cpu")
            bound = 1.0 / math.sqrt(shape[-1])  # kaiming_uniform(a=√5) on a (rows, fan_in) matrix
            return t.uniform_(-bound, bound, generator=g)

    a = draw(r, small)
    b = draw(n, big, r)
    a = a / a.std().clamp_min(1e-12)
    b = b / b.std().clamp_min(1e-12)
    return a, b


def checksum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A position-weighted float64 fingerprint of the bases (detects a different seed, size or generator)."""
    flat = torch.cat([a.flatten(), b.flatten()]).double()
    w = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)
    return torch.stack([flat.sum(), (flat * w).sum(), flat.abs().sum()])


@register(
    "randlora",
    config=RandLoraConfig,
    family="reparameterized",
    paper="Albert et al., ICLR 2025, RandLoRA: Full-rank parameter-efficient fine-tuning (arXiv 2502.00987)",
    description="full-rank update from shared seeded random bases; trains only per-basis scales λ, γ",
    params="N·(r + m), m = min(d_in, d_out), N = ⌈m/r⌉",
    hosts=("linear", "gpt2_conv1d", "bnb_4bit", "bnb_8bit"),
    lr_scale=0.1,  # full-rank update with scale α/r = 20: 2e-3 collapsed (PEFT also advises a lower rate)
)
class RandLora(DenseUpdate, Adapter):
    uses_context = True

    def __init__(self, host: Host, config: RandLoraConfig, context: PlanContext | None = None) -> None:
        if context is None:
            raise PeftkitError("RandLoRA adapters are built by peftkit.adapt (they share bases across layers)")
        super().__init__(host, config, context)
        big_all = max(_dims(h)[0] for _, h in context.targets)
        small_all = max(_dims(h)[1] for _, h in context.targets)
        store = context.shared
        if "A" not in store._buffers:  # drawn on the CPU (same bases on every device), then moved to the host's
            a, b = make_bases(config, big_all, small_all)
            dev = host.weight.device
            store.buffer("A", lambda: a.to(dev), persistent=False)
            store.buffer("B", lambda: b.to(dev), persistent=False)
            store.buffer("checksum", lambda: checksum(a, b).to(dev))
        self.big, self.small = _dims(host)
        self.n = math.ceil(self.small / config.r)
        self.r = config.r
        self.s = lowrank_scaling(config.alpha, config.r)
        self.transposed = host.d_out < host.d_in  # ΔW_{M×m} is (d_in × d_out): apply its transpose
        dev = host.weight.device
        self.lam = nn.Parameter(torch.zeros(self.n, self.r, device=dev))
        self.gamma = nn.Parameter(torch.full((self.n, self.small), 1.0 / self.big, device=dev))
        self.dropout = make_dropout(config.dropout)

    def _bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.shared.A[:, : self.small]
        b = self.shared.B[: self.n, : self.big]  # (N, M, r)
        return a, b

    def _scaled_basis(self) -> torch.Tensor:
        """Ã = [A·diag(γ_1); …; A·diag(γ_N)] as (N·r, m)."""
        a, _ = self._bases()
        return (a[None, :, :] * self.gamma[:, None, :]).reshape(self.n * self.r, self.small)

    def _b_cat(self) -> torch.Tensor:
        """[B_1 … B_N] as (M, N·r)."""
        _, b = self._bases()
        return b.permute(1, 0, 2).reshape(self.big, self.n * self.r)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.lam.dtype)
        lam = self.lam.reshape(-1)
        if not self.transposed:  # d_out = M ≥ d_in = m:  x·ΔWᵀ = s·((x·Ãᵀ)⊙λ)·B_catᵀ
            h = (x @ self._scaled_basis().t()) * lam
            return self.s * (h @ self._b_cat().t())
        # d_out = m < d_in = M:  x·ΔW_{M×m} = s·((x·B_cat)⊙λ)·Ã
        h = (x @ self._b_cat()) * lam
        return self.s * (h @ self._scaled_basis())

    def delta_weight(self) -> torch.Tensor:
        dw = self.s * (self._b_cat() * self.lam.reshape(-1)) @ self._scaled_basis()  # (M, m)
        return dw.t() if self.transposed else dw

    def dense_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W0 + ΔW as one GEMM accumulating into a copy of W0 (no separate ΔW, no scaled copy of the bases)."""
        b_lam = self._b_cat() * self.lam.reshape(-1)  # (M, N·r)
        if self.transposed:
            return torch.addmm(w, self._scaled_basis().t(), b_lam.t(), alpha=self.s)
        return torch.addmm(w, b_lam, self._scaled_basis(), alpha=self.s)

    def check_loaded(self) -> None:
        if "shared_store" not in self._modules:  # only the owner of the shared store checks it
            return
        a, b = make_bases(self.config, self.shared.B.shape[1], self.shared.A.shape[1])
        if not torch.allclose(checksum(a, b), self.shared.checksum.cpu(), rtol=1e-9, atol=1e-6):
            raise PeftkitError(
                f"tensor 'adapter.{self.host.name}.shared_store.checksum' does not match the RandLoRA bases "
                "regenerated from projection_seed (another base model, target sizes or seed); refusing to load"
            )

    @classmethod
    def expected_params(cls, host: Host, config: RandLoraConfig) -> int:
        big, small = _dims(host)
        return math.ceil(small / config.r) * (config.r + small)
