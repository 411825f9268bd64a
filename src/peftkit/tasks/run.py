"""The run machinery every task shares (DESIGN.md principle 8) — written once, never importing the CLI.

A task module (:mod:`peftkit.tasks.classification`, :mod:`~peftkit.tasks.causal_lm`,
:mod:`~peftkit.tasks.token_classification`, :mod:`~peftkit.tasks.image_classification`) loads its data and base
model and measures its own metric; :class:`TrainRun` does the rest the same way for all of them:

    run = TrainRun(args, task.defaults, tag="ner")      # defaults, option checks, the output folder
    cfg, procedures = run.adapt(model)                  # config (+ head in modules_to_save), adapter, procedures
    batches = run.batches(lambda b: make_batches(b))    # under torchrun: the global batch, this process's slice
    summ = run.describe(model, model_line, data_lines)  # model / base / data / method / parameter lines
    run.calibrate(model, calibration_batches, n)        # data-aware init, for methods that register one
    result = run.train(model, batches, steps, "sentences")   # progress bar, checkpoints, --resume
    return run.finish(model, {...task's own train_info...})  # adapter + train_info.json, checkpoints removed

:func:`train_command` is ``peftkit train`` itself: ``--resume``, ``torchrun`` ranks, the other tasks' flags refused,
then the task's ``train``.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..core.config import all_finite
from ..core.errors import PeftkitError
from ..core.io import RunLock
from .options import parse_opts, parse_targets
from .record import TRAIN_INFO

#: the run options every task shares (a task's own defaults — lr, batch size, max length, ... — are in its Task)
RUN_DEFAULTS: dict[str, Any] = {"method": "lora", "targets": "all-linear", "seed": 0, "split_seed": 0,
                                "warmup": 0.06, "save_every": 50}

_HELD: list[RunLock] = []


def release_run_locks() -> None:
    """Release the output-folder locks of the runs this process started (``peftkit train`` calls it when the run
    ends, however it ends, so an in-process caller can start the next run on the same folder)."""
    while _HELD:
        _HELD.pop().release()


class TrainRun:
    """One ``peftkit train`` run of any task (module docstring). Construction validates every cheap option and
    fixes the output folder before anything is loaded."""

    def __init__(self, args: argparse.Namespace, defaults: dict[str, Any], tag: str = "") -> None:
        self.wall_start = time.perf_counter()
        self.max_length_given = getattr(args, "max_length", None) is not None  # else the task's default
        for key in ("batch_size", "max_length"):  # None: the task's default
            if getattr(args, key, None) is None and key in defaults:
                setattr(args, key, defaults[key])
        self.args, self.defaults = args, defaults
        self.info, self.cfg_cls, self.cfg_fields = check_train_args(args)
        self.device = run_device(args)  # --device / --precision / --grad-accum
        if "lr" in defaults:  # no --lr / --head-lr: the task's rate × the method's factor (registry)
            if getattr(args, "lr", None) is None:
                args.lr = defaults["lr"] * self.info.lr_scale
            if getattr(args, "head_lr", None) is None and self.info.head_lr_scale is not None:
                args.head_lr = defaults["lr"] * self.info.head_lr_scale
        name = f"{self.info.name}-{tag}" if tag else self.info.name
        self.output = Path(args.output) if args.output else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        _check_writable(self.output)
        # one writer per run folder: a second run on this --output fails here, before anything is loaded
        self.lock = RunLock(self.output, "peftkit train")
        _HELD.append(self.lock)
        atexit.register(self.lock.release)
        if self.output.exists() and (not self.output.is_dir() or any(self.output.iterdir())) and not args.overwrite:
            raise PeftkitError(f"output {self.output} already exists and is not empty; choose another --output or "
                               "--overwrite")
        for key in ("data", "model"):  # stored for --resume: absolute, so a resume from elsewhere reads the same
            value = getattr(args, key, None)
            if isinstance(value, str) and value and Path(value).exists():
                setattr(args, key, str(Path(value).absolute()))
        args.output = str(self.output.absolute())
        from ..train.distributed import world

        self.rank, self.world_size = world()
        self.cfg: Any = None
        self.calibration: dict[str, Any] | None = None
        self._ckpt: dict[str, Any] | None = None
        self.result: Any = None
        self.summary: Any = None

    # -- model ----------------------------------------------------------------------------------------------
    def adapt(self, model: nn.Module, heads: Sequence[str] | None = None) -> tuple[Any, list[Any]]:
        """Build the config (the task head — ``heads``, else the model's classifier head — in ``modules_to_save``
        unless ``--opt`` set it), adapt ``model`` with ``--seed``, and build the method's procedure plus DEFT's
        density loss when asked."""
        import torch

        import peftkit

        from ..models import classifier_head_names
        from ..train.trainer import method_procedures

        fields = dict(self.cfg_fields)
        if "modules_to_save" not in fields:
            fields["modules_to_save"] = list(heads if heads is not None else classifier_head_names(model)) or None
        self.cfg = fit_default_ranks(model, self.info, self.cfg_cls.from_dict(fields), self.cfg_fields)
        check_max_length(model, getattr(self.args, "max_length", None))
        preflight(model, self.info, self.cfg)
        torch.manual_seed(self.args.seed)
        peftkit.adapt(model, self.cfg)  # on the CPU, where the model was loaded: the same init on every device
        model.to(self.device)
        procedures = method_procedures(self.info, model, self.cfg)
        if getattr(self.args, "density_loss", None) is not None:  # DEFT: any method + λ·(smooth L0 of MLP acts)
            from ..train.density import DensityLoss

            procedures.append(DensityLoss(model, self.args.density_loss))
        return self.cfg, procedures

    def fit_max_length(self, model: nn.Module) -> None:
        """Called once the base model is loaded, before tokenising: a ``--max-length`` above the model's positions is
        an error; the task's default max length is lowered to them, with a notice."""
        limit = max_positions(model)
        a = self.args
        if limit is not None and a.max_length is not None and a.max_length > limit and not self.max_length_given:
            print(f"max length: the task's default {a.max_length} exceeds the model's {limit} positions; using {limit}")
            a.max_length = limit
        check_max_length(model, a.max_length)

    def batches(self, make: Callable[[int], Iterable[Any]]) -> Iterable[Any]:
        """``make(batch_size)`` with the global batch size (``world_size × --batch-size``); under ``torchrun`` this
        process's slice of every batch."""
        from ..train.distributed import Shard

        batches = make(self.args.batch_size * self.world_size)
        return Shard(batches, self.rank, self.world_size) if self.world_size > 1 else batches

    def hold_out(self, procedures: Sequence[Any], indices: Sequence[int],
                 make: Callable[[Sequence[int], int], Iterable[Any]]) -> Sequence[int]:
        """The training indices left once every procedure that asks for held-out examples (``held_out_share``, e.g.
        DiffoRA's selection logits) has its share: the first ⌈share·n⌉ of ``indices`` (already shuffled), batched by
        ``make(indices, batch_size)`` and given to it; the weights train on the rest."""
        share = max((float(getattr(p, "held_out_share", 0.0)) for p in procedures), default=0.0)
        if share <= 0 or len(indices) < 2:
            return indices
        cut = min(len(indices) - 1, max(1, math.ceil(share * len(indices))))
        held, rest = list(indices[:cut]), indices[cut:]
        for p in procedures:
            if float(getattr(p, "held_out_share", 0.0)) > 0:
                p.set_held_out(self.batches(lambda size: make(held, size)))
        print(f"held out for the procedure: {cut:,} of the {len(indices):,} training examples")
        return rest

    def eval_size(self, n: int) -> int:
        """``--eval-size``, else the task's default held-out size, at most a fifth of the ``n`` examples."""
        a = self.args.eval_size
        return a if a is not None else min(self.defaults["eval_size"], max(1, n // 5))

    def steps(self, n_batches: int, default_epochs: float | None = None, default_steps: int | None = None) -> int:
        """``--steps``; else ``--epochs`` (else ``default_epochs``) × batches per epoch; else ``default_steps``."""
        a = self.args
        if a.steps is not None:
            return a.steps
        epochs = a.epochs if a.epochs is not None else default_epochs
        if epochs is None:
            if default_steps is None:
                raise PeftkitError("give --steps or --epochs")
            return default_steps
        return max(1, round(epochs * n_batches / getattr(a, "grad_accum", 1)))  # optimiser steps

    def describe(self, model: nn.Module, model_line: str, data_lines: Sequence[str]) -> Any:
        """Print what is trained on what; returns :func:`peftkit.summary` of the adapted model."""
        import peftkit

        self.summary = peftkit.summary(model)
        print(f"model: {model_line}")
        if self.args.quantize:
            from ..quant.bnb import linear_weight_bytes

            print(f"base: Linear layers in {self.args.quantize} (bitsandbytes, frozen) — linear weights "
                  f"{linear_weight_bytes(model) / 2**20:.1f} MiB")
        for line in data_lines:
            print(line)
        cfg = self.cfg.to_dict()
        print(f"method: {self.info.name} — {', '.join(f'{k}={v}' for k, v in cfg.items() if k != 'method' and v)}")
        print(str(self.summary).splitlines()[0])
        return self.summary

    def calibrate(self, model: nn.Module, make: Callable[[int], Iterable[Any]], available: int) -> None:
        """Data-aware init for methods that register ``calibrate`` (e.g. QWHA), from ``make(n)``: the first ``n``
        training examples in order, ``n`` = the task's ``calibration_size``."""
        if self.info.calibrate is None:
            return
        from ..train.trainer import to_device

        n = min(self.defaults.get("calibration_size", 256), available)
        self.calibration = calibrate_model(self.info, model, (to_device(b, self.device) for b in make(n)), n)
        if self.summary is not None:  # a calibration may change the adapter's size (EVA redistributes ranks)
            import peftkit

            before, self.summary = self.summary, peftkit.summary(model)
            if self.summary.trainable != before.trainable:
                print(f"after calibration: {str(self.summary).splitlines()[0]}")

    # -- training -------------------------------------------------------------------------------------------
    def train(self, model: nn.Module, batches: Iterable[Any], steps: int, procedures: Sequence[Any],
              unit: str = "examples", inputs: str | None = None) -> Any:
        """:func:`peftkit.train.train` with the run's options, checkpoints and ``--resume``; prints the budget
        (``inputs``: what one example is, default the max length) before and the speed after."""
        import torch

        from ..train.trainer import head_param_groups, train

        a = self.args
        inputs = inputs or f"max length {a.max_length}"
        lr = f"lr {a.lr:g}" + (f", head lr {a.head_lr:g}" if getattr(a, "head_lr", None) is not None else "")
        accum = getattr(a, "grad_accum", 1)
        print(f"training {steps} steps × batch {a.batch_size}" + (f" × {accum} accumulated" if accum > 1 else "")
              + f"{_processes(self.world_size)} ({lr}, {inputs}, on {self.device}"
              + (f" in {a.precision}" if a.precision != "fp32" else "")
              + f", {torch.get_num_threads()} threads)", flush=True)
        self._ckpt = checkpointing(a, self.output)
        if a.resume is None:  # the data's sha256: --resume refuses when the file changed
            from ..train.checkpoint import file_fingerprints

            self._ckpt["checkpoint_meta"]["files"] = file_fingerprints({"data": getattr(a, "data", None)})
        else:
            from ..train.checkpoint import latest_checkpoint

            self._ckpt["checkpoint_meta"]["files"] = latest_checkpoint(self._ckpt["checkpoint_dir"]).meta.get(
                "files", {})
        optimizer = None
        if getattr(a, "head_lr", None) is not None:  # the fresh task head at its own learning rate
            optimizer = torch.optim.AdamW(head_param_groups(model, a.lr, a.head_lr), lr=a.lr)
        r = self.result = train(model, batches, steps=steps, lr=a.lr, warmup=a.warmup, procedures=procedures,
                                optimizer=optimizer, progress=not a.no_progress, precision=a.precision,
                                grad_accum=accum, **self._ckpt)
        print(f"trained {r.steps} steps ({r.examples:,} {unit}) in {r.seconds:.1f} s — {r.throughput:.1f} {unit}/s, "
              f"final loss {r.final_loss:.4f}" + (f", peak memory +{r.peak_mib:.0f} MiB" if r.peak_mib is not None
                                                   else ""))
        return r

    def finish(self, model: nn.Module, task: str, model_dir: Path | str, fields: dict[str, Any]) -> int:
        """Save the adapter, then ``train_info.json``: what every task records plus the task's ``fields``; drop the
        checkpoints of the now finished run."""
        import peftkit

        a = self.args
        info = {
            "peftkit_version": peftkit.__version__,
            "task": task,
            "method": self.info.name,
            "config": self.cfg.to_dict(),
            "model": str(Path(model_dir).absolute()) if Path(model_dir).exists() else str(model_dir),
            "model_is_default": a.model is None,
            "quantize": a.quantize,
            "seed": a.seed,
            "split_seed": a.split_seed,
            "max_length": a.max_length,
            **run_record(a, self.result),
            "calibration": self.calibration,
            "density_loss": getattr(a, "density_loss", None),
            **fields,
            "trainable_params": self.summary.trainable,
            "total_params": self.summary.total,
        }
        wall = time.perf_counter() - self.wall_start
        info["wall_seconds"] = round(wall, 3)
        # adapter + train_info.json as one unit: replacing an older adapter (--overwrite) never leaves its run info
        peftkit.save(model, self.output, overwrite=bool(a.overwrite), run_info=info)
        if self._ckpt is not None:
            finish_checkpoints(self._ckpt)
        self.lock.release()
        print(f"saved adapter to {self.output}")
        print(f"wall time: {wall:.1f} s")
        return 0


def fit_default_ranks(model: nn.Module, info: Any, cfg: Any, given: dict[str, Any]) -> Any:
    """``cfg`` with the method's default ranks lowered, layer by layer, to what each targeted layer of ``model``
    allows (:func:`peftkit.core.adapter.fit_ranks`); a rank given with ``--rank`` / ``--opt`` (``given``: the config
    fields from the command line) is left as given, and refused later if a layer cannot take it. Prints what was
    lowered."""
    if info.model_level:
        return cfg
    from ..core.adapter import fit_ranks
    from ..core.host import Host
    from ..core.peft_names import translate
    from ..core.targeting import find_targets

    fixed = set(translate(type(cfg), dict(given))[1]) - {"target_modules"}
    targets = [(path, Host(module, path)) for path, module in find_targets(model, cfg.resolve(model))]
    cfg, lowered = fit_ranks(info.adapter, cfg, targets, fixed)
    for name, layers in lowered.items():
        default = layers[0][1]
        limits = sorted({limit for _, _, limit in layers})
        print(f"{name}: {info.name}'s default {name}={default} exceeds what {len(layers)} of the {len(targets)} "
              f"adapted layers allow; they use their limit ({', '.join(map(str, limits))}) — set it with "
              f"{'--rank' if name == 'r' else f'--opt {name}=...'}")
    return cfg


#: model types whose position ids start after the padding index (RoBERTa's embeddings): padding_idx + 1 fewer
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod", "mpnet")


def max_positions(model: nn.Module) -> int | None:
    """The longest input ``model`` takes: its config's ``max_position_embeddings`` (GPT-2: ``n_positions``), less
    ``pad_token_id + 1`` for RoBERTa-style models, or None."""
    config = getattr(model, "config", None)
    limit = next((v for k in ("max_position_embeddings", "n_positions")
                  if isinstance(v := getattr(config, k, None), int) and not isinstance(v, bool) and v > 0), None)
    pad = getattr(config, "pad_token_id", None)
    if limit is not None and getattr(config, "model_type", None) in _OFFSET_POSITIONS and isinstance(pad, int):
        limit -= pad + 1
    return limit


def check_max_length(model: nn.Module, max_length: int | None) -> None:
    """``--max-length`` above the model's position table (``config.max_position_embeddings``, GPT-2's
    ``n_positions``) would fail inside the forward pass (``expanded size (1502) must match (512)``): refuse it."""
    limit = max_positions(model)
    if max_length is not None and limit is not None and max_length > limit:
        raise PeftkitError(f"--max-length {max_length} exceeds the model's {limit} positions "
                           f"(config.max_position_embeddings); use --max-length <= {limit}")


#: bytes per trained float32 value: the value, its gradient and AdamW's two moments
TRAIN_BYTES_PER_PARAM = 16


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable`` of ``/proc/meminfo``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def trainable_estimate(model: nn.Module, info: Any, cfg: Any) -> int | None:
    """The trainable parameters ``peftkit.adapt(model, cfg)`` would create, from the method's formula
    (``expected_params`` per targeted layer + ``shared_params``) plus the ``modules_to_save`` copies, computed without
    building anything; None when the method has no formula. Every targeted layer's rank is checked first
    (:meth:`~peftkit.core.adapter.Adapter.check_ranks`: the error names the layer)."""
    from ..core.host import Host
    from ..core.targeting import find_targets, matches

    resolved = cfg.resolve(model)
    hosts = [] if info.model_level else [(path, Host(module, path)) for path, module in find_targets(model, resolved)]
    for path, host in hosts:
        info.adapter.check_ranks(host, resolved.for_module(path))
    try:
        if info.model_level:
            n = int(info.adapter.expected_params(model, resolved))
        else:
            n = sum(int(info.adapter.expected_params(h, resolved.for_module(p))) for p, h in hosts)
            n += int(info.adapter.shared_params(resolved, [h for _, h in hosts]))
    except Exception:  # noqa: BLE001 - no formula (or not for these layers): adapt() reports real problems
        return None
    for target in resolved.modules_to_save or []:
        n += sum(p.numel() for name, m in model.named_modules() if name and matches(name, [target])
                 for p in m.parameters())
    return n


def preflight(model: nn.Module, info: Any, cfg: Any, available: int | None = None) -> None:
    """Refuse, before anything is allocated, an adapter whose training state (parameters, gradients, AdamW moments:
    :data:`TRAIN_BYTES_PER_PARAM` bytes each) needs more than the memory available (``available``, default
    :func:`available_memory`); a rank above a layer's limit is refused first, naming the layer."""
    n = trainable_estimate(model, info, cfg)
    available = available_memory() if available is None else available
    if n is None or available is None:
        return
    need = n * TRAIN_BYTES_PER_PARAM
    if need > available:
        raise PeftkitError(
            f"the adapter would train {n:,} parameters: {_size(need)} for their values, gradients and AdamW states, "
            f"more than the {_size(available)} of memory available; lower --rank or target fewer layers"
        )


def check_head_fits(model_dir: Path, num_labels: int, available: int | None = None) -> None:
    """Before the base model is loaded: refuse a ``num_labels``-way classifier head whose training state (the head
    is trained in full: :data:`TRAIN_BYTES_PER_PARAM` bytes per value, plus the frozen original) needs more than the
    memory available. The head's size is read from ``config.json`` (``hidden_size``, else ``d_model`` / ``n_embd``)."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return  # loading the model reports it
    width = next((v for k in ("hidden_size", "d_model", "n_embd", "dim")
                  if isinstance(v := config.get(k) if isinstance(config, dict) else None, int) and v > 0), None)
    available = available_memory() if available is None else available
    if width is None or available is None:
        return
    n = num_labels * (width + 1)
    need = n * (TRAIN_BYTES_PER_PARAM + 4)
    if need > available:
        raise PeftkitError(
            f"a {num_labels:,}-class head on {width}-wide features has {n:,} parameters: {_size(need)} to train, "
            f"more than the {_size(available)} of memory available; use fewer classes"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _check_writable(output: Path) -> None:
    """Fail before training, not after it, when ``output`` cannot be created or written (nothing is created here)."""
    import os

    here = output.absolute()
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise PeftkitError(f"output {output} cannot be created: {here} is a file, not a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise PeftkitError(f"output {output} cannot be written: no write permission on {here}")


def run_record(args: argparse.Namespace, result: Any) -> dict[str, Any]:
    """The training budget and measured speed/memory that every task records in ``train_info.json``."""
    import torch

    from ..train.distributed import world

    return {
        "threads": torch.get_num_threads(),
        "processes": world()[1],
        "device": result.device,
        "precision": result.precision,
        "grad_accum": result.grad_accum,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "head_lr": getattr(args, "head_lr", None),
        "warmup": args.warmup,
        "steps": result.steps,
        "examples_seen": result.examples,
        "train_seconds": round(result.seconds, 3),
        "examples_per_second": round(result.throughput, 2),
        "step_seconds": round(result.seconds / max(result.steps, 1), 4),
        "train_peak_mib": None if result.peak_mib is None else round(result.peak_mib, 1),
        "final_loss": result.final_loss,
    }


def set_threads(n: int | None) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise PeftkitError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def run_device(args: argparse.Namespace) -> Any:
    """``--device`` / ``--precision`` / ``--grad-accum`` of ``peftkit train`` checked (before anything is loaded or
    written); returns the ``torch.device`` to train on (``cuda:LOCAL_RANK`` under ``torchrun``)."""
    from ..train.distributed import local_rank
    from ..train.trainer import check_precision, pick_device

    accum = getattr(args, "grad_accum", 1)
    if accum is None or accum < 1:
        raise PeftkitError(f"--grad-accum must be >= 1 (micro-batches per optimiser step), got {accum}")
    device = pick_device(getattr(args, "device", "auto"), local_rank())
    check_precision(getattr(args, "precision", "fp32"), device)
    return device


def eval_device(args: argparse.Namespace) -> Any:
    """``--device`` of ``peftkit eval`` / ``generate``."""
    from ..train.trainer import pick_device

    return pick_device(getattr(args, "device", "auto"))



def check_train_args(args: argparse.Namespace) -> tuple[Any, type, dict[str, Any]]:
    """Validate every cheap ``train`` option (both tasks); returns (method info, config class, config fields)."""
    from ..core.registry import get as get_method

    info = get_method(args.method)
    cfg_cls = info.config
    fields = cfg_cls.field_names()
    targets = args.targets  # default: the method's own default targets (e.g. all-norm for lntuning), else all-linear
    if info.model_level and targets is not None:
        raise PeftkitError(f"--targets: {info.name} is a model-level method (it adapts the model's inputs, no layers)")
    if targets is None and not info.model_level:
        own = next(f.default for f in dataclasses.fields(cfg_cls) if f.name == "target_modules")
        targets = own if isinstance(own, str) else RUN_DEFAULTS["targets"]
    cfg_fields: dict[str, Any] = {} if info.model_level else {"target_modules": parse_targets(targets)}
    for flag, key, value in (("--rank", "r", args.rank), ("--alpha", "alpha", args.alpha)):
        if key in fields:
            if value is not None:
                cfg_fields[key] = value
        elif value is not None:
            raise PeftkitError(f"{flag}: method {info.name!r} has no field {key!r}; valid fields: {', '.join(fields)}")
    cfg_fields.update(parse_opts(args.opt or []))
    cfg = cfg_cls.from_dict(cfg_fields)  # names and values checked now; modules_to_save filled once the model loads
    if type(cfg) is not cfg_cls:  # a PEFT switch (use_dora=true) names another method
        raise PeftkitError(f"--opt: these options describe method {cfg.method!r}, not {info.name!r}; use --method "
                           f"{cfg.method}")
    for flag, v in (("--lr", args.lr), ("--batch-size", args.batch_size), ("--max-length", args.max_length),
                    ("--head-lr", args.head_lr)):
        if v is not None and v <= 0:  # None: an option the task does not use (max length for images)
            raise PeftkitError(f"{flag} must be > 0, got {v}")
    if args.steps is not None and args.steps < 1:
        raise PeftkitError(f"--steps must be >= 1, got {args.steps}")
    if args.density_loss is not None and not args.density_loss > 0:
        raise PeftkitError(f"--density-loss must be > 0, got {args.density_loss}")
    if args.epochs is not None and args.epochs <= 0:
        raise PeftkitError(f"--epochs must be > 0, got {args.epochs}")
    # argparse's types refuse these at parsing; checked again for options that come from elsewhere (--resume)
    for flag, v in (("--lr", args.lr), ("--head-lr", args.head_lr), ("--epochs", args.epochs),
                    ("--alpha", args.alpha), ("--density-loss", args.density_loss), ("--warmup", args.warmup)):
        if v is not None and not all_finite(v):
            raise PeftkitError(f"{flag} must be a finite number, got {v}")
    if args.warmup is not None and args.warmup < 0:
        raise PeftkitError(f"--warmup must be >= 0 (a fraction of the steps when < 1, else steps), got {args.warmup}")
    set_threads(args.threads)
    return info, cfg_cls, cfg_fields


def calibrate_model(info: Any, model: Any, batches: Any, examples: int) -> dict[str, Any] | None:
    """Data-aware init (e.g. QWHA) from ``batches`` (their labels dropped); prints and returns what it did (None,
    silently, when the adapter's init needs no data, e.g. LoRA without init=eva / corda)."""
    errors = info.calibrate(model, ({k: v for k, v in b.items() if k != "labels"} for b in batches))
    if not errors:
        return None
    before, after = (math.sqrt(sum(e[i] ** 2 for e in errors.values())) for i in (0, 1))
    print(f"calibrated {len(errors)} modules on {examples} training examples: error on the calibration "
          f"data {before:.4g} → {after:.4g} ({after / before:.1%} left)" if before > 0 else
          f"calibrated {len(errors)} modules on {examples} training examples")
    return {"examples": examples, "modules": len(errors), "error_before": before, "error_after": after}


CHECKPOINTS = "checkpoints"
_RESUME_KEEPS = ("resume", "threads", "no_progress", "func", "command")  # options a resumed run may set anew


def resume_args(args: argparse.Namespace, defaults: dict[str, Any]) -> argparse.Namespace:
    """The options of the interrupted run in ``--resume DIR`` (from its newest checkpoint), with the run's own
    ``--threads`` / ``--no-progress``; any other option given with ``--resume`` (one that differs from the parser's
    ``defaults``) is an error."""
    from ..train.checkpoint import check_fingerprints, latest_checkpoint

    folder = Path(args.resume)
    if not folder.is_dir():
        raise PeftkitError(f"--resume: {folder} is not a folder")
    given = [k for k, v in vars(args).items() if k not in _RESUME_KEEPS and v != defaults.get(k)]
    if given:
        raise PeftkitError(f"--resume continues the run with its own options (stored in {folder / CHECKPOINTS}); "
                           f"drop --{given[0].replace('_', '-')}")
    if not (folder / CHECKPOINTS).is_dir() and (folder / TRAIN_INFO).is_file():
        raise PeftkitError(f"--resume: the run in {folder} finished (it has its {TRAIN_INFO}); nothing to resume")
    meta = latest_checkpoint(folder / CHECKPOINTS).meta
    stored = meta.get("args")
    if not isinstance(stored, dict):
        raise PeftkitError(f"--resume: the checkpoint in {folder / CHECKPOINTS} was not written by 'peftkit train'")
    check_fingerprints(meta.get("files", {}), f"--resume {folder}")  # the same data bytes, from any directory
    resumed = argparse.Namespace(**{**defaults, **stored})
    for k in _RESUME_KEEPS:
        setattr(resumed, k, getattr(args, k))
    if args.threads is None:
        resumed.threads = stored.get("threads")
    resumed.output, resumed.overwrite = str(folder), True
    return resumed


def checkpointing(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """The checkpoint arguments of :func:`peftkit.train.train` for a ``peftkit train`` run (any task): a checkpoint
    every ``--save-every`` steps in ``OUTPUT/checkpoints`` (holding the run's options for ``--resume``), and
    resuming from the one in ``--resume DIR``."""
    if args.save_every < 0:
        raise PeftkitError(f"--save-every must be >= 0, got {args.save_every}")
    folder = Path(args.resume) if args.resume is not None else output
    stored = {k: v for k, v in vars(args).items() if k not in ("func", "resume")}
    return {"checkpoint_dir": folder / CHECKPOINTS, "save_every": args.save_every, "resume": args.resume is not None,
            "checkpoint_meta": {"args": stored}}


def finish_checkpoints(kwargs: dict[str, Any]) -> None:
    """After the adapter of a finished run is saved: its checkpoints are not needed any more."""
    import shutil

    shutil.rmtree(kwargs["checkpoint_dir"], ignore_errors=True)


def train_command(args: argparse.Namespace, defaults: dict[str, Any]) -> int:
    """``peftkit train``: takes the options of a ``--resume`` run (``defaults``: the parser's, to tell which options
    were given), joins the process group when started by ``torchrun``, then trains the task. Every process runs the
    same code; only rank 0 prints and keeps its files."""
    from ..train.distributed import init_from_env

    if args.resume is not None:
        args = resume_args(args, defaults)
    rank, _ = init_from_env(device=run_device(args))  # nccl on CUDA, gloo otherwise
    try:
        if rank == 0:
            return _train_task(args)
        import contextlib
        import io
        import tempfile

        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            args.output, args.overwrite, args.no_progress = str(Path(tmp) / "out"), True, True
            return _train_task(args)
    finally:
        release_run_locks()


def _train_task(args: argparse.Namespace) -> int:
    """Refuse the flags of another task, then run ``--task``'s ``train``."""
    from . import all_tasks, get_task

    task = get_task(getattr(args, "task", None) or "classification")
    owners: dict[tuple[str, str], list[str]] = {}  # a flag may be read by several tasks (--examples)
    for t in all_tasks():
        for key in t.own_flags:
            owners.setdefault(key, []).append(t.name)
    for (dest, flag), names in owners.items():
        if task.name not in names and getattr(args, dest, None) is not None:
            raise PeftkitError(f"{flag} applies only to --task {' / '.join(names)}")
    return task.train(args)


def _processes(world_size: int) -> str:
    return f" per process × {world_size} processes (torchrun)" if world_size > 1 else ""


def eval_setup(args: argparse.Namespace, info: dict[str, Any], default_model: Callable[[], Path]
               ) -> tuple[Path, list[str], Any]:
    """What ``eval`` of a labelled task starts with: the base model folder (:func:`~.record.eval_model_dir`), the
    label names, the device (``--device``) and the threads (``--threads``, else the training's)."""
    from .record import eval_model_dir

    model_dir = eval_model_dir(info, default_model)
    device = eval_device(args)
    set_threads(args.threads if args.threads is not None else info.get("threads"))
    return model_dir, list(info["label_names"]), device
