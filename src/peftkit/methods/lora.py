"""LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685),
with rsLoRA scaling (Kalajdzievski 2023), PiSSA init (Meng et al. 2024), OLoRA init (Büyükakyüz 2024) and the inits
LoftQ (Li et al. 2023), EVA (Paischer et al. 2024) and CorDA (Yang et al. 2024), whose maths is in
:mod:`peftkit.methods.lora_inits`.

    forward:  y = x·W0ᵀ + b0 + s · dropout(x)·Aᵀ·Bᵀ,   A ∈ R^{r×d_in}, B ∈ R^{d_out×r},  s = α/r (rsLoRA: α/√r)
    init:     A ~ kaiming_uniform(a=√5) = U(±1/√d_in) (or N(0, 1/r²) "gaussian"), B = 0  ⇒ ΔW = 0
              PiSSA: U,S,Vᵀ = svd(W0); A = diag(√(S_r/s))·Vᵀ_r, B = U_r·diag(√(S_r/s)); base = W_res = W0 − s·B0·A0
              OLoRA: Q,R = qr(W0); A = R[:r], B = Q[:, :r]; base = W_res = W0 − s·B0·A0.  "random": B ~ U(±1/√r) too
              LoftQ: base ← Q = NF4(·), s·B·A = SVD_r fit of W0 − Q, alternated T times (the base weight changes)
              EVA (calibrate): A = top right-singular vectors of the layer's centred inputs, B = 0, ranks redistributed
              CorDA (calibrate): SVD of W0·C (C = input covariance); IPM top / KPM bottom r; kept as PiSSA's (A0, B0)
    merge:    W ← W0 + s·B·A  (ΔW = s·B·A, rank ≤ r);  PiSSA: W ← W_res + s·B·A = W0 + s·(B·A − B0·A0)

Trainable: A, B — r·(d_in + d_out) per layer. PiSSA (and OLoRA likewise) keeps its initial factors (A0, B0) as
saved buffers and leaves the host weight untouched: it computes W_res·x + s·B·A·x as W0·x + s·[B, −B0]·[A; A0]·x
(one rank-2r pass; with dropout while training, the −B0·A0 part sees x undropped, as W_res·x does in the paper and
in PEFT), which is the same function, so ``disable()``, mixed batches and other adapters on the layer still
see the true W0, and loading into a fresh base reproduces the outputs exactly (Hugging Face PEFT instead rewrites the
base weight). CorDA keeps its factors the same way. LoftQ rewrites the host weight to its dequantised NF4 Q (as PEFT
does; ``disable()`` then gives Q's output; loading a LoftQ adapter reruns it on the fresh base, so outputs reload
exactly). EVA and CorDA initialise in :func:`calibrate` (``peftkit train`` calls it with the first
``calibration_size`` training examples); until then EVA's A is kaiming and CorDA uses C = I.
With ``dropout = 0`` on a Linear / GPT-2 Conv1D host the forward and backward run in one fused autograd function.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.errors import PeftkitError, did_you_mean
from peftkit.core.hf import HFTensor, lowrank_config_from_hf, lowrank_config_to_hf, lowrank_layout
from peftkit.core.host import Host
from peftkit.core.lowrank import (
    LowRankConfig,
    LowRankUpdate,
    check_rank,
    init_down_,
    new_factors,
    pad_factors_,
)
from peftkit.core.peft_names import INIT_TO_PEFT, lora_names, plain_number
from peftkit.core.registry import CONV3D_HOSTS, HOST_KINDS, QUANTIZED_HOSTS, register
from peftkit.methods import lora_inits as inits

_INITS = ("kaiming", "gaussian", "random", "pissa", r"pissa_niter_\d+", "olora", "loftq", r"loftq_iter_\d+", "eva",
          r"eva_rho_\d+(\.\d+)?", "corda", "corda_kpm")
_INIT_NAMES = ("kaiming", "gaussian", "random", "pissa", "pissa_niter_K", "olora", "loftq", "loftq_iter_T", "eva",
               "eva_rho_X", "corda", "corda_kpm")


@dataclass
class LoraConfig(LowRankConfig):
    """LoRA. ``init``: ``"kaiming"`` (default), ``"gaussian"``, ``"random"`` (B random too: ΔW ≠ 0 at init, for
    tests — PEFT's ``init_lora_weights=False``), ``"pissa"``, ``"pissa_niter_K"`` (randomised SVD with K subspace
    iterations), ``"olora"``, ``"loftq"`` / ``"loftq_iter_T"`` (NF4 base, T alternations, default 1), ``"eva"`` /
    ``"eva_rho_X"`` (activation SVD with rank redistribution up to ρ·r per layer, default ρ = 2; needs
    :func:`calibrate`), ``"corda"`` (IPM) or ``"corda_kpm"`` (needs :func:`calibrate`). Accepts Hugging Face PEFT
    ``LoraConfig``'s field names (``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``,
    ``rank_pattern``, ...); ``use_dora=True`` builds DoRA's config."""

    init: str = "kaiming"

    peft_type = "LORA"
    peft_names = lora_names(inits=_INITS, dora=False)

    def validate(self) -> None:
        super().validate()
        if not re.fullmatch("|".join(_INITS), self.init):
            raise PeftkitError(f"LoraConfig.init must be one of {', '.join(_INIT_NAMES)}, got {self.init!r}"
                               f"{did_you_mean(self.init, _INIT_NAMES)}")


