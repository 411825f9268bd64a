"""LoLDU — "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning"
(2024, arXiv 2410.13618; official code github.com/SKDDJ/LoLDU ``minloldu/loldu.py``).

    forward:  y = x·Wᵀ + b0,  W = W_res + σ·P·L_r·diag(z)·Ū_r,  W_res = W0 − σ0·P·L_r·diag(z0)·Ū_r
    init:     P, L, U = lu(W0) (float64, partial pivoting);  D = diag(U), Ū = U/D;  L_r = L[:, :r], Ū_r = Ū[:r],
              z = z0 = D[:r], σ = σ0 = α/r  ⇒ W = W0
    merge:    W ← W0 + ΔW,  ΔW = P·L_r·diag(σ·z − σ0·z0)·Ū_r  (rank ≤ r)

Trainable: z ∈ R^r (+ the scalar σ with ``train_scale``) — r (+1) per layer. P (kept as an index vector: row i of
P·L_r is row perm[i] of L_r), L_r, Ū_r and z0 are persistent buffers, so loading into a fresh base reproduces the
outputs exactly. As PiSSA in lora.py, the host weight is never rewritten: W_res·x + σ·P·L_r·diag(z)·Ū_r·x is computed
as W0·x + ((x·Ū_rᵀ)⊙(σz − σ0z0))·(P·L_r)ᵀ on the activation path (two rank-r projections, no d_out×d_in tensor
per step), which is the same function; ``disable()`` and mixed batches still see the true W0.
Resolved: kept pivots with |D_i| ≤ pivot_eps·max|D| make Ū_r blow up — this raises :class:`PeftkitError` naming the
module (no silent clamp). Only the default "lu" init of the official code is implemented (its "uniform", "normal",
… options start away from W0). ``alpha`` defaults to 1 (the official ``from_linear``, σ0 = 1/r). Dropout (training
only) applies to the update branch's input. Conv and embedding hosts use their (d_out, d_in) view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, check_rank
from peftkit.core.registry import register


@dataclass
class LolduConfig(LowRankConfig):
    """LoLDU. ``r``: kept rank; σ0 = ``alpha``/r; ``train_scale``: σ is trainable too; ``pivot_eps``: relative
    threshold below which a kept LU pivot counts as zero (error)."""

    alpha: float = 1.0
    train_scale: bool = False
    pivot_eps: float = 1e-6

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.pivot_eps < 1.0:
            raise PeftkitError(f"LolduConfig.pivot_eps must be in [0, 1), got {self.pivot_eps}")


def ldu(w: torch.Tensor, r: int, eps: float, name: str) -> tuple[torch.Tensor, ...]:
    """perm, L_r (d_out×r, unit lower), Ū_r (r×d_in, unit upper), z0 = D[:r] of ``W0 = P·L·diag(D)·Ū`` (float64)."""
    p, lo, up = torch.linalg.lu(w.detach().double())
    d = up.diagonal()
    bad = (d[:r].abs() <= eps * d.abs().max()).nonzero()
    if len(bad):
        i = int(bad[0])
        raise PeftkitError(
            f"module {name!r}: LU pivot D[{i}] = {float(d[i]):.3g} is (numerically) zero relative to max|D| = "
            f"{float(d.abs().max()):.3g}, so rank {r} cannot be kept; use r <= {i} or another layer"
        )
    return p.argmax(dim=1), lo[:, :r], up[:r] / d[:r, None], d[:r]


@register(
    "loldu",
    config=LolduConfig,
    family="reparameterized",
    paper="LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition (2024, arXiv 2410.13618)",
    description="LU-decomposes W0 = P·L·D·U once and trains only the r kept diagonal entries (+ optional scale)",
    params="r (+1 with train_scale)",
    hosts=("linear", "gpt2_conv1d", "conv1d", "conv2d", "embedding", "bnb_4bit", "bnb_8bit"),
    lr_scale=5.0,
)
class Loldu(Adapter):
    def __init__(self, host: Host, config: LolduConfig) -> None:
        super().__init__(host, config)
        check_rank(host, config.r)
        dt = host.weight.dtype if host.weight.is_floating_point() else torch.float32
        perm, lo, up, z0 = ldu(host.weight_2d(), config.r, config.pivot_eps, host.name)
        self.register_buffer("perm", perm.to(host.weight.device))
        self.register_buffer("L_r", lo.to(host.weight.device, dt))
        self.register_buffer("U_r", up.to(host.weight.device, dt))
        self.register_buffer("z0", z0.to(host.weight.device, dt))
        self.z = nn.Parameter(self.z0.clone())
        # σ0 = α/r rounded to the weight dtype, so that σ·z − σ0·z0 is exactly 0 at init also with a trainable σ
        self.scale0 = float(torch.tensor(config.scaling, dtype=dt))
        self.scale: nn.Parameter | float = (
            nn.Parameter(torch.tensor(self.scale0, device=host.weight.device, dtype=dt)) if config.train_scale
            else self.scale0
        )
        self.dropout = make_dropout(config.dropout)

    def coeffs(self) -> torch.Tensor:
        """σ·z − σ0·z0: the diagonal of the update (exactly 0 at init)."""
        return self.scale * self.z - self.scale0 * self.z0

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        host = self.host
        xd = self.dropout(x).to(self.z.dtype) if x.is_floating_point() else x
        h = host.project_in(xd, self.U_r) * host.out_view(self.coeffs())
        return host.project_out(h, self.L_r.index_select(0, self.perm))

    def delta_weight(self) -> torch.Tensor:
        return self.L_r.index_select(0, self.perm) @ (self.coeffs()[:, None] * self.U_r)

    @classmethod
    def expected_params(cls, host: Host, config: LolduConfig) -> int:
        return config.r + int(config.train_scale)
