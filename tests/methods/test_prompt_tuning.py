"""Prompt tuning's own properties (shared/methods/activation-space-and-procedures.md §2 "Sanity"): n·d trainable
numbers, a prompt equal to real tokens' embeddings reproduces the base model on the concatenated input (Llama, BERT,
GPT-2), mask / labels / token types / positions follow the n virtual positions, cached generation, the three inits,
and bad input that fails cleanly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy, tiny_bert, tiny_llama
from peftkit.core.model_level import CONTAINER, model_adapters
from tolerance import assert_near


def _ids(b: int, t: int, seed: int = 3, low: int = 3) -> torch.Tensor:
    return torch.randint(low, 50, (b, t), generator=torch.Generator().manual_seed(seed))


def _adapt_with_prompt_of(model: torch.nn.Module, a: torch.Tensor, **fields) -> torch.nn.Module:
    """Prompt tuning whose prompt is the embedding of the real tokens ``a`` (1-D)."""
    cfg = peftkit.config("prompt_tuning", num_virtual_tokens=len(a), init="text", init_token_ids=a.tolist(), **fields)
    return peftkit.adapt(model, cfg)


def test_trainable_count_is_n_times_d_and_only_the_prompt_trains() -> None:
    model = tiny_llama()
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=7))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == [f"{CONTAINER}.adapters.default.prompt"]
    assert trainable[f"{CONTAINER}.adapters.default.prompt"].shape == (7, 32)
    s = peftkit.summary(model)
    assert s.trainable == 7 * 32 == s.adapters["default"]
    assert "(model-level)" in str(s)


def test_prompt_of_real_tokens_reproduces_the_base_on_the_concatenation_llama() -> None:
    a, b = _ids(1, 3, seed=1)[0], _ids(2, 5, seed=2)
    base = tiny_llama()
    with torch.no_grad():
        ref = base(torch.cat([a.expand(2, -1), b], 1)).logits
    model = _adapt_with_prompt_of(tiny_llama(), a)
    with torch.no_grad():
        out = model(b).logits
    assert out.shape == (2, 3 + 5, 50)  # the returned sequence length is T + n
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_prompt_of_real_tokens_reproduces_the_base_bert_with_mask_and_token_types() -> None:
    a, b = _ids(1, 4, seed=1)[0], _ids(3, 6, seed=2)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    types = torch.zeros(3, 6, dtype=torch.long)
    types[:, 3:] = 1
    base = tiny_bert()
    full_mask = torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1)
    full_types = torch.cat([torch.zeros(3, 4, dtype=torch.long), types], 1)
    with torch.no_grad():
        ref = base.bert(torch.cat([a.expand(3, -1), b], 1), attention_mask=full_mask,
                        token_type_ids=full_types).last_hidden_state
        ref_logits = base(torch.cat([a.expand(3, -1), b], 1), attention_mask=full_mask,
                          token_type_ids=full_types).logits
    model = _adapt_with_prompt_of(tiny_bert(), a)
    with torch.no_grad():
        logits = model(b, attention_mask=mask, token_type_ids=types).logits  # the classifier reads position 0
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    hidden: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: object, out: object) -> None:
        hidden["h"] = out.last_hidden_state

    model.bert.register_forward_hook(keep)
    with torch.no_grad():
        model(b, attention_mask=mask, token_type_ids=types)
    rows = full_mask.bool()  # padded positions are not compared
    torch.testing.assert_close(hidden["h"][rows], ref[rows], rtol=0, atol=1e-5)


def test_prompt_on_gpt2_and_explicit_positions() -> None:
    spec = MODELS["gpt2"]
    a, b = torch.tensor([5, 9]), spec.input(batch=2)
    with torch.no_grad():
        ref = spec.run(spec.build(), torch.cat([a.expand(2, -1), b], 1))
    model = _adapt_with_prompt_of(spec.build(), a)
    with torch.no_grad():
        out = spec.run(model, b)
        pos = model(b, position_ids=torch.arange(6).expand(2, -1)).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(pos, ref, rtol=0, atol=1e-5)  # given positions become [0..n-1, p + n]


def test_token_labels_are_padded_with_ignore_index_and_class_labels_are_not() -> None:
    a, b = _ids(1, 3, seed=1)[0], _ids(2, 5, seed=2)
    base = tiny_llama()
    full = torch.cat([a.expand(2, -1), b], 1)
    with torch.no_grad():
        ref = base(full, labels=torch.cat([torch.full((2, 3), -100), b], 1)).loss
    model = _adapt_with_prompt_of(tiny_llama(), a)
    with torch.no_grad():
        assert_near(model(b, labels=b).loss, ref, 64, layers=6)
    clf = peftkit.adapt(tiny_bert(), peftkit.config("prompt_tuning", num_virtual_tokens=3))
    y = torch.tensor([0, 1])
    with torch.no_grad():
        out = clf(b, labels=y)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, y))


def test_gradient_reaches_only_the_prompt_and_a_step_changes_the_output() -> None:
    model = peftkit.adapt(tiny_llama(), peftkit.config("prompt_tuning", num_virtual_tokens=4, init="random"))
    b = _ids(2, 5)
    y0 = model(b).logits.detach()
    model(b, labels=b).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.endswith(".prompt"), n
    prompt = model_adapters(model)["default"].prompt
    assert prompt.grad.abs().sum() > 0
    torch.optim.SGD([prompt], lr=1.0).step()
    assert not torch.allclose(model(b).logits, y0)


def test_inits() -> None:
    torch.manual_seed(0)
    model = tiny_llama()
    e = model.get_input_embeddings().weight.detach()
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=60, init="random"), name="r")
    p = model_adapters(model)["r"].prompt.detach()
    assert p.min() >= -0.5 and p.max() <= 0.5 and p.std() > 0.25  # U(-0.5, 0.5): std 0.289
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=12, init="vocab"), name="v")
    p = model_adapters(model)["v"].prompt.detach()
    hits = [(e == row).all(1).nonzero().flatten().tolist() for row in p]
    assert all(len(h) == 1 for h in hits)  # every row is one vocabulary embedding
    assert len({h[0] for h in hits}) == 12  # distinct tokens (the pool of 50 < 5,000 holds them all)
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=5, init="text",
                                        init_token_ids=[7, 8]), name="t")
    torch.testing.assert_close(model_adapters(model)["t"].prompt.detach(), e[[7, 8, 7, 8, 7]], rtol=0, atol=0)


def test_cached_generation_matches_full_forwards_and_disable_restores_the_base() -> None:
    model = tiny_llama()
    b = _ids(2, 4)
    base = model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=6, do_sample=False)
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=3, init="random"))
    gen = model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=6, do_sample=False)
    seq = b
    with torch.no_grad():  # greedy decoding by full forwards (no cache), the reference
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq)
    nocache = model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(nocache, seq)
    assert not torch.equal(gen, base)
    with peftkit.disable(model):
        assert torch.equal(model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=6, do_sample=False),
                           base)


def test_save_load_keeps_token_ids_and_outputs(tmp_path) -> None:
    model = _adapt_with_prompt_of(tiny_llama(), torch.tensor([4, 5, 6]))
    with torch.no_grad():
        model_adapters(model)["default"].prompt.add_(0.1)
    b = _ids(2, 5)
    with torch.no_grad():
        y = model(b).logits
    peftkit.save(model, tmp_path / "pt")
    fresh = tiny_llama()
    peftkit.load(fresh, tmp_path / "pt")
    assert peftkit.get_config(fresh, "default").init_token_ids == [4, 5, 6]
    with torch.no_grad():
        assert torch.equal(fresh(b).logits, y)
    peftkit.delete(fresh, "default")
    assert CONTAINER not in dict(fresh.named_children()) and not fresh._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(fresh(b).logits, tiny_llama()(b).logits)


def test_with_lora_one_model_level_adapter_at_a_time_and_not_mergeable() -> None:
    model = tiny_llama()
    b = _ids(2, 5)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["q_proj", "v_proj"], r=2), name="lora")
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=3), name="p")
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=2), name="q")
    with pytest.raises(peftkit.PeftkitError, match="at most one model-level adapter"):
        peftkit.set_active(model, ["p", "q"])
    peftkit.set_active(model, ["lora", "p"])
    assert model(b).logits.shape == (2, 8, 50)
    assert {n.split(".")[2] if n.startswith(CONTAINER) else "lora" for n, p in model.named_parameters()
            if p.requires_grad} == {"p", "lora"}
    state = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="'p' .*not mergeable"):
        peftkit.merge(model)
    assert same_state(state, state_copy(model))
    peftkit.merge(model, ["lora"])  # the layer adapter still merges
    peftkit.unmerge(model)
    with pytest.raises(peftkit.PeftkitError, match="mixed batch"), peftkit.mixed_batch(model, ["lora", None]):
        pass


def test_bad_input_fails_cleanly_and_changes_nothing() -> None:
    model = tiny_llama()  # 64 positions
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="num_virtual_tokens=64 .*max_position_embeddings=64"):
        peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=64))
    with pytest.raises(peftkit.PeftkitError, match="init_token_ids: id 77 is outside"):
        peftkit.adapt(model, peftkit.config("prompt_tuning", init="text", init_token_ids=[3, 77]))
    with pytest.raises(peftkit.PeftkitError, match="needs a Hugging Face model .*got MLP"):
        peftkit.adapt(MODELS["mlp"].build(), peftkit.config("prompt_tuning"))
    assert same_state(before, state_copy(model)) and not model._forward_pre_hooks
    assert peftkit.adapter_names(model) == []
    for fields, msg in [
        ({"target_modules": ["q_proj"]}, "target_modules: prompt_tuning is a model-level method"),
        ({"init_text": "x"}, "only with init='text'"),
        ({"init": "text"}, "needs init_text"),
        ({"dropout": 0.1}, "no dropout"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be > 0"),
    ]:
        with pytest.raises(peftkit.PeftkitError, match=msg):
            peftkit.config("prompt_tuning", **fields)
    peftkit.adapt(model, peftkit.config("prompt_tuning", num_virtual_tokens=60))
    with pytest.raises(peftkit.PeftkitError, match="60 virtual \\+ 5 input positions exceed .*at most 4 tokens"):
        model(_ids(1, 5))


def test_cli_refuses_targets_for_a_model_level_method(capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.cli import main

    assert main(["train", "--method", "prompt_tuning", "--targets", "query", "--steps", "1"]) != 0
    assert "--targets: prompt_tuning is a model-level method" in capsys.readouterr().err


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert-seq-cls", "llama-causal-lm"])
def test_hugging_face_peft_files_both_ways(build, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    task = "SEQ_CLS" if build is tiny_bert else "CAUSAL_LM"
    theirs = peft.get_peft_model(build(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3))
    perturb(theirs, seed=1, std=0.3)
    with torch.no_grad():
        ref = theirs.eval()(input_ids=ids, attention_mask=mask).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = build()
    peftkit.load(ours, tmp_path / "peft")
    cfg = peftkit.get_config(ours, "default")
    assert cfg.num_virtual_tokens == 3 and cfg.modules_to_save == (["classifier"] if task == "SEQ_CLS" else None)
    with torch.no_grad():
        assert_near(ours(input_ids=ids, attention_mask=mask).logits, ref, 64, layers=6)  # peftkit vs PEFT
    peftkit.save(ours, tmp_path / "ours", format="hf")
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_near(back(input_ids=ids, attention_mask=mask).logits, ref, 64, layers=6)
