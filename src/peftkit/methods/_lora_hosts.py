"""LoRA on the substituted hosts of :mod:`peftkit.core.host` — weights a module reads directly, adapted by running the
module with ``W + ΔW`` in their place — as Hugging Face PEFT's ``lora.MultiheadAttention`` and ``lora.ParamWrapper``:

    nn.MultiheadAttention (E = embed_dim): the packed input projection and ``out_proj`` each get a factor pair of the
        same r, α:  ΔW_in = s·B·A (3E×E), ΔW_out = 2·s·B_o·A_o (E×E). On the host's stacked weight [W_in; W_out]
        that is ΔW = s·diag(B, 2·B_o)·[A; A_o] (what :func:`factors` gives). PEFT's keys: ``<mha>.lora_A.weight``,
        ``<mha>.lora_B.weight``, ``<mha>.base_layer.out_proj.lora_A.weight``, ``…out_proj.lora_B.weight``.
        The 2 is Hugging Face PEFT's (0.21): its ``lora.MultiheadAttention`` merges out_proj's ΔW into the weight and
        then merges the wrapped out_proj ``lora.Linear``, which adds it again — and its forward runs that merge — so
        what its adapters compute (and train: B_o's gradient is doubled too) is W_out + 2·s·B_o·A_o. peftkit
        computes the same function, so adapters move both ways with equal outputs.
    a bare 2-D parameter P ∈ R^{d0×d1} (``target_parameters``): ΔP = s·B·A, A ∈ R^{r×d1}, B ∈ R^{d0×r}, on P as
        stored (whatever the module does with it). PEFT's keys: ``<module>.lora_A.weight`` / ``lora_B.weight``.
    a 3-D stack of E experts (E, out, in) (``is_transposed``: (E, in, out)): ΔP_e = s·B_e·A_e per expert, stored as
        PEFT stacks them: A (E·r, in) with A_e = rows e·r…(e+1)·r, B (out, E·r) with B_e = columns e, e+E, …
        (:meth:`~peftkit.core.host.Host.lowrank_weight`); the same keys.

The update is a weight, so input dropout has no place: PEFT refuses ``lora_dropout`` on a parameter (peftkit too)
and ignores it on nn.MultiheadAttention (peftkit too). Plain inits (kaiming, gaussian, random) only; no
``lora_bias``, block-diagonal or KaSA factors there (PEFT refuses them as well).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor, lowrank_layout
from peftkit.core.host import Host
from peftkit.core.lowrank import init_down_
from peftkit.core.registry import SUBSTITUTED_HOSTS

#: the host kinds LoRA adapts through this module
KINDS = SUBSTITUTED_HOSTS


def _what(host: Host) -> str:
    if host.kind == "mha":
        return f"{host.name!r} (nn.MultiheadAttention)"
    return f"parameter {host.name}.{host.param}"


def check(host: Host, config: Any) -> None:
    """Refuse what LoRA cannot do on a substituted host (a message naming the layer kind and the option)."""
    if not host.substituted:
        return
    bad = [k for k in ("lora_bias", "use_bdlora", "kasa_config") if getattr(config, k)]
    if config.init not in ("kaiming", "gaussian", "random"):
        bad.insert(0, f"init={config.init!r}")
    if host.kind == "parameter" and config.dropout > 0:
        bad.append(f"dropout={config.dropout} (the update is a weight: no input to drop)")
    if bad:
        raise PeftkitError(f"LoRA on {_what(host)}: {bad[0]} is not supported there (plain LoRA factors only, as "
                           f"in Hugging Face PEFT)")


@torch.no_grad()
def setup_(lora: Any, host: Host, config: Any) -> None:
    """After the plain init: on an nn.MultiheadAttention, split the (4E, r) up-projection into the input
    projection's (3E, r) and add ``out_proj``'s own pair ``lora_A_out`` (r, E) / ``lora_B_out`` (E, r), initialised
    as LoRA's (A kaiming or gaussian; B zero, or kaiming-uniform for ``init="random"``)."""
    if host.kind != "mha":
        return
    e = host.d_in
    b = lora.lora_B.data
    lora.lora_B = torch.nn.Parameter(b[:3 * e].clone())
    lora.lora_A_out = torch.nn.Parameter(torch.empty_like(lora.lora_A))
    init_down_(lora.lora_A_out, config.init, config.r)
    lora.lora_B_out = torch.nn.Parameter(b.new_zeros(e, b.shape[1]))
    if config.init == "random":
        torch.nn.init.kaiming_uniform_(lora.lora_B_out, a=math.sqrt(5))


def factors(lora: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) on the stacked [W_in; W_out] of an nn.MultiheadAttention: [A; A_o] and diag(B, 2·B_o) (PEFT's 2)."""
    return torch.cat([lora.lora_A, lora.lora_A_out]), torch.block_diag(lora.lora_B, 2 * lora.lora_B_out)


def layout(host: Host, r: int) -> dict[str, HFTensor]:
    """PEFT's keys and shapes of the factors on a substituted host."""
    if host.kind != "mha":
        return lowrank_layout(host, r)
    e = host.d_in
    out = "base_layer.out_proj."
    return {"lora_A": HFTensor("lora_A.weight", (r, e), (r, e)),
            "lora_B": HFTensor("lora_B.weight", (3 * e, r), (3 * e, r)),
            "lora_A_out": HFTensor(out + "lora_A.weight", (r, e), (r, e)),
            "lora_B_out": HFTensor(out + "lora_B.weight", (e, r), (e, r))}


def params(host: Host, config: Any) -> int | None:
    """Trainable parameters on an nn.MultiheadAttention: 2·r·E + r·(3E + E); on a stack of E experts E·r·(in + out);
    None on other hosts."""
    if host.experts > 1:
        return config.r * (host.experts * host.d_in + host.d_out)
    return 6 * config.r * host.d_in if host.kind == "mha" else None


def check_config(value: Any) -> None:
    """``target_parameters``: None or a list of parameter names (full, or the last parts after a dot)."""
    if value is not None and (not isinstance(value, list) or not value
                              or not all(isinstance(n, str) and n for n in value)):
        raise PeftkitError(f"target_parameters must be a non-empty list of parameter names (e.g. "
                           f"['mlp.experts.w1']), got {value!r}")
