"""A plain training loop: AdamW over the trainable (adapter) parameters, linear warmup then linear decay, gradient
clipping at 1.0, training procedures called around every step, and a tqdm bar with loss and examples/s.

    result = train(model, batches, steps=300, lr=2e-3, procedures=[...])

``batches`` is any iterable of batches. A batch is a mapping of keyword arguments for ``model(**batch)`` whose
output carries a ``loss`` (Hugging Face models given ``labels``), or an ``(inputs, targets)`` pair for a model that
returns logits (cross-entropy). Pass ``loss_fn(model, batch) -> (loss, outputs)`` for anything else. When the
iterable runs out before ``steps`` it is iterated again (one more epoch); a one-shot iterator ends training early.

Per step: ``on_step_start(model, step)`` → for each of the ``grad_accum`` micro-batches: forward → (loss + Σ
``extra_loss(model, batch, outputs)``) / ``grad_accum`` → backward; then clip → optimiser step → schedule step →
``on_step_end(model, step, optimizer)``; ``on_train_start`` / ``on_train_end`` bracket the run. Steps are numbered
from 0 and count optimiser steps (the schedule too); a batch is one micro-batch.

Device and precision: batches follow the model's device (move the model first, e.g. with :func:`pick_device`).
``precision="bf16"`` / ``"fp16"`` runs every forward pass (the loss and the procedures' extra losses) under
``torch.autocast(device.type, dtype)`` while the weights, their gradients and the optimiser stay in fp32 (master
weights); ``"fp16"`` also scales the loss with a ``torch.amp.GradScaler`` (its state is checkpointed). fp16 needs a
CUDA or MPS device: on the CPU torch emulates fp16 matrix products, slower than fp32 — use bf16 there.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import PeftkitError
from ..core.model import trainable_parameters
from ..core.procedure import Procedure, batch_size, default_loss  # re-exported: peftkit.train's API
from ..core.procedure import output_logits as _logits

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Any]]


@dataclass
class TrainResult:
    steps: int
    examples: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    peak_mib: float | None = None  # rise of the peak resident memory during training (Linux; on CUDA the GPU's), MiB
    device: str = "cpu"  # where it trained, e.g. "cuda:0"
    precision: str = "fp32"
    grad_accum: int = 1  # micro-batches per optimiser step

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


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


_device = model_device


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` for ``--device name``: ``auto`` is CUDA when present, else MPS when present, else the CPU;
    ``cuda`` / ``mps`` fail with a clear error when this machine has none. Under ``torchrun`` (``local_rank`` given)
    a CUDA device is ``cuda:LOCAL_RANK``, one GPU per process."""
    if name not in DEVICES:
        raise PeftkitError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PeftkitError("--device cuda: this machine has no CUDA device (or this torch build has no CUDA "
                               f"support: torch {torch.__version__}); use --device cpu or auto")
        if local_rank is not None:
            if local_rank >= torch.cuda.device_count():
                raise PeftkitError(f"--device cuda: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                                   "CUDA device(s) visible; start at most that many processes per node")
            return torch.device("cuda", local_rank)
        return torch.device("cuda")
    if name == "mps" and not _mps_available():
        raise PeftkitError("--device mps: this machine has no MPS (Apple GPU) device; use --device cpu or auto")
    return torch.device(name)


def check_precision(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32) on ``device``; a clear error for a combination that does
    not work: fp16 on the CPU (torch runs it, but emulates fp16 matrix products: slower than fp32, and a loss
    scaler for nothing — use bf16)."""
    if precision not in PRECISIONS:
        raise PeftkitError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    kind = torch.device(device).type
    if precision == "fp16" and kind == "cpu":
        raise PeftkitError("--precision fp16 needs a CUDA or MPS device (the CPU has no fast fp16 matrix products); "
                           "use --precision bf16 on the CPU")
    return dtype


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a mapping / tuple / list of them) moved to ``device``."""
    return _to(batch, device)


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
    precision: str = "fp32",
    grad_accum: int = 1,
) -> TrainResult:
    """Train ``model`` in place for ``steps`` optimiser steps; returns the loss curve, examples and seconds.

    The default optimiser is AdamW over :func:`peftkit.trainable_parameters` (the active adapters, their saved
    modules and trainable biases). The schedule (warmup then linear decay) multiplies every group's lr.

    ``save_every=k`` with ``checkpoint_dir`` writes a resumable checkpoint after every k-th step
    (:mod:`peftkit.train.checkpoint`, with ``checkpoint_meta`` stored in it); ``resume=True`` continues from the
    newest checkpoint there: the model, procedures and ``batches`` must be rebuilt exactly as for the interrupted run,
    and the result is the one an uninterrupted run would have produced. Under ``torchrun`` (an initialised process
    group) gradients of the trainable parameters are averaged across processes every step
    (:mod:`peftkit.train.distributed`); only rank 0 shows progress and writes checkpoints.

    ``precision`` (``fp32``, ``bf16``, ``fp16``): autocast around the forward passes, fp32 master weights, a grad
    scaler for fp16 (module docstring). ``grad_accum=N`` accumulates the gradients of N micro-batches (each loss
    divided by N) before every optimiser step: with equal-sized micro-batches of b examples and a per-example mean
    loss, one step equals one step on a batch of N·b. A checkpoint holds the grad scaler and the number of
    micro-batches consumed; resuming needs the same ``grad_accum``."""
    if steps < 1:
        raise PeftkitError(f"steps must be >= 1, got {steps}")
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise PeftkitError(f"grad_accum must be an integer >= 1, got {grad_accum!r}")
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
    amp_dtype = check_precision(precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    from tqdm.auto import tqdm

    was_training = model.training
    model.train()
    if ckpt is not None:
        ckpt.restore_procedures(procedures)
    for p in procedures:  # on resume, a procedure that changed the adapter's structure replays it here
        p.run_steps = steps
        p.on_train_start(model, optimizer)
    result = TrainResult(0, 0, 0.0, device=str(device), precision=precision, grad_accum=grad_accum)
    first = 0
    consumed = 0  # micro-batches drawn from ``batches`` so far
    prior_seconds = 0.0
    if ckpt is not None:
        saved = _restore_trainer_state(ckpt, checkpoint_dir, precision, grad_accum, scaler)
        ckpt.restore_model(model)
        ckpt.restore_optimizer(model, optimizer, schedule)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        first = result.steps = ckpt.step
        consumed = int(saved.get("micro_batches", first))
        result.examples = int(ckpt.state["examples"])
        result.losses = [float(v) for v in ckpt.state["losses"]]
        prior_seconds = float(ckpt.state["seconds"])
    if size > 1:
        broadcast_parameters(params)
    bar = tqdm(total=steps, initial=first, desc=desc, unit="step", disable=not progress, dynamic_ncols=True,
               leave=True)
    rss = reset_peak_memory() if device.type == "cpu" else None
    if device.type == "cuda":  # the GPU's peak allocation instead of the process's resident memory
        torch.cuda.reset_peak_memory_stats(device)
        base_bytes = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    ema: float | None = None
    try:
        source = _cycle(batches)
        for _ in range(consumed):  # the batches the interrupted run consumed
            if next(source, _END) is _END:
                break
        if ckpt is not None:
            ckpt.restore_rng()
            _restore_device_rng(ckpt, device)
        for step in range(first, steps):
            micro = []  # this step's micro-batches, drawn up front: a short last step divides by what it got
            for _ in range(grad_accum):
                batch = next(source, _END)
                if batch is _END:
                    break
                micro.append(batch)
            if not micro:
                break
            consumed += len(micro)
            for p in procedures:
                p.on_step_start(model, step)
            value, n_local = 0.0, 0
            for batch in micro:
                batch = _to(batch, device)
                n_local += batch_size(batch)
                with autocast():
                    loss, outputs = loss_fn(model, batch)
                    for p in procedures:
                        extra = p.extra_loss(model, batch, outputs)
                        if extra is not None:
                            loss = loss + extra
                part = float(loss.detach())
                if not math.isfinite(part):
                    raise PeftkitError(f"the loss became {part} at step {step}; try a lower learning rate")
                value += part / len(micro)
                loss = loss.float() / len(micro) if len(micro) > 1 else loss
                (scaler.scale(loss) if scaler is not None else loss).backward()
                del loss, outputs
            if sum(len(g["params"]) for g in optimizer.param_groups) != len(params):  # a procedure grew / pruned it
                params = [p for g in optimizer.param_groups for p in g["params"]]
            n_step = sync_gradients(params, n_local) if size > 1 else n_local
            if scaler is not None:
                scaler.unscale_(optimizer)
            if max_grad_norm is not None and max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)  # skipped when the fp16 gradients overflowed; the scale then backs off
                scaler.update()
            else:
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
                meta = {**(checkpoint_meta or {}),
                        TRAINER_STATE: _trainer_state(precision, grad_accum, consumed, scaler, device)}
                save_checkpoint(checkpoint_dir, step=result.steps, model=model, optimizer=optimizer,  # type: ignore
                                schedule=schedule, procedures=procedures, losses=result.losses,
                                examples=result.examples, seconds=prior_seconds + time.perf_counter() - start,
                                meta=meta)
        for p in procedures:
            p.on_train_end(model)
    finally:
        result.seconds = prior_seconds + time.perf_counter() - start
        result.peak_mib = peak_memory_since(rss)
        if device.type == "cuda":
            result.peak_mib = max(0, torch.cuda.max_memory_allocated(device) - base_bytes) / 2**20
        bar.close()
        model.train(was_training)
    return result


