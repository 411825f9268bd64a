"""LoCA — Du et al., ICLR 2025, "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning"
(arXiv 2502.06820; official code github.com/TL-UESTC/LoCA ``peft/src/peft/tuners/loca/{layer.py,dct_utils.py}``,
read through a third-party file that vendors its ``IdctWithIndexGrad`` verbatim; shared/methods/weight-space.md §8).

    forward:  y = base(x) + dropout(x)·ΔWᵀ,  ΔW = α·C_{d_out}ᵀ·S·C_{d_in},  S = scatter(a at (row, col)), d_out×d_in
              C_N[k, j] = √(2/N)·cos(π(2j+1)k/(2N)), row 0 divided by √2 (orthonormal DCT-II: ΔW is the 2-D iDCT of S)
              row_k = round(clamp(ℓ₀ₖ, 0, 0.999)·(d_out−1)), col_k = round(clamp(ℓ₁ₖ, 0, 0.999)·(d_in−1))
    init:     a = 0 (n coefficients), ℓ ~ U[0, 1) (2×n continuous locations)  ⇒  ΔW = 0
    merge:    W ← W0 + α·Cᵀ·S·C  (the locations as they are rounded now)

Trainable: a ∈ R^n and ℓ ∈ R^{2×n} — 3n per layer while the locations are searched; the paper reports n, the count
left once :class:`LocaSchedule` freezes ℓ after ``t_loc`` steps. Duplicate locations add up (as the official
``sparse_coo_tensor(...).to_dense()``). ΔW = Σ_k α·a_k·C_{d_out}[row_k, :]ᵀ ⊗ C_{d_in}[col_k, :] (a sum of n rank-1
terms, so ‖ΔW‖_F = α‖a‖ for distinct locations) is built from gathered DCT rows when n < d_out + d_in and from the
dense product Cᵀ·S·C otherwise, whichever costs fewer multiply-adds (n·d_out·d_in against d_out·d_in·(d_out + d_in)).

Gradients (:class:`_SparseIdct2d`, a custom autograd function): with G = ∂L/∂(ΔW/α) and K = C_{d_out}·G·C_{d_in}ᵀ
(= ∂L/∂S, the 2-D DCT of G), ∂L/∂a_k = K[row_k, col_k] and the locations get the official central finite difference
    ∂L/∂row_k = clamp(½·a_k·(K[row_k+1, col_k] − K[row_k−1, col_k]), −1, 1)   (neighbour indices clamped at the edges)
    ∂L/∂col_k = clamp(½·a_k·(K[row_k, col_k+1] − K[row_k, col_k−1]), −1, 1)
which autograd multiplies by (d−1) (and by the clamp's 0/1 mask) on the way back to ℓ. Only the K entries needed are
computed: gathered (5n of them while ℓ trains, n otherwise) or from the dense K, whichever is cheaper.

Training: :class:`LocaSchedule` (:mod:`.loca_schedule`, attached by the trainer) alternates per optimiser step t:
t = 0 coefficients only; 0 < t < t_loc: in each cycle of b_a + b_l steps, b_a steps train a alone (ℓ frozen) then
b_l steps train ℓ alone; t ≥ t_loc: ℓ frozen for good, a trains. The locations learn at ``location_lr`` (paper
1e-4) under the same warmup/decay multiplier as the coefficients: the procedure rescales their optimiser step.
Resolved: the schedule counts optimiser steps of the procedure (the official layer counts its own training forwards,
which is the same in a plain loop, not under gradient accumulation); the DCT matrices are built once per size and
shared by all layers of an adapter (non-persistent: regenerated at load); a persistent ``loca_shape`` buffer records
(d_out, d_in), because a and ℓ have the same shapes on any base and loading into a wrong-sized layer must fail;
like the official code the position clamp at 0.999 makes the last row/column unreachable when d > 501.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core import precision
from peftkit.core.adapter import Adapter, PlanContext, SharedStore, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import host_forward, trainable
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.registry import HOST_KINDS, register
from peftkit.methods.loca_schedule import T_LOC_UNKNOWN_RUN, LocaSchedule, location_steps
from peftkit.ops.spectral import dct2_entries, dct_matrix, sparse_idct2

__all__ = ["LOCATION_CLAMP", "T_LOC_UNKNOWN_RUN", "Loca", "LocaConfig", "LocaSchedule", "dct_matrix", "location_steps"]

LOCATION_CLAMP = 0.999  # the official upper clamp of ℓ before scaling to a position


@dataclass
class LocaConfig(AdapterConfig):
    """LoCA. ``n``: learnable DCT coefficients per layer (paper 1000 per q/v matrix of RoBERTa-base); ``alpha``: scale
    of ΔW (paper 1); schedule (:class:`LocaSchedule`): ``t_loc`` — the location search's length, a share of the run's
    optimiser steps (a float in [0, 1]; default 0.1, the paper's ≈ 10 % of all steps; a run of unknown length, e.g. a
    schedule driven by hand, uses ``T_LOC_UNKNOWN_RUN`` steps) or a number of steps (an int) — cycles of ``b_a``
    coefficient steps then ``b_l`` location steps (paper 10 and 20), ``location_lr``: learning rate of the locations
    (paper 1e-4; None: the coefficients' rate)."""

    n: int = 1000
    alpha: float = 1.0
    t_loc: int | float = 0.1
    b_a: int = 10
    b_l: int = 20
    location_lr: float | None = 1e-4

    def validate(self) -> None:
        super().validate()
        if self.n <= 0:
            raise PeftkitError(f"LocaConfig.n (number of DCT coefficients) must be a positive integer, got {self.n}")
        self.positive("LocaConfig.alpha", self.alpha)
        for name in ("t_loc", "b_a", "b_l"):
            if getattr(self, name) < 0:
                raise PeftkitError(f"LocaConfig.{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.t_loc, float) and self.t_loc > 1:
            raise PeftkitError(f"LocaConfig.t_loc as a float is a share of the run, in [0, 1]; got {self.t_loc} (give "
                               "a whole number for a number of steps)")
        if self.b_a + self.b_l == 0:
            raise PeftkitError("LocaConfig.b_a + b_l (the length of a coefficient/location cycle) must be >= 1")
        if self.location_lr is not None:
            self.positive("LocaConfig.location_lr", self.location_lr)


class _SparseIdct2d(torch.autograd.Function):
    """ΔW/α = C_outᵀ·S·C_in with S = scatter(a at round(pos)); backward: ∂L/∂a = K[row, col] and the finite-difference
    location gradient on the continuous positions ``pos`` (2, n). In a's dtype, autocast off. A square layer passes
    its one DCT matrix once (``c_in=None``): ``torch.compile`` cannot trace a custom function given one tensor twice."""

    @staticmethod
    @precision.kernel
    def forward(ctx, a, pos, c_out, c_in_given):  # type: ignore[override]
        rows, cols = pos.detach().round().long().unbind(0)
        dw = sparse_idct2(a, rows, cols, c_out, c_out if c_in_given is None else c_in_given)
        ctx.save_for_backward(a, rows, cols, c_out, c_in_given)
        return dw

    @staticmethod
    @precision.kernel
    def backward(ctx, g):  # type: ignore[override]
        a, rows, cols, c_out, c_in = ctx.saved_tensors
        c_in = c_out if c_in is None else c_in
        need_a, need_pos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_a or need_pos):
            return None, None, None, None
        n = a.numel()
        r_sel, c_sel = [rows], [cols]
        if need_pos:
            d_out, d_in = g.shape
            r_sel += [(rows + 1).clamp(max=d_out - 1), (rows - 1).clamp(min=0), rows, rows]
            c_sel += [cols, cols, (cols + 1).clamp(max=d_in - 1), (cols - 1).clamp(min=0)]
        k = dct2_entries(g.to(c_out.dtype), c_out, c_in, torch.cat(r_sel), torch.cat(c_sel)).split(n)
        grad_a = k[0].to(a.dtype) if need_a else None
        grad_pos = None
        if need_pos:
            grad_row = (0.5 * a * (k[1] - k[2])).clamp(-1.0, 1.0)
            grad_col = (0.5 * a * (k[3] - k[4])).clamp(-1.0, 1.0)
            grad_pos = torch.stack([grad_row, grad_col])
        return grad_a, grad_pos, None, None


@register(
    "loca",
    config=LocaConfig,
    family="reparameterized",
    paper="Du et al., ICLR 2025, LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning "
    "(arXiv 2502.06820)",
    description="ΔW = α·iDCT-2D of n learnable coefficients at learnable locations (finite-difference location "
    "gradient, alternating coefficient/location schedule)",
    params="3n while locations are searched (n coefficients + 2n locations); the paper's n once they freeze",
    hosts=HOST_KINDS,
    procedure=LocaSchedule,
    lr_scale=5.0,
)
class Loca(Adapter):
    uses_context = True  # the DCT matrices are shared by every layer of the adapter

    @classmethod
    def rank_limits(cls, host: Host, config: LocaConfig) -> dict[str, int]:
        return {"n": host.d_out * host.d_in}  # n coefficients of the layer's d_out×d_in DCT spectrum

    def __init__(self, host: Host, config: LocaConfig, context: PlanContext | None = None) -> None:
        super().__init__(host, config, context)
        d_out, d_in = host.d_out, host.d_in
        w = host.weight
        dev, dt = w.device, host.param_dtype
        if self.shared is None:  # built outside peftkit.adapt: own the matrices
            self.shared_store = SharedStore()
            object.__setattr__(self, "shared", self.shared_store)
        for d in {d_out, d_in}:
            self.shared.buffer(f"dct_{d}", lambda d=d: dct_matrix(d, dt, dev), persistent=False)
        self.n, self.alpha = config.n, config.alpha
        self.loca_a = nn.Parameter(torch.zeros(config.n, device=dev, dtype=dt))
        # drawn on the CPU (then moved): after the same torch.manual_seed, the same locations on every device
        self.loca_l = nn.Parameter(torch.rand(2, config.n, dtype=torch.float32, device="cpu").to(dev, dt))
        self.register_buffer("loca_shape", torch.tensor([d_out, d_in], device=dev))
        self.dropout = make_dropout(config.dropout)

    # -- the update ---------------------------------------------------------------------------------------------
    def dct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C_{d_out}, C_{d_in})."""
        return getattr(self.shared, f"dct_{self.host.d_out}"), getattr(self.shared, f"dct_{self.host.d_in}")

    def positions(self) -> torch.Tensor:
        """Continuous positions (2, n): clamp(ℓ, 0, 0.999)·(d − 1) per axis (rounded in the forward)."""
        scale = self.loca_l.new_tensor([self.host.d_out - 1, self.host.d_in - 1])[:, None]
        return self.loca_l.clamp(0.0, LOCATION_CLAMP) * scale

    def locations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer (rows, cols) of the n coefficients."""
        rows, cols = self.positions().detach().round().long().unbind(0)
        return rows, cols

    def weight_delta(self) -> torch.Tensor:
        """α·Cᵀ·S·C, differentiable in a and (through the finite difference) in ℓ."""
        c_out, c_in = self.dct()
        dt = self.loca_a.dtype
        c_in = None if c_in is c_out else c_in.to(dt)  # one matrix for a square layer: passed once
        dw = _SparseIdct2d.apply(self.loca_a, self.positions(), c_out.to(dt), c_in)
        return dw * self.alpha if self.alpha != 1.0 else dw

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dw = self.weight_delta()
        x = self.dropout(x)
        xd = x if (not x.is_floating_point() or x.dtype == dw.dtype) else x.to(dw.dtype)
        return self.host.apply_weight(xd, dw)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """x·(W0 + ΔW)ᵀ + b in one product (float hosts, no active dropout, matching dtypes)."""
        if self.config.dropout > 0 and self.training:
            return None
        w, bias = self.host.weight_2d(), self.host.bias
        if precision.fused_dtype(x, w, folds=True) is None or self.loca_a.dtype != w.dtype:
            return None  # half precision (autocast included): W0 + ΔW would round the update away
        # W' kept, not rebuilt in backward: the dense DCT build costs +8.5 % of a MiniLM step to save 8 % of its memory
        return host_forward(self.host, x, lambda: w + self.weight_delta(), trainable(self), bias, rebuild=False)

    def delta_weight(self) -> torch.Tensor:
        return self.weight_delta().detach()

    # -- schedule and bookkeeping ---------------------------------------------------------------------------------
    def location_phase(self, t: int, t_loc: int | None = None) -> bool:
        """Whether optimiser step t trains the locations (and not the coefficients); ``t_loc`` in steps (default: the
        config's, a share taken of an unknown run)."""
        cfg = self.config
        t_loc = location_steps(cfg, None) if t_loc is None else t_loc
        return 0 < t < t_loc and t % (cfg.b_a + cfg.b_l) >= cfg.b_a

    def check_loaded(self) -> None:
        shape = (self.host.d_out, self.host.d_in)
        if tuple(self.loca_shape.tolist()) != shape:
            raise PeftkitError(f"tensor 'adapter.{self.host.name}.loca_shape' records a LoCA layer of (d_out, d_in) "
                               f"= {tuple(self.loca_shape.tolist())} but module {self.host.name!r} is {shape}; "
                               "refusing to load")
        if not (torch.isfinite(self.loca_a).all() and torch.isfinite(self.loca_l).all()):
            raise PeftkitError(f"module {self.host.name!r}: the saved LoCA coefficients and locations must be finite")

    @classmethod
    def expected_params(cls, host: Host, config: LocaConfig) -> int:
        return 3 * config.n

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}, alpha={self.alpha}"
