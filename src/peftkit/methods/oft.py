"""OFT — Qiu et al., NeurIPS 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (arXiv 2306.07280),
as Hugging Face PEFT ≥ 0.18 defines it (``peft/tuners/oft``: the input-rotation form with the Cayley–Neumann series
of Qiu et al. 2025, "Orthogonal Finetuning Made Scalable"); reads and writes PEFT's ``OFT`` files.

    forward:  y = base(x·R),  R = diag(R_1, …, R_n) block-diagonal (d_in×d_in, n blocks of size b, n·b = d_in);
              x·R rotates each b-slice of the input (W0 itself is never touched)
    R_i:      Q_i skew-symmetric from the b(b−1)/2 trained values q_i (upper triangle, Q = U − Uᵀ); Cayley–Neumann
              (default, T = 5 terms): R_i = I + 2Q + 2Q² + … + 2Q^{T−2} + Q^{T−1};  exact Cayley: R_i = (I − Q)(I + Q)⁻¹
    init:     q = 0 ⇒ R = I ⇒ the base model (PEFT's init_weights=True; init="random": q ~ N(0, 0.1²))
    merge:    W ← W0·Rᵀ  (multiplicative: unmerge solves W0 = W·R⁻ᵀ; the bias is unchanged)

Trainable: n·b(b−1)/2 per layer (b(b−1)/2 with ``block_share``: one block for all). Block size: ``block_size``
(PEFT's ``oft_block_size``, default 32) or the number of blocks ``r`` — exactly one of them non-zero; a value that does
not divide d_in is moved to the nearest divisor as PEFT's ``adjust_oft_parameters`` does (PEFT warns). Following
PEFT's code where it differs from the papers: the Neumann series is PEFT's (it approximates (I + Q)(I − Q)⁻¹, the
exact form (I − Q)(I + Q)⁻¹ — the two are each other's transpose); PEFT's ``module_dropout`` is accepted and, as in
PEFT 0.21 (which never applies it), has no effect; COFT (``coft=True``: projecting the trained values in place during
the forward) is refused — an adapter here is a pure function of its parameters. Hosts: Linear (PEFT's) and GPT-2
Conv1D (peftkit only: no PEFT file); PEFT's Conv2d / Embedding OFT are not reproduced.
As the only active adapter the layer runs base(x·R) (one small rotation, the base GEMM); next to other adapters it adds
base(x·R) − base(x) = (x·R − x)·W0ᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.adapter import Adapter
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor, config_from_hf
from peftkit.core.host import Host
from peftkit.core.peft_names import INIT_IDENTITY, TARGETING, alias, bias_alias, inert
from peftkit.core.registry import register

_HOSTS = ("linear", "gpt2_conv1d")


@dataclass
class OFTConfig(AdapterConfig):
    """OFT. ``block_size`` / ``r``: the size / number of the orthogonal blocks (exactly one non-zero);
    ``block_share``: one block for all; ``cayley_neumann`` (``neumann_terms``): the truncated series instead of the
    exact Cayley transform; ``init``: ``"identity"`` or ``"random"``. Accepts Hugging Face PEFT ``OFTConfig``'s field
    names (``oft_block_size``, ``use_cayley_neumann``, ``num_cayley_neumann_terms``, ``init_weights``, ...)."""

    r: int = 0
    block_size: int = 32
    block_share: bool = False
    cayley_neumann: bool = True
    neumann_terms: int = 5
    init: str = "identity"

    peft_type = "OFT"
    peft_names = {
        **TARGETING,
        "bias": bias_alias("oft_only"),
        "oft_block_size": alias("block_size"),
        "use_cayley_neumann": alias("cayley_neumann"),
        "num_cayley_neumann_terms": alias("neumann_terms"),
        "init_weights": INIT_IDENTITY,
        "module_dropout": inert(),  # stored by PEFT 0.21 but never applied: accepted, no effect (as there)
        "coft": inert(False, "COFT rewrites the trained values inside the forward; peftkit's OFT is the plain one"),
        "eps": inert(),  # COFT's radius: meaningless without coft
    }

    def validate(self) -> None:
        super().validate()
        if (self.r != 0) == (self.block_size != 0) or self.r < 0 or self.block_size < 0:
            raise PeftkitError(f"OFTConfig: give exactly one of r (number of blocks) and block_size, the other 0 "
                               f"(r · block_size = d_in); got r={self.r}, block_size={self.block_size}")
        if self.neumann_terms < 1:
            raise PeftkitError(f"OFTConfig.neumann_terms must be >= 1, got {self.neumann_terms}")
        if self.init not in ("identity", "random"):
            raise PeftkitError(f"OFTConfig.init must be 'identity' or 'random', got {self.init!r}")


def _nearest_divisor(n: int, v: int) -> int:
    """PEFT's ``adjust_oft_parameters``: ``v`` itself if it divides n; n if v ≥ n; else the nearer divisor below or
    above (ties: below)."""
    if v >= n:
        return n
    hi = v
    while hi <= n and n % hi:
        hi += 1
    lo = v
    while lo > 1 and n % lo:
        lo -= 1
    return lo if v - lo <= hi - v else hi


def blocks(host: Host, config: OFTConfig) -> tuple[int, int]:
    """(number of blocks n, block size b) on ``host``, n·b = d_in."""
    d = host.d_in
    if config.r:
        n = _nearest_divisor(d, config.r)
        return n, d // n
    b = _nearest_divisor(d, config.block_size)
    return d // b, b


def cayley(q: torch.Tensor, b: int, neumann_terms: int | None) -> torch.Tensor:
    """The (m, b, b) rotations of the (m, b(b−1)/2) values ``q``: the Cayley–Neumann series with ``neumann_terms``
    terms, or the exact Cayley transform (I − Q)(I + Q)⁻¹ when None (see the module docstring)."""
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    u = q.new_zeros(q.shape[0], b * b).index_copy(1, rows * b + cols, q).view(-1, b, b)
    skew = u - u.transpose(-2, -1)
    eye = torch.eye(b, device=q.device, dtype=q.dtype).expand_as(skew)
    if neumann_terms is None:
        return torch.linalg.solve(eye + skew, eye - skew, left=False)
    r = eye.clone()
    if neumann_terms > 1:
        r = r + 2.0 * skew
        if neumann_terms > 2:
            power = skew @ skew
            r = r + 2.0 * power
            for _ in range(3, neumann_terms - 1):
                power = power @ skew
                r = r + 2.0 * power
            r = r + power @ skew
    return r


@register(
    "oft",
    config=OFTConfig,
    family="reparameterized",
    paper="Qiu et al., NeurIPS 2023, OFT (arXiv 2306.07280); Qiu et al. 2025, Orthogonal Finetuning Made "
          "Scalable — Hugging Face PEFT's OFT",
    description="multiplicative: the input rotated by a block-diagonal orthogonal R (Cayley / Cayley–Neumann of "
                "skew-symmetric blocks); merged W0·Rᵀ",
    params="n·b(b−1)/2, n·b = d_in (b(b−1)/2 with block_share)",
    hosts=_HOSTS,
    hf_peft_type="OFT",
)
class OFT(Adapter):
    additive = False  # rotates the host weight (W·R): its update depends on W (see Adapter.additive)
    def __init__(self, host: Host, config: OFTConfig) -> None:
        super().__init__(host, config)
        self.n, self.b = blocks(host, config)
        shape = (1 if config.block_share else self.n, self.b * (self.b - 1) // 2)
        self.oft_R = nn.Parameter(torch.zeros(shape, device=host.weight.device))
        if config.init == "random":
            with torch.no_grad():
                nn.init.normal_(self.oft_R, mean=0.0, std=0.1)
        self.terms = config.neumann_terms if config.cayley_neumann else None

    def rotations(self) -> torch.Tensor:
        """The n (b, b) blocks of R."""
        r = cayley(self.oft_R, self.b, self.terms)
        return r.expand(self.n, -1, -1) if r.shape[0] != self.n else r

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x·R, in the adapter's dtype."""
        xs = x.to(self.oft_R.dtype)
        shape = xs.shape
        xr = torch.einsum("...rk,rkc->...rc", xs.reshape(*shape[:-1], self.n, self.b), self.rotations())
        return xr.reshape(shape)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host.module(self.rotate(x).to(x.dtype))

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        w = self.host.weight_2d()
        return self.host.apply_weight((self.rotate(x) - x.to(self.oft_R.dtype)).to(w.dtype), w)

    def rotation_matrix(self) -> torch.Tensor:
        """R as one (d_in, d_in) block-diagonal matrix."""
        return torch.block_diag(*self.rotations())

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight @ self.rotation_matrix().t().to(weight.dtype), bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        r = self.rotation_matrix().to(torch.float64)  # W·Rᵀ = W' ⇔ R·Wᵀ = W'ᵀ
        return torch.linalg.solve(r, weight.t().to(torch.float64)).t().to(weight.dtype), bias

    def delta_weight(self) -> torch.Tensor:
        w = self.host.weight_2d().detach()
        return w @ self.rotation_matrix().t().to(w.dtype) - w

    @classmethod
    def rank_limits(cls, host: Host, config: Any) -> dict[str, int]:
        return {}  # r counts blocks and is moved to a divisor of d_in, as PEFT does

    @classmethod
    def expected_params(cls, host: Host, config: OFTConfig) -> int:
        n, b = blocks(host, config)
        return (1 if config.block_share else n) * (b * (b - 1) // 2)

    # -- Hugging Face PEFT: peft_type OFT, <module>.oft_R.weight --------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> OFTConfig:
        return config_from_hf(OFTConfig, hf_config)

    @classmethod
    def to_hf_config(cls, config: OFTConfig, hosts: list[Host]) -> dict[str, Any]:
        if config.dropout > 0 or config.overrides:
            raise PeftkitError("cannot export to Hugging Face PEFT format: its OFT has no input dropout and no "
                               "per-module overrides")
        return {
            "r": config.r, "oft_block_size": config.block_size, "block_share": config.block_share,
            "use_cayley_neumann": config.cayley_neumann, "num_cayley_neumann_terms": config.neumann_terms,
            "init_weights": config.init == "identity", "module_dropout": 0.0, "coft": False, "eps": 6e-5,
            "bias": {"adapter_only": "oft_only"}.get(config.bias, config.bias), "fan_in_fan_out": False,
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
            # the Cayley–Neumann series as PEFT 0.18 changed it (PEFT warns on files that do not say so)
            "peft_version": "0.18.0",
        }

    @classmethod
    def hf_layout(cls, host: Host, config: OFTConfig) -> dict[str, HFTensor] | None:
        if host.kind != "linear":
            return None
        n, b = blocks(host, config)
        shape = (1 if config.block_share else n, b * (b - 1) // 2)
        return {"oft_R": HFTensor("oft_R.weight", shape, shape)}
