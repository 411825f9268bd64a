"""Joint training — the upper bound of a continual sequence: no forgetting is possible because nothing is hidden.

:class:`Joint` keeps one PET module + the head over all classes (like :class:`~peftkit.continual.base.Sequential`),
but at stage k it trains on the training examples of tasks 0..k at once, **balanced over tasks**: every batch of B
holds ``B // (k+1)`` examples of each task seen so far, and the remaining ``B mod (k+1)`` come one each from as many
distinct tasks picked at random; within a task, examples are drawn without replacement (that task's examples
reshuffled when used up). So each task gets the same share of the budget whatever its size — with a uniform draw over
the union, an imbalanced sequence (R8: 81 % of the training documents are corporate) spends the run on its largest
task and is no upper bound at a finite budget. The last stage is training on all tasks at once; earlier stages give
the matrix rows the protocol needs (the joint model on the tasks seen so far). Every stage has the same steps as any
other method's, so the budget matches."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from ..core.errors import PeftkitError
from .base import Sequential
from .tasks import Collate, Example, default_collate


def balanced_batches(groups: Sequence[Sequence[Example]], *, batch_size: int, steps: int, seed: int = 0,
                     collate: Collate = default_collate) -> Iterator[Any]:
    """Exactly ``steps`` batches of ``batch_size``, each with ``batch_size // len(groups)`` examples of every group and
    one more from each of ``batch_size % len(groups)`` distinct groups picked at random; every group is drawn without
    replacement, reshuffled when used up."""
    if batch_size < 1 or steps < 1:
        raise PeftkitError(f"joint training needs batch_size >= 1 and steps >= 1, got {batch_size} and {steps}")
    empty = [i for i, g in enumerate(groups) if not g]
    if not groups or empty:
        raise PeftkitError(f"joint training needs at least one example in every task; empty: tasks {empty}")
    rng = random.Random(seed)
    orders: list[list[int]] = [[] for _ in groups]
    each, extra = divmod(batch_size, len(groups))

    def draw(g: int) -> Example:
        if not orders[g]:
            orders[g] = list(range(len(groups[g])))
            rng.shuffle(orders[g])
        return groups[g][orders[g].pop()]

    for _ in range(steps):
        picked = [draw(g) for g in range(len(groups)) for _ in range(each)]
        picked += [draw(g) for g in sorted(rng.sample(range(len(groups)), extra))]
        yield collate(picked)


class Joint(Sequential):
    """One PET module trained at stage k on every task seen so far at once, batches balanced over those tasks (the
    upper bound)."""

    name = "joint"

    def batches(self, k: int, *, steps: int, batch_size: int, seed: int) -> Iterator[Any]:
        return balanced_batches([t.train for t in self.tasks[: k + 1]], batch_size=batch_size, steps=steps, seed=seed,
                                collate=self.collate)
