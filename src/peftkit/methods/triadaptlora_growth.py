"""TriAdaptLoRA's rank growth (:mod:`peftkit.methods.triadaptlora` is the method): :class:`TriAdaptGrowth` grows the
ranks of the modules whose normalised importance passes the budget schedule's threshold, in Δr blocks, after
optimiser steps, and adds the orthogonality loss. It depends on the core's procedure protocol alone."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.core.errors import PeftkitError
from peftkit.core.model import adapter_names, get_config
from peftkit.core.procedure import Procedure, find_adapters

if TYPE_CHECKING:
    from peftkit.methods.triadaptlora import TriAdaptLora, TriAdaptLoraConfig


def _adapter() -> type:
    """The adapter class (imported on use: the method module imports this one to register its procedure)."""
    from peftkit.methods.triadaptlora import TriAdaptLora

    return TriAdaptLora


def budget_fraction(t: int, warmup: int, total: int) -> float:
    """φ = (t − t_warm) / (T − t_warm)."""
    return (t - warmup) / (total - warmup)


def growth_count(schedule: str, remaining: int, phi: float) -> int:
    """k: how many of the top-scored modules set the threshold (before capping at the number of modules)."""
    if schedule == "linear":
        k = math.floor(remaining * phi)
    else:
        k = math.floor(math.exp(phi * math.log(remaining)))
    return max(1, k)


def _modules(model: nn.Module, config: TriAdaptLoraConfig | None) -> dict[str, list[tuple[str, TriAdaptLora]]]:
    found = find_adapters(model, _adapter(), config)
    if not found:
        which = " built from this config" if config is not None else ""
        raise PeftkitError(f"TriAdaptGrowth: the model has no TriAdaptLoRA adapter{which}")
    return found


def _group_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, Any]:
    """The optimiser param group that holds ``p`` (the first group if none does)."""
    for g in optimizer.param_groups:
        if any(q is p for q in g["params"]):
            return g
    return optimizer.param_groups[0]


def _grow_modules(cfg: TriAdaptLoraConfig, mods: list[tuple[str, TriAdaptLora]], paths: list[str],
                  optimizer: torch.optim.Optimizer) -> None:
    """Grow the modules at ``paths`` by one Δr block each, train the new tensors in their module's optimiser group and
    record the new block ranks in the config."""
    ranks = dict(cfg.block_ranks)
    by_path = dict(mods)
    for path in paths:
        a = by_path[path]
        _group_of(optimizer, a.lora_A[0])["params"].extend(a.grow(a.config.delta_rank))
        ranks[path] = a.blocks
    cfg.block_ranks = ranks
    for _, a in mods:  # per-module configs (overrides) are copies: keep their record in step
        a.config.block_ranks = ranks


class TriAdaptGrowth(Procedure):
    """Grows TriAdaptLoRA ranks after optimiser steps (module docstring) and adds the orthogonality loss.

    ``config`` (as the trainer passes it) limits it to the adapters built from that config; ``total_steps`` overrides
    the config's T; with neither, T is the run's length (``run_steps``, set by the trainer). ``events`` lists every
    growth: ``{"step", "k", "threshold", "grown", "total_rank"}``."""

    def __init__(self, model: nn.Module | None = None, config: TriAdaptLoraConfig | None = None,
                 total_steps: int | None = None) -> None:
        self.config = config
        self.total_steps = total_steps
        self.optimizer: torch.optim.Optimizer | None = None
        self.prev_norm: dict[str, float] = {}  # "adapter:path" -> n at the previous evaluation
        self.events: list[dict[str, Any]] = []
        self._replay: list[dict[str, Any]] = []  # growth events to re-apply after load_state_dict

    def _total(self, cfg: TriAdaptLoraConfig, name: str) -> int:
        total = self.total_steps or cfg.total_steps or self.run_steps
        if total is None:
            raise PeftkitError(f"TriAdaptGrowth: adapter {name!r} needs TriAdaptLoraConfig.total_steps (T of the "
                               f"rank-growth schedule, e.g. the number of training steps: --opt total_steps=N), or "
                               f"a trainer that tells the procedure the run's length")
        if total <= cfg.warmup_steps:
            raise PeftkitError(f"TriAdaptGrowth: total_steps = {total} must be > warmup_steps = {cfg.warmup_steps}")
        return total

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        loss = None
        for name, mods in _modules(model, self.config).items():
            lam = get_config(model, name).orth_reg
            if lam > 0:
                term = lam * torch.stack([a.orth_penalty() for _, a in mods]).sum() / (2 * len(mods))
                loss = term if loss is None else loss + term
        return loss

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        opt = optimizer if optimizer is not None else self.optimizer
        for name, mods in _modules(model, self.config).items():
            self.grow(model, name, mods, step + 1, opt)

    def scores(self, name: str, mods: list[tuple[str, TriAdaptLora]]) -> list[float]:
        """Every module's n_t − n_prev (and remember n_t)."""
        out = []
        for path, a in mods:
            n = a.importance()
            key = f"{name}:{path}"
            out.append(n - self.prev_norm.get(key, 0.0))
            self.prev_norm[key] = n
        return out

    def grow(self, model: nn.Module, name: str, mods: list[tuple[str, TriAdaptLora]], t: int,
             optimizer: torch.optim.Optimizer | None) -> list[str]:
        """One growth event for adapter ``name`` after step ``t`` (1-based); returns the grown module paths."""
        cfg = get_config(model, name)
        total = self._total(cfg, name)
        if t <= cfg.warmup_steps or t % cfg.interval:
            return []
        r_total = sum(a.rank for _, a in mods)
        r_target = cfg.target_total_rank or sum(a.config.r for _, a in mods)
        if r_total >= r_target:
            return []
        if optimizer is None:
            raise PeftkitError("TriAdaptGrowth: rank growth needs the optimiser (to train the new tensors); "
                               "pass it to on_train_start / on_step_end")
        shared = [n for n in adapter_names(model) if n != name and get_config(model, n) is cfg]
        if shared:
            raise PeftkitError(f"TriAdaptGrowth: adapters {name!r} and {shared[0]!r} share one config object, which "
                               f"records the grown ranks; give each adapter its own config (copy.deepcopy)")
        scores = self.scores(name, mods)
        k = min(growth_count(cfg.schedule, r_target - r_total, budget_fraction(t, cfg.warmup_steps, total)),
                len(mods))
        threshold = sorted(scores, reverse=True)[k - 1]
        grown = [path for (path, _), score in zip(mods, scores) if score >= threshold]
        _grow_modules(cfg, mods, grown, optimizer)
        self.events.append({"adapter": name, "step": t, "k": k, "threshold": threshold, "grown": grown,
                            "total_rank": sum(a.rank for _, a in mods)})
        return grown

    def state_dict(self) -> dict[str, Any]:
        return {"prev_norm": dict(self.prev_norm), "events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule's memory; the growth events are replayed on the freshly built adapter at the next
        ``on_train_start`` (resuming a checkpoint), so its shapes and the optimiser's parameters match again."""
        self.prev_norm = dict(state["prev_norm"])
        self.events = list(state["events"])
        self._replay = list(self.events)

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.optimizer = optimizer
        found = _modules(model, self.config)
        for name in found:
            self._total(get_config(model, name), name)
        replay, self._replay = getattr(self, "_replay", []), []
        for event in replay:
            name = event.get("adapter", next(iter(found)))
            if name not in found:
                raise PeftkitError(f"TriAdaptGrowth: the saved growth of adapter {name!r} cannot be replayed: the "
                                   f"model has no such TriAdaptLoRA adapter")
            if optimizer is None:
                raise PeftkitError("TriAdaptGrowth: replaying saved rank growth needs the optimiser")
            _grow_modules(get_config(model, name), found[name], event["grown"], optimizer)
