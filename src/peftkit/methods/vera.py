"""VeRA — Kopiczko, Blankevoort & Asano, ICLR 2024, "VeRA: Vector-based Random Matrix Adaptation"
(arXiv 2310.11454), in Hugging Face PEFT's form (``peft/tuners/vera``), whose files it reads and writes.

    forward:  y = base(x) + Λ_b·B·Λ_d·A·dropout(x),  i.e.  h = (x·Aᵀ)⊙d,  y += (h·Bᵀ)⊙b
    init:     frozen A ∈ R^{r×d_in}, B ∈ R^{d_out×r}: slices A_max[:, :d_in], B_max[:d_out, :] of one pair shared by
              every layer, drawn from one CPU generator seeded with ``projection_seed`` (A_max first, then B_max; each
              kaiming-uniform U(±√(6/fan_in)), fan_in = columns); trainable d = d_initial (0.1), b = 0  ⇒ ΔW = 0
    merge:    W ← W0 + ΔW,  ΔW = diag(b)·B·diag(d)·A  (rank ≤ r)

Trainable: d ∈ R^r and b ∈ R^{d_out} — r + d_out per layer. The shared pair is sized to the largest d_in and d_out
over the targets (as PEFT's ``_find_dim``) and is never part of a peftkit save: it is regenerated from the seed. PEFT
writes it into its files when ``save_projection`` (its default) is set: peftkit writes it then too, and on reading
checks that the file's pair is the one it regenerates (refusing the file otherwise). The draw is PEFT's (its
``_kaiming_init``: uniform, gain √2, one CPU generator, A before B), so the same seed gives the same pair in both
libraries; the paper's own code may draw differently. The rank r may exceed min(d_in, d_out) (the paper goes to
r = 1024).
As the sole active adapter with at least d_out rows (no active dropout, float32/64) the layer runs as
x·(W0 + ΔW)ᵀ + b through ``core.dense``; otherwise the two thin products above (no d_out×d_in tensor).
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
from peftkit.core.hf import HFTensor, config_from_hf
from peftkit.core.host import Host
from peftkit.core.peft_names import TARGETING, alias, bias_alias, inert
from peftkit.core.registry import QUANTIZED_HOSTS, register

SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")


@dataclass
class VeraConfig(AdapterConfig):
    """VeRA. ``r``: rank of the shared random pair (PEFT's default 256; may exceed the layer widths);
    ``projection_seed``: seed of the pair; ``d_initial``: initial value of d; ``save_projection``: write the pair into
    Hugging Face PEFT files (PEFT's default; peftkit's own saves never hold it). Accepts Hugging Face PEFT
    ``VeraConfig``'s field names (``projection_prng_key``, ``vera_dropout``, ``bias="vera_only"``, ...)."""

    r: int = 256
    projection_seed: int = 0
    d_initial: float = 0.1
    save_projection: bool = True

    peft_type = "VERA"
    peft_names = {
        **TARGETING,
        "bias": bias_alias("vera_only"),
        "vera_dropout": alias("dropout", lambda v: 0.0 if v is None else v),
        "projection_prng_key": alias("projection_seed"),
        "init_weights": inert(True, "peftkit's VeRA starts at ΔW = 0 (b = 0, d = d_initial); PEFT's False draws d "
                                    "at random and sets b = 1, for tests"),
    }

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise PeftkitError(f"VeraConfig.r must be a positive integer, got {self.r}")
        if any("r" in ov for ov in self.overrides.values()):
            raise PeftkitError("VeraConfig.overrides cannot set r: every layer slices one shared random pair of rank "
                               "r; use one r for the whole adapter")


def projections(r: int, d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair A (r, d_in), B (d_out, r), float32 on the CPU, from a generator of their own (the global RNG
    is untouched): PEFT's ``_kaiming_init`` — U(±√3·√2/√fan_in), fan_in = the number of columns; A drawn first."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def draw(rows: int, cols: int) -> torch.Tensor:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(cols))
        return torch.empty(rows, cols, dtype=torch.float32).uniform_(-bound, bound, generator=g)

    a = draw(r, d_in)
    return a, draw(d_out, r)


def _extent(hosts: list[Host]) -> tuple[int, int]:
    return max(h.d_in for h in hosts), max(h.d_out for h in hosts)


@register(
    "vera",
    config=VeraConfig,
    family="reparameterized",
    paper="Kopiczko et al., ICLR 2024, VeRA: Vector-based Random Matrix Adaptation (arXiv 2310.11454)",
    description="one frozen seeded random pair A, B shared by all layers; trains only the scaling vectors d and b",
    params="r + d_out",
    hosts=("linear", "gpt2_conv1d", *QUANTIZED_HOSTS),
    hf_peft_type="VERA",
)
class Vera(DenseUpdate, Adapter):
    uses_context = True
    hf_shared_keys = SHARED_KEYS

    def __init__(self, host: Host, config: VeraConfig, context: PlanContext | None = None) -> None:
        if context is None:
            raise PeftkitError("VeRA adapters are built by peftkit.adapt (they share one random pair across layers)")
        super().__init__(host, config, context)
        store, dev = context.shared, host.weight.device
        if "A" not in store._buffers:  # drawn on the CPU (same pair on every device), then moved to the host's
            a, b = projections(config.r, *_extent([h for _, h in context.targets]), config.projection_seed)
            store.buffer("A", lambda: a.to(dev), persistent=False)
            store.buffer("B", lambda: b.to(dev), persistent=False)
        self.r = config.r
        self.vera_lambda_d = nn.Parameter(torch.full((self.r,), float(config.d_initial), device=dev))
        self.vera_lambda_b = nn.Parameter(torch.zeros(host.d_out, device=dev))
        self.dropout = make_dropout(config.dropout)

    def _pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared.A[: self.r, : self.host.d_in], self.shared.B[: self.host.d_out, : self.r]

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self._pair()
        x = self.dropout(x).to(self.vera_lambda_d.dtype)
        h = (x @ a.t()) * self.vera_lambda_d
        return (h @ b.t()) * self.vera_lambda_b

    def delta_weight(self) -> torch.Tensor:
        a, b = self._pair()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def dense_weight(self, w: torch.Tensor) -> torch.Tensor:
        a, b = self._pair()
        return torch.addmm(w, self.vera_lambda_b[:, None] * b, self.vera_lambda_d[:, None] * a)

    @classmethod
    def rank_limits(cls, host: Host, config: Any) -> dict[str, int]:
        return {}  # ΔW's rank is min(r, d_in, d_out) whatever r is; PEFT (and the paper) allow any r

    @classmethod
    def expected_params(cls, host: Host, config: VeraConfig) -> int:
        return config.r + host.d_out

    # -- Hugging Face PEFT: peft_type VERA, <module>.vera_lambda_{b,d} (+ base_model.vera_{A,B}) ----------------
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> VeraConfig:
        return config_from_hf(VeraConfig, hf_config)

    @classmethod
    def to_hf_config(cls, config: VeraConfig, hosts: list[Host]) -> dict[str, Any]:
        if config.overrides:
            raise PeftkitError("cannot export to Hugging Face PEFT format: VeRA there has no per-module overrides")
        return {
            "r": config.r,
            "projection_prng_key": config.projection_seed,
            "save_projection": config.save_projection,
            "vera_dropout": config.dropout,
            "d_initial": config.d_initial,
            "bias": {"adapter_only": "vera_only"}.get(config.bias, config.bias),
            "fan_in_fan_out": bool(hosts) and all(h.kind == "gpt2_conv1d" for h in hosts),
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def hf_layout(cls, host: Host, config: VeraConfig) -> dict[str, HFTensor] | None:
        if host.kind not in ("linear", "gpt2_conv1d", *QUANTIZED_HOSTS):
            return None
        return {"vera_lambda_b": HFTensor("vera_lambda_b", (host.d_out,), (host.d_out,)),
                "vera_lambda_d": HFTensor("vera_lambda_d", (config.r,), (config.r,))}

    @classmethod
    def hf_shared_tensors(cls, config: VeraConfig, adapters: list[Adapter]) -> dict[str, torch.Tensor]:
        if not config.save_projection or not adapters:
            return {}
        store = adapters[0].shared
        return {SHARED_KEYS[0]: store.A.contiguous(), SHARED_KEYS[1]: store.B.contiguous()}

    @classmethod
    def check_hf_shared(cls, config: VeraConfig, hosts: list[Host], tensors: dict[str, torch.Tensor]) -> None:
        if not tensors or not hosts:
            return
        expected = dict(zip(SHARED_KEYS, projections(config.r, *_extent(hosts), config.projection_seed), strict=True))
        for key, t in tensors.items():
            want = expected[key]
            if tuple(t.shape) != tuple(want.shape) or not torch.allclose(t.float().cpu(), want, rtol=1e-6, atol=1e-7):
                raise PeftkitError(
                    f"tensor {key!r} (shape {tuple(t.shape)}) is not the VeRA projection peftkit regenerates from "
                    f"projection_prng_key={config.projection_seed} and r={config.r} for these layers (shape "
                    f"{tuple(want.shape)}); peftkit computes with regenerated projections only, so it refuses the file"
                )
