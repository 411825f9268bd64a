"""LoRA's starting factors for each ``init`` (the formulas: :mod:`peftkit.methods.lora`'s docstring; the maths of
LoftQ, EVA and CorDA: :mod:`peftkit.methods.lora_inits`), EVA's rank change, and the kept factors of PiSSA / OLoRA /
CorDA in Hugging Face PEFT's files."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

from peftkit.core.errors import PeftkitError
from peftkit.core.hf import lowrank_config_to_hf
from peftkit.core.lowrank import check_rank, init_down_
from peftkit.core.peft_names import INIT_TO_PEFT, plain_number
from peftkit.methods.lora_inits import corda_factors, corda_mode, loftq


# -- the starting factors of a LoRA adapter ---------------------------------------------------------------------
@torch.no_grad()
def init_factors_(lora: Any, host: Any, config: Any) -> None:
    """Set ``lora``'s (A, B) for ``config.init`` (the formulas: :mod:`peftkit.methods.lora`'s docstring). PiSSA,
    OLoRA and CorDA keep their factors (``lora.keep_init``); LoftQ's Q is written into the host on install."""
    init, r, s = config.init, lora.r, lora.s
    if lora.pissa:
        if host.groups > 1:  # B is grouped there: no SVD / QR factor of the weight fits it
            raise PeftkitError(f"init={init!r} on {host.name!r}: not supported on grouped convolutions")
        check_rank(host, r)
        w = host.weight_2d().detach().float()
        if init == "olora":
            q, r_ = torch.linalg.qr(w)
            lora.keep_init(r_[:r], q[:, :r])
        elif init.startswith("corda"):  # C = I until calibrate()
            lora.keep_init(*corda_factors(host.weight_2d(), torch.eye(host.d_in, device=w.device), r,
                                          corda_mode(init), s))
        else:  # PiSSA, exact or randomised SVD with K subspace iterations
            if "niter" in init:
                u, sv, v = torch.svd_lowrank(w, q=r, niter=int(init.rsplit("_", 1)[1]))
                vh = v.t()
            else:
                u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            sr = (sv[:r] / s).sqrt()
            lora.keep_init(sr[:, None] * vh[:r], u[:, :r] * sr[None, :])
    elif init == "mica":  # B = the left singular vectors of the r smallest singular values, A = 0; B frozen
        if host.kind not in ("linear", "gpt2_conv1d", "embedding"):
            raise PeftkitError(f"init='mica' on {host.name!r}: Linear, GPT-2 Conv1D and Embedding layers only (as in "
                               "Hugging Face PEFT)")
        check_rank(host, r)
        u = torch.linalg.svd(host.weight_2d().detach().float(), full_matrices=False)[0]
        lora.lora_B.copy_(u[:, -r:])
        lora.lora_A.zero_()
    elif init.startswith("loftq"):
        check_rank(host, r)
        q, a, b = loftq(host.weight_2d(), r, int(init.rsplit("_", 1)[1]) if "iter" in init else 1)
        lora._loftq_base = q  # written into the host on install (a failed load changes nothing)
        root = math.sqrt(s)  # s·B·A = L·R (PEFT copies L, R as they are: the same when α = r)
        lora.lora_A.copy_(a / root)
        lora.lora_B.copy_(b / root)
    else:
        init_down_(lora.lora_A, init, config.r)
        if init == "random":  # nn.Linear's default init of B (fan_in r), as PEFT leaves it
            torch.nn.init.kaiming_uniform_(lora.lora_B, a=math.sqrt(5))


@torch.no_grad()
def set_eva(lora: Any, a: torch.Tensor, config: Any) -> None:
    """EVA: rank k = len(a), A = a, B = 0, α ← α·k/r; the model's ``config`` records the new rank and α."""
    k, r, alpha = a.shape[0], lora.r, lora.config.alpha
    lora.lora_A.data = a.to(lora.lora_A)
    lora.lora_B.data = lora.lora_B.new_zeros(lora.lora_B.shape[0], k)
    if k != r:
        lora.config = dataclasses.replace(lora.config, r=k, alpha=alpha * k / r)
        config.overrides[re.escape(lora.host.name)] = {"r": k, "alpha": alpha * k / r}
    lora.r, lora.s = k, lora.config.scaling


# Kept factors in Hugging Face PEFT's files: PiSSA / OLoRA / CorDA are written as PEFT converts them
# (save_pretrained(..., path_initial_model_for_weight_conversion=...)): a plain LoRA of rank 2r with A' = [A; A0],
# B' = [B, −B0] and α scaled to keep s — the same ΔW on the untouched base; the peftkit config in the file's metadata
# splits it back on load.
def hf_config(config: Any, hosts: list[Any], keeps: bool) -> dict[str, Any]:
    """LoRA's Hugging Face ``LORA`` config fields; ``keeps`` (PiSSA / OLoRA / CorDA): the rank-2r form above."""
    plain = config if config.init in INIT_TO_PEFT else dataclasses.replace(config, init="kaiming")
    out = lowrank_config_to_hf(plain, hosts)  # EVA / LoftQ: plain factors (LoftQ: its base is the rewritten Q)
    if keeps:
        grow = math.sqrt(2) if config.rslora else 2  # α/r (rsLoRA α/√r) unchanged at rank 2r
        out.update(r=2 * out["r"], lora_alpha=plain_number(out["lora_alpha"] * grow),
                   rank_pattern={k: 2 * v for k, v in out["rank_pattern"].items()},
                   alpha_pattern={k: plain_number(v * grow) for k, v in out["alpha_pattern"].items()})
    return {**out, "use_dora": False}


def kept_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**{k: v for k, v in state.items() if k.startswith("lora_B_bias")},
            "lora_A": torch.cat([state["lora_A"], state["pissa_A0"]]),
            "lora_B": torch.cat([state["lora_B"], -state["pissa_B0"]], dim=1)}


def kept_from_hf(config: Any, tensors: dict[str, torch.Tensor], hosts: list[Any]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for host in hosts:
        key = f"adapter.{host.name}."
        r = config.for_module(host.name).r
        a, b = out.get(key + "lora_A"), out.get(key + "lora_B")
        if a is None or b is None or a.shape[0] != 2 * r or key + "pissa_A0" in out:
            continue
        out.update({key + "lora_A": a[:r], key + "pissa_A0": a[r:], key + "lora_B": b[:, :r],
                    key + "pissa_B0": -b[:, r:]})
    return out
