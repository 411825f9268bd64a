"""LAE with a key/value-prefix PET: the prefix compensation (spec §8 LAE point 2; official ``Prefix.compensate``) and
the per-layer key/value scalars (point 1), on a tiny random BERT (eager and SDPA attention)."""

from __future__ import annotations

import math

import pytest
import torch

import peftkit
from peftkit.continual import LAE, ContinualLearner, Task
from peftkit.continual.prefix import compensate, compensated_attention, kv_scales, uncompensate
from tolerance import assert_near

P, H, D, LAYERS = 3, 2, 16, 2


def _bert(impl: str, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=H * D, num_hidden_layers=LAYERS, num_attention_heads=H,
                     intermediate_size=64, max_position_embeddings=64, num_labels=4, attn_implementation=impl)
    return BertForSequenceClassification(cfg).eval()


def _prefixed(impl: str, projection: bool = False) -> torch.nn.Module:
    model = _bert(impl)
    peftkit.adapt(model, peftkit.config("prefix_tuning", num_virtual_tokens=P, prefix_projection=projection,
                                        modules_to_save=["classifier"]), "online")
    return model.eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding: the compensation must follow the model's own mask
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _reference_layer(model: torch.nn.Module, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official compensated attention written out: softmax over [prefix; tokens] (padding masked), prefix columns
    divided by their sum, times [V_p; V] — for one BERT self-attention layer, (B, L, H·D)."""
    attn = model.bert.encoder.layer[layer].attention.self
    adapter = peftkit.core.model_level.model_adapters(model)["online"]
    kp, vp = adapter.key_values(hidden.shape[0], hidden.dtype)[layer]  # (B, H, P, D)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], H, D).transpose(1, 2)

    q, k, v = heads(attn.query(hidden)), heads(attn.key(hidden)), heads(attn.value(hidden))
    k, v = torch.cat([kp, k], 2), torch.cat([vp, v], 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    visible = torch.cat([torch.ones(mask.shape[0], P, dtype=torch.bool), mask.bool()], 1)
    probs = scores.masked_fill(~visible[:, None, None, :], -math.inf).softmax(-1)
    lam = probs[..., :P].sum(-1, keepdim=True)
    probs = torch.cat([probs[..., :P] / lam, probs[..., P:]], -1)
    return (probs @ v).transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], H * D)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_compensated_attention_equals_the_explicit_reference(impl: str) -> None:
    model, x = _prefixed(impl), _inputs()
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.attention.self.register_forward_hook(
            lambda m, args, kwargs, out, i=i: seen.__setitem__(i, (kwargs.get("hidden_states", args[0] if args
                                                                               else None), out[0].detach())),
            with_kwargs=True)
    with torch.no_grad():
        plain = model(**x).logits
        plain_out = {i: o for i, (_, o) in seen.items()}
        compensate(model)
        comp = model(**x).logits
    for i, (hidden, out) in seen.items():
        ref = _reference_layer(model, i, hidden.detach(), x["attention_mask"])
        assert_near(out, ref, P + 7, layers=2)
        assert (out - plain_out[i]).abs().max() > 1e-3  # the compensation changes every layer's output
    assert not torch.allclose(plain, comp)
    uncompensate(model)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, plain)  # the model's own attention again


def test_compensated_prefix_weights_sum_to_one() -> None:
    """The spec's sanity test: after compensation the attention weights over the prefix positions sum to 1 for every
    query, and the tokens keep the weights they had (mass 1 − λ)."""
    model, x = _prefixed("eager"), _inputs()
    with torch.no_grad():
        before = model(**x, output_attentions=True).attentions
        compensate(model)
        after = model(**x, output_attentions=True).attentions
    assert len(after) == LAYERS
    for a in after:
        assert_near(a[..., :P].sum(-1), torch.ones_like(a[..., 0]), P)
    a, b = after[0], before[0]  # the first layer sees the same input with and without compensation
    assert torch.equal(a[..., P:], b[..., P:])
    lam = b[..., :P].sum(-1)
    assert_near(a[..., P:].sum(-1), 1 - lam, 7)
    assert lam.min() > 0.01 and lam.max() < 0.99  # a real split between prefix and tokens


def test_compensation_is_off_without_an_active_prefix() -> None:
    model, x = _prefixed("sdpa"), _inputs()
    compensate(model)
    with torch.no_grad(), peftkit.disable(model):
        off = model(**x).logits
    bare = _bert("sdpa")
    with torch.no_grad():
        assert torch.equal(off, bare(**x).logits)


def test_grouped_query_compensation_matches_the_formula() -> None:
    """O_all + (1 − λ)·O_prefix with 4 query heads sharing 2 key/value heads, through transformers' SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 6 if t == "q" else 9, 8, generator=g) for t, n in (("q", 4), ("k", 2), ("v", 2)))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, 2
    out, _ = compensated_attention(sdpa_attention_forward, q, k, v, 3, module, None, 0.3, 0.0)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    probs = (q @ kr.transpose(-1, -2) * 0.3).softmax(-1)
    lam = probs[..., :3].sum(-1, keepdim=True)
    ref = torch.cat([probs[..., :3] / lam, probs[..., 3:]], -1) @ vr
    assert_near(out, ref.transpose(1, 2), 9, layers=2)


@pytest.mark.parametrize("projection", [False, True])
def test_key_and_value_scalars_scale_their_own_half_of_each_layer(projection: bool) -> None:
    model = _prefixed("eager", projection)
    method = LAE()
    method.bind(model, None, (), 4, None)
    adapter = peftkit.core.model_level.model_adapters(model)["online"]
    kv0 = [(k.detach().clone(), v.detach().clone()) for k, v in adapter.key_values(1, torch.float32)]
    method._add_scalers("online")
    s = kv_scales(adapter)
    assert s is not None and s.key_scale.shape == (LAYERS,) and s.key_scale.requires_grad
    with torch.no_grad():
        s.key_scale.copy_(torch.tensor([2.0, 1.0]))
        s.value_scale.copy_(torch.tensor([1.0, -3.0]))
    kv1 = adapter.key_values(1, torch.float32)
    assert_near(kv1[0][0], 2 * kv0[0][0], 1, layers=2)
    assert_near(kv1[0][1], kv0[0][1], 1, layers=2)
    assert_near(kv1[1][0], kv0[1][0], 1, layers=2)
    assert_near(kv1[1][1], -3 * kv0[1][1], 1, layers=2)


def _tasks() -> list[Task]:
    g = torch.Generator().manual_seed(0)

    def ex(c: int, n: int) -> list:  # class c: its own token ids, so the tasks can be learnt
        return [(torch.cat([torch.randint(5, 20, (4,), generator=g), torch.full((2,), 20 + 5 * c)]), c)
                for _ in range(n)]

    return [Task("t0", (0, 1), ex(0, 16) + ex(1, 16), ex(0, 6) + ex(1, 6)),
            Task("t1", (2, 3), ex(2, 16) + ex(3, 16), ex(2, 6) + ex(3, 6))]


def _collate(exs: list) -> dict[str, torch.Tensor]:
    ids = torch.stack([x for x, _ in exs])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([y for _, y in exs])}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_lae_trains_a_prefix_pet_with_compensation_and_saves_it(impl: str, tmp_path) -> None:
    model = _bert(impl)
    cfg = peftkit.config("prefix_tuning", num_virtual_tokens=P, modules_to_save=["classifier"])
    method = LAE(decay=0.9, freeze=0.5)
    learner = ContinualLearner(model, cfg, method, _tasks(), num_classes=4, collate=_collate, steps=6, batch_size=8,
                               lr=1e-2)
    result = learner.run()
    assert model.config._attn_implementation.startswith("peftkit_prefix_compensated")
    assert len(result.matrix) == 2 and sorted(peftkit.adapter_names(model)) == ["offline", "online"]
    on = kv_scales(peftkit.core.model_level.model_adapters(model)["online"])
    off = kv_scales(peftkit.core.model_level.model_adapters(model)["offline"])
    assert not torch.equal(on.key_scale.detach(), torch.ones(LAYERS))  # the scalars learnt
    assert not torch.equal(on.value_scale.detach(), off.value_scale.detach())  # offline: an EMA, not a copy
    x = _inputs()
    with torch.no_grad():
        want = method._logits_of(model, "online", x)
    with method.exported():
        assert kv_scales(peftkit.core.model_level.model_adapters(model)["online"]) is None
        peftkit.save(model, tmp_path / "online", "online")
    assert kv_scales(peftkit.core.model_level.model_adapters(model)["online"]) is on
    fresh = _bert(impl)  # the same frozen base
    peftkit.load(fresh, tmp_path / "online")
    compensate(fresh)
    with torch.no_grad():
        assert_near(fresh.eval()(**x).logits, want, 64, layers=4)  # scalars folded: the same function
