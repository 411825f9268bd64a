"""``peftkit bench``: its options and what it does; ``peftkit.cli`` only registers it."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from .options import QUICK_METHODS, QUICK_SETTINGS

_Q = QUICK_SETTINGS
DESCRIPTION = (
    "Run several methods on the classification task with the same budget and seed (default: every registered method "
    "that supports it; LoRA always, as the reference), each 'peftkit train' in a fresh process, and write "
    "OUT/results.json, OUT/results.md (a table: trainable params, % of the model, step time and peak memory × LoRA, "
    "held-out accuracy) and OUT/results.png (accuracy vs trainable params). A method that fails leaves a row saying "
    f"why. --quick: {', '.join(QUICK_METHODS)}; {_Q['steps']} steps × batch {_Q['batch_size']}, max length "
    f"{_Q['max_length']}, {_Q['eval_size']} held-out examples, no timing pass — a smoke test of a few minutes, not a "
    "ranking."
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the CLI's subparsers."""
    b = sub.add_parser("bench", help="compare methods on one task, same budget: table + plot",
                       description=DESCRIPTION)
    b.add_argument("--methods", metavar="A,B,C",
                   help="comma list of registered methods or name/variant entries of the bench's OPTIONS")
    b.add_argument("--steps", type=int, help=f"optimiser steps per method (default 300; --quick {_Q['steps']})")
    from ..tasks import get_task
    from .runner import TASK

    d = get_task(TASK).defaults
    b.add_argument("--eval-size", type=int,
                   help=f"held-out examples (default: peftkit train's, {d['eval_size']}; --quick {_Q['eval_size']})")
    b.add_argument("--batch-size", type=int, help=f"default {d['batch_size']} (--quick {_Q['batch_size']})")
    b.add_argument("--max-length", type=int, help=f"tokens (default {d['max_length']}; --quick {_Q['max_length']})")
    b.add_argument("--seed", type=int, default=0, help="the same seed for every method (default 0)")
    b.add_argument("--quick", action="store_true", help="a few fast methods with a tiny budget (see above)")
    b.add_argument("--out", default="bench", help="output folder (default %(default)s/)")
    b.add_argument("--model", help="local Hugging Face model folder (default: the packaged all-MiniLM-L6-v2)")
    b.add_argument("--data", help="CSV/TSV/JSONL with text,label columns (default: Rotten Tomatoes reviews)")
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads of every run (default %(default)s)")
    b.add_argument("--timing", action=argparse.BooleanOptionalAction, default=None,
                   help="a separate fixed-batch pass per method for step time and memory (default: on, off with "
                        "--quick); without it the training runs' own numbers are used")
    b.add_argument("--no-progress", action="store_true", help="no progress bar (one line per method instead)")
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import data as D
    from ..models import resolve_model_dir
    from ..tasks import get_task
    from . import report
    from .runner import TASK, BenchSettings, child_env, resolve_methods, run_bench

    wall_start = time.perf_counter()
    quick = args.quick

    def pick(given: Any, key: str, full: Any) -> Any:  # an explicit option, else the --quick value, else the default
        return given if given is not None else (QUICK_SETTINGS[key] if quick else full)

    names = args.methods.split(",") if args.methods is not None else (list(QUICK_METHODS) if quick else None)
    # ---- everything checked before anything runs or is written
    methods = resolve_methods(names)
    d = get_task(TASK).defaults
    s = BenchSettings(steps=pick(args.steps, "steps", 300), eval_size=pick(args.eval_size, "eval_size", None),
                      batch_size=pick(args.batch_size, "batch_size", d["batch_size"]),
                      max_length=pick(args.max_length, "max_length", d["max_length"]), seed=args.seed,
                      threads=args.threads, model=args.model, data=args.data,
                      timing=args.timing if args.timing is not None else not quick)
    s.check()
    model_dir = resolve_model_dir(args.model)
    data = D.load_data(args.data)
    if s.eval_size is not None:
        D.split_indices(len(data), s.eval_size, 0)  # a clear error now rather than one per method
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PeftkitError(f"--out {out} exists and is not a folder")

    settings: dict[str, Any] = {
        "task": TASK, "methods": methods, "quick": quick, "model": str(model_dir),
        "data": data.source, "labels": data.label_names, **{k: v for k, v in vars(s).items() if k not in
                                                             ("model", "data")},
        "omp_wait_policy": child_env()["OMP_WAIT_POLICY"]}
    model_name = "all-MiniLM-L6-v2" if args.model is None else model_dir.name
    title = (f"peftkit bench{' --quick' if quick else ''}: {model_name}, {Path(data.source).name}, "
             f"{s.steps} steps × batch {s.batch_size}, max length {s.max_length}, seed {s.seed}, "
             f"{s.threads} threads")
    print(f"bench: {len(methods)} methods ({', '.join(methods)}) — {s.steps} steps × batch {s.batch_size}, max "
          f"length {s.max_length}, seed {s.seed}, {s.threads} threads; timing pass {'on' if s.timing else 'off'}; "
          f"writing to {out}/", flush=True)

    def save(rows: list[dict[str, Any]], final: bool = False) -> dict[str, Path]:
        settings["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
        return report.write(out, rows, settings, title=title, final=final)

    def on_row(rows: list[dict[str, Any]]) -> None:
        if "majority_accuracy" not in settings:  # the held-out split as the first completed run drew it
            done = next((r for r in rows if "error" not in r), None)
            if done is not None:
                _, held_out = D.split_indices(len(data), int(done["eval_size"]), int(done["split_seed"]))
                counts = Counter(data.labels[i] for i in held_out)
                settings["majority_accuracy"] = max(counts.values()) / len(held_out)
        save(rows)

    rows = run_bench(methods, s, labels=len(data.label_names), model_dir=str(model_dir), logs=out / "logs",
                     progress=not args.no_progress, on_row=on_row)
    paths = save(rows, final=True)
    print()
    print(report.table(rows, majority=settings.get("majority_accuracy")))
    failed = sum("error" in r for r in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} methods completed; wrote {paths['json']}, {paths['md']}, "
          f"{paths['png']} (per-method logs in {out / 'logs'}/)")
    print(f"wall time: {time.perf_counter() - wall_start:.1f} s")
    return 0
