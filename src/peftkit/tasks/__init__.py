"""Tasks as plugins (DESIGN.md principle 8): name -> :class:`Task`.

A task module in this package (sequence classification, causal-LM instruction tuning, token classification, image
classification) calls :func:`register_task` with its defaults, the ``peftkit train`` flags that only it reads, and
its ``train`` / ``eval`` (and ``generate`` where it has one) commands. ``peftkit.cli`` parses and dispatches through
this registry; the run machinery every task shares is :mod:`peftkit.tasks.run`. Adding a task is one new file here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import PeftkitError, did_you_mean


@dataclass(frozen=True)
class Task:
    """What the registry knows about one task.

    ``defaults``: the task's run defaults (``lr``, ``batch_size``, ``max_length``, ``eval_size``, ``steps`` or
    ``epochs``, ``eval_batch_size``, ``calibration_size``, ...). ``add_flags(parser)`` adds the ``peftkit train``
    options only this task reads; ``own_flags`` names them (``(dest, "--flag")``) so another task refuses them.
    ``train(args)``, ``eval(args, train_info)`` and ``generate(args, train_info)`` return the exit status."""

    name: str
    help: str
    defaults: dict[str, Any]
    train: Callable[[argparse.Namespace], int]
    eval: Callable[[argparse.Namespace, dict[str, Any]], int]
    generate: Callable[[argparse.Namespace, dict[str, Any]], int] | None = None
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None
    own_flags: tuple[tuple[str, str], ...] = field(default=())
    order: int = 100  # position in --task's choices and help (the default task first)


_TASKS: dict[str, Task] = {}
_LOADED = False


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry (a task module calls it at import)."""
    if task.name in _TASKS and _TASKS[task.name] is not task:
        raise ValueError(f"task {task.name!r} registered twice")
    _TASKS[task.name] = task
    return task


def _load_all() -> None:
    """Import every module of this package, so that each task registers itself (no central list to edit)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "run":
            importlib.import_module(f"{__name__}.{mod.name}")


def all_tasks() -> list[Task]:
    _load_all()
    return sorted(_TASKS.values(), key=lambda t: (t.order, t.name))


def get_task(name: str) -> Task:
    _load_all()
    if name not in _TASKS:
        raise PeftkitError(f"unknown task {name!r}{did_you_mean(name, _TASKS)}; known: {', '.join(_TASKS)}")
    return _TASKS[name]


DEFAULT_TASK = "classification"

__all__ = ["DEFAULT_TASK", "Task", "all_tasks", "get_task", "register_task"]
