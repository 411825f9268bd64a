"""Joint training — the upper bound of a continual sequence: no forgetting is possible because nothing is hidden.

:class:`Joint` keeps one PET module + the head over all classes (like :class:`~peftkit.continual.base.Sequential`),
but at stage k it trains on the union of the training examples of tasks 0..k, drawn uniformly (each batch a random
draw without replacement from that union, reshuffled when used up). The last stage is therefore training on all
tasks at once; earlier stages give the matrix rows the protocol needs (the joint model on the tasks seen so far).
Every stage has the same steps as any other method's, so the budget matches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .base import Sequential
from .replay import replay_batches


class Joint(Sequential):
    """One PET module trained at stage k on every task seen so far at once (the upper bound)."""

    name = "joint"

    def batches(self, k: int, *, steps: int, batch_size: int, seed: int) -> Iterator[Any]:
        union = [ex for t in self.tasks[: k + 1] for ex in t.train]
        return replay_batches(union, None, batch_size=batch_size, steps=steps, seed=seed, collate=self.collate)
