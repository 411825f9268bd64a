"""What every ``peftkit train`` task does around its own data, model and metrics — written once.

A task module (classification in :mod:`peftkit.cli`, :mod:`peftkit.cli_causal_lm`, :mod:`peftkit.cli_token`,
:mod:`peftkit.cli_vision`) loads its data and base model and measures its own metric; :class:`TrainRun` does the
rest the same way for all of them:

    run = TrainRun(args, TASK_DEFAULTS, tag="ner")      # defaults, option checks, the output folder
    cfg, procedures = run.adapt(model)                  # config (+ head in modules_to_save), adapter, procedures
    batches = run.batches(lambda b: make_batches(b))    # under torchrun: the global batch, this process's slice
    summ = run.describe(model, model_line, data_lines)  # model / base / data / method / parameter lines
    run.calibrate(model, calibration_batches, n)        # data-aware init, for methods that register one
    result = run.train(model, batches, steps, "sentences")   # progress bar, checkpoints, --resume
    return run.finish(model, {...task's own train_info...})  # adapter + train_info.json, checkpoints removed
"""

from __future__ import annotations

import argparse
import atexit
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .cli import (
    _calibrate,
    _check_train_args,
    _processes,
    checkpointing,
    finish_checkpoints,
    run_device,
    run_record,
)
from .core.errors import PeftkitError
from .core.io import RunLock

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
        self.info, self.cfg_cls, self.cfg_fields = _check_train_args(args)
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
        from .train.distributed import world

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

        from .models import classifier_head_names
        from .train.trainer import method_procedures

        fields = dict(self.cfg_fields)
        if "modules_to_save" not in fields:
            fields["modules_to_save"] = list(heads if heads is not None else classifier_head_names(model)) or None
        self.cfg = self.cfg_cls.from_dict(fields)
        check_max_length(model, getattr(self.args, "max_length", None))
        preflight(model, self.info, self.cfg)
        torch.manual_seed(self.args.seed)
        peftkit.adapt(model, self.cfg)  # on the CPU, where the model was loaded: the same init on every device
        model.to(self.device)
        procedures = method_procedures(self.info, model, self.cfg)
        if getattr(self.args, "density_loss", None) is not None:  # DEFT: any method + λ·(smooth L0 of MLP acts)
            from .train.density import DensityLoss

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
        from .train.distributed import Shard

        batches = make(self.args.batch_size * self.world_size)
        return Shard(batches, self.rank, self.world_size) if self.world_size > 1 else batches

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
            from .quant.bnb import linear_weight_bytes

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
        from .train.trainer import _to

        n = min(self.defaults.get("calibration_size", 256), available)
        self.calibration = _calibrate(self.info, model, (_to(b, self.device) for b in make(n)), n)

    # -- training -------------------------------------------------------------------------------------------
    def train(self, model: nn.Module, batches: Iterable[Any], steps: int, procedures: Sequence[Any],
              unit: str = "examples", inputs: str | None = None) -> Any:
        """:func:`peftkit.train.train` with the run's options, checkpoints and ``--resume``; prints the budget
        (``inputs``: what one example is, default the max length) before and the speed after."""
        import torch

        from .train.trainer import head_param_groups, train

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
            from .train.checkpoint import file_fingerprints

            self._ckpt["checkpoint_meta"]["files"] = file_fingerprints({"data": getattr(a, "data", None)})
        else:
            from .train.checkpoint import latest_checkpoint

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
    from .core.host import Host
    from .core.targeting import _matches, find_targets

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
        n += sum(p.numel() for name, m in model.named_modules() if name and _matches(name, [target])
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


def eval_model_dir(info: dict[str, Any], default: Callable[[], Path]) -> Path:
    """The base model folder an adapter's ``train_info.json`` names; the task's packaged ``default()`` when the
    run used it and the package has moved (a new environment: same model, new place)."""
    from .models import resolve_model_dir

    model_dir = Path(info["model"])
    if not (model_dir / "config.json").is_file() and info.get("model_is_default"):
        model_dir = default()
    return resolve_model_dir(model_dir)


def load_for_eval(model: nn.Module, adapter: Path, rank: int | None, what: str, device: Any = None) -> str:
    """Load the adapter saved in ``adapter`` into ``model`` (``peftkit eval``), at rank ``rank`` when given (methods
    trained for every rank, e.g. DyLoRA), then move it to ``device`` when given; returns ``what`` (the evaluated
    data's description) saying so."""
    import peftkit

    peftkit.load(model, adapter)
    if device is not None:
        model.to(device)
    if rank is not None:
        peftkit.set_rank(model, rank)
        what += f", at rank {rank}"
    return what
