"""LN tuning — train only the normalisation layers' scale and shift, as in GenD ("Deepfake Detection that
Generalizes Across Benchmarks", 2025; github.com/yermandy/GenD) and Hugging Face PEFT's ``LN_TUNING`` (after Zhao
et al. 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning", arXiv 2312.11420).

    forward:  y = norm(x; γ + Δγ, β + Δβ)            (LayerNorm: x̂ ⊙ (γ+Δγ) + β + Δβ; RMSNorm: no β)
    init:     Δγ = 0, Δβ = 0  ⇒  y = norm(x; γ, β) exactly
    merge:    γ ← γ + Δγ, β ← β + Δβ  (unmerge subtracts them again)

Other layers (Linear, convolutions, Embedding, GPT-2 Conv1D), as Hugging Face PEFT's LN_TUNING targets any layer it is
given: the same with γ, β = the layer's weight and bias (a full trainable copy's worth of Δ, as in PEFT).
Trainable: Δγ, Δβ — d (+ d when the norm has a shift β) per norm layer. A norm's output is affine in (γ, β) (also
for Gemma-style x̂·(1+γ)), so the delta norm(x; γ+Δγ, β+Δβ) − norm(x; γ, β) adds up exactly across adapters and
over a merged base; it is computed by calling the host norm itself with the shifted parameters, so every
LayerNorm / RMSNorm class (torch's, transformers' ``LlamaRMSNorm``, ``T5LayerNorm``, ...) is handled by one code
path. Hugging Face PEFT stores trained copies γ' = γ + Δγ (``<norm>.ln_tuning_layers.weight``); that format is read
and written (Δ = γ' − γ on import).

GenD head option. GenD trains every LayerNorm plus a linear head on L2-normalised CLIP features ("LinearNorm":
z = f/‖f‖₂, logits = W z + b) with L = CE + 0.5·L_unif + 0.1·L_align on z:
L_unif = log mean_{i<j} exp(−2‖z_i − z_j‖²) (clamped at 1e-6 before the log), L_align = mean over same-label
pairs i<j of ‖z_i − z_j‖². :class:`GenDLoss` (the method's procedure, in :mod:`.lntuning_gend`) adds those two
terms, weighted by the config's ``unif_weight`` / ``align_weight`` (0 by default = plain LN tuning; GenD: 0.5 / 0.1),
on the normalised input of ``feature_module`` (default: the first ``modules_to_save`` entry, i.e. the head).
GenD's plain "Linear" head is exactly that (losses on z, head on f); :func:`use_linear_norm_head` turns a Linear
head into the LinearNorm head (the same parameters, so ``modules_to_save`` files are unchanged) — a change to the
model, made before adapting it and again on the base an adapter is loaded into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from peftkit.core.adapter import Adapter
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor
from peftkit.core.host import Host
from peftkit.core.peft_names import PEFT_METADATA, alias, names_list, or_default
from peftkit.core.registry import CONV3D_HOSTS, HOST_KINDS, NORM_HOSTS, register
from peftkit.methods.lntuning_gend import (  # GenD's losses, head and procedure: their own module
    GenDLoss,
    LinearNorm,
    alignment_loss,
    uniformity_loss,
    use_linear_norm_head,
)

__all__ = ["GenDLoss", "LinearNorm", "LnTuning", "LnTuningConfig", "alignment_loss", "uniformity_loss",
           "use_linear_norm_head"]


@dataclass
class LnTuningConfig(AdapterConfig):
    """LN tuning. ``target_modules`` defaults to ``"all-norm"`` (every LayerNorm / RMSNorm outside the head).
    ``unif_weight`` / ``align_weight``: GenD's uniformity / alignment loss weights (training only; GenD uses 0.5 /
    0.1), computed on the L2-normalised input of ``feature_module`` (default: the first ``modules_to_save``)."""

    target_modules: list[str] | str | None = "all-norm"
    unif_weight: float = 0.0
    align_weight: float = 0.0
    feature_module: str | None = None

    # Hugging Face PEFT LNTuningConfig's fields (its None targets: PEFT's per-architecture norms; here "all-norm")
    peft_type = "LN_TUNING"
    peft_names = {
        "target_modules": or_default("target_modules", names_list),
        "exclude_modules": alias("exclude_modules", names_list),
        "modules_to_save": alias("modules_to_save", names_list),
    }

    def validate(self) -> None:
        super().validate()
        if self.dropout != 0.0:
            raise PeftkitError(f"LnTuningConfig.dropout must be 0 (LN tuning has no adapter input), got {self.dropout}")
        for f in ("unif_weight", "align_weight"):
            if getattr(self, f) < 0:
                raise PeftkitError(f"LnTuningConfig.{f} must be >= 0, got {getattr(self, f)}")


# -- the adapter -----------------------------------------------------------------------------------------------------
_HF_META = PEFT_METADATA | {"target_modules", "exclude_modules", "modules_to_save"}


@register(
    "lntuning",
    config=LnTuningConfig,
    family="selective",
    paper="GenD, Deepfake Detection that Generalizes Across Benchmarks (2025); Zhao et al. 2023 (arXiv 2312.11420)",
    description="only LayerNorm / RMSNorm scale and shift train (Δγ, Δβ); GenD's uniformity + alignment losses "
                "on normalised head features as an option",
    params="d_norm (+ d_norm with a shift β) per norm layer; another targeted layer: its weight (+ bias) size",
    hosts=NORM_HOSTS + HOST_KINDS + CONV3D_HOSTS,
    procedure=GenDLoss,
    hf_peft_type="LN_TUNING",
    lr_scale=5.0,
)
class LnTuning(Adapter):
    additive = False  # reads the host output / weight (see Adapter.additive)
    def __init__(self, host: Host, config: LnTuningConfig) -> None:
        super().__init__(host, config)
        self.d_gamma = nn.Parameter(torch.zeros_like(host.weight.detach()))
        bias = host.bias
        self.d_beta = nn.Parameter(torch.zeros_like(bias.detach())) if isinstance(bias, torch.Tensor) else None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """The host norm with γ + Δγ (and β + Δβ)."""
        m = self.host.module
        params = {"weight": m.weight + self.d_gamma}
        if self.d_beta is not None:
            params["bias"] = m.bias + self.d_beta
        w = params["weight"]
        if (self.host.kind != "norm" and x.is_floating_point() and x.dtype != w.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            x = x.to(w.dtype)  # a Linear / conv: γ + Δγ is float32 on a half base; x joins it
        return functional_call(m, params, (x,))

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self._norm(x) - base_out

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        # γ + Δγ stays in the adapter's float32 (in bfloat16 a step below 2⁻⁸·γ would vanish); the output takes the
        # dtype the host norm alone gives (norms differ: torch's under autocast give float32, a Llama RMSNorm its
        # weight's dtype) — read off the host run on no rows
        y = self._norm(x)
        return y.to(self.host.module(x[:0]).dtype) if x.dim() > 1 else y

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.d_beta is not None:
            bias = bias + self.d_beta.to(bias.dtype)
        return weight + self.host.weight_2d(self.d_gamma).to(weight.dtype), bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.d_beta is not None:
            bias = bias - self.d_beta.to(bias.dtype)
        return weight - self.host.weight_2d(self.d_gamma).to(weight.dtype), bias

    @classmethod
    def expected_params(cls, host: Host, config: LnTuningConfig) -> int:
        return host.weight.numel() + (host.bias.numel() if isinstance(host.bias, torch.Tensor) else 0)

    # Hugging Face PEFT LN_TUNING: a trained copy of the whole norm, <norm>.ln_tuning_layers.{weight,bias}
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> LnTuningConfig:
        unknown = sorted(k for k in hf_config if k not in _HF_META and hf_config[k] not in (None, False, [], {}, ""))
        if unknown:
            raise PeftkitError(f"unknown Hugging Face PEFT LN_TUNING option {unknown[0]}={hf_config[unknown[0]]!r}")
        return LnTuningConfig(modules_to_save=hf_config.get("modules_to_save") or None)

    @classmethod
    def to_hf_config(cls, config: LnTuningConfig, hosts: list[Host]) -> dict[str, Any]:
        return {"exclude_modules": None}

    @classmethod
    def hf_layout(cls, host: Host, config: LnTuningConfig) -> dict[str, HFTensor] | None:
        shape = tuple(host.weight.shape)
        out = {"d_gamma": HFTensor("ln_tuning_layers.weight", shape, shape, base="weight")}
        if isinstance(host.bias, torch.Tensor):
            b = tuple(host.bias.shape)
            out["d_beta"] = HFTensor("ln_tuning_layers.bias", b, b, base="bias")
        return out


__all__ = ["GenDLoss", "LinearNorm", "LnTuning", "LnTuningConfig", "alignment_loss", "uniformity_loss",
           "use_linear_norm_head"]
