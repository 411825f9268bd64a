"""PETALface — Narayan et al. 2025, "PETALface: Parameter Efficient Transfer Learning for Low-resolution Face
Recognition" (WACV 2025, arXiv 2412.07771): two LoRA branches mixed per sample by an image-quality gate α.

    forward:  y = W·x + b + s·[(1 − α)·drop(U_lq·D_lq·x) + α·drop(U_hq·D_hq·x)],   α ∈ [0, 1] per sample
    init:     D_lq, D_hq ~ N(0, (1/r)²) (std 1/r), U_lq = U_hq = 0 ⇒ y = W·x + b at init;  s a plain multiplier (1)
    merge:    only at a fixed gate α₀ (``default_gate``): W ← W + s·[(1 − α₀)·U_lq·D_lq + α₀·U_hq·D_hq]

Trainable: D_lq, U_lq, D_hq, U_hq — 2·r·(d_in + d_out) per layer. The official ``LoRALinearTwo`` computes
``U1(D1((1−α)x)) + U2(D2(α x))``; both branches are linear, so scaling the branch outputs is the same function, and
the output is affine in α: y(α) = (1 − α)·y(0) + α·y(1). Dropout acts on each branch's output, as in the official
code. LoRA2 is the "HQ" branch: high-quality images (α → 1) use it, low-quality ones (α → 0) use LoRA1 ("LQ").

The gate of each sample is given with ``with peftkit.condition(model, alphas): model(x)`` (one float in [0, 1] per
sample; values outside are refused before anything runs). Outside such a block every sample uses ``default_gate``
(None: the forward refuses to run). This is what ``peftkit train`` does — the command line cannot compute an image
quality, so it trains and evaluates at the fixed gate ``default_gate`` (0.5, change it with ``--opt default_gate=…``).

Quality gate (the paper's training procedure): :class:`QualityGate` computes α for every forward of the model from
its inputs with a user function — a frozen image-quality metric q (the paper: CNNIQA or BRISQUE through pyiqa),
oriented so that larger means better and normalised — as α = 0.5 + (q − T) for a threshold T, and runs the forward
under ``peftkit.condition(model, α)``. Pass it to ``peftkit.train.train(..., procedures=[QualityGate(score_fn)])`` (it
attaches at the start of training and detaches at the end) or attach it yourself for evaluation
(``with QualityGate(score_fn).attach(model): ...``). The official code does not clip α; here α must lie in [0, 1]
(``clip=True`` clamps it instead of refusing). Unconfirmed: BRISQUE's orientation in the official code (lower is
better, not inverted there) — the gate expects larger = better.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import fused_lowrank_forward, init_down_, lowrank_delta, new_factors
from peftkit.core.model import condition as run_under
from peftkit.core.procedure import Procedure
from peftkit.core.registry import HOST_KINDS, register


@dataclass
class PetalfaceConfig(AdapterConfig):
    """``r``: rank of each branch; ``scale``: the plain multiplier s; ``default_gate``: α used outside a
    ``peftkit.condition`` block (None: a gate per sample is required); ``dropout`` acts on each branch's output."""

    r: int = 8
    scale: float = 1.0
    default_gate: float | None = 0.5
    dropout: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise PeftkitError(f"PetalfaceConfig.r (rank) must be a positive integer, got {self.r}")
        if not math.isfinite(self.scale):
            raise PeftkitError(f"PetalfaceConfig.scale must be finite, got {self.scale}")
        if self.default_gate is not None and not 0.0 <= self.default_gate <= 1.0:
            raise PeftkitError(f"PetalfaceConfig.default_gate must be in [0, 1] (or None), got {self.default_gate}")