TRAINER_STATE = "trainer"  # the key of the trainer's own state in a checkpoint's meta


def _trainer_state(precision: str, grad_accum: int, consumed: int, scaler: Any, device: torch.device
                   ) -> dict[str, Any]:
    """What a checkpoint needs beyond model, optimiser, schedule and CPU RNG (all plain JSON): the precision and
    accumulation of the run, the micro-batches consumed, the fp16 grad scaler, the accelerator's RNG."""
    state: dict[str, Any] = {"precision": precision, "grad_accum": grad_accum, "micro_batches": consumed,
                             "scaler": scaler.state_dict() if scaler is not None else None}
    if device.type == "cuda":  # dropout on the GPU draws from the CUDA generator, not the CPU one
        state["cuda_rng"] = torch.cuda.get_rng_state(device).tolist()
    return state


def _restore_trainer_state(ckpt: Any, directory: Any, precision: str, grad_accum: int, scaler: Any
                           ) -> dict[str, Any]:
    saved = ckpt.meta.get(TRAINER_STATE) or {}  # none in checkpoints written before precision / accumulation
    was_accum, was_precision = int(saved.get("grad_accum", 1)), saved.get("precision", "fp32")
    if was_accum != grad_accum:
        raise PeftkitError(f"the checkpoint in {directory} was written with grad_accum {was_accum}, this run has "
                           f"{grad_accum}; resume with the same accumulation")
    if was_precision != precision:
        raise PeftkitError(f"the checkpoint in {directory} was written with precision {was_precision}, this run has "
                           f"{precision}; resume with the same precision")
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    return saved


def _restore_device_rng(ckpt: Any, device: torch.device) -> None:
    state = (ckpt.meta.get(TRAINER_STATE) or {}).get("cuda_rng")
    if state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state, dtype=torch.uint8), device)


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
    from ..core.state import saved_modules

    head_ids = {id(p) for _, sm in saved_modules(model) for p in sm.copies.parameters() if p.requires_grad}
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
