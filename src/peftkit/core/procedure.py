"""The training-procedure protocol (DESIGN principle 4): small objects the trainer calls around each step.

A procedure never changes what an adapter computes; it schedules (rank sampling, rank growth, location
search), adds a loss term, or post-processes after the optimiser step. ``state_dict``/``load_state_dict`` let a
checkpoint resume it. :func:`peftkit.train.hf.as_trainer_callback` wraps one for ``transformers.Trainer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .model import adapted_layers, get_config


class Procedure:
    """Base class; every hook is optional.

    Two things a run tells its procedures, both optional: ``run_steps`` — the run's length in optimiser steps, set by
    the trainer (:func:`peftkit.train.train`, the ``transformers.Trainer`` bridge) before ``on_train_start``, so a
    schedule can be a share of the run (None: unknown, e.g. a procedure driven by hand); and held-out data — a
    procedure that steps parameters of its own on examples the weights must not see (DiffoRA's selection logits) sets
    ``held_out_share`` > 0, and a task that honours it trains on the rest and hands the held-out batches to
    :meth:`set_held_out`."""

    run_steps: int | None = None
    held_out_share: float = 0.0

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called once before the first step."""

    def on_step_start(self, model: nn.Module, step: int) -> None:
        """Called before the forward pass of optimiser step ``step`` (0-based)."""

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        """An extra loss term added to the task loss of this step, or None."""
        return None

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called after the optimiser step."""

    def on_train_end(self, model: nn.Module) -> None:
        """Called once after the last step."""

    def set_held_out(self, batches: Iterable[Any]) -> None:
        """Receive the held-out batches asked for with ``held_out_share`` (called before ``on_train_start``)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def find_adapters(model: nn.Module, adapter_cls: type, config: Any = None) -> dict[str, list[tuple[str, Any]]]:
    """Adapter name -> [(module path, adapter)], in model order, of every ``adapter_cls`` adapter of ``model``; with
    ``config``, only those of the adapters built from it (that very object, else an equal one). How a method's
    procedure finds the layers it drives."""
    found: dict[str, list[tuple[str, Any]]] = {}
    for path, layer in adapted_layers(model):
        for n, a in layer.adapters.items():
            if isinstance(a, adapter_cls):
                found.setdefault(n, []).append((path, a))
    if config is not None:
        mine = {n for n in found if get_config(model, n) is config} or {
            n for n in found if get_config(model, n) == config}
        found = {n: v for n, v in found.items() if n in mine}
    return found
