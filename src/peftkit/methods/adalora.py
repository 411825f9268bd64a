"""AdaLoRA — Zhang et al., ICLR 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(arXiv 2303.10512): LoRA in SVD form whose rank budget moves, during training, to the layers that need it.

    forward:  y = x·W0ᵀ + b0 + (α / (r₀ + 10⁻⁵)) · dropout(x)·(A ⊙ E)ᵀ·Bᵀ,   P = B ∈ R^{d_out×r}, Λ = E ∈ R^{r×1},
              Q = A ∈ R^{r×d_in}; r₀ = init_r on every layer (also after pruning, so kept triplets keep their scale)
    init:     E = 0 (⇒ ΔW = 0), A, B ~ N(0, 0.02²)
    merge:    ΔW = α/(r₀ + 10⁻⁵) · B·diag(E)·A
    train:    + orth_reg_weight · mean over the factors of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (the procedure's extra loss);
              after every step the importance of each triplet (E_i, A_i,:, B_:,i) — smoothed sensitivity |p·∂L/∂p|
              times its uncertainty, Eq. (9)–(11) — ranks all triplets, and the lowest are masked (E_i = 0) down to a
              total budget that falls cubically from Σ init_r to target_r·(layers) between steps tinit and
              total_step − tfinal (:class:`AdaLoraAllocator`, a procedure in :mod:`.adalora_allocator`).

Follows Hugging Face PEFT's ``AdaLoraModel`` (its numbers and its files: the ``ADALORA`` type, ``lora_A`` /
``lora_B`` / ``lora_E`` tensors, ``rank_pattern`` = per-layer masks of kept triplets, tensors saved with the pruned
triplets cut out): scaling α (not α/r), step numbering of ``update_and_allocate(global_step)``, importance from the
parameters after the optimiser step. When training ends the allocator cuts the pruned triplets out of every layer
and records the masks in the config's ``rank_pattern`` (a layer then has rank Σ mask; a config with a
``rank_pattern`` builds layers of those ranks, which is how a saved adapter loads); until then pruned triplets are
rows with E = 0. ``total_step`` may be left unset when the procedure is given the run's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankUpdate
from peftkit.core.peft_names import PEFT_METADATA, TARGETING, alias, inert
from peftkit.core.registry import register
from peftkit.methods.adalora_allocator import AdaLoraAllocator  # the budget procedure: its own module

__all__ = ["AdaLora", "AdaLoraAllocator", "AdaLoraConfig"]

_HF_IGNORED = PEFT_METADATA | frozenset({
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "r",
    "use_rslora", "use_dora", "init_lora_weights", "alpha_pattern", "megatron_core", "runtime_config",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "layer_replication", "use_qalora",
    "qalora_group_size", "target_parameters", "lora_bias", "ensure_weight_tying", "trainable_token_indices",
    "arrow_config", "alora_invocation_tokens", "modules_to_save", "bias", "lora_alpha", "lora_dropout", "rank_pattern",
})
_KEY = ".lora_E"  # PEFT's rank_pattern keys: "<module path>.lora_E"


def _patterns_in(v: Any) -> Any:
    """PEFT's ``rank_pattern`` ({"<path>.lora_E": [bool] * init_r}) → peftkit's ({path: [bool]})."""
    if not v:
        return None
    return {k.removesuffix(".default").removesuffix(_KEY): [bool(b) for b in m] for k, m in dict(v).items()}


@dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA. ``init_r``: every layer's starting rank; ``target_r``: the average rank the budget falls to;
    ``alpha``: the scale numerator (PEFT's ``lora_alpha``; the scale is α/r₀); ``tinit`` / ``tfinal``: steps before
    pruning starts / after it ends; ``deltaT``: prune every deltaT steps; ``beta1`` / ``beta2``: EMA factors of the
    sensitivity and its uncertainty; ``orth_reg_weight``: the orthogonality penalty's weight; ``total_step``: the
    run's length T (or left None when the procedure knows it); ``rank_pattern``: per layer, which of the init_r
    triplets were kept (set when training ends; a saved adapter's layers are built at those ranks). Accepts Hugging
    Face PEFT ``AdaLoraConfig``'s field names."""

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 — PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    peft_type = "ADALORA"
    peft_names = {
        **TARGETING,
        "lora_alpha": alias("alpha"), "lora_dropout": alias("dropout"),
        "rank_pattern": alias("rank_pattern", _patterns_in),
        "r": inert(8, "AdaLoRA's starting rank is init_r (PEFT ignores r too)"),
        "init_lora_weights": inert(True, "AdaLoRA starts from E = 0 (the base model)"),
        "use_rslora": inert(False), "use_dora": inert(False, "AdaLoRA has no DoRA variant"),
        "alpha_pattern": inert({}),
        # LoraConfig's fields that PEFT's AdaLoraConfig inherits: accepted at their defaults (as PEFT's to_dict()
        # writes them), refused when set
        **{k: inert() for k in ("fan_in_fan_out", "megatron_core", "megatron_config", "qalora_group_size",
                                "runtime_config")},
        **{k: inert(None, "not a field of AdaLoRA in peftkit") for k in (
            "loftq_config", "eva_config", "corda_config", "lora_ga_config", "layer_replication", "use_qalora",
            "target_parameters", "lora_bias", "ensure_weight_tying", "trainable_token_indices", "arrow_config",
            "alora_invocation_tokens", "use_bdlora", "kasa_config", "monteclora_config", "velora_config")},
    }

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        for f in ("init_r", "target_r", "deltaT"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PeftkitError(f"{name}.{f} must be a positive integer, got {v!r}")
        if self.target_r > self.init_r:
            raise PeftkitError(f"{name}.target_r ({self.target_r}) must be <= init_r ({self.init_r}): the budget only "
                               f"falls")
        for f in ("tinit", "tfinal"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PeftkitError(f"{name}.{f} must be an integer >= 0, got {v!r}")
        for f in ("beta1", "beta2"):
            if not 0 < getattr(self, f) < 1:
                raise PeftkitError(f"{name}.{f} must be in (0, 1), got {getattr(self, f)!r}")
        if self.orth_reg_weight < 0:
            raise PeftkitError(f"{name}.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            if isinstance(self.total_step, bool) or not isinstance(self.total_step, int) or self.total_step < 1:
                raise PeftkitError(f"{name}.total_step must be a positive integer or None, got {self.total_step!r}")
            if self.tinit >= self.total_step - self.tfinal:
                raise PeftkitError(f"{name}: tinit ({self.tinit}) >= total_step − tfinal ({self.total_step} − "
                                   f"{self.tfinal}) leaves no budgeting phase; lower tinit / tfinal or raise "
                                   f"total_step")
        for path, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, list | tuple) or len(mask) != self.init_r:
                raise PeftkitError(f"{name}.rank_pattern[{path!r}] must list init_r = {self.init_r} booleans, got "
                                   f"{mask!r}")

    def rank_of(self, path: str) -> int:
        mask = (self.rank_pattern or {}).get(path)
        return self.init_r if mask is None else sum(bool(b) for b in mask)


_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


@register(
    "adalora",
    config=AdaLoraConfig,
    family="reparameterized",
    paper="Zhang et al., ICLR 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning "
          "(arXiv 2303.10512)",
    description="LoRA in SVD form B·diag(E)·A with an orthogonality penalty; the rank budget falls from init_r to "
                "target_r per layer on average, pruning the least important triplets across all layers",
    params="r·(d_in + d_out + 1), r = init_r (after training: the kept triplets of the layer)",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d"),
    procedure=AdaLoraAllocator,
    hf_peft_type="ADALORA",
    lr_scale=1.0,
)
class AdaLora(LowRankUpdate, Adapter):
    def __init__(self, host: Host, config: AdaLoraConfig) -> None:
        super().__init__(host, config)
        r = config.rank_of(host.name)
        w = host.weight
        dt = w.dtype if w.is_floating_point() else torch.float32
        g = {"device": w.device, "dtype": dt}
        self.lora_A = nn.Parameter(torch.randn(r, host.d_in, **g) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(host.d_out, r, **g) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **g))
        self.r = r
        self.s = config.alpha / (config.init_r + 1e-5)
        self.dropout = make_dropout(config.dropout)

    @classmethod
    def rank_limits(cls, host: Host, config: Any) -> dict[str, int]:
        return {"init_r": min(host.d_in, host.d_out)}

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A * self.lora_E, self.lora_B

    def orth_penalty(self) -> torch.Tensor:
        """‖AAᵀ − I‖_F + ‖BᵀB − I‖_F (two of PEFT's per-parameter terms)."""
        a, b = self.lora_A, self.lora_B
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        return torch.linalg.matrix_norm(a @ a.t() - eye) + torch.linalg.matrix_norm(b.t() @ b - eye)

    @torch.no_grad()
    def keep(self, mask: torch.Tensor) -> None:
        """Cut the triplets where ``mask`` is False out of this layer (training has ended)."""
        idx = mask.nonzero().flatten()
        self.lora_A = nn.Parameter(self.lora_A[idx].clone(), requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(self.lora_B[:, idx].clone(), requires_grad=self.lora_B.requires_grad)
        self.lora_E = nn.Parameter(self.lora_E[idx].clone(), requires_grad=self.lora_E.requires_grad)
        self.r = int(idx.numel())

    @classmethod
    def expected_params(cls, host: Host, config: AdaLoraConfig) -> int:
        return config.rank_of(host.name) * (host.d_in + host.d_out + 1)

    # -- Hugging Face PEFT: peft_type ADALORA ----------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> AdaLoraConfig:
        unknown = sorted(k for k, v in hf_config.items() if k not in _HF_IGNORED and k not in _FIELDS
                         and v not in (None, False, [], {}))
        if unknown:
            raise PeftkitError(f"unknown Hugging Face PEFT ADALORA option {unknown[0]}={hf_config[unknown[0]]!r}; "
                               f"peftkit cannot tell whether it changes the adapter's outputs")
        if hf_config.get("bias", "none") != "none" or hf_config.get("use_dora"):
            raise PeftkitError("Hugging Face PEFT ADALORA with bias / use_dora is not read by peftkit")
        kw = {k: hf_config[k] for k in _FIELDS if k in hf_config and hf_config[k] is not None}
        return AdaLoraConfig(
            target_modules=hf_config.get("target_modules"), alpha=hf_config.get("lora_alpha", 8),
            dropout=hf_config.get("lora_dropout", 0.0), rank_pattern=_patterns_in(hf_config.get("rank_pattern")),
            modules_to_save=hf_config.get("modules_to_save") or None, **kw)

    @classmethod
    def to_hf_config(cls, config: AdaLoraConfig, hosts: list[Host]) -> dict[str, Any]:
        if config.bias != "none":
            raise PeftkitError(f"cannot export to Hugging Face PEFT format: bias={config.bias!r}")
        pattern = None if config.rank_pattern is None else {
            f"{p}{_KEY}": list(m) for p, m in config.rank_pattern.items()}
        return {"init_r": config.init_r, "target_r": config.target_r, "lora_alpha": config.alpha,
                "lora_dropout": config.dropout, "tinit": config.tinit, "tfinal": config.tfinal,
                "deltaT": config.deltaT, "beta1": config.beta1, "beta2": config.beta2,
                "orth_reg_weight": config.orth_reg_weight, "total_step": config.total_step or 1,
                "rank_pattern": pattern,
                "fan_in_fan_out": bool(hosts) and all(h.kind == "gpt2_conv1d" for h in hosts)}

    @classmethod
    def hf_layout(cls, host: Host, config: AdaLoraConfig) -> dict[str, HFTensor] | None:
        if host.kind == "conv1d":
            return None
        r = config.rank_of(host.name)
        a, b, e = (r, host.d_in), (host.d_out, r), (r, 1)
        return {"lora_A": HFTensor("lora_A", a, a), "lora_B": HFTensor("lora_B", b, b),
                "lora_E": HFTensor("lora_E", e, e)}
