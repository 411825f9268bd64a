"""Conditional scale-and-shift (SSF per condition) for missing modalities — Reza et al. 2023, "Robust Multimodal
Learning with Missing Modalities via Parameter-Efficient Adaptation" (arXiv 2310.03986); the scale-and-shift itself
is SSF, Lian et al. 2022 (arXiv 2210.08823).

    forward:  y = γ[c] ⊙ h + β[c],  h = W·x + b the host output, c the sample's condition id ⇒ Δ = (γ[c] − 1) ⊙ h + β[c]
    init:     "identity": γ = 1, β = 0 ⇒ exactly the base model;  "ssf": γ ~ N(1, 0.02²), β ~ N(0, 0.02²) (official SSF)
    merge:    none — γ, β change per sample (mergeable=False)

Trainable: γ, β ∈ R^{C×d_out} — 2·C·d_out per layer (channel-wise: a conv's maps broadcast over their positions).
A condition is e.g. a modality-availability pattern; :func:`condition_ids` maps a (B, M) presence mask to
id = Σ_k 2^k·present_k. The caller passes one id per sample with ``with peftkit.condition(model, ids): model(x)``;
one batch may mix ids (and, through ``peftkit.mixed_batch``, adapters). Outside such a block every sample uses
``default_condition`` (None: the forward refuses to run). ``base_condition`` names an id with no parameters whose
samples run the unmodified network — Reza et al. keep the full-modality pattern there; with M modalities use
``num_conditions = 2^M − 1`` and ``base_condition = 2^M − 1``.

Unconfirmed (no official code found): insertion points follow SSF — "after linear, conv, norm and attention/MLP
outputs"; here the modulated features are the outputs of the targeted layers (Linear, Conv, Embedding, and
LayerNorm / RMSNorm with a learned scale). The optional FiLM generator MLP(mask) → (γ, β) of the spec's general form
is not included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from peftkit.core.adapter import Adapter
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.registry import register


def condition_ids(present: torch.Tensor) -> torch.Tensor:
    """(B, M) modality-presence mask (bool or 0/1) -> (B,) condition ids Σ_k 2^k·present_k."""
    if present.dim() != 2:
        raise PeftkitError(f"condition_ids expects a (batch, modalities) mask, got shape {tuple(present.shape)}")
    weights = 2 ** torch.arange(present.shape[1], device=present.device)
    return (present.long() * weights).sum(dim=1)


@dataclass
class ConditionalSSFConfig(AdapterConfig):
    """``num_conditions`` C (ids 0..C−1 own a γ, β each); ``default_condition``: the id used outside a
    ``peftkit.condition`` block (None: ids are required); ``base_condition``: an extra id outside 0..C−1 whose samples
    are not modulated; ``init``: ``"identity"`` or ``"ssf"``."""

    num_conditions: int = 1
    default_condition: int | None = 0
    base_condition: int | None = None
    init: Literal["identity", "ssf"] = "identity"

    def validate(self) -> None:
        super().validate()
        c = self.num_conditions
        self.positive("ConditionalSSFConfig.num_conditions", c)
        if self.base_condition is not None and 0 <= self.base_condition < c:
            raise PeftkitError(
                f"ConditionalSSFConfig.base_condition must lie outside 0..{c - 1} (the ids with parameters), got "
                f"{self.base_condition}"
            )
        if self.default_condition is not None and not (
                0 <= self.default_condition < c or self.default_condition == self.base_condition):
            raise PeftkitError(
                f"ConditionalSSFConfig.default_condition must be in 0..{c - 1}"
                + (f" or the base_condition {self.base_condition}" if self.base_condition is not None else "")
                + f", got {self.default_condition}"
            )


@register(
    "conditional_ssf",
    config=ConditionalSSFConfig,
    family="scaling",
    paper="Reza et al. 2023, Robust Multimodal Learning with Missing Modalities via Parameter-Efficient Adaptation "
          "(arXiv 2310.03986); SSF, Lian et al. 2022 (arXiv 2210.08823)",
    description="per-condition (e.g. modality pattern) scale and shift γ[c]⊙h + β[c] of layer outputs; the "
                "condition id is chosen per sample with peftkit.condition",
    params="2·C·d_out",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "embedding", "norm"),
    mergeable=False,
    lr_scale=5.0,
)
class ConditionalSSF(Adapter):
    additive = False  # reads the host output / weight (see Adapter.additive)
    uses_condition = True

    def __init__(self, host: Host, config: ConditionalSSFConfig) -> None:
        super().__init__(host, config)
        w = host.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        shape = (config.num_conditions, host.d_out)
        self.ssf_scale = nn.Parameter(torch.ones(shape, device=w.device, dtype=dtype))
        self.ssf_shift = nn.Parameter(torch.zeros(shape, device=w.device, dtype=dtype))
        if config.init == "ssf":
            nn.init.normal_(self.ssf_scale, mean=1.0, std=0.02)
            nn.init.normal_(self.ssf_shift, std=0.02)
        self.default, self.base = config.default_condition, config.base_condition

    def check_condition(self, ids: torch.Tensor) -> None:
        if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise PeftkitError(
                f"condition ids must be a 1-D sequence of integers (one per sample), got {ids.dtype} of shape "
                f"{tuple(ids.shape)}"
            )
        c = self.ssf_scale.shape[0]
        bad = (ids < 0) | (ids >= c)
        if self.base is not None:
            bad &= ids != self.base
        if bool(bad.any()):
            allowed = f"0..{c - 1}" + (f" or {self.base} (base_condition)" if self.base is not None else "")
            raise PeftkitError(
                f"condition ids {sorted(set(ids[bad].tolist()))} are out of range; num_conditions={c} allows {allowed}"
            )

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        h = self.host
        if condition is None:  # every sample under the default condition: one row, no gather
            if self.default is None:
                raise PeftkitError(
                    f"conditional_ssf on {h.name!r} needs a condition id per sample (default_condition is None): "
                    f"run the forward inside `with peftkit.condition(model, ids):`"
                )
            if self.default == self.base:
                return torch.zeros_like(base_out)
            return h.out_view(self.ssf_scale[self.default] - 1) * base_out + h.out_view(self.ssf_shift[self.default])
        rows = condition
        keep = None
        if self.base is not None:
            keep = condition != self.base
            rows = torch.where(keep, condition, torch.zeros_like(condition))
        scale = h.sample_view(self.ssf_scale.index_select(0, rows) - 1, base_out)
        shift = h.sample_view(self.ssf_shift.index_select(0, rows), base_out)
        d = scale * base_out + shift
        if keep is not None:
            d = d * h.sample_view(keep[:, None].to(d.dtype), base_out)
        return d

    @classmethod
    def expected_params(cls, host: Host, config: ConditionalSSFConfig) -> int:
        return 2 * config.num_conditions * host.d_out
