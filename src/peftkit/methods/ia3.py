"""(IA)³ — Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (arXiv 2205.05638); module semantics as Hugging Face PEFT's ``tuners/ia3``.

    forward:  output scaling (keys, values):         y = l ⊙ (W·x + b),   l ∈ R^{d_out}   ⇒ Δ = (l − 1) ⊙ base_out
              input scaling (``feedforward_modules``: the FFN's down projection, fed act(W_1·x)):
                                                      y = W·(l ⊙ x) + b,   l ∈ R^{c_in}    ⇒ Δ = W·((l − 1) ⊙ x)
    init:     l = 1 ⇒ exactly the base model
    merge:    output scaling W ← diag(l)·W, b ← l ⊙ b (rows);  input scaling W ← W·diag(l) (columns; the kernel taps
              of one input channel of a convolution share its l), b unchanged;  unmerge divides by l

Trainable: l — d_out (output scaling) or c_in (input scaling: d_in of a Linear / GPT-2 Conv1D, in_channels of a
convolution) per layer. ``feedforward_modules`` uses the same matching rules as ``target_modules`` (a list of names
or name suffixes, or a full-match regex). The defaults pick the paper's modules on BERT/RoBERTa
(``key``, ``value``, the FFN's ``layer.N.output.dense`` — not ``attention.output.dense``) and on LLaMA-style models
(``k_proj``, ``v_proj``, ``down_proj``); any Linear, Conv or Embedding can be scaled (as in Hugging Face PEFT), and
input scaling of an Embedding (whose input is token ids) is refused. When the adapter is the only one active the
layer runs as one host call (``fused_forward``); an input-scaled Linear / GPT-2 Conv1D layer with at least d_out rows
(float32/64) runs as ``x·(W·diag(l))ᵀ + b`` — no N×d_in scaled copy of x — and keeps x for ∂l = Σ_rows x ⊙ (g·W)
through ``core.saved_input`` (no copy of it when its producer, e.g. the FFN's GELU, can rebuild it; Hugging Face
PEFT's ``x * l`` keeps x). Two IA3 adapters active on one layer add their deltas ((l₁ + l₂ − 1) ⊙ h), whereas
Hugging Face PEFT multiplies them (l₁·l₂ ⊙ h); one active adapter is identical.
Reads and writes Hugging Face PEFT's ``IA3`` format (``ia3_l`` of shape (d_out, 1) or (1, d_in); (1, C, 1, 1) on
Conv2d), for the host kinds PEFT supports (Linear, GPT-2 Conv1D, Conv2d).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core import precision, saved_input
from peftkit.core.adapter import Adapter, check_first_order
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor
from peftkit.core.host import Host
from peftkit.core.lowrank import fold_pays, linear_into
from peftkit.core.peft_names import TARGETING, inert, names_list, or_default
from peftkit.core.registry import register
from peftkit.core.targeting import matches

#: BERT/RoBERTa: key, value, FFN output.dense (not attention.output.dense); LLaMA-style: k_proj, v_proj, down_proj
DEFAULT_TARGETS = r"(.*\.)?(key|value|k_proj|v_proj|down_proj|layer\.\d+\.output\.dense)"
DEFAULT_FEEDFORWARD = r"(.*\.)?(down_proj|layer\.\d+\.output\.dense)"

#: Hugging Face IA3 config fields that are metadata, only steer init, or decide targeting (the file's keys settle it)
_HF_IGNORED = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "target_modules", "exclude_modules", "fan_in_fan_out", "init_ia3_weights", "modules_to_save", "feedforward_modules",
})


@dataclass
class IA3Config(AdapterConfig):
    """IA3. ``feedforward_modules``: the targets whose *input* is scaled (the rest scale their output); None: none.
    Accepts Hugging Face PEFT ``IA3Config``'s field names; there, None targets / feedforward modules mean PEFT's
    per-architecture defaults, here peftkit's (the same modules on BERT/RoBERTa and LLaMA-style models)."""

    target_modules: list[str] | str | None = DEFAULT_TARGETS
    feedforward_modules: list[str] | str | None = DEFAULT_FEEDFORWARD

    peft_type = "IA3"
    peft_names = {
        **TARGETING,
        "target_modules": or_default("target_modules", names_list),
        "feedforward_modules": or_default("feedforward_modules", names_list),
        "init_ia3_weights": inert(True, "peftkit's IA3 vectors start at 1 (the base model); PEFT's False draws them "
                                        "at random, for tests"),
    }

    def validate(self) -> None:
        super().validate()
        if self.dropout != 0.0:
            raise PeftkitError(f"IA3Config.dropout must be 0 (IA3 has no dropout), got {self.dropout}")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list | tuple) and isinstance(targets, list | tuple):
            extra = [f for f in ff if f not in targets]
            if extra:
                raise PeftkitError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules: {extra} not in {list(targets)}"
                )

    def is_feedforward(self, module_name: str) -> bool:
        ff = self.feedforward_modules
        if ff is None:
            return False
        return re.fullmatch(ff, module_name) is not None if isinstance(ff, str) else matches(module_name, list(ff))


