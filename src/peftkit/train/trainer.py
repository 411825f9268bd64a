"""A plain training loop: AdamW over the trainable (adapter) parameters, linear warmup then linear decay, gradient
clipping at 1.0, training procedures called around every step, and a tqdm bar with loss and examples/s.

    result = train(model, batches, steps=300, lr=2e-3, procedures=[...])

``batches`` is any iterable of batches. A batch is a mapping of keyword arguments for ``model(**batch)`` whose
output carries a ``loss`` (Hugging Face models given ``labels``), or an ``(inputs, targets)`` pair for a model that
returns logits (cross-entropy). Pass ``loss_fn(model, batch) -> (loss, outputs)`` for anything else. When the
iterable runs out before ``steps`` it is iterated again (one more epoch); a one-shot iterator ends training early.

Per step: ``on_step_start(model, step)`` → forward → loss + Σ ``extra_loss(model, batch, outputs)`` → backward →
clip → optimiser step → schedule step → ``on_step_end(model, step, optimizer)``; ``on_train_start`` /
``on_train_end`` bracket the run. Steps are numbered from 0.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PeftkitError
from ..core.model import trainable_parameters
from ..core.procedure import Procedure

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Any]]


@dataclass
class TrainResult:
    steps: int
    examples: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    peak_mib: float | None = None  # rise of the process's peak resident memory during training (Linux), MiB

    @property
    def throughput(self) -> float:
        """Training examples per second."""
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of steps (at least one)."""
        if not self.losses:
            return math.nan
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory() -> int | None:
    """Reset the kernel's peak-RSS counter of this process (Linux); returns the resident KiB now, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def peak_memory_since(rss_kib: int | None) -> float | None:
    """MiB the peak resident memory rose above ``rss_kib`` (from :func:`reset_peak_memory`)."""
    peak = _status_kib("VmHWM")
    return None if rss_kib is None or peak is None else max(0, peak - rss_kib) / 1024


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in the batch (1 if there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, tuple | list) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 1


def _logits(outputs: Any) -> torch.Tensor:
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
            loss = F.cross_entropy(_logits(outputs), batch["labels"])
        return loss, outputs
    if isinstance(batch, tuple | list) and len(batch) == 2:
        outputs = model(batch[0])
        return F.cross_entropy(_logits(outputs), batch[1]), outputs
    raise PeftkitError(f"cannot compute a loss for a batch of type {type(batch).__name__}; pass loss_fn=")


def linear_schedule(steps: int, warmup: float | int) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` steps (a fraction of ``steps`` if < 1), then linear decay to 0."""
    w = int(round(warmup * steps)) if isinstance(warmup, float) and warmup < 1 else int(warmup)

    def factor(i: int) -> float:
        if i < w:
            return (i + 1) / (w + 1)
        return max(0.0, (steps - i) / max(1, steps - w))

    return factor


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches, epoch after epoch; a one-shot iterator (or an empty iterable) just ends."""
    while True:
        it = iter(batches)
        first = next(it, _END)
        if first is _END:
            return
        yield first
        yield from it
        if isinstance(batches, Iterator):
            return


_END = object()


def train(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    weight_decay: float = 0.0,
    warmup: float | int = 0.06,
    max_grad_norm: float | None = 1.0,
    procedures: Sequence[Procedure] = (),
    loss_fn: LossFn | None = None,
    progress: bool = True,
    desc: str = "train",
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int = 0,
    resume: bool = False,
    checkpoint_meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``steps`` optimiser steps; returns the loss curve, examples and seconds.

    The default optimiser is AdamW over :func:`peftkit.trainable_parameters` (the active adapters, their saved
    modules and trainable biases). The schedule (warmup then linear decay) multiplies every group's lr.

    ``save_every=k`` with ``checkpoint_dir`` writes a resumable checkpoint after every k-th step
    (:mod:`peftkit.train.checkpoint`, with ``checkpoint_meta`` stored in it); ``resume=True`` continues from the
    newest checkpoint there: the model, procedures and ``batches`` must be rebuilt exactly as for the interrupted run,
    and the result is the one an uninterrupted run would have produced. Under ``torchrun`` (an initialised process
    group) gradients of the trainable parameters are averaged across processes every step
    (:mod:`peftkit.train.distributed`); only rank 0 shows progress and writes checkpoints."""
    if steps < 1:
        raise PeftkitError(f"steps must be >= 1, got {steps}")
    if (save_every or resume) and checkpoint_dir is None:
        raise PeftkitError("save_every / resume need checkpoint_dir")
    if save_every < 0:
        raise PeftkitError(f"save_every must be >= 0, got {save_every}")
    from .checkpoint import latest_checkpoint, save_checkpoint
    from .distributed import broadcast_parameters, sync_gradients, world

    ckpt = latest_checkpoint(checkpoint_dir) if resume else None  # type: ignore[arg-type]
    if ckpt is not None and ckpt.step >= steps:
        raise PeftkitError(f"the checkpoint in {checkpoint_dir} is at step {ckpt.step}, not before the run's last "
                           f"step {steps}: nothing to resume")
    rank, size = world()
    progress = progress and rank == 0
    if optimizer is None:
        params = trainable_parameters(model)
        if not params:
            raise PeftkitError("the model has no trainable parameters; adapt it (peftkit.adapt) first")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(steps, warmup))
    loss_fn = loss_fn or default_loss
    device = _device(model)

    from tqdm.auto import tqdm

    was_training = model.training
    model.train()
    if ckpt is not None:
        ckpt.restore_procedures(procedures)
    for p in procedures:  # on resume, a procedure that changed the adapter's structure replays it here
        p.on_train_start(model, optimizer)
    result = TrainResult(0, 0, 0.0)
    first = 0
    prior_seconds = 0.0
    if ckpt is not None:
        ckpt.restore_model(model)
        ckpt.restore_optimizer(model, optimizer, schedule)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        first = result.steps = ckpt.step
        result.examples = int(ckpt.state["examples"])
        result.losses = [float(v) for v in ckpt.state["losses"]]
        prior_seconds = float(ckpt.state["seconds"])
    if size > 1:
        broadcast_parameters(params)
    bar = tqdm(total=steps, initial=first, desc=desc, unit="step", disable=not progress, dynamic_ncols=True,
               leave=True)
    rss = reset_peak_memory() if device.type == "cpu" else None
    start = time.perf_counter()
    ema: float | None = None
    try:
        source = _cycle(batches)
        for _ in range(first):  # the batches the interrupted run consumed
            if next(source, _END) is _END:
                break
        if ckpt is not None:
            ckpt.restore_rng()
        for step in range(first, steps):
            batch = next(source, _END)
            if batch is _END:
                break
            batch = _to(batch, device)
            n_local = batch_size(batch)
            for p in procedures:
                p.on_step_start(model, step)
            loss, outputs = loss_fn(model, batch)
            for p in procedures:
                extra = p.extra_loss(model, batch, outputs)
                if extra is not None:
                    loss = loss + extra
            value = float(loss.detach())
            if not math.isfinite(value):
                raise PeftkitError(f"the loss became {value} at step {step}; try a lower learning rate")
            loss.backward()
            if sum(len(g["params"]) for g in optimizer.param_groups) != len(params):  # a procedure grew / pruned it
                params = [p for g in optimizer.param_groups for p in g["params"]]
            n_step = sync_gradients(params, n_local) if size > 1 else n_local
            if max_grad_norm is not None and max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            for p in procedures:
                p.on_step_end(model, step, optimizer)
            result.steps += 1
            result.examples += n_step
            result.losses.append(value)
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            if progress:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{ema:.4f}", ex_s=f"{(result.examples) / max(elapsed + prior_seconds, 1e-9):.1f}",
                                refresh=False)
                bar.update(1)
            if save_every and result.steps % save_every == 0 and result.steps < steps and rank == 0:
                save_checkpoint(checkpoint_dir, step=result.steps, model=model, optimizer=optimizer,  # type: ignore
                                schedule=schedule, procedures=procedures, losses=result.losses,
                                examples=result.examples, seconds=prior_seconds + time.perf_counter() - start,
                                meta=checkpoint_meta)
        for p in procedures:
            p.on_train_end(model)
    finally:
        result.seconds = prior_seconds + time.perf_counter() - start
        result.peak_mib = peak_memory_since(rss)
        bar.close()
        model.train(was_training)
    return result


