"""LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685),
with rsLoRA scaling (Kalajdzievski 2023), PiSSA init (Meng et al. 2024) and OLoRA init (Büyükakyüz 2024).

    forward:  y = x·W0ᵀ + b0 + s · dropout(x)·Aᵀ·Bᵀ,   A ∈ R^{r×d_in}, B ∈ R^{d_out×r},  s = α/r (rsLoRA: α/√r)
    init:     A ~ kaiming_uniform(a=√5) = U(±1/√d_in) (or N(0, 1/r²) "gaussian"), B = 0  ⇒ ΔW = 0
              PiSSA: U,S,Vᵀ = svd(W0); A = diag(√(S_r/s))·Vᵀ_r, B = U_r·diag(√(S_r/s)); base = W_res = W0 − s·B0·A0
              OLoRA: Q,R = qr(W0); A = R[:r], B = Q[:, :r]; base = W_res = W0 − s·B0·A0.  "random": B ~ U(±1/√r) too
    merge:    W ← W0 + s·B·A  (ΔW = s·B·A, rank ≤ r);  PiSSA: W ← W_res + s·B·A = W0 + s·(B·A − B0·A0)
    lora_bias (PEFT's option): B gets a bias c, update s·(B·A·x + c), init c = 0; merge adds s·c to the host bias
    trainable_token_indices (PEFT's option): chosen embedding rows train too (see methods/_lora_tokens.py)
    use_bdlora (PEFT's option): A or B block-diagonal on chosen layers (BD-LoRA, see methods/_lora_blocks.py)
    kasa_config (PEFT's option): KaSA — base's r smallest singular directions dropped, ΔW = s·B·diag(d)·A (_lora_kasa)

Trainable: A, B — r·(d_in + d_out) per layer. PiSSA (and OLoRA likewise) keeps its initial factors (A0, B0) as
saved buffers and leaves the host weight untouched: it computes W_res·x + s·B·A·x as W0·x + s·[B, −B0]·[A; A0]·x
(one rank-2r pass; with dropout while training, the −B0·A0 part sees x undropped, as W_res·x does in the paper and
in PEFT), which is the same function, so ``disable()``, mixed batches and other adapters on the layer still
see the true W0, and loading into a fresh base reproduces the outputs exactly (Hugging Face PEFT instead rewrites the
base weight).
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
from peftkit.core.errors import PeftkitError
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
from peftkit.core.peft_names import lora_names, plain_number
from peftkit.core.registry import CONV3D_HOSTS, GROUPED_CONV_HOSTS, HOST_KINDS, QUANTIZED_HOSTS, register
from peftkit.methods import _lora_blocks as _blocks
from peftkit.methods import _lora_kasa as _kasa
from peftkit.methods import _lora_tokens as _tokens

_INITS = ("kaiming", "gaussian", "random", "pissa", r"pissa_niter_\d+", "olora")


@dataclass
class LoraConfig(LowRankConfig):
    """LoRA. ``init``: ``"kaiming"`` (default), ``"gaussian"``, ``"random"`` (B random too: ΔW ≠ 0 at init, for
    tests — PEFT's ``init_lora_weights=False``), ``"pissa"``, ``"pissa_niter_K"`` (randomised SVD with K subspace
    iterations) or ``"olora"``. Accepts Hugging Face PEFT ``LoraConfig``'s field names (``lora_alpha``,
    ``lora_dropout``, ``use_rslora``, ``init_lora_weights``, ``rank_pattern``, ...); ``use_dora=True`` builds DoRA's
    config. ``lora_bias``, ``trainable_token_indices``, ``use_bdlora``, ``kasa_config``: PEFT's options (above)."""

    init: str = "kaiming"
    lora_bias: bool = False
    trainable_token_indices: dict[str, list[int]] | list[int] | None = None
    use_bdlora: dict[str, Any] | None = None
    kasa_config: dict[str, float] | None = None

    peft_type = "LORA"
    peft_names = lora_names(inits=_INITS, dora=False, own=tuple(_tokens.OPTIONS))

    def resolve(self, model: torch.nn.Module) -> LoraConfig:
        return _tokens.resolve(self, model)

    def extra_targets(self) -> list[str]:
        spec = self.trainable_token_indices
        return list(spec) if isinstance(spec, dict) else []

    def validate(self) -> None:
        super().validate()
        _tokens.check(self.trainable_token_indices)
        _blocks.check(self.use_bdlora)
        _kasa.check(self.kasa_config)
        if not re.fullmatch("|".join(_INITS), self.init):
            raise PeftkitError(
                f"LoraConfig.init must be kaiming, gaussian, random, pissa, pissa_niter_K or olora, got {self.init!r}"
            )


