"""Prefix tuning's own properties (shared/methods/activation-space-and-procedures.md §2 "Sanity"): the parameter
count (MLP and folded), a prefix equal to a real context's keys / values reproduces the base model on that context
(Llama with grouped-query attention, a BERT encoder, GPT-2) — which shows the prefix enters every attention layer and
nothing else —, a masked-out prefix recovers the base logits of a rotary model, folding the MLP, cached and padded
generation, and bad input that fails cleanly."""

from __future__ import annotations

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification, DynamicCache

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy, tiny_bert, tiny_llama
from peftkit.core.model_level import CONTAINER, model_adapters
from peftkit.methods.prefix_tuning import fold_projection
from tolerance import assert_near


def _ids(b: int, t: int, seed: int = 3, low: int = 3, high: int = 50) -> torch.Tensor:
    return torch.randint(low, high, (b, t), generator=torch.Generator().manual_seed(seed))


def _context_table(cache: DynamicCache, p: int) -> torch.Tensor:
    """The (P, 2·L·d_kv) prefix table holding the first ``p`` cached keys / values of every layer (batch row 0)."""
    layers = [torch.stack([layer.keys[0, :, :p], layer.values[0, :, :p]]) for layer in cache.layers]  # (2, H, P, dh)
    t = torch.stack(layers)  # (L, 2, H, P, dh)
    return t.permute(3, 0, 1, 2, 4).reshape(p, -1)


def _set_table(model: torch.nn.Module, table: torch.Tensor, name: str = "default") -> None:
    with torch.no_grad():
        model_adapters(model)[name].embedding.weight.copy_(table)


def test_parameter_count_with_the_mlp_and_folded() -> None:
    model = tiny_llama()  # L = 2, 2 key/value heads of 8 → d_kv = 16, hidden 32
    peftkit.adapt(model, peftkit.config("prefix_tuning", num_virtual_tokens=5, encoder_hidden_size=16))
    width = 2 * 2 * 16
    expected = 5 * 32 + (32 * 16 + 16) + (16 * width + width)
    assert peftkit.summary(model).trainable == expected == sum(p.numel() for p in model.parameters()
                                                                if p.requires_grad)
    fold_projection(model)
    assert peftkit.summary(model).trainable == 5 * width  # P·2·L·d_kv
    other = peftkit.adapt(tiny_llama(), peftkit.config("prefix_tuning", num_virtual_tokens=5, prefix_projection=False))
    assert peftkit.summary(other).trainable == 5 * width


def test_prefix_of_a_real_context_reproduces_the_base_llama() -> None:
    a, b = _ids(1, 4, seed=1), _ids(1, 5, seed=2)
    base = tiny_llama()
    cache = DynamicCache()
    with torch.no_grad():
        ref = base(torch.cat([a, b], 1), cache=cache, use_cache=True).logits[:, 4:]
    model = peftkit.adapt(tiny_llama(), peftkit.config("prefix_tuning", num_virtual_tokens=4, prefix_projection=False))
    _set_table(model, _context_table(cache, 4))
    with torch.no_grad():
        out = model(b).logits
        with_mask = model(b, attention_mask=torch.ones_like(b)).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_mask, ref, rtol=0, atol=1e-5)


def test_prefix_of_a_real_context_reproduces_the_base_bert_encoder() -> None:
    # bidirectional: the context's keys / values in the full run depend on b too — taken from that full run, every
    # layer's attention over [prefix; b] sees exactly what b's positions see in the full run
    a, b = _ids(1, 3, seed=1), _ids(1, 6, seed=2)
    base = tiny_bert()
    cache = DynamicCache()
    with torch.no_grad():
        ref = base.bert(torch.cat([a, b], 1), cache=cache).last_hidden_state[:, 3:]
    model = peftkit.adapt(tiny_bert(), peftkit.config("prefix_tuning", num_virtual_tokens=3, prefix_projection=False,
                                                      modules_to_save=["classifier"]))
    _set_table(model, _context_table(cache, 3))
    hidden: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: object, out: object) -> None:
        hidden["h"] = out.last_hidden_state

    model.bert.register_forward_hook(keep)
    with torch.no_grad():
        model(b)
        torch.testing.assert_close(hidden["h"], ref, rtol=0, atol=1e-5)
        logits = model(b, attention_mask=torch.ones_like(b)).logits
    torch.testing.assert_close(hidden["h"], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, base.classifier(base.bert.pooler(ref)), rtol=0, atol=1e-5)


