"""BOFT — Liu et al., ICLR 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization"
(arXiv 2311.06243), in Hugging Face PEFT's form (``peft/tuners/boft``, its pure-torch definition), whose ``BOFT`` files
it reads and writes.

    forward:  y = (base(x·R) − bias)·s + bias,   R = M_{m−1}···M_1·M_0 (d_in×d_in, orthogonal), s ∈ R^{d_out}
    M_i:      P_i·diag(Q_{i,1}, …, Q_{i,n})·P_iᵀ — n blocks of size b (n·b = d_in), P_i the block-butterfly
              permutation of factor i (P_0 = I; P_i interleaves the b/2-halves of neighbouring groups of 2^i blocks)
    Q_{i,j}:  Cayley transform of a trained full b×b matrix U:  S = ½(U − Uᵀ),  Q = (I − S)(I + S)⁻¹
    init:     U = 0 ⇒ R = I, s = 1 ⇒ the base model (PEFT's init_weights=True; init="random": U ~ N(0, 0.1²),
              s ~ N(1, 0.1²), PEFT's init_weights=False)
    merge:    W ← (W0·Rᵀ)⊙s (rows scaled; the bias unchanged); unmerge W0 = (W/s)·R  (R orthogonal)

m = ``n_butterfly_factor`` (PEFT's ``boft_n_butterfly_factor``); block size b = ``block_size`` or n = ``block_num``
(exactly one non-zero), m = 1 is OFT with full-matrix Cayley blocks and a trained output scale. Trainable:
m·n·b² + d_out per layer (PEFT trains the full b×b matrices, of which only the skew part counts — kept for its
file format). ``dropout`` is PEFT's multiplicative dropout (``boft_dropout``): in training, in one randomly chosen
factor ⌊p·n⌋ randomly chosen blocks are replaced by the identity (PEFT's draws, in its order: torch.randint, then
torch.randperm); no input dropout.

Following PEFT's code where it differs from the paper: the output scale s (the paper's magnitude vector, there
optional) is always trained; the butterfly permutations are PEFT's ``block_butterfly_perm``. PEFT 0.21 uses
m > 1 only with its CUDA extension: without it PEFT silently runs m = 1 (its ``boft_R`` then has one factor) —
peftkit always computes the m factors it is given, so a PEFT file saved with m > 1 loads here only if PEFT saved m
factors (with its extension), and a peftkit export with m > 1 loads in PEFT only where the extension builds.
Hosts: Linear (PEFT's Conv2d BOFT is not reproduced). As the only active adapter the layer runs base(x·R) once; next to
other adapters it adds (x·R·W0ᵀ)⊙s − x·W0ᵀ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.adapter import Adapter
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor, config_from_hf
from peftkit.core.host import Host
from peftkit.core.peft_names import INIT_IDENTITY, TARGETING, alias, bias_alias
from peftkit.core.registry import register

_HOSTS = ("linear",)


@dataclass
class BOFTConfig(AdapterConfig):
    """BOFT. ``block_size`` / ``block_num``: size / number of the orthogonal blocks (exactly one non-zero);
    ``n_butterfly_factor``: number of butterfly factors m (1: block-diagonal, OFT-like); ``dropout``: PEFT's
    multiplicative block dropout; ``init``: ``"identity"`` or ``"random"``. Accepts Hugging Face PEFT ``BOFTConfig``'s
    field names (``boft_block_size``, ``boft_block_num``, ``boft_n_butterfly_factor``, ``boft_dropout``,
    ``init_weights``, ``bias="boft_only"``)."""

    block_size: int = 4
    block_num: int = 0
    n_butterfly_factor: int = 1
    init: str = "identity"

    peft_type = "BOFT"
    peft_names = {
        **TARGETING,
        "bias": bias_alias("boft_only"),
        "boft_block_size": alias("block_size"),
        "boft_block_num": alias("block_num"),
        "boft_n_butterfly_factor": alias("n_butterfly_factor"),
        "boft_dropout": alias("dropout", lambda v: 0.0 if v is None else v),
        "init_weights": INIT_IDENTITY,
    }

    def validate(self) -> None:
        super().validate()
        if (self.block_size != 0) == (self.block_num != 0) or self.block_size < 0 or self.block_num < 0:
            raise PeftkitError(f"BOFTConfig: give exactly one of block_size and block_num, the other 0 "
                               f"(block_size · block_num = d_in); got block_size={self.block_size}, "
                               f"block_num={self.block_num}")
        self.positive("BOFTConfig.n_butterfly_factor", self.n_butterfly_factor)
        if self.init not in ("identity", "random"):
            raise PeftkitError(f"BOFTConfig.init must be 'identity' or 'random', got {self.init!r}")


def blocks(host: Host, config: BOFTConfig) -> tuple[int, int, int]:
    """(factors m, blocks n, block size b) on ``host`` — PEFT's ``update_layer`` rules, its messages."""
    d, m, extra = host.d_in, config.n_butterfly_factor, config.n_butterfly_factor - 1
    where = f"module {host.name!r} (d_in={d})"
    if config.block_num:
        n = config.block_num
        if d % n:
            raise PeftkitError(f"{where}: d_in must be divisible by BOFT's block_num {n}")
        if extra and (extra > int(math.log2(n)) or n % (2 ** extra)):
            raise PeftkitError(f"{where}: block_num {n} must be a multiple of 2^(n_butterfly_factor − 1) = "
                               f"{2 ** extra}")
        b = d // n
    else:
        b = config.block_size
        if d % b:
            raise PeftkitError(f"{where}: d_in must be divisible by BOFT's block_size {b}")
        if extra and d % (b * 2 ** extra):
            raise PeftkitError(f"{where}: d_in must be a multiple of block_size · 2^(n_butterfly_factor − 1) = "
                               f"{b * 2 ** extra}")
        n = d // b
    if extra and (n % 2 or b % 2):
        raise PeftkitError(f"{where}: with n_butterfly_factor > 1 the block size ({b}) and number ({n}) must be even")
    return m, n, b


