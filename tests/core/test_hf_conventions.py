"""An adapted transformers model answers to Hugging Face PEFT's conventions: ``adapter_names=`` in the forward (the
mixed-batch semantics), ``save_pretrained`` writing the adapters (never the wrapped full model), and
``transformers.Trainer`` checkpoints that hold only the adapters and resume."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

import peftkit
from conformance.models import tiny_bert, tiny_llama
from tolerance import assert_near


def _bert_two_adapters() -> torch.nn.Module:
    model = tiny_bert()
    for name in ("a", "b"):
        peftkit.adapt(model, peftkit.config("lora", target_modules=["query", "value"], r=2), name)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
    return model


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (3, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_adapter_names_routes_each_sample_as_mixed_batch() -> None:
    model = _bert_two_adapters()
    batch = _batch()
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        y = model(**batch, adapter_names=names).logits
        with peftkit.mixed_batch(model, names):
            ref = model(**batch).logits
        assert torch.equal(y, ref)  # same code path, same inputs
        for i, n in enumerate(names):  # and each row is that adapter's own output
            one = {k: v[i:i + 1] for k, v in batch.items()}
            if n == "__base__":
                with peftkit.disable(model):
                    yi = model(**one).logits
            else:
                peftkit.set_active(model, n)
                yi = model(**one).logits
            assert_near(y[i:i + 1], yi, 64, layers=4)
        peftkit.set_active(model, "b")
        plain = model(**batch).logits  # the routing ends with the call
        assert not torch.allclose(plain[1], y[1])
        assert torch.equal(model(**batch, adapter_names=None).logits, plain)


def test_adapter_names_refused_not_ignored() -> None:
    model = _bert_two_adapters()
    batch = _batch()
    with pytest.raises(peftkit.PeftkitError, match="unknown adapter"):
        model(**batch, adapter_names=["a", "nope", "b"])
    with pytest.raises(peftkit.PeftkitError, match="3"):
        model(**batch, adapter_names=["a", "b"])
    with pytest.raises(peftkit.PeftkitError, match="one adapter name per sample"):
        model(**batch, adapter_names="a")
    peftkit.merge(model, ["b"])
    with pytest.raises(peftkit.PeftkitError, match="merged"):
        model(**batch, adapter_names=["a", "b", "a"])
    peftkit.unmerge(model)
    with torch.no_grad():  # a refused call leaves no routing behind
        peftkit.set_active(model, "a")
        y = model(**batch).logits
        with peftkit.mixed_batch(model, ["a"] * 3):
            assert torch.equal(model(**batch).logits, y)


def test_adapter_names_in_generate() -> None:
    model = tiny_llama()
    for name in ("a", "b"):
        peftkit.adapt(model, peftkit.config("lora", target_modules=["q_proj", "v_proj"], r=2), name)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
    ids = torch.randint(2, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, adapter_names=["a", "b"])
    beams = model.generate(ids, max_new_tokens=4, do_sample=False, num_beams=2, adapter_names=["a", "b"])
    for i, n in enumerate(["a", "b"]):
        peftkit.set_active(model, n)
        assert torch.equal(out[i], model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False)[0])
        assert torch.equal(beams[i], model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False, num_beams=2)[0])
    assert not torch.equal(out[0, 5:], out[1, 5:]) or not torch.equal(beams[0, 5:], beams[1, 5:])


def test_save_pretrained_writes_adapters_that_reload(tmp_path) -> None:
    model = _bert_two_adapters()
    batch = _batch()
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "adapter_config.json" in files and "b" in files
    assert not any(f.startswith("model") for f in files)  # no base weights, no resume files outside a checkpoint
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path) for f in fs)
    base_size = sum(p.numel() * p.element_size() for p in tiny_bert().parameters())
    assert size < base_size / 4
    fresh = tiny_bert()
    peftkit.load(fresh, tmp_path, "a")
    peftkit.load(fresh, tmp_path / "b", "b")
    with torch.no_grad():
        for n in ("a", "b"):
            peftkit.set_active(model, n)
            peftkit.set_active(fresh, n)
            assert torch.equal(fresh(**batch).logits, model(**batch).logits)
    with pytest.raises(peftkit.PeftkitError, match="unknown adapter"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["zz"])
    # copies keep their own save_pretrained; unloading gives the model's own back
    assert copy.deepcopy(model).save_pretrained.args[0] is not model
    clone = pickle.loads(pickle.dumps(model))
    assert clone.save_pretrained.args[0] is clone
    peftkit.unload(model)
    assert "save_pretrained" not in model.__dict__
    assert model.save_pretrained.__func__ is type(model).save_pretrained
    assert "generate" not in model.__dict__


def _dataset(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(1, 50, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(n)]


def _trainer(model: torch.nn.Module, out: str):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=out, max_steps=4, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, logging_steps=100,
                             dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=_dataset())


def _adapted_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_bert()
    peftkit.adapt(model, peftkit.config("lora", target_modules=["query", "value"], r=2,
                                        modules_to_save=["classifier"]))
    return model


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peftkit.adapter_state_dict(model).items()}


def test_trainer_checkpoints_hold_the_adapter_and_resume(tmp_path) -> None:
    full = _adapted_bert()
    _trainer(full, str(tmp_path / "full")).train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert "model.safetensors" not in files
    weights = sum(os.path.getsize(ckpt / f) for f in files if f.endswith(".safetensors"))
    base_size = sum(p.numel() * p.element_size() for p in tiny_bert().parameters())
    assert weights < base_size / 4, "a checkpoint holds base weights"
    # the checkpoint is the adapter at step 2 (loads with peftkit.load)
    at2 = tiny_bert()
    peftkit.load(at2, ckpt)
    # resuming from step 2 ends where the uninterrupted run ended
    resumed = _adapted_bert()
    _trainer(resumed, str(tmp_path / "resumed")).train(resume_from_checkpoint=str(ckpt))
    final, again = _trained(full), _trained(resumed)
    assert final.keys() == again.keys()
    start = _trained(at2)
    assert any(not torch.equal(start[k], final[k]) for k in final), "steps 3-4 changed nothing"
    for k in final:
        assert_near(again[k], final[k], 64, layers=8)
