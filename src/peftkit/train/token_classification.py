"""Token classification (BIO tagging): padded batches of aligned sentences, per-word predictions and their
entity-level scores.

Training is the plain loop of :mod:`.trainer`: a batch carries per-token ``labels`` (the tag on each word's first
sub-token, -100 elsewhere), so a Hugging Face ``*ForTokenClassification`` model returns the mean cross-entropy over
the labelled sub-tokens as its ``loss``.

    aligned = align(tokenizer, data.words, data.tags, max_length=128)
    train(model, token_batches(tokenizer, aligned, 16, shuffle=True), steps=300, lr=5e-3)
    scores = evaluate_tags(model, tokenizer, eval_aligned, [data.tag_names(i) for i in eval_idx], data.label_names)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import PeftkitError
from ..data.conll import OUTSIDE, Aligned, TagScores, score_tags
from ..data.text import Batches, collate, pad_token_id
from .trainer import _device, _logits, _to


def token_batches(tokenizer: Any, aligned: Aligned, batch_size: int, *, shuffle: bool, seed: int = 0,
                  bucket: int = 16) -> Batches:
    """Padded batches (``input_ids``, ``attention_mask``, per-token ``labels`` padded with -100). Training
    (``shuffle=True``) draws length-bucketed batches in a new order every epoch; evaluation batches are sorted by
    length."""
    return Batches(aligned.ids, aligned.labels, batch_size, pad_token_id(tokenizer), shuffle=shuffle, seed=seed,
                   bucket=bucket if shuffle else 0)


@torch.inference_mode()
def predict_tags(model: nn.Module, tokenizer: Any, aligned: Aligned, batch_size: int) -> list[list[int]]:
    """The predicted label of every word of every sentence (argmax at the word's first sub-token), in eval mode;
    a word with no sub-token (truncated away) is predicted label 0 (``O``). Sentences are run in batches sorted by
    length, the same batches every time, so a re-evaluation is bit-identical."""
    was_training = model.training
    model.eval()
    device = _device(model)
    pad = pad_token_id(tokenizer)
    order = sorted(range(len(aligned)), key=lambda i: (len(aligned.ids[i]), i))
    out: list[list[int]] = [[] for _ in range(len(aligned))]
    try:
        for s in range(0, len(order), batch_size):
            chunk = order[s: s + batch_size]
            batch = collate([aligned.ids[i] for i in chunk], [aligned.labels[i] for i in chunk], pad)
            batch = _to({k: v for k, v in batch.items() if k != "labels"}, device)
            logits = _logits(model(**batch))
            best = logits[:, -batch["input_ids"].shape[1]:].argmax(-1).cpu()  # virtual tokens in front carry no tag
            for row, i in enumerate(chunk):
                out[i] = [int(best[row, p]) if p >= 0 else 0 for p in aligned.first[i]]
    finally:
        model.train(was_training)
    return out


def evaluate_tags(model: nn.Module, tokenizer: Any, aligned: Aligned, gold: Sequence[Sequence[str]],
                  label_names: Sequence[str], batch_size: int = 64) -> TagScores:
    """Token accuracy and entity precision / recall / F1 of the model's tags for ``aligned`` against ``gold`` (tag
    names per word); words truncated away count as predicted ``O``."""
    if label_names[0] != OUTSIDE:
        raise PeftkitError(f"label 0 must be {OUTSIDE!r}, got {label_names[0]!r}")
    pred = predict_tags(model, tokenizer, aligned, batch_size)
    return score_tags(gold, [[label_names[t] for t in row] for row in pred])