@register(
    "lora",
    config=LoraConfig,
    family="reparameterized",
    paper="Hu et al. 2021, LoRA (arXiv 2106.09685); rsLoRA (arXiv 2312.03732); PiSSA (arXiv 2404.02948); LoftQ (arXiv "
    "2310.08659); EVA (arXiv 2410.07170); CorDA (arXiv 2406.05223)",
    description="additive low-rank update s·BA; α/r or rsLoRA α/√r scaling; init kaiming, gaussian, PiSSA, OLoRA, "
    "LoftQ (NF4 base), EVA or CorDA (calibrate() from data)",
    params="r·(d_in + d_out)",
    hosts=HOST_KINDS + CONV3D_HOSTS + QUANTIZED_HOSTS,
    hf_peft_type="LORA",
    calibrate=lambda model, batches, name=None: calibrate(model, batches, name),
)
class Lora(LowRankUpdate, Adapter):
    def __init__(self, host: Host, config: LoraConfig) -> None:
        super().__init__(host, config)
        self.r, self.s = config.r, config.scaling
        self.lora_A, self.lora_B = new_factors(host, config.r)
        self.dropout = make_dropout(config.dropout)
        # PiSSA, OLoRA and CorDA start from factors of W0 and keep them (buffers pissa_A0 / pissa_B0): see the docstring
        self.pissa = _keeps_init(config)
        if config.init.startswith(("loftq", "eva", "corda")):
            inits.check_host(host, config.init)
        if self.pissa:
            check_rank(host, config.r)
            if config.init == "olora":
                self._olora_init()
            elif config.init.startswith("corda"):  # C = I until calibrate()
                mode, eye = inits.corda_mode(config.init), torch.eye(host.d_in, device=host.weight.device)
                self.keep_init(*inits.corda_factors(host.weight_2d(), eye, self.r, mode, self.s))
            else:
                self._pissa_init(int(config.init.rsplit("_", 1)[1]) if "niter" in config.init else None)
        elif config.init.startswith("loftq"):
            check_rank(host, config.r)
            self._loftq_init(int(config.init.rsplit("_", 1)[1]) if "iter" in config.init else 1)
        else:
            init_down_(self.lora_A, config.init, config.r)
            if config.init == "random":  # nn.Linear's default init of B (fan_in r), as PEFT leaves it
                torch.nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    @torch.no_grad()
    def _pissa_init(self, niter: int | None) -> None:
        w = self.host.weight_2d().detach().float()
        r = self.r
        if niter is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        else:
            u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
            vh = v.t()
        sr = (s[:r] / self.s).sqrt()
        self.keep_init(sr[:, None] * vh[:r], u[:, :r] * sr[None, :])

    @torch.no_grad()
    def _olora_init(self) -> None:
        q, r_ = torch.linalg.qr(self.host.weight_2d().detach().float())
        self.keep_init(r_[:self.r], q[:, :self.r])

    @torch.no_grad()
    def _loftq_init(self, iters: int) -> None:
        q, a, b = inits.loftq(self.host.weight_2d(), self.r, iters)
        self._loftq_base: torch.Tensor | None = q  # written into the host on install (a failed load changes nothing)
        root = math.sqrt(self.s)  # s·B·A = L·R (PEFT copies L, R as they are: the same when α = r)
        self.lora_A.copy_(a / root)
        self.lora_B.copy_(b / root)

    def on_install(self) -> None:
        if getattr(self, "_loftq_base", None) is not None:
            self.host.write_weight_2d(self._loftq_base)
            self._loftq_base = None

    @torch.no_grad()
    def keep_init(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Start from (A, B) = (A0, B0) and keep them: ΔW = s·(B·A − B0·A0) = 0 at init."""
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.register_buffer("pissa_A0", self.lora_A.detach().clone())
        self.register_buffer("pissa_B0", self.lora_B.detach().clone())

    @torch.no_grad()
    def set_eva(self, a: torch.Tensor, config: LoraConfig) -> None:
        """EVA: rank k = len(a), A = a, B = 0, α ← α·k/r; the model's ``config`` records the new rank and α."""
        k, r, alpha = a.shape[0], self.r, self.config.alpha
        self.lora_A.data = a.to(self.lora_A)
        self.lora_B.data = self.lora_B.new_zeros(self.lora_B.shape[0], k)
        if k != r:
            self.config = dataclasses.replace(self.config, r=k, alpha=alpha * k / r)
            config.overrides[re.escape(self.host.name)] = {"r": k, "alpha": alpha * k / r}
        self.r, self.s = k, self.config.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the update; for PiSSA the rank-2r pair [A; A0], [B, −B0] (ΔW relative to the true W0)."""
        if not self.pissa:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, self.pissa_A0]), torch.cat([self.lora_B, -self.pissa_B0], dim=1)

    def pad_rank(self, r: int, scaling: float | None = None) -> None:
        if self.pissa:  # the kept A0/B0 are part of the update: their rank is the trained one
            super().pad_rank(r, scaling)
        pad_factors_(self, self.lora_A, self.lora_B, r, scaling)

    def undropped_rank(self) -> int:
        """PiSSA / OLoRA: the −B0·A0 term stands for the residual base weight, which sees x undropped (the paper's
        W_res·x + s·B·A·dropout(x), Hugging Face PEFT's output too)."""
        return self.r if self.pissa else 0

    @classmethod
    def expected_params(cls, host: Host, config: LoraConfig) -> int:
        return config.r * (host.d_in + host.d_out)

    # Hugging Face PEFT: peft_type LORA without use_dora. PiSSA / OLoRA are written as PEFT converts them
    # (save_pretrained(..., path_initial_model_for_weight_conversion=...)): a plain LoRA of rank 2r with
    # A' = [A; A0], B' = [B, −B0] and α scaled to keep s — the same ΔW on the untouched base; the peftkit config in
    # the file's metadata splits it back on load.
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> LoraConfig | None:
        return None if hf_config.get("use_dora") else lowrank_config_from_hf(LoraConfig, hf_config)

    @classmethod
    def to_hf_config(cls, config: LoraConfig, hosts: list[Host]) -> dict[str, Any]:
        plain = config if config.init in INIT_TO_PEFT else dataclasses.replace(config, init="kaiming")
        if not _keeps_init(config):  # EVA / LoftQ: plain factors (LoftQ: its base is the rewritten Q)
            return {**lowrank_config_to_hf(plain, hosts), "use_dora": False}
        out = lowrank_config_to_hf(plain, hosts)
        grow = math.sqrt(2) if config.rslora else 2  # α/r (rsLoRA α/√r) unchanged at rank 2r
        out.update(r=2 * out["r"], lora_alpha=plain_number(out["lora_alpha"] * grow),
                   rank_pattern={k: 2 * v for k, v in out["rank_pattern"].items()},
                   alpha_pattern={k: plain_number(v * grow) for k, v in out["alpha_pattern"].items()})
        return {**out, "use_dora": False}

    @classmethod
    def hf_layout(cls, host: Host, config: LoraConfig) -> dict[str, HFTensor]:
        return lowrank_layout(host, 2 * config.r if _keeps_init(config) else config.r)

    @classmethod
    def to_hf_state(cls, config: LoraConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not _keeps_init(config):
            return state
        return {"lora_A": torch.cat([state["lora_A"], state["pissa_A0"]]),
                "lora_B": torch.cat([state["lora_B"], -state["pissa_B0"]], dim=1)}

    @classmethod
    def from_hf_state(cls, config: LoraConfig, tensors: dict[str, torch.Tensor], hosts: list[Host]
                      ) -> dict[str, torch.Tensor]:
        if not _keeps_init(config):
            return tensors
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


def _keeps_init(config: LoraConfig) -> bool:
    """PiSSA / OLoRA / CorDA: the initial factors are kept next to the trained ones."""
    return config.init.startswith(("pissa", "corda")) or config.init == "olora"


def calibrate(model: Any, batches: Any, name: str | None = None) -> dict[str, tuple[float, float]]:
    """EVA / CorDA init of LoRA adapter ``name`` from ``batches`` (tensors, tuples or dicts as ``model`` takes them;
    run with adapters disabled): see :func:`peftkit.methods.lora_inits.calibrate_lora`. ``{}`` for other inits."""
    return inits.calibrate_lora(model, Lora, batches, name)
