"""The continual-method protocol (:class:`ContinualMethod`: the trainer hooks of a
:class:`~peftkit.core.procedure.Procedure` plus the task hooks the learner calls) and the forgetting baseline
:class:`Sequential` (one PET module + the task head, ``modules_to_save``, fine-tuned task after task).

Setting: *class-incremental* by default — one head over all classes; while training task k the logits of classes
not yet seen are masked, and evaluation predicts among all classes seen so far (no task id at test time)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import PeftkitError
from ..core.model import adapt, adapter_names, set_active
from ..core.procedure import Procedure, output_logits
from ..train.trainer import train
from .replay import ReplayMemory, replay_batches
from .tasks import Collate, Task

NEG = -1e4  # ConPET's "very negative constant" for the logits of unselected tasks


def _inputs_labels(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise PeftkitError(f"a continual batch is a mapping with 'labels' or an (inputs, labels) pair, got "
                       f"{type(batch).__name__}")


def forward_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    return output_logits(model(**inputs) if isinstance(inputs, Mapping) else model(inputs))


class ContinualMethod(Procedure):
    """A continual-learning method: trainer hooks (:class:`Procedure`) plus the task hooks the learner calls.

    The learner sets ``model``, ``config``, ``tasks``, ``num_classes``, ``collate`` (:meth:`bind`), then per task k:
    :meth:`begin_task` → :meth:`train_task` (which calls :func:`peftkit.train.train` with ``procedures=[self, …]``)
    → :meth:`end_task`; :meth:`scores` gives per-class scores whose argmax over the allowed classes predicts."""

    name = "method"

    def __init__(self, memory_size: int = 0, ratio: float = 1.0, seed: int = 0) -> None:
        self.memory = ReplayMemory(memory_size, seed) if memory_size else None
        self.ratio, self.seed = ratio, seed
        self.task = -1
        self.tasks: Sequence[Task] = ()

    def bind(self, model: nn.Module, config: AdapterConfig, tasks: Sequence[Task], num_classes: int,
             collate: Collate) -> None:
        self.model, self.config, self.tasks, self.num_classes, self.collate = model, config, tasks, num_classes, collate

    def _check_task(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(self.tasks):
            raise PeftkitError(f"task id {k!r} is not one of this sequence's 0..{len(self.tasks) - 1}")

    def _new_adapter(self, name: str, activate: bool = True) -> None:
        if name in adapter_names(self.model):
            raise PeftkitError(f"the model already has an adapter named {name!r}")
        adapt(self.model, copy.deepcopy(self.config), name, activate=activate)

    def class_mask(self, classes: Sequence[int]) -> torch.Tensor:
        m = torch.zeros(self.num_classes, dtype=torch.bool)
        m[list(classes)] = True
        return m

    def seen_classes(self, upto: int | None = None) -> list[int]:
        upto = self.task if upto is None else upto
        return [c for t in self.tasks[: upto + 1] for c in t.classes]

    def begin_task(self, k: int) -> None:
        self._check_task(k)
        if k != self.task + 1:
            raise PeftkitError(f"tasks run in order: expected task {self.task + 1}, got {k}")
        self.task = k

    def batches(self, k: int, *, steps: int, batch_size: int, seed: int) -> Iterator[Any]:
        return replay_batches(self.tasks[k].train, self.memory, batch_size=batch_size, steps=steps, ratio=self.ratio,
                              seed=seed, collate=self.collate)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        """CE over the classes seen so far (the others masked)."""
        inputs, labels = _inputs_labels(batch)
        logits = forward_logits(model, inputs)
        mask = self.class_mask(self.seen_classes()).to(logits.device)
        return F.cross_entropy(logits.masked_fill(~mask, NEG), labels), logits

    def procedures(self) -> list[Procedure]:
        return [self]

    def train_task(self, k: int, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = False,
                   weight_decay: float = 0.01) -> Any:
        torch.manual_seed(seed)
        return train(self.model, self.batches(k, steps=steps, batch_size=batch_size, seed=seed), steps=steps, lr=lr,
                     weight_decay=weight_decay, procedures=self.procedures(), loss_fn=self.loss, progress=progress,
                     desc=f"{self.name} task {k}")

    def end_task(self, k: int) -> None:
        if self.memory is not None:
            self.memory.add(k, self.tasks[k].train)

    def scores(self, model: nn.Module, inputs: Any, allowed: torch.Tensor) -> torch.Tensor:
        """(B, C) scores; prediction = argmax over ``allowed`` classes."""
        return forward_logits(model, inputs)

    @contextmanager
    def exported(self) -> Iterator[None]:
        """While inside, the adapters are in the form :func:`peftkit.save` writes (a method that reparametrises its
        PETs for training, as LAE's scalers do, folds them here)."""
        yield


class Sequential(ContinualMethod):
    """One PET module fine-tuned on each task in turn (no replay): the forgetting baseline."""

    name = "sequential"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(0, seed=seed)

    def begin_task(self, k: int) -> None:
        super().begin_task(k)
        if k == 0:
            self._new_adapter("pet")
        set_active(self.model, "pet")


def _batch_len(inputs: Any) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    return int(first.shape[0])
