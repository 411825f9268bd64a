"""``peftkit train --task fewshot`` and ``peftkit eval`` of a CrossTune few-shot classification head.

CrossTune (Lu et al. 2024, :mod:`peftkit.heads.crosstune`) treats the encoder as a black box: its token features are
computed once, without gradients, and only a label-enhanced cross-attention head trains on them. The label
descriptions are the label-side input: each label's text ``y_k`` is encoded and mean-pooled to ``e_k``, the query
that attends to the input's tokens. This task draws ``--examples K`` training examples per class (``--seed`` picks
which, and initialises the head) from the training part of the data (default Rotten Tomatoes, or any CSV / TSV /
JSONL with text,label columns like the classification task), over any local Hugging Face encoder (default the
packaged all-MiniLM-L6-v2), and reports held-out accuracy

- before: zero-shot — each input's mean-pooled features against the label descriptions' ``e_k`` (cosine similarity,
  argmax); no training example is used;
- a linear-probe baseline: L2-regularised logistic regression on the same K examples' mean-pooled features;
- after: the trained CrossTune head.

It saves ``crosstune_head.safetensors`` and ``train_info.json`` (as one unit); ``peftkit eval --adapter DIR`` rebuilds
the encoder, the held-out split and the label descriptions and reproduces the accuracy. Label descriptions: a JSON
object ``{label: text}`` with ``--label-descriptions FILE``; default, for Rotten Tomatoes, CrossTune's "It is
positive: …" style texts (:data:`RT_DESCRIPTIONS`), otherwise ``"It is {label}."``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from . import Task, record, register_task
from .options import nonnegative_int

TASK = "fewshot"
HEAD_FILE = "crosstune_head.safetensors"
DEFAULTS = {"examples": 8, "epochs": 100, "lr": 1e-3, "batch_size": 32, "max_length": 64, "eval_size": 1000,
            "eval_batch_size": 128, "n_heads": 4, "dropout": 0.1, "weight_decay": 1e-2}
#: CrossTune's label descriptions ("It is positive: ...") for the two Rotten Tomatoes labels
RT_DESCRIPTIONS = {"rotten": "It is negative: a bad, disappointing movie that the critic did not like.",
                   "fresh": "It is positive: a good, enjoyable movie that the critic liked."}
#: the ``peftkit train`` options that configure an adapter or its training loop; a head over frozen features has none
_NOT_HERE = (("rank", "--rank"), ("alpha", "--alpha"), ("targets", "--targets"), ("opt", "--opt"),
             ("quantize", "--quantize"), ("density_loss", "--density-loss"), ("head_lr", "--head-lr"))
_OWN = (("examples", "--examples"), ("label_descriptions", "--label-descriptions"))


def add_flags(parser: argparse.ArgumentParser) -> None:
    shared = next((a for a in parser._actions if "--examples" in a.option_strings), None)
    what = f"fewshot: K training examples drawn per class (default {DEFAULTS['examples']}; --seed picks them)"
    if shared is None:  # causal-lm registers --examples too (examples printed); one option, read by both
        parser.add_argument("--examples", type=nonnegative_int, metavar="K", help=what)
    else:
        shared.help = f"{shared.help}; {what}"
    parser.add_argument("--label-descriptions", metavar="FILE",
                        help="fewshot: JSON object {label: description} — the label texts CrossTune's queries "
                             "are made of (default: Rotten Tomatoes' built-in ones, else 'It is {label}.')")


def label_descriptions(path: str | None, names: list[str], source: str) -> list[str]:
    """One description per label name: from ``path`` (a JSON object naming every label, and no other), else the
    built-in ones."""
    from ..data.text import ROTTEN_TOMATOES

    if path is None:
        table = RT_DESCRIPTIONS if source == ROTTEN_TOMATOES else {}
        return [table.get(n, f"It is {n}.") for n in names]
    from ..core.io import read_json

    if not Path(path).is_file():
        raise PeftkitError(f"--label-descriptions: file not found: {path}")
    table = read_json(path)
    missing, extra = [n for n in names if n not in table], sorted(set(table) - set(names))
    if missing or extra:
        raise PeftkitError(f"--label-descriptions {path}: " + (f"no description for label(s) {missing}" if missing
                           else f"unknown label(s) {extra}") + f"; the data's labels are {names}")
    bad = [k for k in names if not isinstance(table[k], str) or not table[k].strip()]
    if bad:
        raise PeftkitError(f"--label-descriptions {path}: the description of {bad[0]!r} must be a non-empty string")
    return [table[n] for n in names]


def draw_examples(labels: list[int], pool: list[int], k: int, names: list[str], seed: int) -> list[int]:
    """``k`` indices of each class drawn from ``pool`` with ``seed`` (Python's ``random``: the same on every
    platform), class by class; a class with fewer than ``k`` examples in the pool is an error naming it."""
    if k < 1:
        raise PeftkitError(f"--examples must be >= 1 for --task {TASK} (training examples per class), got {k}")
    by_class: dict[int, list[int]] = {c: [] for c in range(len(names))}
    for i in pool:
        by_class[labels[i]].append(i)
    smallest = min(by_class, key=lambda c: len(by_class[c]))
    if len(by_class[smallest]) < k:
        raise PeftkitError(f"--examples {k} exceeds the {len(by_class[smallest])} training examples of class "
                           f"{names[smallest]!r} (the smallest class outside the held-out split); use --examples <= "
                           f"{len(by_class[smallest])}")
    rng = random.Random(seed)
    return sorted(i for c in range(len(names)) for i in rng.sample(by_class[c], k))


def load_encoder(model_dir: Path) -> tuple[Any, Any]:
    """``(AutoModel, tokenizer)`` of a local folder, offline, in eval mode, every parameter frozen."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    from ..models import load_errors, load_message, quiet_transformers

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    except load_errors() as e:
        raise PeftkitError(load_message("an encoder", model_dir, e)) from None
    return model.eval().requires_grad_(False), tokenizer


