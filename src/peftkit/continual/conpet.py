"""ConPET — Song et al. 2023, "ConPET: Continual Parameter-Efficient Tuning for Large Language Models"
(arXiv 2309.14763; github.com/Raincleared-Song/ConPET).

* :class:`StaticConPET` — one PET module + a linear head over all classes seen so far, trained with dynamic replay
  (:func:`~peftkit.continual.replay.replay_batches`) from a task-balanced memory.
* :class:`DynamicConPET` — one PET module + head per task (the head's task-``k`` columns are task ``k``'s classes;
  old modules frozen) and a PET module selector (its own PET + head; its first T outputs are task logits) trained
  with cross-entropy on task ids over replay batches. Inference: the selector's top-k tasks run (one mixed-batch
  forward per rank, :func:`peftkit.mixed_batch`), their class logits are written into a full-label vector filled
  with ``NEG``; predict argmax. Training task k uses teacher forcing (the true task replaces the last pick when
  missing) and NLL over log_softmax of the assembled logits; only module k gets gradients. Old modules' logits are
  recomputed (frozen, so equal to the reference's per-sample cache). The schedule "selector first, then the expert"
  (``train_expert_selector=2``) is unconfirmed; it is what is done here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PeftkitError
from ..core.model import mixed_batch, set_active
from .base import NEG, ContinualMethod, Sequential, _batch_len, _inputs_labels, forward_logits


class StaticConPET(Sequential):
    """One PET module + head over all seen classes, trained with dynamic replay from a task-balanced memory."""

    name = "conpet-static"

    def __init__(self, memory_size: int = 200, ratio: float = 1.0, seed: int = 0) -> None:
        ContinualMethod.__init__(self, memory_size, ratio, seed)


class DynamicConPET(ContinualMethod):
    """A PET module + head per task, a PET module selector over task ids, top-k routing at inference."""

    name = "conpet-dynamic"

    def __init__(self, memory_size: int = 200, ratio: float = 1.0, topk: int = 1, selector_steps: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(memory_size, ratio, seed)
        if topk < 1:
            raise PeftkitError(f"topk must be >= 1, got {topk}")
        self.topk, self.selector_steps = topk, selector_steps
        self._training_selector = False

    @staticmethod
    def expert(k: int) -> str:
        return f"task{k}"

    def _owner(self, device: torch.device) -> torch.Tensor:
        """class id -> task index."""
        owner = torch.full((self.num_classes,), -1, dtype=torch.long)
        for i, t in enumerate(self.tasks):
            owner[list(t.classes)] = i
        return owner.to(device)

    def begin_task(self, k: int) -> None:
        super().begin_task(k)
        if k == 0:
            self._new_adapter("selector", activate=False)
        self._new_adapter(self.expert(k), activate=False)

    def select(self, model: nn.Module, inputs: Any, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k') indices of the selected tasks among those seen (k' = min(topk, seen)); with ``labels`` the
        true task is forced in (it replaces the last pick when missing)."""
        n = self.task + 1
        batch = next(v for v in (inputs.values() if isinstance(inputs, Mapping) else [inputs]))
        with torch.no_grad(), mixed_batch(model, ["selector"] * batch.shape[0]):
            task_logits = forward_logits(model, inputs)[:, :n]
        picks = task_logits.topk(min(self.topk, n), dim=-1).indices
        if labels is not None:
            true = self._owner(labels.device)[labels]
            missing = ~(picks == true[:, None]).any(-1)
            picks[missing, -1] = true[missing]
        return picks

    def assemble(self, model: nn.Module, inputs: Any, picks: torch.Tensor) -> torch.Tensor:
        """Full-label logits: the class logits of each sample's selected task modules, ``NEG`` elsewhere."""
        owner = self._owner(picks.device)
        full: torch.Tensor | None = None
        for j in range(picks.shape[1]):
            with mixed_batch(model, [self.expert(int(t)) for t in picks[:, j]]):
                out = forward_logits(model, inputs)
            full = torch.full_like(out, NEG) if full is None else full
            full = torch.where(owner[None, :] == picks[:, j:j + 1], out, full)
        if full is None:
            raise PeftkitError("DynamicConPET: top-k selection picked no expert (topk must be >= 1)")
        return full

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        inputs, labels = _inputs_labels(batch)
        if self._training_selector:
            logits = forward_logits(model, inputs)[:, : self.task + 1]
            return F.cross_entropy(logits, self._owner(labels.device)[labels]), logits
        full = self.assemble(model, inputs, self.select(model, inputs, labels))
        return F.nll_loss(full.log_softmax(-1), labels), full

    def train_task(self, k: int, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = False,
                   weight_decay: float = 0.01) -> Any:
        if k > 0:  # with one task the selector has nothing to choose
            set_active(self.model, "selector")
            self._training_selector = True
            try:
                super().train_task(k, steps=self.selector_steps or steps, batch_size=batch_size, lr=lr, seed=seed,
                                   progress=progress, weight_decay=weight_decay)
            finally:
                self._training_selector = False
        set_active(self.model, self.expert(k))  # old experts and the selector: frozen
        # the expert trains on the same dynamic-replay batches (new + replayed) as the official code
        # (kernel/training.py iterates one train loader); with top-1 and teacher forcing a replayed sample runs
        # through its own frozen module, so it gives module k no gradient but counts in the batch mean
        return super().train_task(k, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                                  weight_decay=weight_decay)

    def scores(self, model: nn.Module, inputs: Any, allowed: torch.Tensor) -> torch.Tensor:
        seen = self.class_mask(self.seen_classes()).to(allowed.device)
        if not (allowed & seen).any():  # a future task: the newest module's zero-shot logits
            with mixed_batch(model, [self.expert(self.task)] * _batch_len(inputs)):
                return forward_logits(model, inputs)
        return self.assemble(model, inputs, self.select(model, inputs)).log_softmax(-1)
