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
pairs i<j of ‖z_i − z_j‖². :class:`GenDLoss` (the method's procedure) adds those two terms, weighted by the
config's ``unif_weight`` / ``align_weight`` (0 by default = plain LN tuning; GenD: 0.5 / 0.1), on the normalised
input of ``feature_module`` (default: the first ``modules_to_save`` entry, i.e. the head). GenD's plain "Linear"
head is exactly that (losses on z, head on f); :func:`use_linear_norm_head` turns a Linear head into the
LinearNorm head (the same parameters, so ``modules_to_save`` files are unchanged) — a change to the model, made
before adapting it and again on the base an adapter is loaded into.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from peftkit.core.adapter import Adapter
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor
from peftkit.core.host import Host
from peftkit.core.peft_names import alias, names_list, or_default
from peftkit.core.procedure import Procedure
from peftkit.core.registry import CONV3D_HOSTS, HOST_KINDS, NORM_HOSTS, register


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


# -- GenD's losses and head ------------------------------------------------------------------------------------------
def _pair_sq_dists(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """‖z_i − z_j‖² for all pairs i < j (Gram form: no B×B×d tensor, smooth at z_i = z_j) and the (2, P) indices."""
    sq = z.pow(2).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.t()).clamp_min(0)
    iu = torch.triu_indices(z.shape[0], z.shape[0], 1, device=z.device)
    return d2[iu[0], iu[1]], iu


def uniformity_loss(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean_{i<j} exp(−t‖z_i − z_j‖²), the mean clamped at 1e-6 (Wang & Isola 2020; GenD's L_unif)."""
    if z.shape[0] < 2:
        return z.sum() * 0
    d2, _ = _pair_sq_dists(z)
    return d2.mul(-t).exp().mean().clamp(min=1e-6).log()


def alignment_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean ‖z_i − z_j‖² over pairs i < j with the same label (α = 2); 0 when there is no such pair."""
    if z.shape[0] < 2:
        return z.sum() * 0
    d2, iu = _pair_sq_dists(z)
    same = labels[iu[0]] == labels[iu[1]]
    return d2[same].mean() if bool(same.any()) else z.sum() * 0


class LinearNorm(nn.Linear):
    """GenD's "LinearNorm" head: logits = W·(f/‖f‖₂) + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=-1), self.weight, self.bias)


def use_linear_norm_head(model: nn.Module, name: str) -> nn.Module:
    """Replace the ``nn.Linear`` module ``name`` of ``model`` by a :class:`LinearNorm` holding the very same
    parameters (in place, before :func:`peftkit.adapt`); returns the model."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise PeftkitError(f"use_linear_norm_head: the model has no module {name!r}") from None
    if type(old) is not nn.Linear:
        raise PeftkitError(f"use_linear_norm_head: {name!r} is a {type(old).__name__}, not an nn.Linear (adapt after)")
    new = LinearNorm(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    new.weight, new.bias = old.weight, old.bias
    new.train(old.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


class GenDLoss(Procedure):
    """Adds ``unif_weight·L_unif(z) + align_weight·L_align(z, y)`` with z = f/‖f‖₂, f the (B, d) input of
    ``feature_module``, y the batch labels (``batch["labels"]`` or the second item of a pair)."""

    def __init__(self, model: nn.Module, config: LnTuningConfig) -> None:
        self.unif_weight, self.align_weight = config.unif_weight, config.align_weight
        self.module_name = config.feature_module or (config.modules_to_save or [None])[0]
        self.module: nn.Module | None = None
        self.features: torch.Tensor | None = None
        self._handle: Any = None
        if self.unif_weight == 0 and self.align_weight == 0:
            return
        if self.module_name is None:
            raise PeftkitError("LnTuningConfig.unif_weight / align_weight need feature_module (the head whose input "
                               "features they read) or a modules_to_save entry")
        try:
            self.module = model.get_submodule(self.module_name)
        except AttributeError:
            raise PeftkitError(f"LnTuningConfig.feature_module: the model has no module {self.module_name!r}") from None

    def _grab(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self.features = args[0] if args else None

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        if self.module is not None and self._handle is None:
            self._handle = self.module.register_forward_pre_hook(self._grab)

    def on_step_start(self, model: nn.Module, step: int) -> None:
        self.features = None

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        if self.module is None:
            return None
        f = self.features
        self.features = None
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            raise PeftkitError(
                f"GenD losses: the input of {self.module_name!r} must be a (batch, features) tensor, got "
                f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}; set feature_module to a "
                f"module that receives pooled features"
            )
        z = F.normalize(f.float(), dim=-1)
        loss = self.unif_weight * uniformity_loss(z) if self.unif_weight else z.sum() * 0
        if self.align_weight:
            labels = batch.get("labels") if isinstance(batch, Mapping) else batch[1]
            if labels is None:
                raise PeftkitError("GenD alignment loss: the batch has no labels")
            loss = loss + self.align_weight * alignment_loss(z, labels.to(z.device))
        return loss

    def on_train_end(self, model: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# -- the adapter -----------------------------------------------------------------------------------------------------
_HF_META = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                      "revision", "inference_mode", "target_modules", "exclude_modules", "modules_to_save"})


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