class _InputScaledLinear(torch.autograd.Function):
    """y = (x ⊙ l)·Wᵀ + b for a frozen (d_out, d_in) ``W``, computed as x·(W·diag(l))ᵀ + b. Backward: with
    ``S = g·W``, ∂x = S ⊙ l, ∂l = Σ_rows x ⊙ S (x from :mod:`~peftkit.core.saved_input`), ∂b = Σ_rows g."""

    @staticmethod
    def forward(ctx, x, w, bias, scale):  # type: ignore[override]
        y = linear_into(x, w * scale, bias)
        kind, extra, kept = saved_input.pack(x) if ctx.needs_input_grad[3] else ("plain", None, ())
        ctx.save_for_backward(w, scale, *kept)
        ctx.kind, ctx.extra, ctx.shape = kind, extra, x.shape
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        check_first_order()
        w, scale, *kept = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_scale = grad_bias = None
        if ctx.needs_input_grad[3]:
            s = torch.mm(g2, w)
            grad_scale = saved_input.column_dot(ctx.kind, ctx.extra, tuple(kept), s)
            if ctx.needs_input_grad[0]:
                grad_x = s.mul_(scale).view(ctx.shape)
        elif ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, w * scale).view(ctx.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, grad_scale


def _size(host: Host, feedforward: bool) -> int:
    if not feedforward:
        return host.d_out
    return host.module.in_channels if host.is_conv else host.d_in


@register(
    "ia3",
    config=IA3Config,
    family="scaling",
    paper="Liu et al. 2022, (IA)³: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
          "Learning (arXiv 2205.05638)",
    description="learned rescaling vectors: outputs of keys/values, input of the FFN down projection; init 1",
    params="d_out per output-scaled layer, c_in per feedforward (input-scaled) layer",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "conv3d", "embedding"),
    hf_peft_type="IA3",
    lr_scale=5.0,
)
class IA3(Adapter):
    additive = False  # reads the host output / weight (see Adapter.additive)
    def __init__(self, host: Host, config: IA3Config) -> None:
        super().__init__(host, config)
        self.feedforward = config.is_feedforward(host.name)
        if self.feedforward and host.kind == "embedding":
            raise PeftkitError(
                f"IA3: {host.name!r} is an Embedding (its input is token ids) and cannot be a feedforward module; "
                f"feedforward_modules={config.feedforward_modules!r} should name the FFN's down projection only"
            )
        w = host.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        self.ia3_l = nn.Parameter(torch.ones(_size(host, self.feedforward), device=w.device, dtype=dtype))

    def _l(self, minus_one: bool = False) -> torch.Tensor:
        """l (or l − 1) shaped to broadcast over the host's output (output scaling) or input (input scaling)."""
        return self.host.out_view(self.ia3_l - 1 if minus_one else self.ia3_l)

    def stacks(self) -> bool:  # on outputs it scales whatever output it is given
        return not self.feedforward

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if not self.feedforward:
            return self._l(minus_one=True) * base_out
        w = self.host.weight_2d()
        return self.host.project_in((x * self._l(minus_one=True)).to(w.dtype), w)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.feedforward:
            y = self.host.module(x)
            return (y * self._l()).to(y.dtype)
        host, w = self.host, self.host.weight_2d()
        dt = precision.fused_dtype(x, w, folds=True)  # W·diag(l) in half precision would round the scaling
        if (host.kind in ("linear", "gpt2_conv1d") and x.dim() >= 2 and not w.requires_grad and dt is not None
                and self.ia3_l.dtype == dt and fold_pays(x.numel() // x.shape[-1], host.d_out, dt)):
            if torch.is_grad_enabled() and (x.requires_grad or self.ia3_l.requires_grad):
                return _InputScaledLinear.apply(x, w, host.bias, self.ia3_l)
            return linear_into(x, w * self.ia3_l, host.bias)
        return host.module((x * self._l()).to(x.dtype))

    def _factors(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.detach().to(weight.dtype)
        if bool((scale == 0).any()):
            raise PeftkitError(
                f"IA3 on {self.host.name!r} has zero scales, which a merge could not undo; nothing was merged"
            )
        if not self.feedforward:
            return scale[:, None]
        return scale.repeat_interleave(weight.shape[1] // scale.numel())[None, :]

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self._factors(weight)
        if self.feedforward or bias is None:
            return weight * f, bias
        return weight * f, bias * f[:, 0].to(bias.dtype)

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self._factors(weight)
        if self.feedforward or bias is None:
            return weight / f, bias
        return weight / f, bias / f[:, 0].to(bias.dtype)

    @classmethod
    def expected_params(cls, host: Host, config: IA3Config) -> int:
        return _size(host, config.is_feedforward(host.name))

    # Hugging Face PEFT: peft_type IA3
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> IA3Config:
        unknown = sorted(k for k, v in hf_config.items() if k not in _HF_IGNORED and v not in (None, False, [], {}))
        if unknown:
            raise PeftkitError(
                f"unknown Hugging Face PEFT IA3 option {unknown[0]}={hf_config[unknown[0]]!r}; peftkit cannot tell "
                f"whether it changes the adapter's outputs, so it refuses to load the adapter"
            )
        ff = hf_config.get("feedforward_modules")
        if isinstance(ff, list | tuple):  # PEFT matches list entries as plain name suffixes (no '.' boundary)
            ff = f".*(?:{'|'.join(re.escape(f) for f in ff)})" if ff else []
        return IA3Config(
            target_modules=hf_config.get("target_modules") or DEFAULT_TARGETS,
            feedforward_modules=ff, modules_to_save=hf_config.get("modules_to_save") or None,
        )

    @classmethod
    def to_hf_config(cls, config: IA3Config, hosts: list[Host]) -> dict[str, Any]:
        if config.bias != "none":
            raise PeftkitError(
                f"cannot export to Hugging Face PEFT format: IA3 there has no trainable biases (bias={config.bias!r})"
            )
        names = [h.name for h in hosts]
        ff = [h.name for h in hosts if config.is_feedforward(h.name)]
        # PEFT treats a target as feedforward when its name ends with an entry; exact paths unless one is a suffix
        ambiguous = any(o != f and o.endswith(f) for f in ff for o in names)
        return {
            "feedforward_modules": "|".join(re.escape(f) for f in ff) if ambiguous else ff,
            "fan_in_fan_out": bool(hosts) and all(h.kind == "gpt2_conv1d" for h in hosts),
            "init_ia3_weights": True,
            "exclude_modules": None,
        }

    @classmethod
    def hf_layout(cls, host: Host, config: IA3Config) -> dict[str, HFTensor] | None:
        if host.kind not in ("linear", "gpt2_conv1d", "conv2d", "conv3d"):
            return None
        ff = config.is_feedforward(host.name)
        n = _size(host, ff)
        hf_shape = (1, n, *(1,) * (host.weight.dim() - 2)) if host.is_conv else ((1, n) if ff else (n, 1))
        return {"ia3_l": HFTensor("ia3_l", hf_shape, (n,))}
