"""Causal-LM instruction tuning: batches of chat-tokenised conversations, held-out answer loss and perplexity,
greedy (or sampled) answers through the model's own ``generate``.

Training itself is the plain loop of :mod:`.trainer`: a batch carries ``labels`` with -100 outside the answers, so
a Hugging Face causal LM returns the mean cross-entropy over answer tokens as its ``loss``.

    ids, labels, kept = encode_chats(tokenizer, data.conversations, max_length)
    batches = chat_batches(tokenizer, ids, labels, batch_size=8, shuffle=True)
    train(model, batches, steps=100, lr=1e-3)
    loss, tokens = heldout_loss(model, eval_batches); perplexity = math.exp(loss)
    answer(model, tokenizer, "What is AI?", max_new_tokens=32)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PeftkitError
from ..data.chat import IGNORE, Message, prompt_ids
from ..data.text import Batches, pad_token_id
from .trainer import _device, _to


def chat_batches(tokenizer: Any, ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], batch_size: int, *,
                 shuffle: bool, seed: int = 0, bucket: int = 16) -> Batches:
    """Padded batches (``input_ids``, ``attention_mask``, per-token ``labels`` padded with -100). Training
    (``shuffle=True``) draws length-bucketed batches in a new order every epoch; evaluation batches are sorted by
    length."""
    return Batches(ids, labels, batch_size, pad_token_id(tokenizer), shuffle=shuffle, seed=seed,
                   bucket=bucket if shuffle else 0)


@torch.inference_mode()
def heldout_loss(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, int]:
    """``(mean loss, tokens)``: cross-entropy of next-token prediction averaged over every labelled token (labels
    other than -100) of all batches, in eval mode; ``math.exp`` of it is the perplexity."""
    was_training = model.training
    model.eval()
    device = _device(model)
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = _to(batch, device)
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            logits = logits[:, -labels.shape[1]:]  # virtual tokens in front (prompt tuning) carry no label
            target = labels[:, 1:]
            keep = target != IGNORE
            if not keep.any():
                continue
            total += float(F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum"))
            count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise PeftkitError("no labelled tokens to evaluate")
    return total / count, count


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


@torch.inference_mode()
def answer(model: nn.Module, tokenizer: Any, question: str | Sequence[Message], *, max_new_tokens: int = 64,
           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> str:
    """The model's reply to ``question`` (a string is one user message) rendered with the chat template: greedy
    decoding when ``temperature`` is 0, else sampling (seeded by ``seed``). Generation stops at the end-of-turn
    token or after ``max_new_tokens``; special tokens are dropped from the text."""
    if max_new_tokens < 1:
        raise PeftkitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise PeftkitError(f"temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    device = _device(model)
    ids = torch.tensor([prompt_ids(tokenizer, question)], device=device)
    sample: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        sample = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    else:
        sample.update(temperature=None, top_p=None, top_k=None)  # the model's generation_config may set them
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id(tokenizer), **sample)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
