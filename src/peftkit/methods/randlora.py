"""RandLoRA — Albert et al., ICLR 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models"
(arXiv 2502.00987; official code PaulAlbert31/RandLoRA and its Hugging Face PEFT port, whose files this one reads and
writes).

    forward:  y = base(x) + dropout(x)·ΔWᵀ,  ΔW_{M×m} = s·B_cat·Ã  (ᵀ if d_out < d_in), a sum of N·r rank-one terms
              B_cat (M, N·r): column i·r+k = B_i[:, k];  Ã (r·N, m): row k·N+i = λ[k, i]·A[k] ⊙ γ[i]
    init:     frozen shared bases A ∈ R^{r×m}, B_i ∈ R^{M×r} from one seeded generator (kaiming_uniform(a=√5) in
              bfloat16, or ternary {−1,0,+1}; each divided by its std); trainable λ ∈ R^{r×N} = 0, γ ∈ R^{N×m} = 1/M
    merge:    W ← W0 + ΔW   (rank(ΔW) = m = min(d_in, d_out) for generic λ, γ: full rank with N = ⌈m/r⌉ terms)

m = min(d_in, d_out), M = max, N = ⌈m/r⌉; s = α/r (Hugging Face PEFT; the official NLG code uses α/(r·√N)). The
pairing of B's columns with Ã's rows is Hugging Face PEFT's (``get_scaled_bases``: B flattened (basis, rank), Ã
flattened (rank, basis)) — the paper's Σ_i B_i·diag(λ_i)·A·diag(γ_i) with a fixed permutation of which random
vectors meet, the same family of full-rank updates — kept so that adapters move between the two libraries.
Trainable: λ, γ — N·(r + m) per layer. The bases are one set for the whole model, drawn exactly as PEFT draws them
(sized from the largest d_out and d_in over the targets, sliced per layer); peftkit never saves them: they are
regenerated from ``projection_seed`` at load and verified against a saved checksum (a PEFT file's saved copies are
compared with them instead). The activation path builds Ã (N·r×m ≈ m×m, the size of one weight, not of the
activations) and computes x·ΔWᵀ = s·(x·Ãᵀ)·B_catᵀ (or the transposed chain when d_out < d_in). As the sole active
adapter with at least d_out rows (training batches; no active dropout; float32 hosts, matching its float32
parameters) the layer instead runs as x·(W0 + ΔW)ᵀ + b through ``core.dense`` — ΔW built once (≈ d_out·d_in·m), no
activation-sized intermediate kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.adapter import Adapter, PlanContext, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import DenseUpdate
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor
from peftkit.core.host import Host
from peftkit.core.lowrank import lowrank_scaling
from peftkit.core.peft_names import BIAS_OUT, PEFT_METADATA, TARGETING, alias, inert, plain_number
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
        self.positive_int("RandLoraConfig.r", self.r)


def _dims(host: Host) -> tuple[int, int]:
    return max(host.d_in, host.d_out), min(host.d_in, host.d_out)


def base_dims(hosts: list[Host]) -> tuple[int, int]:
    """(M, m) of the shared bases, as Hugging Face PEFT sizes them: from the largest d_out and the largest d_in."""
    d_out, d_in = max(h.d_out for h in hosts), max(h.d_in for h in hosts)
    return max(d_out, d_in), min(d_out, d_in)


def make_bases(cfg: RandLoraConfig, big: int, small: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bases: A (r, small) and B (big, N_max, r), drawn as Hugging Face PEFT draws them (same generator
    calls, same order, bfloat16 kaiming-uniform or float32 ternary, then each divided by its std) so that the same
    ``projection_seed`` gives PEFT's bases. On the CPU with a generator of their own (the global RNG is untouched),
    returned in float32; the caller moves them."""
    r = cfg.r
    n = math.ceil(small / r)
    g = torch.Generator(device="cpu").manual_seed(cfg.projection_seed)
    if cfg.sparse or cfg.very_sparse:
        s = math.sqrt(small) if cfg.very_sparse else 3.0

        def ternary(u: torch.Tensor) -> torch.Tensor:
            t = torch.zeros(u.shape)
            t[u < 1 / (2 * s)] = -1.0
            t[u > 1 - 1 / (2 * s)] = 1.0
            return t

        a = ternary(torch.rand((r, 1, small), generator=g))
        b = ternary(torch.rand((big, n, r), generator=g))
    else:

        def kaiming(*shape: int) -> torch.Tensor:
            t = torch.empty(shape, dtype=torch.bfloat16)
            return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)

        a = kaiming(r, 1, small)
        b = torch.cat([kaiming(big, 1, r) for _ in range(n)], dim=1)
    a, b = a / a.std(), b / b.std()
    return a.reshape(r, small).float(), b.float()


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
    hf_peft_type="RANDLORA",
)
class RandLora(DenseUpdate, Adapter):
    uses_context = True
    hf_regenerated_keys = ("randlora_A", "randlora_B")  # PEFT's save_projection=True copies of the bases
    hf_metadata_tensors = ("shared_store.checksum",)  # kept in a PEFT file's metadata: load checks the bases with it

    def __init__(self, host: Host, config: RandLoraConfig, context: PlanContext | None = None) -> None:
        context = self.require_context(context)
        super().__init__(host, config, context)
        big_all, small_all = base_dims([h for _, h in context.targets])
        store, dev = context.shared, host.weight.device
        if "A" not in store._buffers:  # drawn on the CPU (same bases on every device), then moved to the host's
            a, b = make_bases(config, big_all, small_all)
            store.buffer("A", lambda: a.to(dev), persistent=False)
            store.buffer("B", lambda: b.to(dev), persistent=False)
            store.buffer("checksum", lambda: checksum(a, b).to(dev))
        self.big, self.small = _dims(host)
        self.n, self.r, self.s = math.ceil(self.small / config.r), config.r, lowrank_scaling(config.alpha, config.r)
        self.transposed = host.d_out < host.d_in  # ΔW_{M×m} is (d_in × d_out): apply its transpose
        self.lam = nn.Parameter(torch.zeros(self.r, self.n, device=dev))
        self.gamma = nn.Parameter(torch.full((self.n, self.small), 1.0 / self.big, device=dev))
        self.dropout = make_dropout(config.dropout)

    def _scaled_basis(self) -> torch.Tensor:
        """Ã as (r·N, m): row k·N+i is λ[k, i]·A[k] ⊙ γ[i]."""
        a = self.shared.A[:, None, : self.small]  # (r, 1, m)
        return (self.lam[:, :, None] * a * self.gamma[None]).reshape(self.r * self.n, self.small)

    def _b_cat(self) -> torch.Tensor:
        """B_cat as (M, N·r): column i·r+k is B_i[:, k]."""
        return self.shared.B[: self.big, : self.n].reshape(self.big, self.n * self.r)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.lam.dtype)
        if not self.transposed:  # d_out = M ≥ d_in = m:  x·ΔWᵀ = s·(x·Ãᵀ)·B_catᵀ
            return self.s * ((x @ self._scaled_basis().t()) @ self._b_cat().t())
        # d_out = m < d_in = M:  x·ΔW_{M×m} = s·(x·B_cat)·Ã
        return self.s * ((x @ self._b_cat()) @ self._scaled_basis())

    def delta_weight(self) -> torch.Tensor:
        dw = self.s * self._b_cat() @ self._scaled_basis()  # (M, m)
        return dw.t() if self.transposed else dw

    def dense_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W0 + ΔW as one GEMM accumulating into a copy of W0 (no separate ΔW)."""
        if self.transposed:
            return torch.addmm(w, self._scaled_basis().t(), self._b_cat().t(), alpha=self.s)
        return torch.addmm(w, self._b_cat(), self._scaled_basis(), alpha=self.s)

    def check_loaded(self) -> None:
        if "shared_store" not in self._modules:  # only the owner of the shared store checks it
            return
        a, b = make_bases(self.config, self.shared.B.shape[0], self.shared.A.shape[1])
        if not torch.allclose(checksum(a, b), self.shared.checksum.cpu(), rtol=1e-9, atol=1e-6):
            raise PeftkitError(
                f"tensor 'adapter.{self.host.name}.shared_store.checksum' does not match the RandLoRA bases "
                "regenerated from projection_seed (another base model, target sizes or seed); refusing to load"
            )

    @classmethod
    def expected_params(cls, host: Host, config: RandLoraConfig) -> int:
        big, small = _dims(host)
        return math.ceil(small / config.r) * (config.r + small)

    # Hugging Face PEFT: peft_type RANDLORA, λ and γ in its layout; the bases are regenerated, never written
    # (save_projection=False: PEFT draws the same ones from projection_prng_key)
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> RandLoraConfig:
        fields = {k: v for k, v in hf_config.items() if k not in _HF_META}
        fields["init_weights"] = True  # the file's λ, γ replace whatever the init drew
        return RandLoraConfig(**fields)

    @classmethod
    def to_hf_config(cls, config: RandLoraConfig, hosts: list[Host]) -> dict[str, Any]:
        if config.overrides:
            raise PeftkitError("RandLoRA's per-module overrides have no place in Hugging Face PEFT's RANDLORA config")
        return {
            "r": config.r, "randlora_alpha": plain_number(config.alpha), "randlora_dropout": config.dropout,
            "projection_prng_key": config.projection_seed, "save_projection": False, "sparse": config.sparse,
            "very_sparse": config.very_sparse, "init_weights": True, "bias": BIAS_OUT[config.bias],
            "fan_in_fan_out": bool(hosts) and all(h.kind == "gpt2_conv1d" for h in hosts),
        }

    @classmethod
    def hf_layout(cls, host: Host, config: RandLoraConfig) -> dict[str, HFTensor] | None:
        if host.kind not in ("linear", "gpt2_conv1d"):
            return None
        big, small = _dims(host)
        n = math.ceil(small / config.r)
        return {"lam": HFTensor("randlora_lambda", (config.r, n), (config.r, n)),
                "gamma": HFTensor("randlora_gamma", (n, small), (n, small))}

    @classmethod
    def from_hf_state(cls, config: RandLoraConfig, tensors: dict[str, torch.Tensor], hosts: list[Host]
                      ) -> dict[str, torch.Tensor]:
        """Check PEFT's saved copies of the bases (if any) against the ones the seed gives; add the checksum."""
        owner = f"adapter.{hosts[0].name}.shared_store.checksum"
        if owner in tensors or not hosts:
            return tensors
        a, b = make_bases(config, *base_dims(hosts))
        want = {"randlora_A": a[:, None, :], "randlora_B": b}
        out = {k: v for k, v in tensors.items() if not k.startswith("hf_shared.")}
        for k, t in tensors.items():
            if k.startswith("hf_shared."):
                ref = want[k.rpartition(".")[2]]
                if tuple(t.shape) != tuple(ref.shape) or not torch.allclose(t.float(), ref, rtol=0, atol=1e-6):
                    raise PeftkitError(
                        f"RandLoRA bases {k[len('hf_shared.'):]!r} in the file differ from those projection_prng_key="
                        f"{config.projection_seed} gives for these target sizes (PEFT draws them in bfloat16, in "
                        "float16 where bfloat16 is missing); peftkit regenerates its bases and cannot load this adapter"
                    )
        out[owner] = checksum(a, b)
        return out


#: adapter_config.json fields that are metadata or targeting (the file's keys decide what is adapted)
_HF_META = PEFT_METADATA | {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
