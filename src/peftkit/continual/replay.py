"""Replay (ConPET, Song et al. 2023, arXiv 2309.14763; github.com/Raincleared-Song/ConPET): a task-balanced memory
of past examples (:class:`ReplayMemory`, EMR-style random exemplars, an equal share of ``size`` per past task) and
*dynamic replay* batches (:func:`replay_batches`): a fixed number N of batches per task; each batch of size B holds
``n_new = int(B·ρ/(ρ+1))`` new-task examples (drawn without replacement) and ``B − n_new`` replayed ones, each from a
past task picked uniformly at random, then one of its stored examples. Method-independent."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from ..core.errors import PeftkitError
from .tasks import Collate, Example, default_collate


class ReplayMemory:
    """Stored examples of past tasks, at most ``size`` in all, an equal share (``size // tasks``) per task: each task
    keeps a random subset (fixed at :meth:`add`), and older tasks shrink to their share when a task arrives."""

    def __init__(self, size: int, seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise PeftkitError(f"replay memory size must be a positive integer, got {size!r}")
        self.size = size
        self._rng = random.Random(seed)
        self._store: dict[int, list[Example]] = {}

    def add(self, task: int, examples: Sequence[Example]) -> None:
        if task in self._store:
            raise PeftkitError(f"task {task} is already in the replay memory")
        if len(self._store) + 1 > self.size:
            raise PeftkitError(f"a memory of {self.size} examples cannot hold {len(self._store) + 1} tasks")
        order = list(examples)
        self._rng.shuffle(order)
        self._store[task] = order
        share = self.size // len(self._store)
        for k in self._store:
            self._store[k] = self._store[k][:share]

    def tasks(self) -> list[int]:
        return list(self._store)

    def examples(self, task: int) -> list[Example]:
        if task not in self._store:
            raise PeftkitError(f"task {task!r} was never stored in the replay memory; stored: {self.tasks()}")
        return self._store[task]

    def __len__(self) -> int:
        return sum(len(v) for v in self._store.values())

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "store": {k: list(v) for k, v in self._store.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = int(state["size"])
        self._store = {int(k): list(v) for k, v in state["store"].items()}


def replay_batches(new: Sequence[Example], memory: ReplayMemory | None, *, batch_size: int, steps: int,
                   ratio: float = 1.0, seed: int = 0, collate: Collate = default_collate) -> Iterator[Any]:
    """ConPET's dynamic replay: exactly ``steps`` batches of ``batch_size``; each holds ``n_new = int(B·ρ/(ρ+1))``
    new examples (without replacement, reshuffled when used up) and ``B − n_new`` replayed ones, each from a past task
    picked uniformly at random, then one of its stored examples uniformly. With an empty memory all B are new."""
    if batch_size < 1 or steps < 1:
        raise PeftkitError(f"replay needs batch_size >= 1 and steps >= 1, got {batch_size} and {steps}")
    if not new:
        raise PeftkitError("replay needs at least one new-task example")
    if not ratio > 0:
        raise PeftkitError(f"the new/old ratio must be > 0, got {ratio}")
    rng = random.Random(seed)
    past = [k for k in (memory.tasks() if memory is not None else []) if memory.examples(k)]
    n_new = int(batch_size * ratio / (ratio + 1)) if past else batch_size
    order: list[int] = []
    for _ in range(steps):
        picked: list[Example] = []
        for _ in range(n_new):
            if not order:
                order = list(range(len(new)))
                rng.shuffle(order)
            picked.append(new[order.pop()])
        for _ in range(batch_size - n_new):
            stored = memory.examples(rng.choice(past))  # type: ignore[union-attr]
            picked.append(stored[rng.randrange(len(stored))])
        yield collate(picked)
