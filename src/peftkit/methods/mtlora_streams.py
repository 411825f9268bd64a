"""MTLoRA's multi-stream forward (:mod:`peftkit.methods.mtlora` is the method): :func:`forward_tasks` runs the shared
stream and every task stream of the active MTLoRA adapter in one forward (the batch stacked T + 1 times, the rows
routed by stream id, the outputs split back). It depends on the core alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from peftkit.core.errors import PeftkitError
from peftkit.core.model import active_adapters, get_config
from peftkit.core.model import condition as run_under

SHARED = "shared"  # the name of the shared stream in forward_tasks' result


def task_names(model: nn.Module) -> list[str]:
    """The tasks of the model's active MTLoRA adapter(s) (they must agree)."""
    from peftkit.methods.mtlora import MtloraConfig  # on use: the method module imports this one

    found = {n: get_config(model, n) for n in active_adapters(model)}
    found = {n: c for n, c in found.items() if isinstance(c, MtloraConfig)}
    if not found:
        raise PeftkitError("forward_tasks: the model has no active mtlora adapter")
    tasks = {tuple(c.tasks) for c in found.values()}
    if len(tasks) != 1:
        raise PeftkitError(f"forward_tasks: the active mtlora adapters have different tasks: "
                           f"{ {n: c.tasks for n, c in found.items()} }")
    return list(tasks.pop())


def stream_ids(batch: int, num_tasks: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Stream id of each row of a stream-major stacked batch: ``[0]*batch + [1]*batch + … + [T]*batch``."""
    return torch.arange(num_tasks + 1, device=device).repeat_interleave(batch)


def _first_batch(obj: Any) -> int | None:
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.dim() else None
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, list | tuple) else ()
    for v in items:
        b = _first_batch(v)
        if b is not None:
            return b
    return None


def _map(obj: Any, fn: Any) -> Any:
    """``fn`` applied to every tensor of a (nested) tuple / list / dict / Hugging Face ``ModelOutput``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        parts = {k: _map(v, fn) for k, v in obj.items()}
        return type(obj)(**parts) if hasattr(obj, "to_tuple") else type(obj)(parts)
    if isinstance(obj, list | tuple):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


def forward_tasks(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``model(*args, **kwargs)`` for the shared stream and every task stream in ONE forward: every tensor argument
    with the batch size B as its first dimension is stacked T + 1 times, the model runs under the stream ids, and
    every output tensor with (T + 1)·B rows is split back. Returns ``{"shared": out, task: out, ...}`` (outputs
    without such a batch dimension, e.g. a loss the model computed over all rows, are passed to every stream as is —
    compute task losses from the split outputs)."""
    tasks = task_names(model)
    batch = _first_batch((args, kwargs))
    if batch is None:
        raise PeftkitError("forward_tasks: no tensor argument with a batch dimension")
    copies = len(tasks) + 1
    stacked = _map((args, kwargs), lambda t: torch.cat([t] * copies) if t.dim() and t.shape[0] == batch else t)
    with run_under(model, stream_ids(batch, len(tasks))):
        out = model(*stacked[0], **stacked[1])
    rows = batch * copies
    return {name: _map(out, lambda t, i=i: t[i * batch:(i + 1) * batch] if t.dim() and t.shape[0] == rows else t)
            for i, name in enumerate([SHARED, *tasks])}
