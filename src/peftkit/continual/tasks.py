"""A continual task sequence: :class:`Task` (name, classes, examples), the checks a class-incremental sequence must
pass (:func:`check_tasks`), and the default collate of ``(tensor, label)`` examples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import PeftkitError

Example = tuple[Any, int]  # (model input, global class id)
Collate = Callable[[Sequence[Example]], Any]


# -- tasks ----------------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """One task of a sequence: its name, its classes (global class ids) and its (input, label) examples."""

    name: str
    classes: tuple[int, ...]
    train: Sequence[Example]
    eval: Sequence[Example]


def check_tasks(tasks: Sequence[Task], num_classes: int) -> None:
    """Clear errors for a sequence the protocol forbids: no tasks, duplicate names, a task without classes or
    examples, overlapping label spaces, a class id outside [0, num_classes), an example labelled outside its task."""
    if not tasks:
        raise PeftkitError("a continual sequence needs at least one task")
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PeftkitError(f"task names must be unique; repeated: {dup}")
    owner: dict[int, str] = {}
    for t in tasks:
        if not t.classes:
            raise PeftkitError(f"task {t.name!r} has no classes")
        if not t.train or not t.eval:
            raise PeftkitError(f"task {t.name!r} needs training and evaluation examples "
                               f"(got {len(t.train)} and {len(t.eval)})")
        for c in t.classes:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise PeftkitError(f"task {t.name!r}: class {c!r} is outside the head's 0..{num_classes - 1}")
            if c in owner:
                raise PeftkitError(f"tasks {owner[c]!r} and {t.name!r} share class {c}: the label spaces of a "
                                   "class-incremental sequence must be disjoint")
            owner[c] = t.name
        own = set(t.classes)
        for split, data in (("train", t.train), ("eval", t.eval)):
            bad = sorted({int(y) for _, y in data if int(y) not in own})
            if bad:
                raise PeftkitError(f"task {t.name!r}: {split} examples labelled {bad}, not among its classes "
                                   f"{list(t.classes)}")


def default_collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensor inputs: an ``(inputs, labels)`` pair batch."""
    return torch.stack([x for x, _ in examples]), torch.tensor([int(y) for _, y in examples], dtype=torch.long)
