"""P-tuning v2's own properties (shared/methods/activation-space-and-procedures.md §2): the defaults (a free
P×2·L·d_kv table, P = 20, prefix dropout 0.1), the P·2·L·d_kv count, dropout drawn per sample in training and absent
in eval, deep prompts reaching every layer of a BERT classifier whose head trains alongside, and the optional MLP."""

from __future__ import annotations

import torch
from transformers import DynamicCache

import peftkit
from conformance.models import tiny_bert, tiny_llama
from peftkit.core.model_level import CONTAINER, model_adapters
from tolerance import assert_near


def _ids(b: int, t: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 50, (b, t), generator=torch.Generator().manual_seed(seed))


def test_defaults_and_count() -> None:
    cfg = peftkit.config("ptuning_v2")
    assert (cfg.num_virtual_tokens, cfg.prefix_projection, cfg.dropout) == (20, False, 0.1)
    model = peftkit.adapt(tiny_llama(), cfg)  # L = 2, d_kv = 2 heads × 8 = 16
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{CONTAINER}.adapters.default.embedding.weight": (20, 2 * 2 * 16)}
    mlp = peftkit.adapt(tiny_llama(), peftkit.config("ptuning_v2", num_virtual_tokens=4, prefix_projection=True,
                                                     encoder_hidden_size=8))
    assert peftkit.summary(mlp).trainable == 4 * 32 + (32 * 8 + 8) + (8 * 64 + 64)


def test_dropout_per_sample_in_training_none_in_eval() -> None:
    model = peftkit.adapt(tiny_llama(), peftkit.config("ptuning_v2", num_virtual_tokens=4, dropout=0.5))
    same = _ids(1, 5).expand(2, -1)
    with torch.no_grad():
        y_eval = model(same).logits
        assert torch.equal(model(same).logits, y_eval)
        model.train()
        y1, y2 = model(same).logits, model(same).logits
    assert not torch.allclose(y1, y2) and not torch.allclose(y1[0], y1[1])  # fresh masks per call and per sample
    # eval is the same function as an undropped table (prefix tuning without MLP, same numbers)
    ref = peftkit.adapt(tiny_llama(), peftkit.config("prefix_tuning", num_virtual_tokens=4, prefix_projection=False))
    with torch.no_grad():
        model_adapters(ref)["default"].embedding.weight.copy_(model_adapters(model)["default"].embedding.weight)
        model.eval()
        assert_near(model(same).logits, ref(same).logits, 32, layers=4)  # P-Tuning v2's code vs prefix tuning's


def test_deep_prompts_reach_every_layer_and_the_head_trains() -> None:
    model = peftkit.adapt(tiny_bert(), peftkit.config("ptuning_v2", num_virtual_tokens=3, dropout=0.0,
                                                      modules_to_save=["classifier"]))
    b = _ids(2, 6)
    seen: list[int] = []
    for layer in model.bert.encoder.layer:  # each layer's attention is handed a cache whose keys start with P rows
        layer.attention.self.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["cache"].layers[m.layer_idx].keys.shape[2]), with_kwargs=True)
    out = model(b, attention_mask=torch.ones_like(b), labels=torch.tensor([1, 0]))
    assert seen == [3, 3]
    out.loss.backward()
    table = model_adapters(model)["default"].embedding.weight
    g = table.grad.view(3, 2, 2, 4, 8)  # (P, L, k/v, heads, d_h): every layer's keys and values get a gradient
    assert all(g[:, i, j].abs().sum() > 0 for i in range(2) for j in range(2))
    assert model.classifier.copies["default"].weight.grad.abs().sum() > 0


def test_table_layout_is_p_l_kv_heads_dh() -> None:
    model = peftkit.adapt(tiny_llama(), peftkit.config("ptuning_v2", num_virtual_tokens=2, dropout=0.0))
    adapter = model_adapters(model)["default"]
    t = adapter.embedding.weight.detach().view(2, 2, 2, 2, 8)
    kv = adapter.key_values(3, torch.float32)
    for layer in range(2):
        k, v = kv[layer]
        assert k.shape == v.shape == (3, 2, 2, 8)  # (batch, kv heads, P, d_h)
        assert torch.equal(k[1], t[:, layer, 0].transpose(0, 1)) and torch.equal(v[2], t[:, layer, 1].transpose(0, 1))
    cache = DynamicCache()
    with torch.no_grad():
        model(_ids(1, 4), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 2 + 4


def test_written_as_peft_prefix_tuning_and_read_back_as_prefix_tuning(tmp_path) -> None:
    model = peftkit.adapt(tiny_bert(), peftkit.config("ptuning_v2", num_virtual_tokens=3,
                                                      modules_to_save=["classifier"]))
    b = _ids(2, 5)
    with torch.no_grad():
        y = model(b).logits
    peftkit.save(model, tmp_path / "hf", format="hf")
    fresh = tiny_bert()
    peftkit.load(fresh, tmp_path / "hf")
    assert peftkit.get_config(fresh, "default").method == "prefix_tuning"
    with torch.no_grad():
        assert torch.equal(fresh(b).logits, y)
