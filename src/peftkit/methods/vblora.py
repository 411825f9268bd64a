"""VB-LoRA — Li, Han & Ji, NeurIPS 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks"
(arXiv 2405.15179), in Hugging Face PEFT's form (``peft/tuners/vblora``), whose ``VBLORA`` files it reads and writes.

    bank:     V ∈ R^{h×b} (h = ``num_vectors`` vectors of length b = ``vector_length``), ONE for every layer of the
              adapter (trained, kept in the adapter's shared store and saved once)
    A, B:     per layer, logits L_A ∈ R^{r×(d_in/b)×h}, L_B ∈ R^{(d_out/b)×r×h}; every b-long piece of A's rows and
              B's columns is a top-k mixture  Σ_{j∈topk(ℓ)} softmax(ℓ_topk)_j · V_j  of bank vectors
              (A: (r, d_in/b, b) → (r, d_in);  B: (d_out/b, r, b) → (d_out/b, b, r) → (d_out, r))
    forward:  y = base(x) + dropout(x)·Aᵀ·Bᵀ            (no α/r scaling: PEFT applies none, nor does the paper)
    init:     V ~ U(±``init_vector_bank_bound``) (0.02), logits ~ N(0, ``init_logits_std``²) (0.1) — ΔW ≠ 0 at init
    merge:    W ← W0 + B·A  (rank ≤ r)

Trainable: r·(d_in + d_out)/b·h logits per layer, plus h·b for the shared bank. Compared with MoS (methods/mos.py),
which also assembles every layer's factors from pieces shared across layers: MoS's shards are routed by a fixed,
seeded index (each rank-one vector a concatenation of shard *rows* chosen once), its pools are per module type and
its LoRA scale α/r stays; VB-LoRA's routing is *learned* — each sub-vector is a differentiable top-k softmax mixture
over one bank for the whole adapter, and the logits are what each layer trains. Hosts: Linear and GPT-2 Conv1D (as
PEFT); b must divide every targeted d_in and d_out. As the only active adapter (no active dropout) the layer runs
through LoRA's fused path (``core.lowrank``) with the mixed A and B.

Following PEFT's code: the bank is drawn again for every targeted module (``_init_vblora_vector_bank`` runs inside
``_create_and_replace``) and the last draw is kept — peftkit draws in the same order from the global RNG (bank, then
L_A, then L_B, per layer), so one torch seed gives PEFT's initial tensors. PEFT's ``save_only_topk_weights`` files
(top-k indices and weights instead of logits, for inference only) are refused: save the full logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.adapter import Adapter, PlanContext, drops, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor, config_from_hf
from peftkit.core.host import Host
from peftkit.core.lowrank import fused_lowrank_forward
from peftkit.core.peft_names import TARGETING, alias, bias_alias, inert
from peftkit.core.registry import register

BANK_KEY = "base_model.vblora_vector_bank"
_HOSTS = ("linear", "gpt2_conv1d")


@dataclass
class VBLoRAConfig(AdapterConfig):
    """VB-LoRA. ``r``: rank; ``num_vectors`` (h) and ``vector_length`` (b): size of the shared bank (b must divide
    every targeted d_in and d_out); ``topk``: bank vectors mixed per sub-vector; ``init_vector_bank_bound``,
    ``init_logits_std``: the initial draws. Accepts Hugging Face PEFT ``VBLoRAConfig``'s field names
    (``vblora_dropout``, ``bias="vblora_only"``, ...)."""

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1

    peft_type = "VBLORA"
    peft_names = {
        **TARGETING,
        "bias": bias_alias("vblora_only"),
        "vblora_dropout": alias("dropout", lambda v: 0.0 if v is None else v),
        "save_only_topk_weights": inert(False, "that file holds top-k indices and weights instead of the logits; "
                                               "save the adapter with save_only_topk_weights=False"),
    }

    def validate(self) -> None:
        super().validate()
        for f in ("r", "num_vectors", "vector_length", "topk"):
            self.positive(f"VBLoRAConfig.{f}", getattr(self, f))
        if self.topk > self.num_vectors:
            raise PeftkitError(f"VBLoRAConfig.topk ({self.topk}) cannot exceed num_vectors ({self.num_vectors})")
        if any(k in ov for ov in self.overrides.values() for k in ("num_vectors", "vector_length")):
            raise PeftkitError("VBLoRAConfig.overrides cannot set num_vectors or vector_length: every layer mixes "
                               "vectors of one shared bank; set them for the whole adapter")


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """(…, h) logits → (…, b): the softmax over the top-k logits weighting the chosen bank vectors (PEFT's
    ``_get_low_rank_matrix``)."""
    top, idx = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)


def _check_divisible(host: Host, config: VBLoRAConfig) -> None:
    b = config.vector_length
    if host.d_in % b or host.d_out % b:
        raise PeftkitError(
            f"module {host.name!r}: VB-LoRA's vector_length {b} must divide d_in={host.d_in} and d_out={host.d_out}; "
            f"choose a common divisor of the targeted widths or target other layers"
        )


@register(
    "vblora",
    config=VBLoRAConfig,
    family="reparameterized",
    paper="Li et al., NeurIPS 2024, VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks "
          "(arXiv 2405.15179)",
    description="LoRA factors whose sub-vectors are top-k softmax mixtures of one trained vector bank shared by all "
                "layers; trains the bank and per-layer logits",
    params="r·(d_in + d_out)/b·h logits (+ h·b bank, shared)",
    hosts=_HOSTS,
    hf_peft_type="VBLORA",
    init_is_identity=False,  # PEFT's (and the paper's) init: random bank and logits, ΔW ≠ 0
)
class VBLoRA(Adapter):
    uses_context = True
    hf_shared_keys = (BANK_KEY,)

    def __init__(self, host: Host, config: VBLoRAConfig, context: PlanContext | None = None) -> None:
        if context is None:
            raise PeftkitError("VB-LoRA adapters are built by peftkit.adapt (they share one vector bank across layers)")
        _check_divisible(host, config)
        super().__init__(host, config, context)
        dev, h, b = host.weight.device, config.num_vectors, config.vector_length
        bound = config.init_vector_bank_bound
        fresh = torch.empty(h, b).uniform_(-bound, bound)  # PEFT redraws the bank for every module; the last stays
        bank = context.shared.parameter("vector_bank", lambda: torch.empty(h, b, device=dev))
        with torch.no_grad():
            bank.copy_(fresh)
        self.r, self.topk = config.r, config.topk
        self.vblora_logits_A = nn.Parameter(torch.empty(self.r, host.d_in // b, h))
        self.vblora_logits_B = nn.Parameter(torch.empty(host.d_out // b, self.r, h))
        with torch.no_grad():
            nn.init.normal_(self.vblora_logits_A, 0.0, config.init_logits_std)
            nn.init.normal_(self.vblora_logits_B, 0.0, config.init_logits_std)
        self.to(dev)
        self.dropout = make_dropout(config.dropout)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, d_in) and B (d_out, r) mixed from the bank."""
        bank = self.shared.vector_bank
        a = mix(self.vblora_logits_A, bank, self.topk).reshape(self.r, -1)
        b = mix(self.vblora_logits_B, bank, self.topk).transpose(1, 2).reshape(-1, self.r)
        return a, b

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return F.linear(F.linear(self.dropout(x).to(a.dtype), a), b)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mixed factors through LoRA's fused layer (core.lowrank: one output write, x kept without a copy
        where its producer allows; ∂A, ∂B flow back through the mixture to the logits and the bank)."""
        if drops(self, self.host):
            return None
        a, b = self.factors()
        return fused_lowrank_forward(self.host, x, a, b, 1.0)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return b @ a

    @classmethod
    def rank_limits(cls, host: Host, config: Any) -> dict[str, int]:
        return {}  # PEFT (and the paper) allow any r; the factors are mixtures, not free matrices

    @classmethod
    def expected_params(cls, host: Host, config: VBLoRAConfig) -> int:
        return config.r * (host.d_in + host.d_out) // config.vector_length * config.num_vectors

    @classmethod
    def shared_params(cls, config: VBLoRAConfig, hosts: list[Host]) -> int:
        return config.num_vectors * config.vector_length if hosts else 0

    # -- Hugging Face PEFT: peft_type VBLORA, <module>.vblora_logits_{A,B} + base_model.vblora_vector_bank -----------
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> VBLoRAConfig:
        return config_from_hf(VBLoRAConfig, hf_config)

    @classmethod
    def to_hf_config(cls, config: VBLoRAConfig, hosts: list[Host]) -> dict[str, Any]:
        if config.overrides:
            raise PeftkitError("cannot export to Hugging Face PEFT format: VB-LoRA there has no per-module overrides")
        return {
            "r": config.r, "num_vectors": config.num_vectors, "vector_length": config.vector_length,
            "topk": config.topk, "vblora_dropout": config.dropout, "save_only_topk_weights": False,
            "init_vector_bank_bound": config.init_vector_bank_bound, "init_logits_std": config.init_logits_std,
            "bias": {"adapter_only": "vblora_only"}.get(config.bias, config.bias),
            "fan_in_fan_out": bool(hosts) and all(h.kind == "gpt2_conv1d" for h in hosts),
            "layers_to_transform": None, "layers_pattern": None,
        }

    @classmethod
    def hf_layout(cls, host: Host, config: VBLoRAConfig) -> dict[str, HFTensor] | None:
        if host.kind not in _HOSTS:
            return None
        b, h = config.vector_length, config.num_vectors
        a, bb = (config.r, host.d_in // b, h), (host.d_out // b, config.r, h)
        return {"vblora_logits_A": HFTensor("vblora_logits_A", a, a),
                "vblora_logits_B": HFTensor("vblora_logits_B", bb, bb)}

    @classmethod
    def hf_shared_tensors(cls, config: VBLoRAConfig, adapters: list[Adapter]) -> dict[str, torch.Tensor]:
        return {BANK_KEY: adapters[0].shared.vector_bank.detach().contiguous()} if adapters else {}

    @classmethod
    def hf_shared_state(
        cls, config: VBLoRAConfig, hosts: list[Host], tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        shape = (config.num_vectors, config.vector_length)
        bank = tensors.get(BANK_KEY)
        if bank is None:
            raise PeftkitError(f"tensor {BANK_KEY!r} (the shared vector bank) is missing from the file")
        if tuple(bank.shape) != shape:
            raise PeftkitError(f"tensor {BANK_KEY!r} has shape {tuple(bank.shape)} but the config's "
                               f"(num_vectors, vector_length) is {shape}")
        return {"shared_store.vector_bank": bank}
