"""The training-procedure protocol (DESIGN principle 4): small objects the trainer calls around each step.

A procedure never changes what an adapter computes; it schedules (rank sampling, rank growth, location
search), adds a loss term, or post-processes after the optimiser step. ``state_dict``/``load_state_dict`` let a
checkpoint resume it. :func:`peftkit.train.hf.as_trainer_callback` wraps one for ``transformers.Trainer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Procedure:
    """Base class; every hook is optional."""

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

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
