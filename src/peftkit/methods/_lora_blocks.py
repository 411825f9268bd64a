"""Block-diagonal LoRA (BD-LoRA; Hugging Face PEFT's ``LoraConfig.use_bdlora``): on chosen layers A or B is
block-diagonal with ``nblocks`` blocks, so that a layer sharded over ``nblocks`` devices (rows or columns) serves its
adapter without communication.

    A block-diagonal:  A = diag(A_1, …, A_nb),  A_i ∈ R^{r/nb × d_in/nb}  (stored stacked: (r, d_in/nb), PEFT's layout)
    B block-diagonal:  B = diag(B_1, …, B_nb),  B_i ∈ R^{d_out/nb × r/nb} (stored stacked: (d_out, r/nb))
    forward / merge:   as LoRA with those A, B  (ΔW = s·B·A)

``use_bdlora`` holds PEFT's ``BdLoraConfig`` fields: ``target_modules_bd_a`` / ``target_modules_bd_b`` (a layer whose
name contains one of the strings gets that factor block-diagonal), ``nblocks``, ``match_strict`` (every targeted
layer must match one of the lists). Linear and GPT-2 Conv1D layers only.
"""

from __future__ import annotations

from typing import Any

import torch

from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor
from peftkit.core.host import Host

FIELDS = {"target_modules_bd_a", "target_modules_bd_b", "nblocks", "match_strict"}


def check(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or set(value) - FIELDS:
        raise PeftkitError(f"use_bdlora must be a dict with keys among {sorted(FIELDS)} (PEFT's BdLoraConfig), "
                           f"got {value!r}")
    nb = value.get("nblocks", 1)
    if isinstance(nb, bool) or not isinstance(nb, int) or nb < 1:
        raise PeftkitError(f"use_bdlora: nblocks must be a positive integer, got {nb!r}")
    for key in ("target_modules_bd_a", "target_modules_bd_b"):
        names = value.get(key)
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise PeftkitError(f"use_bdlora: {key} must be a list of module-name fragments, got {names!r}")


def side(config: Any, host: Host, strict: bool = True) -> tuple[str | None, int]:
    """("a" | "b" | None, nblocks) for the layer ``host``: which factor is block-diagonal there (``strict``: raise
    where the config cannot apply to the layer, else answer None)."""
    bd = getattr(config, "use_bdlora", None)
    if not bd:
        return None, 1
    nb = bd.get("nblocks", 1)
    a = any(p in host.name for p in bd.get("target_modules_bd_a") or [])
    b = any(p in host.name for p in bd.get("target_modules_bd_b") or [])
    if not strict and (a == b or host.kind not in ("linear", "gpt2_conv1d")):
        return None, nb
    if a and b:
        raise PeftkitError(f"use_bdlora: {host.name!r} matches both target_modules_bd_a and target_modules_bd_b")
    if not (a or b):
        if bd.get("match_strict", True):
            raise PeftkitError(f"use_bdlora: {host.name!r} matches neither target_modules_bd_a nor "
                               f"target_modules_bd_b (set match_strict=False to mix plain and block-diagonal LoRA)")
        return None, nb
    if host.kind not in ("linear", "gpt2_conv1d"):
        raise PeftkitError(f"use_bdlora on {host.name!r}: block-diagonal LoRA adapts Linear / GPT-2 Conv1D layers only")
    r = config.r
    width = host.d_in if a else host.d_out
    if r % nb or width % nb:
        raise PeftkitError(f"use_bdlora on {host.name!r}: r = {r} and the layer's {'d_in' if a else 'd_out'} = "
                           f"{width} must be multiples of nblocks = {nb}")
    return ("a" if a else "b"), nb


def compact_(owner: Any, which: str, nb: int) -> None:
    """Replace ``owner``'s ``lora_A`` (which "a") or ``lora_B`` ("b") by its stacked blocks (PEFT's init: A
    kaiming-uniform, B zero)."""
    if which == "a":
        a = torch.empty(owner.lora_A.shape[0], owner.lora_A.shape[1] // nb, dtype=owner.lora_A.dtype,
                        device=owner.lora_A.device)
        torch.nn.init.kaiming_uniform_(a)
        owner.lora_A = torch.nn.Parameter(a)
    else:
        owner.lora_B = torch.nn.Parameter(owner.lora_B.new_zeros(owner.lora_B.shape[0], owner.lora_B.shape[1] // nb))


def factors(owner: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``owner``'s (A, B) as matrices: its stacked blocks as the block-diagonal (nb·m, nb·n) matrix."""
    a, b = owner.lora_A, owner.lora_B
    if owner.bd == "a":
        return torch.block_diag(*a.chunk(owner.nb, dim=0)), b
    return a, torch.block_diag(*b.chunk(owner.nb, dim=0))


def layout(out: dict[str, HFTensor], host: Host, config: Any) -> dict[str, HFTensor]:
    """PEFT's layout of the factors on ``host`` (the stacked blocks where one is block-diagonal)."""
    which, nb = side(config, host, strict=False)
    if which is None:
        return out
    key, spec = ("lora_A", out["lora_A"]) if which == "a" else ("lora_B", out["lora_B"])
    shape = (spec.shape[0], spec.shape[1] // nb)
    return {**out, key: HFTensor(f"{key}.weight", shape, shape)}


def params(host: Host, config: Any) -> int | None:
    """The factors' parameter count where one is block-diagonal (else None)."""
    which, nb = side(config, host, strict=False)
    if which is None:
        return None
    return config.r * host.d_in // (nb if which == "a" else 1) + host.d_out * config.r // (nb if which == "b" else 1)
