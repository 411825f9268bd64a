"""LAE — Gao et al., ICCV 2023, "A Unified Continual Learning Framework with General Parameter-Efficient Tuning"
(arXiv 2303.10070; github.com/gqk/LAE, ``main.py``).

* Learning: the online PET (any registered adapter, with the task head in ``modules_to_save``) is trained with CE
  over the *new* classes only (``logits[:, task classes]``, targets shifted into that slice).
* Adaptation-speed calibration: for every task after the first the PET is frozen for the first part of the task's
  run while the new head rows train alone (official: ``num_freeze_epochs=3`` of ``num_epochs=5``, so 60 % of the
  run; here ``freeze`` = 0.6 of each later task's steps by default, or an integer number of steps). The paper's other
  two calibrations belong to the PET module, not to this procedure: a learnable scalar on the PET output (official
  ``Scaler(None)``, init 1) — peftkit's parallel ``bottleneck`` adapter with ``scaling="learned"`` is the official
  adapter PET with it — and prefix compensation (dividing the prefix columns of the attention probabilities by their
  sum), which needs the attention probabilities and is not implemented.
* Accumulation: the offline PET is created when task 1 starts, as a copy of the PET trained on task 0 (official
  ``setup_model``: ``ModelEmaV2(self.pets)`` once a task has been learnt), then after every step
  θ_off ← d·θ_off + (1−d)·θ_on (:class:`~peftkit.continual.ema.EMA`, d = 0.9999); the head is shared (the offline
  head copy mirrors the online one).
* Ensemble: p = max(softmax(f_on(x)), softmax(f_off(x))) elementwise, prediction argmax p
  (:func:`~peftkit.continual.ema.max_prob_ensemble`); during task 0 there is no offline PET and f_on alone predicts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PeftkitError
from ..core.model import adapter_names, mixed_batch, set_active
from ..core.procedure import Procedure
from .base import ContinualMethod, _batch_len, _inputs_labels, forward_logits
from .ema import EMA, _named_adapter_params, max_prob_ensemble

FREEZE = 0.6  # official num_freeze_epochs / num_epochs = 3 / 5


class LAE(ContinualMethod):
    """Online PET trained on the new classes, offline PET (from task 1 on) EMA'd from it, max-probability ensemble.

    ``freeze``: how much of each later task's run trains the head alone — a fraction in [0, 1) of its steps
    (default 0.6, the official 3 of 5 epochs) or a whole number of steps (``freeze_steps``, kept for old callers,
    overrides it)."""

    name = "lae"

    def __init__(self, decay: float = 0.9999, freeze: float = FREEZE, seed: int = 0, *,
                 freeze_steps: int | None = None) -> None:
        super().__init__(0, seed=seed)
        if isinstance(freeze, bool) or not isinstance(freeze, int | float) or not 0.0 <= freeze < 1.0:
            raise PeftkitError(f"LAE freeze is the share of a later task's steps that trains the head alone, in "
                               f"[0, 1); got {freeze!r}")
        if freeze_steps is not None and (isinstance(freeze_steps, bool) or not isinstance(freeze_steps, int)
                                         or freeze_steps < 0):
            raise PeftkitError(f"LAE freeze_steps must be a whole number >= 0, got {freeze_steps!r}")
        self.ema = EMA("online", "offline", decay)
        self.freeze, self.freeze_steps = float(freeze), freeze_steps
        self._frozen_for = 0

    def begin_task(self, k: int) -> None:
        super().begin_task(k)
        if k == 0:
            self._new_adapter("online")
        elif "offline" not in adapter_names(self.model):  # task 1: the PET learnt on task 0 starts the offline one
            self._new_adapter("offline", activate=False)
            self.ema.copy(self.model)
        set_active(self.model, "online")

    def has_offline(self) -> bool:
        return "offline" in adapter_names(self.model)

    def procedures(self) -> list[Procedure]:
        return [self, self.ema] if self.has_offline() else [self]

    def frozen_steps(self, steps: int) -> int:
        """Steps at the start of task ``self.task`` (> 0) during which the PET is frozen."""
        if self.task <= 0:
            return 0
        return self.freeze_steps if self.freeze_steps is not None else int(self.freeze * steps)

    def train_task(self, k: int, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = False,
                   weight_decay: float = 0.01) -> Any:
        self._frozen_for = self.frozen_steps(steps)
        return super().train_task(k, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                                  weight_decay=weight_decay)

    def _online_pet(self) -> list[nn.Parameter]:
        return [p for k, (p, saved) in _named_adapter_params(self.model, "online").items() if not saved]

    def on_step_start(self, model: nn.Module, step: int) -> None:
        if self._frozen_for:  # the PET waits while the new head rows catch up
            for p in self._online_pet():
                p.requires_grad_(step >= self._frozen_for)

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
        if not self.has_offline():
            return max_prob_ensemble(on, mask=allowed)
        with mixed_batch(model, ["offline"] * n):
            off = forward_logits(model, inputs)
        return max_prob_ensemble(on, off, mask=allowed)