@register(
    "petalface",
    config=PetalfaceConfig,
    family="hybrid",
    paper="Narayan et al. 2025, PETALface (WACV 2025, arXiv 2412.07771)",
    description="two LoRA branches (low-/high-quality) mixed per sample by a quality gate α ∈ [0, 1] "
                "(peftkit.condition, or the QualityGate procedure from an image-quality score)",
    params="2·r·(d_in + d_out)",
    hosts=HOST_KINDS,
)
class Petalface(Adapter):
    uses_condition = True

    def __init__(self, host: Host, config: PetalfaceConfig) -> None:
        super().__init__(host, config)
        self.s, self.gate = config.scale, config.default_gate
        self.lora_A_lq, self.lora_B_lq = new_factors(host, config.r)
        self.lora_A_hq, self.lora_B_hq = new_factors(host, config.r)
        init_down_(self.lora_A_lq, "gaussian", config.r)
        init_down_(self.lora_A_hq, "gaussian", config.r)
        self.dropout = make_dropout(config.dropout)

    def check_condition(self, ids: torch.Tensor) -> None:
        if ids.dim() != 1 or ids.dtype == torch.bool:
            raise PeftkitError(
                f"petalface gates must be one number in [0, 1] per sample (a 1-D sequence), got {ids.dtype} of shape "
                f"{tuple(ids.shape)}"
            )
        g = ids.detach().double()
        bad = ~((g >= 0) & (g <= 1))  # NaN is out of range too
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise PeftkitError(
                f"petalface gates must lie in [0, 1]; sample(s) {rows[:8]} have {g[bad][:8].tolist()}"
            )

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s·drop(U_lq·D_lq·x) and s·drop(U_hq·D_hq·x)."""
        h = self.host
        lq = self.dropout(lowrank_delta(h, x, self.lora_A_lq, self.lora_B_lq, self.s))
        hq = self.dropout(lowrank_delta(h, x, self.lora_A_hq, self.lora_B_hq, self.s))
        return lq, hq

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is None:
            if self.gate is None:
                raise PeftkitError(
                    f"petalface on {self.host.name!r} needs a gate per sample (default_gate is None): run the "
                    f"forward inside `with peftkit.condition(model, gates):`"
                )
            g = self.gate
            h = self.host  # a fixed gate of 0 or 1 runs one branch only
            if g == 0.0:
                return self.dropout(lowrank_delta(h, x, self.lora_A_lq, self.lora_B_lq, self.s))
            if g == 1.0:
                return self.dropout(lowrank_delta(h, x, self.lora_A_hq, self.lora_B_hq, self.s))
            lq, hq = self._branches(x)
            return lq + g * (hq - lq)
        lq, hq = self._branches(x)
        g = condition.to(lq.dtype).view(-1, *([1] * (lq.dim() - 1)))
        return lq + g * (hq - lq)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """At the fixed gate g (no per-sample gates: the core calls this only outside a ``condition`` block) the
        update is one rank-2r LoRA, A = [D_lq; D_hq], B = [(1 − g)·U_lq, g·U_hq] (one branch at g = 0 or 1), run by
        the fused low-rank kernel — the input is read and kept once instead of once per branch. Not with active
        dropout (it acts on each branch's output)."""
        g = self.gate
        if g is None or (self.training and self.config.dropout > 0):
            return None
        if g == 0.0 or g == 1.0:
            a, b = (self.lora_A_lq, self.lora_B_lq) if g == 0.0 else (self.lora_A_hq, self.lora_B_hq)
        else:
            a = torch.cat([self.lora_A_lq, self.lora_A_hq])
            b = torch.cat([self.lora_B_lq * (1.0 - g), self.lora_B_hq * g], 1)
        return fused_lowrank_forward(self.host, x, a, b, self.s)

    def delta_weight(self) -> torch.Tensor:
        if self.gate is None:
            raise PeftkitError(
                f"petalface on {self.host.name!r}: merging needs a fixed gate and default_gate is None"
            )
        g = self.gate
        return self.s * ((1 - g) * (self.lora_B_lq @ self.lora_A_lq) + g * (self.lora_B_hq @ self.lora_A_hq))

    @classmethod
    def expected_params(cls, host: Host, config: PetalfaceConfig) -> int:
        return 2 * config.r * (host.d_in + host.d_out)


def quality_gate(q: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The paper's gate from quality scores ``q`` (larger = better): α = 0.5 + (q − T)."""
    return 0.5 + (q - threshold)


class QualityGate(Procedure):
    """Runs every forward of the model under per-sample gates α = 0.5 + (q − T), ``q = score_fn(*args, **kwargs)``
    computed (without gradient) from that forward's own arguments — one score per sample, larger = better quality.

    As a training procedure it attaches at ``on_train_start`` and detaches at ``on_train_end``; ``attach(model)``
    does the same by hand and returns the gate, a context manager that detaches on exit. Gates outside [0, 1] are
    refused (the forward does not run) unless ``clip=True`` clamps them."""

    def __init__(self, score_fn: Callable[..., Any], threshold: float = 0.5, clip: bool = False) -> None:
        self.score_fn, self.threshold, self.clip = score_fn, float(threshold), clip
        self._handles: list[Any] = []
        self._open: list[contextlib.AbstractContextManager[Any] | None] = []
        self._from_training = False

    def gates(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """α for a forward called with these arguments."""
        with torch.no_grad():
            q = torch.as_tensor(self.score_fn(*args, **kwargs))
        if not q.is_floating_point():
            q = q.float()
        g = quality_gate(q.flatten() if q.dim() == 2 and q.shape[1] == 1 else q, self.threshold)
        return g.clamp(0.0, 1.0) if self.clip else g

    def attach(self, model: nn.Module) -> QualityGate:
        if self._handles:
            raise PeftkitError("QualityGate is already attached to a model; detach() it first")

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._open.append(None)  # popped by the post-hook even if this one raises
            ctx = run_under(module, self.gates(*args, **kwargs))
            ctx.__enter__()
            self._open[-1] = ctx

        def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            ctx = self._open.pop() if self._open else None
            if ctx is not None:
                ctx.__exit__(None, None, None)

        self._handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                         model.register_forward_hook(post, with_kwargs=True, always_call=True)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> QualityGate:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        if not self._handles:
            self.attach(model)
            self._from_training = True

    def on_train_end(self, model: nn.Module) -> None:
        if self._from_training:
            self.detach()
            self._from_training = False
