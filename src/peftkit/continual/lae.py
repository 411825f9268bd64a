"""LAE — Gao et al., ICCV 2023, "A Unified Continual Learning Framework with General Parameter-Efficient Tuning"
(arXiv 2303.10070; github.com/gqk/LAE)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.model import mixed_batch, set_active
from ..core.procedure import Procedure
from .base import ContinualMethod, _batch_len, _inputs_labels, forward_logits
from .ema import EMA, _named_adapter_params, max_prob_ensemble


class LAE(ContinualMethod):
    """Online PET trained on the new classes, offline PET EMA'd from it, max-probability ensemble at inference."""

    name = "lae"

    def __init__(self, decay: float = 0.9999, freeze_steps: int = 0, seed: int = 0) -> None:
        super().__init__(0, seed=seed)
        self.ema = EMA("online", "offline", decay)
        self.freeze_steps = freeze_steps

    def begin_task(self, k: int) -> None:
        super().begin_task(k)
        if k == 0:
            self._new_adapter("online")
            self._new_adapter("offline", activate=False)
            self.ema.copy(self.model)
        set_active(self.model, "online")

    def procedures(self) -> list[Procedure]:
        return [self, self.ema]

    def _online_pet(self) -> list[nn.Parameter]:
        return [p for k, (p, saved) in _named_adapter_params(self.model, "online").items() if not saved]

    def on_step_start(self, model: nn.Module, step: int) -> None:
        if self.task > 0 and self.freeze_steps:  # the PET waits while the new head rows catch up
            for p in self._online_pet():
                p.requires_grad_(step >= self.freeze_steps)

    def on_train_end(self, model: nn.Module) -> None:
        for p in self._online_pet():
            p.requires_grad_(True)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        """CE over the current task's classes only (targets shifted into that slice)."""
        inputs, labels = _inputs_labels(batch)
        logits = forward_logits(model, inputs)
        classes = torch.tensor(self.tasks[self.task].classes, device=logits.device)
        local = (labels[:, None] == classes[None, :]).float().argmax(-1)
        return F.cross_entropy(logits.index_select(1, classes), local), logits

    def scores(self, model: nn.Module, inputs: Any, allowed: torch.Tensor) -> torch.Tensor:
        n = _batch_len(inputs)
        with mixed_batch(model, ["online"] * n):
            on = forward_logits(model, inputs)
        with mixed_batch(model, ["offline"] * n):
            off = forward_logits(model, inputs)
        return max_prob_ensemble(on, off, mask=allowed)
