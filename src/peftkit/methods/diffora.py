"""DiffoRA — Jiang, Wang, Yuan 2025, "DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential
Low-Rank Matrix Adaptation" (arXiv 2502.08905; v2: "…via Differential Module Selection").

    forward:  y = base(x) + Γ·s·dropout(x)·Aᵀ·Bᵀ,   A ∈ R^{r×d_in}, B ∈ R^{d_out×r},  s = α/r (rsLoRA: α/√r)
              search: Γ → γ = σ(θ) (= the LoRA weight of softmax([θ, 0]) over {LoRA, zero}); after it Γ ∈ {0, 1}
    init:     A ~ kaiming_uniform(a=√5), B = 0, θ = 0 (γ = ½)  ⇒  ΔW = 0
    merge:    W ← W0 + Γ·s·B·A   (the current γ while searching; nothing for a dropped module)

Every targeted module is a candidate with its own LoRA branch of rank r and its own selection logit θ (a saved
buffer, not a parameter: the task optimiser never sees it). :class:`DifforaSearch` (attached by the trainer) runs
the bi-level search as alternating first-order DARTS steps: the trainer's optimiser step trains the LoRA weights on
the training batch, then the procedure takes one Adam step on the θ's alone from the loss of a held-out batch
(``held_out=``, cycled). After ``search_steps`` optimiser steps (or at the end of training) it discretises: the
top-⌈ρ·n⌉ of the n candidate modules by γ (ties: model order) keep their LoRA weights (weight sharing, no re-init)
with Γ = 1 — plain LoRA from then on — and the others are switched off for good: their tensors are deleted (and
dropped from the optimiser) and the layer runs the base module alone. The kept module paths are recorded in the
config (``selected``), which ``save`` writes, so ``load`` rebuilds the discretised adapter.
Params: r·(d_in + d_out) per candidate while searching (+ one logit each, a buffer); Σ_selected r·(d_in + d_out) after.

UNCONFIRMED: no code exists and the paper body was not readable; this is the spec's best reading (DARTS-style).
Choices made here that the paper may do differently: σ(θ) per module (the spec allows a 2-way softmax; the two are the
same function), θ = 0 at init, one θ step after every weight step, Adam(lr=``theta_lr``, betas (0.5, 0.999),
weight decay 1e-3) for θ (the DARTS architecture optimiser), ⌈ρ·n⌉ kept over all candidates of the adapter, and no
folding of γ into the kept weights at discretisation (Γ = 1, as the spec says). Without ``held_out`` batches (e.g.
under ``peftkit train``) the θ step uses the step's own training batch (seen through ``extra_loss``) after the weight
step: alternating, but single-split — a documented fallback, not the paper's bi-level split. Under data-parallel
training (``torchrun``) the θ gradients are averaged over the processes (weighted by their batch slices) before the
θ step, so every process keeps the same θ and selects the same modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import LowRankConfig, LowRankUpdate, init_down_, new_factors
from peftkit.core.model import adapted_layers, adapter_names, get_config
from peftkit.core.procedure import Procedure, batch_size, default_loss, find_adapters, sync_gradients, world_size
from peftkit.core.registry import HOST_KINDS, QUANTIZED_HOSTS, register

THETA_BETAS = (0.5, 0.999)
THETA_WEIGHT_DECAY = 1e-3


@dataclass
class DifforaConfig(LowRankConfig):
    """DiffoRA. ``rho``: fraction of candidate modules kept; ``search_steps``: optimiser steps of relaxed search
    before discretising (None: discretise at the end of training); ``theta_lr``: learning rate of the selection
    logits; ``selected``: the kept module paths, written at discretisation (None while searching)."""

    rho: float = 0.5
    search_steps: int | None = None
    theta_lr: float = 3e-4
    selected: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if not 0.0 < self.rho <= 1.0:
            raise PeftkitError(f"{name}.rho (fraction of modules kept) must be in (0, 1], got {self.rho}")
        if self.search_steps is not None and self.search_steps < 1:
            raise PeftkitError(f"{name}.search_steps must be >= 1, got {self.search_steps}")
        if not self.theta_lr > 0:
            raise PeftkitError(f"{name}.theta_lr must be > 0, got {self.theta_lr}")

    def kept(self, n: int) -> int:
        """⌈ρ·n⌉ (at least one)."""
        return max(1, math.ceil(self.rho * n - 1e-9))


def relaxation_weights(theta: torch.Tensor) -> torch.Tensor:
    """softmax([θ, 0]) over {LoRA, zero}: (γ, 1 − γ) along the last dimension, γ = σ(θ)."""
    return torch.softmax(torch.stack([theta, torch.zeros_like(theta)], -1), -1)


# -- discretisation and the search procedure (before the adapter, which registers it) -------------------------
def discretize(model: nn.Module, name: str | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> dict[str, list[str]]:
    """Keep the top-⌈ρ·n⌉ modules of every searching DiffoRA adapter (or of adapter ``name``) by γ with Γ = 1 and
    switch the others off for good (their tensors leave the model and ``optimizer``). Everything is checked before
    anything changes. Returns adapter name -> kept module paths."""
    if name is not None:
        get_config(model, name)
    found = {n: mods for n, mods in find_adapters(model, Diffora).items()
             if (name is None or n == name) and mods[0][1].mode == "search"}
    if not found:
        which = f"adapter {name!r}" if name is not None else "the model"
        raise PeftkitError(f"discretize: {which} has no DiffoRA adapter in its search phase")
    for n in found:
        for path, layer in adapted_layers(model):
            if n in layer.merged:
                raise PeftkitError(f"discretize: DiffoRA adapter {n!r} is merged into {path!r}; unmerge first")
        cfg = get_config(model, n)
        shared = [o for o in adapter_names(model) if o != n and get_config(model, o) is cfg]
        if shared:
            raise PeftkitError(f"discretize: adapters {n!r} and {shared[0]!r} share one config object, which "
                               f"records the selection; give each adapter its own config (copy.deepcopy)")
    out = {}
    for n, mods in found.items():
        order = sorted(range(len(mods)), key=lambda i: (-float(mods[i][1].theta), i))
        keep = set(order[: get_config(model, n).kept(len(mods))])
        out[n] = apply_selection(model, n, mods, [path for i, (path, _) in enumerate(mods) if i in keep], optimizer)
    return out


def apply_selection(model: nn.Module, name: str, mods: list[tuple[str, Diffora]], selected: list[str],
                    optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Keep LoRA on the modules at ``selected`` and switch the others of adapter ``name`` off (their tensors leave the
    model and ``optimizer``); records the selection in the config. Returns ``selected`` in model order."""
    keep = set(selected)
    unknown = keep - {path for path, _ in mods}
    if unknown:
        raise PeftkitError(f"DiffoRA adapter {name!r} has no candidate module {sorted(unknown)[0]!r}")
    dropped: list[torch.Tensor] = []
    for path, a in mods:
        dropped.extend(a.switch(path in keep))
    selected = [path for path, _ in mods if path in keep]
    get_config(model, name).selected = selected
    for _, a in mods:  # per-module configs (overrides) are copies: keep their record in step
        a.config.selected = selected
    if optimizer is not None and dropped:
        gone = {id(p) for p in dropped}
        for g in optimizer.param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in gone]
        for p in dropped:
            optimizer.state.pop(p, None)
    return selected


