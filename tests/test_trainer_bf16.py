"""``transformers.Trainer(bf16=True)`` on CPU (accelerate's mixed precision: the forward under
``torch.autocast("cpu", bfloat16)``) trains a peftkit adapter on a tiny BERT classifier — the fused kernels run in
bfloat16 inside autocast, the adapter keeps float32 parameters."""

from __future__ import annotations

import math

import pytest
import torch

import peftkit
from conformance.models import tiny_bert

pytest.importorskip("accelerate")

METHODS = {
    "lora": {"target_modules": ["query", "value"]},
    "dora": {"target_modules": ["query", "value"]},
    "ia3": {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]},
    "randlora": {"target_modules": ["query", "value"]},
    "prefix_tuning": {"num_virtual_tokens": 4},
}


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 50, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > 27).long()  # learnable from the first token

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_bf16_trains(method: str, tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    model = tiny_bert().train()
    info = peftkit.get_method(method)
    peftkit.adapt(model, info.config.from_dict(METHODS[method]))
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen: set[torch.dtype] = set()
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
             for _, layer in peftkit.adapted_layers(model)]
    args = TrainingArguments(
        output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=4, per_device_train_batch_size=8,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Data())
    trainer.train()
    for h in hooks:
        h.remove()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    if not info.model_level:  # the adapted layers ran under autocast: bfloat16 outputs, as the Linear alone gives
        assert seen == {torch.bfloat16}
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in params)  # float32 master values
    assert any(not torch.allclose(after[n].detach(), p) for n, p in params.items()), "no parameter changed"
