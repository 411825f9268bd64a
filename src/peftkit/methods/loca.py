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

Training: :class:`LocaSchedule` (attached by the trainer) alternates per optimiser step t: t = 0 coefficients only;
0 < t < t_loc: in each cycle of b_a + b_l steps, b_a steps train a alone (ℓ frozen) then b_l steps train ℓ alone;
t ≥ t_loc: ℓ frozen for good, a trains. The locations learn at ``location_lr`` (paper 1e-4) under the same
warmup/decay multiplier as the coefficients: the procedure rescales their optimiser step (see the class).
Resolved: the schedule counts optimiser steps of the procedure (the official layer counts its own training forwards,
which is the same in a plain loop, not under gradient accumulation); the DCT matrices are built once per size and
shared by all layers of an adapter (non-persistent: regenerated at load); a persistent ``loca_shape`` buffer records
(d_out, d_in), because a and ℓ have the same shapes on any base and loading into a wrong-sized layer must fail;
like the official code the position clamp at 0.999 makes the last row/column unreachable when d > 501.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core import precision
from peftkit.core.adapter import Adapter, PlanContext, SharedStore, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import host_forward, trainable
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.procedure import Procedure, find_adapters
from peftkit.core.registry import HOST_KINDS, register

LOCATION_CLAMP = 0.999  # the official upper clamp of ℓ before scaling to a position


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix C_n (n×n): C[k, j] = √(2/n)·cos(π(2j+1)k/(2n)), row 0 divided by √2.
    ``C·x`` is the DCT of x, ``Cᵀ·y`` its inverse; computed in float64, then cast."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype=dtype, device=device)


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


T_LOC_UNKNOWN_RUN = 100  # location-search steps when t_loc is a share and the run's length is unknown


def location_steps(config: LocaConfig, run_steps: int | None) -> int:
    """``t_loc`` in optimiser steps: an int as given; a share (float) of ``run_steps``."""
    if isinstance(config.t_loc, float):
        return T_LOC_UNKNOWN_RUN if run_steps is None else round(config.t_loc * run_steps)
    return int(config.t_loc)


def _entries(g: torch.Tensor, c_out: torch.Tensor, c_in: torch.Tensor, rows: torch.Tensor,
             cols: torch.Tensor) -> torch.Tensor:
    """K[rows, cols] for K = C_out·G·C_inᵀ: gathered (m·d_out·d_in multiply-adds) or dense, whichever is cheaper."""
    d_out, d_in = g.shape
    if rows.numel() < d_out + d_in:
        return ((c_out[rows] @ g) * c_in[cols]).sum(1)
    return (c_out @ g @ c_in.t())[rows, cols]


class _SparseIdct2d(torch.autograd.Function):
    """ΔW/α = C_outᵀ·S·C_in with S = scatter(a at round(pos)); backward: ∂L/∂a = K[row, col] and the finite-difference
    location gradient on the continuous positions ``pos`` (2, n). In a's dtype, autocast off. A square layer passes
    its one DCT matrix once (``c_in=None``): ``torch.compile`` cannot trace a custom function given one tensor twice."""

    @staticmethod
    @precision.kernel
    def forward(ctx, a, pos, c_out, c_in_given):  # type: ignore[override]
        c_in = c_out if c_in_given is None else c_in_given
        d_out, d_in = c_out.shape[0], c_in.shape[0]
        rows, cols = pos.detach().round().long().unbind(0)
        if a.numel() < d_out + d_in:  # Σ_k a_k·C_out[row_k]ᵀ ⊗ C_in[col_k]
            dw = (c_out[rows].t() * a) @ c_in[cols]
        else:
            s = a.new_zeros(d_out, d_in).index_put_((rows, cols), a, accumulate=True)
            dw = c_out.t() @ s @ c_in
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
        k = _entries(g.to(c_out.dtype), c_out, c_in, torch.cat(r_sel), torch.cat(c_sel)).split(n)
        grad_a = k[0].to(a.dtype) if need_a else None
        grad_pos = None
        if need_pos:
            grad_row = (0.5 * a * (k[1] - k[2])).clamp(-1.0, 1.0)
            grad_col = (0.5 * a * (k[3] - k[4])).clamp(-1.0, 1.0)
            grad_pos = torch.stack([grad_row, grad_col])
        return grad_a, grad_pos, None, None


class LocaSchedule(Procedure):
    """LoCA's alternating coefficient / location schedule (per adapter layer, from that layer's config).

    Before optimiser step t (counted by the procedure, from 0): ``locations(t) = 0 < t < t_loc and t mod (b_a + b_l)
    >= b_a``; in a location step only ℓ requires grad, otherwise only a (so the other tensor gets no gradient and
    AdamW leaves it untouched). The locations' learning rate: the optimiser keeps one group (a param group added
    after the LR scheduler breaks the scheduler), so after each location step the procedure scales ℓ's update by
    ``location_lr / base lr`` of its group (``initial_lr`` when a scheduler set one) — exactly the step the optimiser
    would have taken with lr = ``location_lr`` × the schedule's current multiplier, for any optimiser whose step is
    proportional to lr (SGD with or without momentum, Adam, AdamW including its decoupled weight decay).
    After training a trains and ℓ stays trainable only if the search is not over. Only LoCA adapters with a
    trainable tensor when training starts take part (``config``: only those built from it).
    """

    def __init__(self, model: nn.Module | None = None, config: LocaConfig | None = None) -> None:
        self.config = config
        self.t = 0  # optimiser steps scheduled so far
        self._layers: list[Loca] | None = None
        self._ratio: dict[int, float] = {}  # id(ℓ) -> location_lr / base lr of its optimiser group
        self._before: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (ℓ, ℓ before the step, ratio)

    def _collect(self, model: nn.Module) -> list[Loca]:
        found = find_adapters(model, Loca, self.config)
        layers = [a for v in found.values() for _, a in v if a.loca_a.requires_grad or a.loca_l.requires_grad]
        if not layers:
            which = " built from this config" if self.config is not None else ""
            raise PeftkitError(f"LocaSchedule: the model has no trainable LoCA adapter{which}")
        return layers

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._layers = self._collect(model)
        self._ratio = {}
        if optimizer is None:
            return
        want = {id(a.loca_l): a.config.location_lr for a in self._layers if a.config.location_lr is not None}
        for group in optimizer.param_groups:
            base = float(group.get("initial_lr", group["lr"]))
            for p in group["params"]:
                if id(p) in want and base > 0:
                    self._ratio[id(p)] = want[id(p)] / base

    def on_step_start(self, model: nn.Module, step: int) -> None:
        if self._layers is None:
            self._layers = self._collect(model)
        self._before = []
        for a in self._layers:
            loc = a.location_phase(self.t, location_steps(a.config, self.run_steps))
            a.loca_a.requires_grad_(not loc)
            a.loca_l.requires_grad_(loc)
            ratio = self._ratio.get(id(a.loca_l), 1.0)
            if loc and ratio != 1.0:
                self._before.append((a.loca_l, a.loca_l.detach().clone(), ratio))
        self.t += 1

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        with torch.no_grad():
            for p, old, ratio in self._before:  # ℓ ← ℓ_old + ratio·(ℓ − ℓ_old)
                p.sub_(old).mul_(ratio).add_(old)
        self._before = []

    def on_train_end(self, model: nn.Module) -> None:
        for a in self._layers or []:
            a.loca_a.requires_grad_(True)
            a.loca_l.requires_grad_(self.t < location_steps(a.config, self.run_steps))

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])


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
        dev, dt = w.device, (w.dtype if w.is_floating_point() else torch.float32)
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