@torch.inference_mode()
def predict(model: nn.Module, batches: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, label) for every example of ``batches`` (mapping batches with ``labels``, or pairs),
    in eval mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = _device(model)
    preds: list[torch.Tensor] = []
    gold: list[torch.Tensor] = []
    try:
        for batch in batches:
            batch = _to(batch, device)
            if isinstance(batch, Mapping):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                outputs, labels = model(**inputs), batch["labels"]
            else:
                outputs, labels = model(batch[0]), batch[1]
            preds.append(_logits(outputs).argmax(-1).cpu())
            gold.append(labels.cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds), torch.cat(gold)


def accuracy(model: nn.Module, batches: Iterable[Any]) -> tuple[float, int, int]:
    """``(accuracy, correct, total)`` of argmax predictions over ``batches``."""
    pred, gold = predict(model, batches)
    correct = int((pred == gold).sum())
    return correct / max(len(gold), 1), correct, len(gold)


def head_param_groups(model: nn.Module, lr: float, head_lr: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups: the adapters (and any other trainable tensor) at ``lr``, the fully trained copies
    of ``modules_to_save`` (e.g. a fresh classification head) at ``head_lr`` — for methods whose adapter needs a
    much smaller or larger learning rate than a fresh head (prefix tuning's reparametrising MLP, prompt tuning)."""
    from ..core.model import _saved_modules

    head_ids = {id(p) for _, sm in _saved_modules(model) for p in sm.copies.parameters() if p.requires_grad}
    params = trainable_parameters(model)
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": lr},
              {"params": [p for p in params if id(p) in head_ids], "lr": head_lr}]
    return [g for g in groups if g["params"]]


def method_procedures(info: Any, model: nn.Module, cfg: Any) -> list[Procedure]:
    """The training procedure a method registered (``info.procedure``), built as ``peftkit train`` and ``peftkit
    bench`` build it: ``Procedure(model, config)`` when its constructor takes two arguments, else ``Procedure()``."""
    cls = info.procedure
    if cls is None:
        return []
    try:
        params = [p for p in inspect.signature(cls).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [cls(model, cfg) if len(params) >= 2 else cls()]