@register(
    "lora",
    config=LoraConfig,
    family="reparameterized",
    paper="Hu et al. 2021, LoRA (arXiv 2106.09685); rsLoRA (arXiv 2312.03732); PiSSA (arXiv 2404.02948)",
    description="additive low-rank update s·BA; α/r or rsLoRA α/√r scaling; kaiming, gaussian or PiSSA init",
    params="r·(d_in + d_out)",
    hosts=HOST_KINDS + CONV3D_HOSTS + GROUPED_CONV_HOSTS + QUANTIZED_HOSTS,
    hf_peft_type="LORA",
)
class Lora(LowRankUpdate, Adapter):
    @classmethod
    def create(cls, host: Host, config: LoraConfig, context: Any = None) -> Adapter:
        ids = _tokens.token_ids(config, host.name)
        return cls(host, config) if ids is None else _tokens.token_adapter(host, config, ids)

    def __init__(self, host: Host, config: LoraConfig) -> None:
        super().__init__(host, config)
        self.r, self.s = config.r, config.scaling
        self.lora_A, self.lora_B = new_factors(host, config.r)
        self.dropout = make_dropout(config.dropout)
        # PiSSA and OLoRA start from factors of W0 and keep them (buffers pissa_A0 / pissa_B0): see the docstring
        self.pissa = config.init.startswith("pissa") or config.init == "olora"
        self.bd, self.nb = _blocks.side(config, host)
        self.kasa = config.kasa_config is not None
        if (self.bd or self.kasa) and (self.pissa or self.bd and self.kasa):
            raise PeftkitError(f"{host.name!r}: init={config.init!r}, use_bdlora and kasa_config do not combine")
        if self.pissa:
            if host.groups > 1:  # B is grouped there: no SVD / QR factor of the weight fits it
                raise PeftkitError(f"init={config.init!r} on {host.name!r}: not supported on grouped convolutions")
            check_rank(host, config.r)
            if config.init == "olora":
                self._olora_init()
            else:
                self._pissa_init(int(config.init.rsplit("_", 1)[1]) if "niter" in config.init else None)
        else:
            init_down_(self.lora_A, config.init, config.r)
            if config.init == "random":  # nn.Linear's default init of B (fan_in r), as PEFT leaves it
                torch.nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        if self.bd:
            _blocks.compact_(self, self.bd, self.nb)
        if self.kasa:
            _kasa.init_(self, host, config.r)
        self.lora_B_bias = None
        if config.lora_bias:
            if host.kind == "embedding":  # an embedding's lookup has no bias to fold it into (PEFT refuses it too)
                raise PeftkitError(f"lora_bias=True on {host.name!r}: not supported on Embedding layers")
            self.lora_B_bias = torch.nn.Parameter(self.lora_B.new_zeros(host.d_out))
            if config.init == "random":
                torch.nn.init.uniform_(self.lora_B_bias, -1 / math.sqrt(config.r), 1 / math.sqrt(config.r))

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
        self._keep_init(sr[:, None] * vh[:r], u[:, :r] * sr[None, :])

    @torch.no_grad()
    def _olora_init(self) -> None:
        q, r_ = torch.linalg.qr(self.host.weight_2d().detach().float())
        self._keep_init(r_[:self.r], q[:, :self.r])

    @torch.no_grad()
    def _keep_init(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.register_buffer("pissa_A0", a.to(self.lora_A.dtype).clone())
        self.register_buffer("pissa_B0", b.to(self.lora_B.dtype).clone())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the update; for PiSSA the rank-2r pair [A; A0], [B, −B0] (ΔW relative to the true W0)."""
        if self.kasa:
            return _kasa.factors(self)
        if not self.pissa:
            return _blocks.factors(self) if self.bd else (self.lora_A, self.lora_B)
        return torch.cat([self.lora_A, self.pissa_A0]), torch.cat([self.lora_B, -self.pissa_B0], dim=1)

    def out_bias(self) -> torch.Tensor | None:
        return self.lora_B_bias

    def pad_rank(self, r: int, scaling: float | None = None) -> None:
        if self.bd or self.kasa:
            raise PeftkitError(f"LoRA on {self.host.name!r}: cannot pad the rank of a block-diagonal / KaSA update")
        if self.pissa:  # the kept A0/B0 are part of the update: their rank is the trained one
            super().pad_rank(r, scaling)
        pad_factors_(self, self.lora_A, self.lora_B, r, scaling)

    def undropped_rank(self) -> int:
        """PiSSA / OLoRA: the −B0·A0 term stands for the residual base weight, which sees x undropped (the paper's
        W_res·x + s·B·A·dropout(x), Hugging Face PEFT's output too)."""
        return self.r if self.pissa or self.kasa else 0

    @classmethod
    def expected_params(cls, host: Host, config: LoraConfig) -> int:
        if _tokens.token_ids(config, host.name) is not None:
            return len(_tokens.token_ids(config, host.name)) * host.d_out
        n = _blocks.params(host, config) or config.r * host.d_in + host.d_out * config.r // host.groups
        return n + (host.d_out if config.lora_bias else 0) + (config.r if config.kasa_config is not None else 0)

    # Hugging Face PEFT: peft_type LORA without use_dora. PiSSA / OLoRA are written as PEFT converts them
    # (save_pretrained(..., path_initial_model_for_weight_conversion=...)): a plain LoRA of rank 2r with
    # A' = [A; A0], B' = [B, −B0] and α scaled to keep s — the same ΔW on the untouched base; the peftkit config in
    # the file's metadata splits it back on load.
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> LoraConfig | None:
        return None if hf_config.get("use_dora") else lowrank_config_from_hf(LoraConfig, hf_config)

    @classmethod
    def to_hf_config(cls, config: LoraConfig, hosts: list[Host]) -> dict[str, Any]:
        if not _keeps_init(config):
            return {**lowrank_config_to_hf(config, hosts), "use_dora": False, **_tokens.hf_fields(config, hosts)}
        out = lowrank_config_to_hf(dataclasses.replace(config, init="kaiming"), hosts)
        grow = math.sqrt(2) if config.rslora else 2  # α/r (rsLoRA α/√r) unchanged at rank 2r
        out.update(r=2 * out["r"], lora_alpha=plain_number(out["lora_alpha"] * grow),
                   rank_pattern={k: 2 * v for k, v in out["rank_pattern"].items()},
                   alpha_pattern={k: plain_number(v * grow) for k, v in out["alpha_pattern"].items()})
        return {**out, "use_dora": False, **_tokens.hf_fields(config, hosts)}

    @classmethod
    def hf_layout(cls, host: Host, config: LoraConfig) -> dict[str, HFTensor]:
        if _tokens.token_ids(config, host.name) is not None:
            return _tokens.token_layout(host, _tokens.token_ids(config, host.name))
        out = _blocks.layout(lowrank_layout(host, 2 * config.r if _keeps_init(config) else config.r), host, config)
        out = _kasa.layout(out, config.r) if config.kasa_config is not None else out
        if config.lora_bias:
            out["lora_B_bias"] = HFTensor("lora_B.bias", (host.d_out,), (host.d_out,))
        return out

    @classmethod
    def to_hf_state(cls, config: LoraConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not _keeps_init(config):
            return state
        return {**{k: v for k, v in state.items() if k.startswith("lora_B_bias")},
                "lora_A": torch.cat([state["lora_A"], state["pissa_A0"]]),
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
    """PiSSA / OLoRA: the initial factors are kept next to the trained ones."""
    return config.init.startswith("pissa") or config.init == "olora"
