"""MoS — Mixture of Shards, Wang et al., ICLR 2025, "MoS: Unleashing parameter efficiency of low-rank adaptation
with mixture of shards" (arXiv 2410.00938; official code Forence1999/MoS).

    forward:  y = base(x) + (α/r)·dropout(x)·A_jᵀ·B_jᵀ,
              A_j[k] = ⊕_{u<l} P_A[idx_A[k·l+u]],  B_j[:,k] = ⊕_{u<l} P_B[:, idx_B[k·l+u]]   (⊕ = concatenation)
    init:     per module type, P_A ∈ R^{(r_e·L·l)×(d_in/l)} ~ U(±1/√d_in), P_B ∈ R^{(d_out/l)×(r_e·L·l)} = 0 ⇒ ΔW = 0;
              idx_A = [randperm(public)[:(r−r_p)·l] ; private shards of layer j], idx_B drawn independently
    merge:    W_j ← W0_j + (α/r)·B_j·A_j   (rank ≤ r)

Inter-layer sharing: the L targeted layers of one module type (same leaf name and shape) share one pair of pools.
Shard privatization: the last L·r_p·l shards are split into private blocks, one per layer. Pair dissociation:
idx_A and idx_B are drawn independently. Vector sharding: each rank-one vector is the concatenation of l shards.
The routing is fixed at init (not input-dependent) and kept as index buffers; the pools live once in the shared
store. Trainable per module type: r_e·L·(d_in + d_out) — LoRA's count at rank r_e while every layer has rank r.
Exact paper values of (r, r_e, r_p, l) are unconfirmed; defaults here: r=8, r_e=4, r_p=2, l=2, α=16.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from peftkit.core.adapter import Adapter, PlanContext, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankUpdate, lowrank_scaling
from peftkit.core.registry import register


@dataclass
class MosConfig(AdapterConfig):
    """MoS. ``r``: active rank per layer; ``r_e``: equivalent (trainable) rank; ``r_p``: private rank;
    ``l``: shards per vector (must divide d_in and d_out); ``alpha``: scale α/r; ``seed``: seed of the routing
    and of the down-projection pool's init (drawn on the CPU: the same on every device)."""

    r: int = 8
    r_e: int = 4
    r_p: int = 2
    l: int = 2
    alpha: float = 16.0
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        for f in ("r", "r_e", "l"):
            self.positive(f"MosConfig.{f}", getattr(self, f))
        if not 0 <= self.r_p <= min(self.r, self.r_e):
            raise PeftkitError(f"MosConfig.r_p must be in [0, min(r, r_e)] = [0, {min(self.r, self.r_e)}], "
                               f"got {self.r_p}")


def _group(path: str, host: Host) -> str:
    """Module type = leaf name + shape; pools are shared within a group."""
    return f"{path.rsplit('.', 1)[-1]}_{host.d_in}x{host.d_out}".replace("-", "_")


def _seed(seed: int, name: str) -> int:
    """A process- and device-independent seed for one module's (or pool's) draw."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _pool_a(seed: int, group: str, n: int, width: int, bound: float, device: torch.device) -> torch.Tensor:
    """The down-projection shard pool U(±bound), drawn in fp32 on the CPU from a generator seeded by ``seed`` and the
    pool's name (the global RNG is untouched): the same seed gives the same pool on every device."""
    g = torch.Generator(device="cpu").manual_seed(_seed(seed, f"pool_a_{group}"))
    return torch.empty(n, width, dtype=torch.float32).uniform_(-bound, bound, generator=g).to(device)


@register(
    "mos",
    config=MosConfig,
    family="reparameterized",
    paper="Wang et al., ICLR 2025, MoS: Mixture of Shards (arXiv 2410.00938)",
    description="LoRA factors assembled from global shard pools shared across layers (private + public shards)",
    params="r_e·(d_in + d_out) per layer (pools shared per module type)",
    hosts=("linear", "gpt2_conv1d", "bnb_4bit", "bnb_8bit"),
)
class Mos(LowRankUpdate, Adapter):
    uses_context = True

    def __init__(self, host: Host, config: MosConfig, context: PlanContext | None = None) -> None:
        context = self.require_context(context)
        super().__init__(host, config, context)
        path = context.targets[context.index][0]
        l = config.l
        if host.d_in % l or host.d_out % l:
            raise PeftkitError(
                f"module {path!r}: MoS needs l={l} to divide d_in={host.d_in} and d_out={host.d_out}"
            )
        group = _group(path, host)
        members = [p for p, h in context.targets if _group(p, h) == group]
        L, j = len(members), members.index(path)
        if config.r - config.r_p > (config.r_e - config.r_p) * L:
            raise PeftkitError(
                f"module {path!r}: MoS needs r − r_p ≤ (r_e − r_p)·L public ranks "
                f"({config.r} − {config.r_p} > ({config.r_e} − {config.r_p})·{L}); raise r_e or r_p, or lower r"
            )
        n_shards = config.r_e * L * l
        dev = host.weight.device
        bound = 1.0 / math.sqrt(host.d_in)
        # the pools live once in the shared store; layers keep only their names (no per-layer registration)
        self.keys = (f"pool_a_{group}", f"pool_b_{group}")
        self.shared.parameter(self.keys[0], lambda: _pool_a(config.seed, group, n_shards, host.d_in // l, bound, dev))
        self.shared.parameter(self.keys[1], lambda: torch.zeros(host.d_out // l, n_shards, device=dev))
        n_pub = (config.r_e - config.r_p) * L * l
        private = torch.arange(n_pub + j * config.r_p * l, n_pub + (j + 1) * config.r_p * l)
        g = torch.Generator(device="cpu").manual_seed(_seed(config.seed, path))
        k = (config.r - config.r_p) * l
        idx_a = torch.cat([torch.randperm(n_pub, generator=g)[:k], private])
        idx_b = torch.cat([torch.randperm(n_pub, generator=g)[:k], private])
        self.register_buffer("idx_a", idx_a.to(dev))
        self.register_buffer("idx_b", idx_b.to(dev))
        self.r, self.l = config.r, l
        self.s = lowrank_scaling(config.alpha, config.r)
        self.dropout = make_dropout(config.dropout)

    @property
    def pool_a(self) -> torch.Tensor:
        return self.shared._parameters[self.keys[0]]

    @property
    def pool_b(self) -> torch.Tensor:
        return self.shared._parameters[self.keys[1]]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_j, B_j) assembled from the pools by vector sharding."""
        a = self.pool_a.index_select(0, self.idx_a).reshape(self.r, -1)
        pb = self.pool_b.index_select(1, self.idx_b)  # (d_out/l, r·l)
        b = pb.reshape(pb.shape[0], self.r, self.l).permute(2, 0, 1).reshape(-1, self.r)
        return a, b

    @classmethod
    def expected_params(cls, host: Host, config: MosConfig) -> int:
        return config.r_e * (host.d_in + host.d_out)