def head_from_info(info: dict[str, Any], path: Path) -> Any:
    """The CrossTune head ``train_info.json``'s ``head`` describes (unknown kinds / bad sizes: a clear error)."""
    from ..heads.crosstune import CrossAttentionLabelHead

    cfg = info.get("head")
    if not isinstance(cfg, dict) or cfg.get("kind") != "crosstune":
        raise PeftkitError(f"{path}: head must be a CrossTune head config ({{\"kind\": \"crosstune\", ...}}), got "
                           f"{json.dumps(cfg)[:80]}")
    fields = {"d_model", "n_heads", "dropout"}
    if set(cfg) - fields - {"kind"} or not all(isinstance(cfg.get(k), int | float) and not isinstance(cfg.get(k), bool)
                                               for k in fields):
        raise PeftkitError(f"{path}: head must hold exactly kind, d_model, n_heads, dropout (numbers), got "
                           f"{json.dumps(cfg)[:80]}")
    if not 0 <= cfg["dropout"] < 1:
        raise PeftkitError(f"{path}: head dropout must be in [0, 1), got {cfg['dropout']}")
    return CrossAttentionLabelHead(int(cfg["d_model"]), int(cfg["n_heads"]), float(cfg["dropout"]))


def linear_probe(x: Any, y: Any, num_classes: int, weight_decay: float = 1e-3) -> Any:
    """Multinomial logistic regression on L2-normalised features (L-BFGS, L2 penalty ``weight_decay``·‖W‖²);
    returns a function mapping features to logits."""
    import torch
    import torch.nn.functional as F

    xn = F.normalize(x, dim=-1)
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = F.cross_entropy(xn @ w + b, y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda feats: F.normalize(feats, dim=-1) @ w + b


def _acc(pred: Any, gold: Any) -> tuple[float, int, int]:
    correct = int((pred == gold).sum())
    return correct / len(gold), correct, len(gold)


def _features(encoder: Any, tokenizer: Any, texts: list[str], max_length: int, batch: int, device: Any) -> Any:
    """CrossTune's cached token features of ``texts`` (the encoder run once, under ``no_grad``, on ``device``)."""
    from ..heads.crosstune import cache_features

    def encode(t: list[str]) -> Any:
        enc = tokenizer(t, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = encoder(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        return out.last_hidden_state.cpu(), enc["attention_mask"].bool()

    return cache_features(encode, texts, batch)


def train(args: argparse.Namespace) -> int:
    for key, flag in _NOT_HERE:
        if getattr(args, key, None) is not None:
            raise PeftkitError(f"{flag} does not apply to --task {TASK}: it trains a CrossTune head over the frozen "
                               f"encoder's cached features (no adapter)")
    from .run import RUN_DEFAULTS, TrainRun

    if args.method != RUN_DEFAULTS["method"]:
        raise PeftkitError(f"--method does not apply to --task {TASK}: it trains a CrossTune head (no adapter)")
    if args.precision != "fp32" or args.grad_accum != 1:
        raise PeftkitError(f"--precision / --grad-accum do not apply to --task {TASK} (a small fp32 head)")
    k = DEFAULTS["examples"] if args.examples is None else args.examples
    if k < 1:
        raise PeftkitError(f"--examples must be >= 1 for --task {TASK} (training examples per class), got {k}")
    if args.lr is None:
        args.lr = DEFAULTS["lr"]
    run = TrainRun(args, DEFAULTS, tag=TASK)  # options checked, output folder fixed, before anything loads
    from .. import data as D
    from ..models import model_label, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    data = D.load_data(args.data)
    if len(set(data.labels)) < 2:
        raise PeftkitError(f"{data.source}: training needs at least two distinct labels, found only "
                           f"{D.present_labels(data)}")
    descriptions = label_descriptions(args.label_descriptions, data.label_names, data.source)
    pool, eval_idx = D.split_indices(len(data), run.eval_size(len(data)), args.split_seed)
    shots = draw_examples(data.labels, pool, k, data.label_names, args.seed)

    import torch
    import torch.nn.functional as F

    from ..heads.crosstune import CrossAttentionLabelHead, predict, train_head

    encoder, tokenizer = load_encoder(model_dir)
    run.fit_max_length(encoder)
    encoder.to(run.device)
    start = time.perf_counter()
    eb = DEFAULTS["eval_batch_size"]
    train_f = _features(encoder, tokenizer, [data.texts[i] for i in shots], args.max_length, eb, run.device)
    eval_f = _features(encoder, tokenizer, [data.texts[i] for i in eval_idx], args.max_length, eb, run.device)
    labels = _features(encoder, tokenizer, descriptions, args.max_length, eb, run.device).pooled()
    encode_s = time.perf_counter() - start
    y_train = torch.tensor([data.labels[i] for i in shots])
    y_eval = torch.tensor([data.labels[i] for i in eval_idx])
    d = labels.shape[1]
    print(f"model: {model_label(model_dir)} — {type(encoder).__name__} (frozen, black box), {d}-wide token features")
    print(f"data: {data.source} — {k} examples per class drawn with seed {args.seed} ({len(shots)} in all) from "
          f"{len(pool):,} training examples; {len(eval_idx):,} held-out (split seed {args.split_seed})")
    for name, text in zip(data.label_names, descriptions):
        print(f"label {name!r}: {text!r}")
    print(f"encoded {len(shots) + len(eval_idx) + len(descriptions):,} texts once in {encode_s:.1f} s")
    zero = _acc(F.cosine_similarity(eval_f.pooled()[:, None], labels[None], dim=-1).argmax(-1), y_eval)
    print(f"held-out accuracy before (zero-shot: cosine of mean-pooled features with the label descriptions): "
          f"{record.acc_line(zero)}")
    probe = _acc(linear_probe(train_f.pooled(), y_train, len(data.label_names))(eval_f.pooled()).argmax(-1), y_eval)
    print(f"held-out accuracy of a linear probe on the same {len(shots)} examples' mean-pooled features: "
          f"{record.acc_line(probe)}")
    torch.manual_seed(args.seed)
    head = CrossAttentionLabelHead(d, DEFAULTS["n_heads"], DEFAULTS["dropout"])
    per_epoch = math.ceil(len(shots) / args.batch_size)
    epochs = DEFAULTS["epochs"] if args.epochs is None and args.steps is None else (
        max(1, round(args.epochs)) if args.epochs is not None else max(1, math.ceil(args.steps / per_epoch)))
    n_params = sum(p.numel() for p in head.parameters())
    print(f"training the CrossTune head ({n_params:,} parameters): {epochs} epochs × {per_epoch} steps, batch "
          f"{args.batch_size}, lr {args.lr:g}, AdamW", flush=True)
    start = time.perf_counter()
    train_head(head, train_f, y_train, labels, epochs=epochs, lr=args.lr, weight_decay=DEFAULTS["weight_decay"],
               batch_size=args.batch_size, seed=args.seed)
    train_s = time.perf_counter() - start
    after = _acc(predict(head, eval_f, labels).argmax(-1), y_eval)
    print(f"trained in {train_s:.1f} s")
    print(f"held-out accuracy after:  {record.acc_line(after)}")
    import peftkit

    info = {
        "peftkit_version": peftkit.__version__, "task": TASK, "method": "crosstune",
        "head": {"kind": "crosstune", "d_model": d, "n_heads": DEFAULTS["n_heads"], "dropout": DEFAULTS["dropout"]},
        "model": str(model_dir), "model_is_default": args.model is None, "data": data.source,
        "label_names": data.label_names, "label_descriptions": descriptions, "examples_per_class": k,
        "train_indices": shots, "seed": args.seed, "split_seed": args.split_seed, "max_length": args.max_length,
        "eval_size": len(eval_idx), "eval_batch_size": eb, "epochs": epochs, "steps": epochs * per_epoch,
        "batch_size": args.batch_size, "lr": args.lr, "weight_decay": DEFAULTS["weight_decay"],
        "device": str(run.device), "threads": torch.get_num_threads(), "trainable_params": n_params,
        **record.accuracy_fields(zero, after), "baseline_before": "zero-shot label-description similarity",
        "accuracy_linear_probe": probe[0], "correct_linear_probe": probe[1],
        "encode_seconds": round(encode_s, 3), "train_seconds": round(train_s, 3),
    }
    wall = time.perf_counter() - run.wall_start
    info["wall_seconds"] = round(wall, 3)
    save_head(head, run.output, info)
    run.lock.release()
    print(f"saved the head to {run.output}")
    print(f"wall time: {wall:.1f} s")
    return 0


def save_head(head: Any, output: Path, info: dict[str, Any]) -> None:
    """The head's weights and ``train_info.json``, written as one unit (a crash leaves the old folder or the new)."""
    from ..core.io import dumps, serialise_tensors, write_unit

    raw = dumps(info, sort=False)
    blob = serialise_tensors(head.state_dict(), {"format": "pt", "task": TASK}, {record.TRAIN_INFO: raw})
    write_unit(output, {HEAD_FILE: blob, record.TRAIN_INFO: raw})


def evaluate(args: argparse.Namespace, info: dict[str, Any]) -> int:
    """Held-out (or ``--data``) accuracy of a saved CrossTune head, compared with the accuracy recorded after
    training."""
    adapter = Path(args.adapter)
    record.check_train_info(adapter, info, need=("head", "label_descriptions"))
    descriptions = info["label_descriptions"]
    names = list(info["label_names"])
    if (not isinstance(descriptions, list) or len(descriptions) != len(names)
            or not all(isinstance(t, str) and t for t in descriptions)):
        raise PeftkitError(f"{adapter / record.TRAIN_INFO}: label_descriptions must be one non-empty string per label")
    head = head_from_info(info, adapter / record.TRAIN_INFO)
    weights = adapter / HEAD_FILE
    if not weights.is_file():
        raise PeftkitError(f"{adapter} has no {HEAD_FILE}")
    from safetensors.torch import load_file

    try:
        head.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as e:  # noqa: BLE001 - a damaged file or a head of another size: one line naming the file
        raise PeftkitError(f"{weights} does not fit the head in {record.TRAIN_INFO}: "
                           f"{str(e).strip().splitlines()[0][:200]}") from None
    from ..models import default_model_dir
    from .run import eval_setup

    model_dir, _, device = eval_setup(args, info, default_model_dir)
    subset, what = record.text_eval_data(args, info, names)
    import torch

    from ..heads.crosstune import predict
    from .run import check_max_length

    encoder, tokenizer = load_encoder(model_dir)
    check_max_length(encoder, int(info["max_length"]))
    encoder.to(device)
    if head.d_model != encoder.config.hidden_size:
        raise PeftkitError(f"the head in {adapter} reads {head.d_model}-wide features; {model_dir} gives "
                           f"{encoder.config.hidden_size}")
    eb, ml = int(info.get("eval_batch_size", DEFAULTS["eval_batch_size"])), int(info["max_length"])
    feats = _features(encoder, tokenizer, subset.texts, ml, eb, device)
    labels = _features(encoder, tokenizer, descriptions, ml, eb, device).pooled()
    acc = _acc(predict(head, feats, labels).argmax(-1), torch.tensor(subset.labels))
    record.check_accuracy(args, info, acc, what, device)
    return 0


register_task(Task(TASK, "fewshot: a CrossTune head on K examples per class over a frozen text encoder", DEFAULTS,
                   train, evaluate, add_flags=add_flags, own_flags=_OWN, order=5))
