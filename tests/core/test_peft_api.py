"""PEFT's entry points (``get_peft_model``, ``TaskType``, ``print_trainable_parameters``,
``PeftModel.from_pretrained``): the same snippet runs with ``peft`` and with ``peftkit`` imported under the
same names, and gives the same model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers

import peftkit
from tolerance import assert_near

peft = pytest.importorskip("peft")


def _bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def _snippet(lib, model):
    """A PEFT quick-start, verbatim except for the module it takes the names from."""
    LoraConfig, TaskType, get_peft_model = lib.LoraConfig, lib.TaskType, lib.get_peft_model
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=["query", "value"])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def test_the_peft_quickstart_runs_unchanged_and_trains_the_same_parameters(capsys: pytest.CaptureFixture) -> None:
    theirs = _snippet(peft, _bert())
    line_peft = capsys.readouterr().out.strip()
    ours = _snippet(peftkit, _bert())
    line_ours = capsys.readouterr().out.strip()
    assert line_ours == line_peft  # same counts: LoRA factors + the SEQ_CLS head
    assert line_ours.startswith("trainable params: ")
    assert isinstance(ours, transformers.BertForSequenceClassification)  # adapted in place, not wrapped
    assert peftkit.TaskType.SEQ_CLS == "SEQ_CLS"
    # the same base, head and LoRA factors give the same logits
    src = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, layer in peftkit.adapted_layers(ours):
            a = layer.adapters["default"]
            a.lora_A.copy_(torch.randn_like(a.lora_A))
            a.lora_B.copy_(torch.randn_like(a.lora_B))
            src[f"base_model.model.{path}.lora_A.default.weight"].copy_(a.lora_A)
            src[f"base_model.model.{path}.lora_B.default.weight"].copy_(a.lora_B)
    theirs.eval(), ours.eval()
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert_near(ours(x).logits, theirs(x).logits, dtype=torch.float32)


def test_the_convenience_methods_survive_deepcopy_and_pickle(capsys: pytest.CaptureFixture) -> None:
    model = peftkit.get_peft_model(_bert(), peftkit.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < total
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.get_nb_trainable_parameters() == (trainable, total)
        # the method belongs to the clone, not to the original
        peftkit.delete(clone, "default")
        assert clone.get_nb_trainable_parameters() != (trainable, total)
        assert model.get_nb_trainable_parameters() == (trainable, total)


def test_a_peft_config_object_and_from_pretrained(tmp_path) -> None:
    model = peftkit.get_peft_model(_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for t in peftkit.adapter_state_dict(model).values():
            t.add_(0.05)
    peftkit.save(model, tmp_path / "a")
    x = torch.randint(0, 64, (2, 5))
    fresh = peftkit.PeftModel.from_pretrained(_bert(), tmp_path / "a")
    assert not any(p.requires_grad for p in fresh.parameters())  # frozen unless is_trainable, as PEFT
    with torch.no_grad():
        assert_near(fresh(x).logits, model(x).logits, dtype=torch.float32)
    trainable = peftkit.PeftModel.from_pretrained(_bert(), tmp_path / "a", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0
