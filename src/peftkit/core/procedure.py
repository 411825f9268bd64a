"""The training-procedure protocol (DESIGN principle 4): small objects the trainer calls around each step.

A procedure never changes what an adapter computes; it schedules (rank sampling, rank growth, location
search), adds a loss term, or post-processes after the optimiser step. ``state_dict``/``load_state_dict`` let a
checkpoint resume it. :func:`peftkit.train.hf.as_trainer_callback` wraps one for ``transformers.Trainer``.

What a procedure may use of the run it is part of lives here too, so that a method's procedure depends on the core
alone (never on :mod:`peftkit.train`): the task loss the trainer uses (:func:`default_loss`), a batch's size, and
the data-parallel process group (:func:`world_size`, :func:`sync_gradients`, the trainer's own gradient sync).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import PeftkitError
from .state import adapted_layers, get_config


class Procedure:
    """Base class; every hook is optional.

    Two things a run tells its procedures, both optional: ``run_steps`` — the run's length in optimiser steps, set by
    the trainer (:func:`peftkit.train.train`, the ``transformers.Trainer`` bridge) before ``on_train_start``, so a
    schedule can be a share of the run (None: unknown, e.g. a procedure driven by hand); and held-out data — a
    procedure that steps parameters of its own on examples the weights must not see (DiffoRA's selection logits) sets
    ``held_out_share`` > 0, and a task that honours it trains on the rest and hands the held-out batches to
    :meth:`set_held_out`."""

    run_steps: int | None = None
    held_out_share: float = 0.0

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called once before the first step."""

    def on_step_start(self, model: nn.Module, step: int) -> None:
        """Called before the forward pass of optimiser step ``step`` (0-based)."""

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        """An extra loss term added to the task loss of this step, or None."""
        return None

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called after the optimiser step."""

    def on_train_end(self, model: nn.Module) -> None:
        """Called once after the last step."""

    def set_held_out(self, batches: Iterable[Any]) -> None:
        """Receive the held-out batches asked for with ``held_out_share`` (called before ``on_train_start``)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def find_adapters(model: nn.Module, adapter_cls: type, config: Any = None) -> dict[str, list[tuple[str, Any]]]:
    """Adapter name -> [(module path, adapter)], in model order, of every ``adapter_cls`` adapter of ``model``; with
    ``config``, only those of the adapters built from it (that very object, else an equal one). How a method's
    procedure finds the layers it drives."""
    found: dict[str, list[tuple[str, Any]]] = {}
    for path, layer in adapted_layers(model):
        for n, a in layer.adapters.items():
            if isinstance(a, adapter_cls):
                found.setdefault(n, []).append((path, a))
    if config is not None:
        mine = {n for n in found if get_config(model, n) is config} or {
            n for n in found if get_config(model, n) == config}
        found = {n: v for n, v in found.items() if n in mine}
    return found


def adapter_layers(
    model: nn.Module, adapter_cls: type, name: str | None, who: str
) -> tuple[str, list[tuple[str, Any]]]:
    """The name and the [(module path, adapter)] layers of the ``adapter_cls`` adapter ``name`` (None: the only
    adapter of that class); ``who`` prefixes the errors (none or several such adapters, no adapter of that name)."""
    found = find_adapters(model, adapter_cls)
    kind = adapter_cls.__name__
    if name is None:
        if len(found) != 1:
            raise PeftkitError(f"{who}: {len(found)} {kind} adapters loaded ({sorted(found)}); say which one "
                               "with name=")
        name = next(iter(found))
    if name not in found:
        raise PeftkitError(f"{who}: no {kind} adapter named {name!r}; {kind} adapters: {sorted(found)}")
    return name, found[name]


# -- what a procedure may use of the run: the task loss, the batch size, the process group ---------------------------
def batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in the batch (1 if there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, tuple | list) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 1


def output_logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, tuple | list) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise PeftkitError(f"cannot find logits in model output of type {type(outputs).__name__}")


def default_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    """``model(**batch).loss`` for a mapping batch (cross-entropy on its logits if the model returns no loss);
    cross-entropy of ``model(inputs)`` against ``targets`` for an ``(inputs, targets)`` pair."""
    if isinstance(batch, Mapping):
        outputs = model(**batch)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        if loss is None:
            if "labels" not in batch:
                raise PeftkitError("the model returned no loss and the batch has no 'labels'; pass loss_fn=")
            loss = F.cross_entropy(output_logits(outputs), batch["labels"])
        return loss, outputs
    if isinstance(batch, tuple | list) and len(batch) == 2:
        outputs = model(batch[0])
        return F.cross_entropy(output_logits(outputs), batch[1]), outputs
    raise PeftkitError(f"cannot compute a loss for a batch of type {type(batch).__name__}; pass loss_fn=")


def world_size() -> int:
    """Processes in the initialised data-parallel group (``torchrun``), 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sync_gradients(params: Sequence[torch.Tensor], n_local: int) -> int:
    """Replace every process's gradients by the example-weighted mean over all processes (one ``all_reduce``);
    returns the global example count. A missing gradient counts as zero."""
    if world_size() <= 1:
        return n_local
    ref = params[0]
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(ref.dtype) * n_local
             for p in params]
    flat = torch.cat([*parts, torch.tensor([float(n_local)], dtype=ref.dtype, device=ref.device)])
    dist.all_reduce(flat)
    total = int(round(float(flat[-1])))
    flat = flat[:-1] / max(total, 1)
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset: offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n
    return total
