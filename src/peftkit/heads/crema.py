"""CREMA — Yu et al. 2025, "CREMA: Generalizable and Efficient Video-Language Reasoning via Multimodal Modular
Fusion" (ICLR 2025, arXiv 2402.05889; official code Yui010206/CREMA, ``lavis/models/blip2_models/blip2.py``
``LoRA_Multimodal_QFormer`` and ``lavis/models/crema_models/crema.py``).

    modality m:  T_m = P_m( Q(q_m, F_m; W + B_m A_m) ),  LoRA on the shared backbone's chosen layers (the Q-Former's
                 self-attention query/value), r = 64, dropout 0.1, no α/r scaling (α = r); own query tokens
                 q_m ∈ R^{n_q×d} and own projection P_m: R^d → R^{d_out}
    fusion:      z = Linear_{(M−1)·d_out → d_out}( concat_{m ≠ primary} T_m ),  T = T_primary + σ(z) ⊙ z
                 — the fused tokens have the primary modality's shape (compression of M−1 token sets)
    init:        A_m kaiming(a=√5), B_m = 0 (T_m equals the frozen backbone's tokens); q_m, P_m copied from given
                 tensors / Linear (BLIP-2's query tokens and ``t5_proj``) or N(0, 0.02²) / PyTorch default
    merge:       none — several LoRAs share one backbone and are routed per call (``peftkit.mixed_batch``).

A modular system rather than one layer method: the per-modality LoRAs are ordinary peftkit ``lora`` adapters named
after the modalities on the user's backbone; :class:`Crema` routes each modality's call to its own adapter, so
switching modality changes only the LoRA used. A missing modality (absent from the inputs) contributes a zero block
to the concatenation (equivalently, its slice of the fusion weight is skipped); with no secondary modality at all
the primary tokens pass through unchanged. The v2 additions (modality-sequential training, early exit) are not here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from peftkit.core.errors import PeftkitError
from peftkit.core.model import adapt, adapter_names, disable, mixed_batch, set_active


class EspressoFusion(nn.Module):
    """Self-gated fusion of the secondary modalities' tokens into the primary ones: ``T_p + σ(z)⊙z``."""

    def __init__(self, d: int, secondaries: Sequence[str]) -> None:
        super().__init__()
        self.d, self.secondaries = d, list(secondaries)
        self.proj = nn.Linear(d * len(self.secondaries), d) if self.secondaries else None

    def forward(self, primary: torch.Tensor, others: Mapping[str, torch.Tensor]) -> torch.Tensor:
        unknown = sorted(set(others) - set(self.secondaries))
        if unknown:
            raise PeftkitError(f"EspressoFusion: unknown modality(ies) {unknown}; secondaries: {self.secondaries}")
        if not others or self.proj is None:
            return primary
        for m, t in others.items():
            if t.shape != primary.shape:
                raise PeftkitError(f"EspressoFusion: modality {m!r} tokens {tuple(t.shape)} differ from the primary "
                                   f"{tuple(primary.shape)}")
        zero = primary.new_zeros(primary.shape)
        z = self.proj(torch.cat([others.get(m, zero) for m in self.secondaries], dim=-1))
        return primary + torch.sigmoid(z) * z


class Crema(nn.Module):
    """Per-modality LoRA + query tokens + projection on one frozen ``backbone(queries, features) -> [B, n_q, d]``,
    and :class:`EspressoFusion` over the projected tokens. ``modalities[0]`` (or ``primary``) is the primary one.

    ``backbone`` is adapted in place: one ``lora`` adapter per modality (``target_modules``, ``r``, α = r,
    ``dropout``); every other backbone parameter is frozen. ``skip`` lists modalities that bypass their LoRA
    (CREMA's ``m-skip``)."""

    def __init__(
        self, backbone: nn.Module, modalities: Sequence[str], *, d_model: int, n_query: int, d_out: int,
        target_modules: list[str] | str, r: int = 64, dropout: float = 0.1, primary: str | None = None,
        query_init: torch.Tensor | None = None, proj_init: nn.Linear | None = None, skip: Sequence[str] = (),
    ) -> None:
        super().__init__()
        from peftkit.methods.lora import LoraConfig

        modalities = list(modalities)
        if not modalities or len(set(modalities)) != len(modalities):
            raise PeftkitError(f"Crema: modalities must be distinct non-empty names, got {modalities}")
        primary = modalities[0] if primary is None else primary
        if primary not in modalities or set(skip) - set(modalities):
            raise PeftkitError(f"Crema: primary {primary!r} / skip {list(skip)} must name modalities {modalities}")
        if query_init is not None and query_init.shape != (n_query, d_model):
            raise PeftkitError(f"Crema: query_init must be ({n_query}, {d_model}), got {tuple(query_init.shape)}")
        taken = sorted(set(modalities) & set(adapter_names(backbone)))
        if taken:
            raise PeftkitError(f"Crema: the backbone already has adapter(s) named {taken}")
        cfg = LoraConfig(target_modules=target_modules, r=r, alpha=float(r), dropout=dropout)
        cfg.validate()
        for m in modalities:  # the first adapt validates targeting; a failure leaves the backbone unchanged
            adapt(backbone, cfg, name=m, activate=False)
        set_active(backbone, modalities)  # all modality LoRAs trainable; calls are routed per modality
        self.backbone = backbone
        self.modalities, self.primary, self.skip = modalities, primary, set(skip)
        self.queries = nn.ParameterDict({
            m: nn.Parameter(query_init.clone() if query_init is not None else torch.randn(n_query, d_model) * 0.02)
            for m in modalities
        })
        self.proj = nn.ModuleDict()
        for m in modalities:
            p = nn.Linear(d_model, d_out)
            if proj_init is not None:
                p.load_state_dict(proj_init.state_dict())
            self.proj[m] = p
        self.fusion = EspressoFusion(d_out, [m for m in modalities if m != primary])

    def modality_tokens(self, m: str, features: torch.Tensor) -> torch.Tensor:
        """The projected tokens [B, n_q, d_out] of modality ``m`` (its own LoRA, queries and projection)."""
        if m not in self.modalities:
            raise PeftkitError(f"Crema: unknown modality {m!r}; modalities: {self.modalities}")
        b = features.shape[0]
        q = self.queries[m].unsqueeze(0).expand(b, -1, -1)
        if m in self.skip:
            with disable(self.backbone):
                h = self.backbone(q, features)
        else:
            with mixed_batch(self.backbone, [m] * b):
                h = self.backbone(q, features)
        return self.proj[m](h)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``inputs``: modality -> features [B, N_m, d_feat]; any subset of the modalities. Returns [B, n_q, d_out]."""
        unknown = sorted(set(inputs) - set(self.modalities))
        if unknown or not inputs:
            raise PeftkitError(f"Crema: inputs must name some of {self.modalities}, got {sorted(inputs)}")
        tokens = {m: self.modality_tokens(m, f) for m, f in inputs.items()}
        primary = tokens.pop(self.primary, None)
        if primary is None:  # the primary modality is missing: fuse onto zero tokens
            primary = torch.zeros_like(next(iter(tokens.values())))
        return self.fusion(primary, tokens)