def test_prefix_of_a_real_context_reproduces_the_base_gpt2() -> None:
    spec = MODELS["gpt2"]
    a, b = _ids(1, 3, seed=1, high=40), _ids(1, 5, seed=2, high=40)
    cache = DynamicCache()
    with torch.no_grad():
        ref = spec.build()(torch.cat([a, b], 1), cache=cache, use_cache=True).last_hidden_state[:, 3:]
    model = peftkit.adapt(spec.build(), peftkit.config("prefix_tuning", num_virtual_tokens=3, prefix_projection=False))
    _set_table(model, _context_table(cache, 3))
    with torch.no_grad():
        torch.testing.assert_close(spec.run(model, b), ref, rtol=0, atol=1e-5)


def test_masked_out_prefix_recovers_the_base_logits_of_a_rotary_model() -> None:
    base = tiny_llama()
    b = _ids(2, 6)
    with torch.no_grad():
        ref = base(b).logits
    model = peftkit.adapt(tiny_llama(), peftkit.config("prefix_tuning", num_virtual_tokens=4))
    adapter = model_adapters(model)["default"]
    cache = DynamicCache()
    with torch.no_grad():
        for i, (k, v) in enumerate(adapter.key_values(2, torch.float32)):
            cache.update(k, v, i)
        mask = torch.cat([torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], 1)
        with peftkit.disable(model):  # the plain model, given the prefix cache and a mask that hides it
            out = model(b, cache=cache, attention_mask=mask).logits  # positions 4..9: the shift cancels in RoPE
        prefixed = model(b).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(prefixed, ref, atol=1e-3)


def test_gradients_reach_the_embedding_and_the_mlp_only() -> None:
    model = peftkit.adapt(tiny_bert(), peftkit.config("prefix_tuning", num_virtual_tokens=3, encoder_hidden_size=8,
                                                      modules_to_save=["classifier"]))
    b = _ids(2, 5)
    out = model(b, attention_mask=torch.ones_like(b), labels=torch.tensor([0, 1]))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert {n.split("default.")[1] for n in grads} == {
        "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias",
        "weight", "bias"}  # the prefix encoder and the classifier copy
    assert all(g.abs().sum() > 0 for g in grads.values())
    y0 = out.logits.detach()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert not torch.allclose(model(b, attention_mask=torch.ones_like(b)).logits, y0)


def test_fold_keeps_the_outputs_and_saves_a_plain_table(tmp_path) -> None:
    model = peftkit.adapt(tiny_llama(), peftkit.config("prefix_tuning", num_virtual_tokens=3, encoder_hidden_size=8))
    b = _ids(2, 5)
    with torch.no_grad():
        y = model(b).logits
    fold_projection(model)
    cfg = peftkit.get_config(model, "default")
    assert not cfg.prefix_projection
    assert sorted(peftkit.adapter_state_dict(model)) == ["model.embedding.weight"]
    with torch.no_grad():
        assert_near(model(b).logits, y, 64, layers=6)
    peftkit.save(model, tmp_path / "folded")
    fresh = tiny_llama()
    peftkit.load(fresh, tmp_path / "folded")
    with torch.no_grad():
        assert_near(fresh(b).logits, y, 64, layers=6)
    with pytest.raises(peftkit.PeftkitError, match="no projection MLP to fold"):
        fold_projection(fresh)


def test_generation_cached_padded_and_disabled() -> None:
    model = tiny_llama()
    b = _ids(2, 4)
    ones = torch.ones_like(b)
    base = model.generate(b, attention_mask=ones, max_new_tokens=6, do_sample=False)
    peftkit.adapt(model, peftkit.config("prefix_tuning", num_virtual_tokens=3))
    gen = model.generate(b, attention_mask=ones, max_new_tokens=6, do_sample=False)
    seq = b
    with torch.no_grad():  # greedy decoding by full forwards, each with a fresh prefix cache
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq)
    assert torch.equal(model.generate(b, attention_mask=ones, max_new_tokens=6, do_sample=False, use_cache=False), seq)
    assert not torch.equal(gen, base)
    # a left-padded batch generates what each sequence generates alone
    short = b[1:, 2:]
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)
    batch = torch.cat([b[:1], padded])
    mask = torch.cat([ones[:1], torch.tensor([[0, 0, 1, 1]])])
    together = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=5, do_sample=False)
    assert torch.equal(together[1, 2:], alone[0])
    with peftkit.disable(model):
        assert torch.equal(model.generate(b, attention_mask=ones, max_new_tokens=6, do_sample=False), base)