class DifforaSearch(Procedure):
    """The alternating bi-level search and the discretisation (module docstring).

    ``held_out``: the held-out batches for the θ steps (on the model's device; cycled); without them the step's own
    training batch is used (seen through ``extra_loss``). ``loss_fn(model, batch) -> (loss, outputs)`` computes the
    held-out loss (default: the model's ``loss`` / cross-entropy). ``config`` (as the trainer passes it) limits the
    search to the adapters built from that config."""

    def __init__(self, model: nn.Module | None = None, config: DifforaConfig | None = None,
                 held_out: Iterable[Any] | None = None,
                 loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, Any]] | None = None) -> None:
        self.config = config
        self.held_out = held_out
        self.loss_fn = default_loss if loss_fn is None else loss_fn  # the trainer's task loss, the same definition
        self.optimizers: dict[str, torch.optim.Adam] = {}  # adapter name -> optimiser of its θ's
        self.train_optimizer: torch.optim.Optimizer | None = None
        self.theta_steps = 0
        self.selected: dict[str, list[str]] = {}
        self._iter: Iterator[Any] | None = None
        self._batch: Any = None
        self._pending: dict[str, Any] = {}  # θ-optimiser states from load_state_dict, applied when rebuilt

    def _searching(self, model: nn.Module) -> dict[str, list[tuple[str, Diffora]]]:
        found = find_adapters(model, Diffora, self.config)
        if not found:
            which = " built from this config" if self.config is not None else ""
            raise PeftkitError(f"DifforaSearch: the model has no DiffoRA adapter{which}")
        return {n: mods for n, mods in found.items() if mods[0][1].mode == "search"}

    def _held_out_batch(self) -> Any:
        if self.held_out is None:
            if self._batch is None:
                raise PeftkitError("DifforaSearch needs held-out batches (held_out=) or the training batches "
                                   "(through extra_loss: the peftkit trainer, or ProcedureLossMixin)")
            return self._batch
        for _ in range(2):
            if self._iter is None:
                self._iter = iter(self.held_out)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
        raise PeftkitError("DifforaSearch: the held_out batches are empty")

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.train_optimizer = optimizer
        searching = self._searching(model)
        for n, selected in self.selected.items():  # resuming after the discretisation: re-apply it
            if n in searching:
                apply_selection(model, n, searching[n], list(selected), optimizer)

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        if self.held_out is None:
            self._batch = batch
        return None

    def theta_step(self, model: nn.Module, batch: Any) -> None:
        """One Adam step on the selection logits alone, from the loss of ``batch`` (nothing else changes)."""
        found = self._searching(model)
        thetas = {n: [a.theta for _, a in mods] for n, mods in found.items()}
        flat = [t for ts in thetas.values() for t in ts]
        if not flat:
            return
        # only the θ's require grad during this pass: the backward follows their path alone (no weight gradients)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        for t in flat:
            t.requires_grad_(True)
        try:
            with torch.enable_grad():
                loss, _ = self.loss_fn(model, batch)
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
        finally:
            for t in flat:
                t.requires_grad_(False)
            for p in trainable:
                p.requires_grad_(True)
        for t, g in zip(flat, grads):
            t.grad = torch.zeros_like(t) if g is None else g.detach()
        if world_size() > 1:  # data-parallel (torchrun): every process takes the same θ step, from the global batch
            sync_gradients(flat, batch_size(batch))
        for n, ts in thetas.items():
            opt = self.optimizers.get(n)
            if opt is None or opt.param_groups[0]["params"][0] is not ts[0]:
                opt = torch.optim.Adam(ts, lr=get_config(model, n).theta_lr, betas=THETA_BETAS,
                                       weight_decay=THETA_WEIGHT_DECAY)
                if n in self._pending:
                    opt.load_state_dict(self._pending.pop(n))
                self.optimizers[n] = opt
            opt.step()
        for t in flat:
            t.grad = None
        self.theta_steps += 1

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        found = self._searching(model)
        if not found:
            return
        self.theta_step(model, self._held_out_batch())
        opt = optimizer if optimizer is not None else self.train_optimizer
        for n in found:
            limit = get_config(model, n).search_steps
            if limit is not None and step + 1 >= limit:
                self.selected.update(discretize(model, n, opt))

    def on_train_end(self, model: nn.Module) -> None:
        for n in self._searching(model):
            self.selected.update(discretize(model, n, self.train_optimizer))
        self._batch = None

    def state_dict(self) -> dict[str, Any]:
        return {"theta_steps": self.theta_steps, "selected": dict(self.selected),
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta_steps = state["theta_steps"]
        self.selected = dict(state["selected"])
        self._pending = dict(state.get("optimizers", {}))
        self.optimizers = {}


@register(
    "diffora",
    config=DifforaConfig,
    family="procedure",
    paper="Jiang, Wang, Yuan 2025, DiffoRA: Differential Low-Rank Matrix Adaptation / Module Selection "
          "(arXiv 2502.08905) — unconfirmed reading",
    description="LoRA on every candidate module gated by σ(θ); θ learned on held-out batches (alternating "
                "DARTS), then the top ρ fraction of modules keep LoRA and the rest are switched off",
    params="r·(d_in + d_out) per candidate; Σ_selected r·(d_in + d_out) after discretisation",
    hosts=HOST_KINDS + QUANTIZED_HOSTS,
    procedure=DifforaSearch,
)
class Diffora(LowRankUpdate, Adapter):
    def __init__(self, host: Host, config: DifforaConfig) -> None:
        super().__init__(host, config)
        if host.kind == "embedding" and config.dropout > 0:
            raise PeftkitError(f"module {host.name!r}: dropout cannot apply to an Embedding's token ids")
        self.s = config.scaling
        self.dropout = make_dropout(config.dropout)
        if config.selected is None:
            self.mode = "search"
        else:
            self.mode = "on" if host.name in config.selected else "off"
        if self.mode != "off":
            self.lora_A, self.lora_B = new_factors(host, config.r)
            init_down_(self.lora_A, "kaiming", config.r)
        if self.mode == "search":
            self.register_buffer("theta", torch.zeros((), device=self.lora_A.device, dtype=torch.float32))
        self._merged_gate: torch.Tensor | None = None

    def gate(self) -> torch.Tensor | float:
        """Γ: σ(θ) while searching, then 1 (kept) or 0 (dropped)."""
        if self.mode == "search":
            return torch.sigmoid(self.theta)
        return 1.0 if self.mode == "on" else 0.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, Γ·B)."""
        if self.mode == "search":
            return self.lora_A, self.lora_B * self.gate().to(self.lora_B.dtype)
        return self.lora_A, self.lora_B

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return torch.zeros_like(base_out)
        return super().delta(x, base_out)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.mode == "off":
            return self.host.module(x)  # a dropped module costs nothing: the base layer alone
        return super().fused_forward(x)

    def delta_weight(self, gate: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "off":
            w = self.host.weight
            return torch.zeros(self.host.d_out, self.host.d_in, device=w.device,
                               dtype=w.dtype if w.is_floating_point() else torch.float32)
        if self.mode == "on":
            return self.s * (self.lora_B @ self.lora_A)
        g = torch.sigmoid(self.theta) if gate is None else gate
        return self.s * ((self.lora_B * g.to(self.lora_B.dtype)) @ self.lora_A)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mode == "search":  # remember γ: unmerge subtracts the same ΔW even if θ moved in between
            self._merged_gate = torch.sigmoid(self.theta).detach().clone()
        return weight + self.delta_weight(self._merged_gate).to(weight.dtype), bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        gate, self._merged_gate = self._merged_gate, None
        return weight - self.delta_weight(gate).to(weight.dtype), bias

    @torch.no_grad()
    def switch(self, keep: bool) -> list[nn.Parameter]:
        """End the search for this module: Γ = 1 (``keep``) or off for good. Returns the deleted parameters."""
        if self.mode != "search":
            raise PeftkitError(f"module {self.host.name!r}: this DiffoRA adapter is already discretised")
        del self.theta
        if keep:
            self.mode = "on"
            return []
        removed = [self.lora_A, self.lora_B]
        del self.lora_A, self.lora_B
        self.mode = "off"
        return removed

    @classmethod
    def expected_params(cls, host: Host, config: DifforaConfig) -> int:
        if config.selected is not None and host.name not in config.selected:
            return 0
        return config.r * (host.d_in + host.d_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.config.r}, mode={self.mode}"