def butterfly_perm(d: int, groups: int, half: int, butterfly: bool) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm``: within each of ``groups`` chunks of d, the ``half``-long pieces in even
    positions first, then the odd ones (identity without a butterfly)."""
    if not butterfly:
        return torch.arange(d)
    chunk = d // groups
    pieces = torch.arange(chunk).view(-1, half)
    order = torch.cat([pieces[0::2], pieces[1::2]]).reshape(-1)
    return (torch.arange(d).view(groups, chunk)[:, order]).reshape(-1)


def cayley_full(u: torch.Tensor) -> torch.Tensor:
    """(…, b, b) → (I − S)(I + S)⁻¹, S = ½(U − Uᵀ) (PEFT's ``cayley_batch``)."""
    w = u if u.dtype in (torch.float32, torch.float64) else u.float()  # solved in float32 at least, as PEFT
    skew = 0.5 * (w - w.transpose(-2, -1))
    eye = torch.eye(u.shape[-1], device=u.device, dtype=w.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).to(u.dtype)


@register(
    "boft",
    config=BOFTConfig,
    family="reparameterized",
    paper="Liu et al., ICLR 2024, Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization "
          "(arXiv 2311.06243)",
    description="multiplicative: the input rotated by a product of butterfly-permuted block-diagonal Cayley rotations, "
                "the output rescaled; merged (W0·Rᵀ)⊙s",
    params="m·n·b² + d_out (n·b = d_in, m butterfly factors)",
    hosts=_HOSTS,
    hf_peft_type="BOFT",
)
class BOFT(Adapter):
    additive = False  # rotates the host weight (W·R): its update depends on W (see Adapter.additive)
    def __init__(self, host: Host, config: BOFTConfig) -> None:
        super().__init__(host, config)
        self.m, self.n, self.b = blocks(host, config)
        dev = host.weight.device
        self.boft_R = nn.Parameter(torch.zeros(self.m, self.n, self.b, self.b, device=dev))
        self.boft_s = nn.Parameter(torch.ones(host.d_out, 1, device=dev))
        if config.init == "random":
            with torch.no_grad():
                nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
                nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        perms = [butterfly_perm(host.d_in, self.n // 2 ** i, self.b // 2, self.m > 1) for i in range(self.m)]
        self.register_buffer("perm", torch.stack(perms).to(dev), persistent=False)
        self.register_buffer("inv_perm", torch.stack([p.argsort() for p in perms]).to(dev), persistent=False)
        self.p = config.dropout

    def rotations(self) -> torch.Tensor:
        """The (m, n, b, b) Cayley blocks, with PEFT's multiplicative dropout in training."""
        q = cayley_full(self.boft_R)
        if self.training and self.p > 0:
            pick = torch.randint(0, self.m, (1,)).item()
            k = int(self.p * self.n)
            mask = torch.cat([torch.ones(k, device=q.device), torch.zeros(self.n - k, device=q.device)])
            mask = mask[torch.randperm(self.n)].view(self.n, 1, 1).to(q.dtype)
            eye = torch.eye(self.b, device=q.device, dtype=q.dtype)
            q = torch.cat([q[:pick], ((1 - mask) * q[pick] + mask * eye)[None], q[pick + 1:]])
        return q

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x·R = x·M_{m−1}···M_0 in the adapter's dtype, M_i = P_i·D_i·P_iᵀ applied as two gathers and a block
        product (no d_in×d_in matrix)."""
        q = self.rotations()
        h = x.to(q.dtype)
        shape = h.shape
        for i in range(self.m - 1, -1, -1):
            h = h[..., self.inv_perm[i]]  # x·P_i
            h = torch.einsum("...nk,nkc->...nc", h.reshape(*shape[:-1], self.n, self.b), q[i]).reshape(shape)
            h = h[..., self.perm[i]]  # ·P_iᵀ
        return h

    def _scaled(self, x_rot: torch.Tensor) -> torch.Tensor:
        w = self.host.weight_2d()
        out = self.host.apply_weight(x_rot.to(w.dtype), w)  # the host's output dtype (autocast included)
        return out * self.boft_s.squeeze(-1).to(out.dtype)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._scaled(self.rotate(x))
        bias = self.host.bias
        return out if bias is None else out + bias.to(out.dtype)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        w = self.host.weight_2d()
        out = self._scaled(self.rotate(x))
        return out - self.host.apply_weight(x.to(w.dtype), w).to(out.dtype)

    def rotation_matrix(self) -> torch.Tensor:
        """R as one (d_in, d_in) matrix (the identity rotated: I·R)."""
        return self.rotate(torch.eye(self.host.d_in, device=self.boft_R.device, dtype=self.boft_R.dtype))

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        r = self.rotation_matrix()
        return ((weight.to(r.dtype) @ r.t()) * self.boft_s).to(weight.dtype), bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        r = self.rotation_matrix().to(torch.float64)  # orthogonal up to rounding: solve rather than transpose
        w = weight.to(torch.float64) / self.boft_s.to(torch.float64)
        return torch.linalg.solve(r, w.t()).t().to(weight.dtype), bias

    def delta_weight(self) -> torch.Tensor:
        w = self.host.weight_2d().detach()
        return self.merge(w, None)[0] - w

    @classmethod
    def rank_limits(cls, host: Host, config: Any) -> dict[str, int]:
        return {}

    @classmethod
    def expected_params(cls, host: Host, config: BOFTConfig) -> int:
        m, n, b = blocks(host, config)
        return m * n * b * b + host.d_out

    # -- Hugging Face PEFT: peft_type BOFT, <module>.boft_R (m, n, b, b), <module>.boft_s (d_out, 1) --------------
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> BOFTConfig:
        return config_from_hf(BOFTConfig, hf_config)

    @classmethod
    def to_hf_config(cls, config: BOFTConfig, hosts: list[Host]) -> dict[str, Any]:
        if config.overrides:
            raise PeftkitError("cannot export to Hugging Face PEFT format: its BOFT has no per-module overrides")
        return {
            "boft_block_size": config.block_size, "boft_block_num": config.block_num,
            "boft_n_butterfly_factor": config.n_butterfly_factor, "boft_dropout": config.dropout,
            "init_weights": config.init == "identity", "fan_in_fan_out": False,
            "bias": {"adapter_only": "boft_only"}.get(config.bias, config.bias),
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        }

    @classmethod
    def hf_layout(cls, host: Host, config: BOFTConfig) -> dict[str, HFTensor] | None:
        if host.kind not in _HOSTS:
            return None
        m, n, b = blocks(host, config)
        return {"boft_R": HFTensor("boft_R", (m, n, b, b), (m, n, b, b)),
                "boft_s": HFTensor("boft_s", (host.d_out, 1), (host.d_out, 1))}
