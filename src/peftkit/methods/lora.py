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
    lora_bias (PEFT's option): B gets a bias c, update s·(B·A·x + c), init c = 0; merge adds s·c to the host bias
    trainable_token_indices (PEFT's option): chosen embedding rows train too (see methods/_lora_tokens.py)
    use_bdlora (PEFT's option): A or B block-diagonal on chosen layers (BD-LoRA, see methods/_lora_blocks.py)
    kasa_config (PEFT's option): KaSA — base's r smallest singular directions dropped, ΔW = s·B·diag(d)·A (_lora_kasa)
    MiCA init: B = U[:, −r:] (left singular vectors of W0 with the r smallest singular values), A = 0; B is frozen
    nn.MultiheadAttention, target_parameters (PEFT's option: bare 2-D parameters, 3-D expert stacks): ΔW on the
      weight the module reads, the module run with W + ΔW (see methods/_lora_hosts.py)

Trainable: A, B — r·(d_in + d_out) per layer (MiCA: A only). PiSSA (and OLoRA likewise) keeps its initial factors
(A0, B0) as saved buffers and leaves the host weight untouched: it computes W_res·x + s·B·A·x as
W0·x + s·[B, −B0]·[A; A0]·x (one rank-2r pass; with dropout while training, the −B0·A0 part sees x undropped, as
W_res·x does in the paper and in PEFT), which is the same function, so ``disable()``, mixed batches and other
adapters on the layer still see the true W0, and loading into a fresh base reproduces the outputs exactly (Hugging
Face PEFT instead rewrites the base weight). CorDA keeps its factors the same way. LoftQ rewrites the host weight to
its dequantised NF4 Q (as PEFT does; ``disable()`` then gives Q's output; loading a LoftQ adapter reruns it on the
fresh base, so outputs reload exactly). EVA and CorDA initialise in :func:`calibrate` (``peftkit train`` calls it
with the first ``calibration_size`` training examples); until then EVA's A is kaiming and CorDA uses C = I.
With ``dropout = 0`` on a Linear / GPT-2 Conv1D host the forward and backward run in one fused autograd function.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.errors import PeftkitError, did_you_mean
from peftkit.core.hf import HFTensor, lowrank_config_from_hf, lowrank_layout
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, LowRankUpdate, new_factors, pad_factors_
from peftkit.core.peft_names import lora_names
from peftkit.core.registry import CONV3D_HOSTS, GROUPED_CONV_HOSTS, HOST_KINDS, QUANTIZED_HOSTS, register
from peftkit.methods import _lora_blocks as _blocks
from peftkit.methods import _lora_factors as _factors
from peftkit.methods import _lora_hosts as _hosts
from peftkit.methods import _lora_kasa as _kasa
from peftkit.methods import _lora_tokens as _tokens
from peftkit.methods import lora_inits as inits

_INITS = ("kaiming", "gaussian", "random", "pissa", r"pissa_niter_\d+", "olora", "loftq", r"loftq_iter_\d+", "eva",
          r"eva_rho_\d+(\.\d+)?", "corda", "corda_kpm", "mica")
_INIT_NAMES = ("kaiming", "gaussian", "random", "pissa", "pissa_niter_K", "olora", "loftq", "loftq_iter_T", "eva",
               "eva_rho_X", "corda", "corda_kpm", "mica")


@dataclass
class LoraConfig(LowRankConfig):
    """LoRA. ``init``: ``"kaiming"`` (default), ``"gaussian"``, ``"random"`` (B random too: ΔW ≠ 0 at init, for
    tests — PEFT's ``init_lora_weights=False``), ``"pissa"``, ``"pissa_niter_K"`` (randomised SVD with K subspace
    iterations), ``"olora"``, ``"loftq"`` / ``"loftq_iter_T"`` (NF4 base, T alternations, default 1), ``"eva"`` /
    ``"eva_rho_X"`` (activation SVD with rank redistribution up to ρ·r per layer, default ρ = 2; needs
    :func:`calibrate`), ``"corda"`` (IPM) or ``"corda_kpm"`` (needs :func:`calibrate`), ``"mica"`` (B frozen).
    Accepts Hugging Face PEFT ``LoraConfig``'s field names (``lora_alpha``, ``lora_dropout``, ``use_rslora``,
    ``init_lora_weights``, ``rank_pattern``, ...); ``use_dora=True`` builds DoRA's config. ``lora_bias``,
    ``trainable_token_indices``, ``use_bdlora``, ``kasa_config``, ``target_parameters``: PEFT's options (above)."""

    init: str = "kaiming"
    lora_bias: bool = False
    trainable_token_indices: dict[str, list[int]] | list[int] | None = None
    use_bdlora: dict[str, Any] | None = None
    kasa_config: dict[str, float] | None = None
    target_parameters: list[str] | None = None

    peft_type = "LORA"
    peft_names = lora_names(inits=_INITS, dora=False, own=tuple(_tokens.OPTIONS))

    @property
    def needs_calibration(self) -> bool:  # EVA / CorDA read data (calibrate); the other inits do not
        return self.init.startswith(("eva", "corda"))

    def resolve(self, model: torch.nn.Module) -> LoraConfig:
        return _tokens.resolve(self, model)

    def extra_targets(self) -> list[str]:
        spec = self.trainable_token_indices
        return list(spec) if isinstance(spec, dict) else []

    def parameter_targets(self) -> list[str]:
        return list(self.target_parameters or [])

    def validate(self) -> None:
        super().validate()
        _tokens.check(self.trainable_token_indices)
        _hosts.check_config(self.target_parameters)
        _blocks.check(self.use_bdlora)
        _kasa.check(self.kasa_config)
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
    "LoftQ (NF4 base), EVA or CorDA (calibrate() from data), MiCA (frozen minor singular B)",
    params="r·(d_in + d_out)",
    hosts=HOST_KINDS + CONV3D_HOSTS + GROUPED_CONV_HOSTS + QUANTIZED_HOSTS + _hosts.KINDS,
    hf_peft_type="LORA",
    calibrate=lambda model, batches, name=None: calibrate(model, batches, name),
)
class Lora(LowRankUpdate, Adapter):
    @classmethod
    def create(cls, host: Host, config: LoraConfig, context: Any = None) -> Adapter:
        ids = _tokens.token_ids(config, host.name)
        return cls(host, config) if ids is None else _tokens.token_adapter(host, config, ids)

    def __init__(self, host: Host, config: LoraConfig) -> None:
        super().__init__(host, config)
        _hosts.check(host, config)
        self.r, self.s, self.mha = config.r, config.scaling, host.kind == "mha"
        self.lora_A, self.lora_B = new_factors(host, config.r)
        self.dropout = make_dropout(config.dropout)
        # PiSSA, OLoRA and CorDA start from factors of W0 and keep them (buffers pissa_A0 / pissa_B0): see the docstring
        self.pissa = _keeps_init(config)
        if config.init.startswith(("loftq", "eva", "corda")):
            inits.check_host(host, config.init)
        self.bd, self.nb = _blocks.side(config, host)
        self.kasa = config.kasa_config is not None
        plain_init = config.init in ("kaiming", "gaussian", "random")
        if (self.bd or self.kasa) and (not plain_init or self.bd and self.kasa):
            raise PeftkitError(f"{host.name!r}: init={config.init!r}, use_bdlora and kasa_config do not combine")
        _factors.init_factors_(self, host, config)
        _hosts.setup_(self, host, config)
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

    def set_eva(self, a: torch.Tensor, config: LoraConfig) -> None:
        _factors.set_eva(self, a, config)

    def frozen_parameters(self) -> frozenset[str]:  # MiCA's B: saved, never trained
        return frozenset({"lora_B"}) if self.config.init == "mica" else frozenset()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the update; for PiSSA the rank-2r pair [A; A0], [B, −B0] (ΔW relative to the true W0)."""
        if self.mha:
            return _hosts.factors(self)
        if self.kasa:
            return _kasa.factors(self)
        if not self.pissa:
            return _blocks.factors(self) if self.bd else (self.lora_A, self.lora_B)
        return torch.cat([self.lora_A, self.pissa_A0]), torch.cat([self.lora_B, -self.pissa_B0], dim=1)

    def out_bias(self) -> torch.Tensor | None:
        return self.lora_B_bias

    def pad_rank(self, r: int, scaling: float | None = None) -> None:
        if self.bd or self.kasa or self.mha:
            raise PeftkitError(f"LoRA on {self.host.name!r}: cannot pad the rank of a block-diagonal / KaSA / "
                               "nn.MultiheadAttention update")
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
        n = (_blocks.params(host, config) or _hosts.params(host, config)
             or config.r * host.d_in + host.d_out * config.r // host.groups * (config.init != "mica"))
        return n + (host.d_out if config.lora_bias else 0) + (config.r if config.kasa_config is not None else 0)

    # Hugging Face PEFT: peft_type LORA without use_dora; PiSSA / OLoRA / CorDA as PEFT converts them (_lora_factors)
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> LoraConfig | None:
        return None if hf_config.get("use_dora") else lowrank_config_from_hf(LoraConfig, hf_config)

    @classmethod
    def to_hf_config(cls, config: LoraConfig, hosts: list[Host]) -> dict[str, Any]:
        return {**_factors.hf_config(config, hosts, _keeps_init(config)), **_tokens.hf_fields(config, hosts)}

    @classmethod
    def hf_layout(cls, host: Host, config: LoraConfig) -> dict[str, HFTensor]:
        if _tokens.token_ids(config, host.name) is not None:
            return _tokens.token_layout(host, _tokens.token_ids(config, host.name))
        if host.substituted:
            return _hosts.layout(host, config.r)
        out = _blocks.layout(lowrank_layout(host, 2 * config.r if _keeps_init(config) else config.r), host, config)
        out = _kasa.layout(out, config.r) if config.kasa_config is not None else out
        if config.lora_bias:
            out["lora_B_bias"] = HFTensor("lora_B.bias", (host.d_out,), (host.d_out,))
        return out

    @classmethod
    def to_hf_state(cls, config: LoraConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return _factors.kept_to_hf(state) if _keeps_init(config) else state

    @classmethod
    def from_hf_state(cls, config: LoraConfig, tensors: dict[str, torch.Tensor], hosts: list[Host]
                      ) -> dict[str, torch.Tensor]:
        return _factors.kept_from_hf(config, tensors, hosts) if _keeps_init(config) else tensors

def _keeps_init(config: LoraConfig) -> bool:
    """PiSSA / OLoRA / CorDA: the initial factors are kept next to the trained ones."""
    return config.init.startswith(("pissa", "corda")) or config.init == "olora"


def calibrate(model: Any, batches: Any, name: str | None = None) -> dict[str, tuple[float, float]]:
    """EVA / CorDA init of LoRA adapter ``name`` from ``batches`` (tensors, tuples or dicts as ``model`` takes them;
    run with adapters disabled): see :func:`peftkit.methods.lora_inits.calibrate_lora`. ``{}`` for other inits."""
    return inits.calibrate_lora(model, Lora, batches, name)
