"""KaSA on LoRA (Wang et al. 2024, "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models",
arXiv 2412.06071; Hugging Face PEFT's ``LoraConfig.kasa_config``).

    base:     W_t = W0 − U_d·S_d·V_dᵀ   (the r smallest singular directions of W0 dropped, once)
    forward:  y = x·W_tᵀ + b0 + s·dropout(x)·Aᵀ·diag(d)·Bᵀ,   d ∈ R^r trained (N(0, 1) init), B = 0 at init
    merge:    W ← W_t + s·B·diag(d)·A

As for PiSSA, the host weight is left untouched: the dropped part is kept as the frozen factor pair
(V_dᵀ, −U_d·S_d / s) next to (A, diag(d)·B), one rank-2r update on the true W0 — recomputed from the base weight
when the adapter is built (as PEFT recomputes the truncation when it loads a KaSA file), so it is not saved.
``kasa_config`` holds PEFT's ``KasaConfig`` fields ``beta`` / ``gamma``: the weights of KaSA's auxiliary training
regularisers, which peftkit does not add to the loss (they do not change what a trained adapter computes).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor
from peftkit.core.host import Host


def check(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or set(value) - {"beta", "gamma"} or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
        raise PeftkitError(f"kasa_config must be a dict with numbers beta / gamma (PEFT's KasaConfig), got {value!r}")
    if any(value.values()):
        warnings.warn("kasa_config: KaSA's auxiliary regularisers (beta, gamma) are not added to the loss by peftkit; "
                      "the adapter computes as KaSA does", stacklevel=3)


@torch.no_grad()
def init_(owner: Any, host: Host, r: int) -> None:
    """Keep the dropped directions of ``host``'s weight as buffers (not saved) and add the trained diagonal."""
    if host.kind != "linear":
        raise PeftkitError(f"kasa_config on {host.name!r}: KaSA adapts Linear layers only (as in PEFT)")
    w = host.weight_2d().detach().float()
    k = min(w.shape)
    if r >= k:
        raise PeftkitError(f"kasa_config on {host.name!r}: r = {r} must be below min(d_in, d_out) = {k} (KaSA keeps "
                           f"at least one singular direction of the base weight)")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    dt = owner.lora_A.dtype
    owner.register_buffer("kasa_A0", vh[k - r:k].to(dt).contiguous(), persistent=False)
    owner.register_buffer("kasa_B0", (u[:, k - r:k] * s[k - r:k]).to(dt).contiguous(), persistent=False)
    owner.lora_diag = torch.nn.Parameter(torch.randn(r, dtype=dt, device=owner.lora_A.device))


def factors(owner: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-2r pair [A; V_dᵀ], [B·diag(d), −U_d·S_d / s]."""
    return (torch.cat([owner.lora_A, owner.kasa_A0]),
            torch.cat([owner.lora_B * owner.lora_diag, -owner.kasa_B0 / owner.s], dim=1))


def layout(out: dict[str, HFTensor], r: int) -> dict[str, HFTensor]:
    return {**out, "lora_diag": HFTensor("lora_diag", (r,), (r,))}