def test_lora_all_linear_next_to_a_prefix_leaves_the_prefix_mlp_alone() -> None:
    model = peftkit.adapt(tiny_llama(), peftkit.config("prefix_tuning", num_virtual_tokens=3), name="prefix")
    peftkit.adapt(model, peftkit.config("lora", target_modules="all-linear", r=2), name="lora")
    assert not any(p.startswith(CONTAINER) for p, _ in peftkit.adapted_layers(model))
    assert len(list(peftkit.adapted_layers(model))) == 2 * 7


def test_bad_input_fails_cleanly_and_changes_nothing() -> None:
    cfg = DistilBertConfig(vocab_size=50, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    distil = DistilBertForSequenceClassification(cfg).eval()
    before = state_copy(distil)
    with pytest.raises(peftkit.PeftkitError, match="DistilBertForSequenceClassification \\(backbone DistilBertModel\\)"
                                                   " accepts no cache / past_key_values"):
        peftkit.adapt(distil, peftkit.config("prefix_tuning"))
    assert same_state(before, state_copy(distil)) and not distil._forward_pre_hooks
    assert peftkit.adapter_names(distil) == []
    bert = tiny_bert()  # 32 positions
    with pytest.raises(peftkit.PeftkitError, match="num_virtual_tokens=32 leaves no room .*max_position_embeddings=32"):
        peftkit.adapt(bert, peftkit.config("prefix_tuning", num_virtual_tokens=32))
    with pytest.raises(peftkit.PeftkitError, match="needs a Hugging Face model"):
        peftkit.adapt(MODELS["mlp"].build(), peftkit.config("prefix_tuning"))
    with pytest.raises(peftkit.PeftkitError, match="layers_to_transform: prefix_tuning is a model-level method"):
        peftkit.config("prefix_tuning", layers_to_transform=[0])
    assert CONTAINER not in dict(bert.named_children())
    peftkit.adapt(bert, peftkit.config("prefix_tuning", num_virtual_tokens=30))
    with pytest.raises(peftkit.PeftkitError, match="30 virtual \\+ 5 input positions exceed BertForSequence"):
        bert(_ids(1, 5))
    llama = peftkit.adapt(tiny_llama(), peftkit.config("prefix_tuning", num_virtual_tokens=3))
    foreign = DynamicCache()
    with peftkit.disable(llama), torch.no_grad():
        llama(_ids(1, 4), cache=foreign, use_cache=True)
    with pytest.raises(peftkit.PeftkitError, match="non-empty cache that does not start with this adapter's prefix"):
        llama(_ids(1, 1), cache=foreign, use_cache=True)


def test_hugging_face_peft_files_both_ways(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    # PEFT saves the table its MLP computes; it loads here as a folded prefix_tuning adapter (GQA: d_kv = 16)
    theirs = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                       prefix_projection=True, encoder_hidden_size=8))
    perturb(theirs, seed=1, std=0.3)
    with torch.no_grad():
        ref = theirs.eval()(input_ids=ids, attention_mask=mask).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    peftkit.load(ours, tmp_path / "peft")
    assert not peftkit.get_config(ours, "default").prefix_projection
    with torch.no_grad():
        assert_near(ours(input_ids=ids, attention_mask=mask).logits, ref, 64, layers=6)  # peftkit vs PEFT
    # ours with its MLP → the computed table in PEFT's file
    mine = peftkit.adapt(tiny_llama(), peftkit.config("prefix_tuning", num_virtual_tokens=3, encoder_hidden_size=8))
    with torch.no_grad():
        y = mine(input_ids=ids, attention_mask=mask).logits
    peftkit.save(mine, tmp_path / "ours", format="hf")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_near(back(input_ids=ids, attention_mask=mask).logits, y, 64, layers=6)
