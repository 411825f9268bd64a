"""LLaMA-Adapter: zero-init gated prompt attention in the top layers; PEFT's outputs, draws and ADAPTION_PROMPT files
both directions on Llama (incl. generate) and GPT-2."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftkit
from conformance.models import same_state, state_copy, tiny_gpt2, tiny_llama
from peft_interop import load_with_peft, peft_model
from tolerance import assert_near

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def _trainable(m):
    return [p for _, p in sorted((n.rsplit("layers.", 1)[-1], p) for n, p in m.named_parameters() if p.requires_grad)]


def _pair(base, n=3, layers=2, seed=3, **peft_kw):
    torch.manual_seed(seed)
    pm = peft_model(base, peft.AdaptionPromptConfig(adapter_len=n, adapter_layers=layers, **peft_kw))
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config("llama_adapter", adapter_len=n, adapter_layers=layers))
    return pm, model


def test_zero_gate_is_the_base_and_draws_are_peft_s() -> None:
    base = tiny_llama()
    pm, model = _pair(base, layers=1)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, base(input_ids=IDS).logits)
    ours, theirs = _trainable(model), [p for p in pm.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in ours] == [(1,), (1, 3, 32)]  # gate, prompt (sorted by name)
    assert [tuple(p.shape) for p in theirs] == [(1, 3, 32), (1,)]
    assert torch.equal(ours[1], theirs[0])  # the same N(0, 1) prompt draw
    assert peftkit.summary(model).trainable == 3 * 32 + 1
    # only the top layer is adapted: the first layer's attention has no hook
    assert not base.model.layers[1].self_attn._forward_hooks
    assert model.model.layers[1].self_attn._forward_hooks and not model.model.layers[0].self_attn._forward_hooks


def _perturb_both(pm, model):
    with torch.no_grad():
        for p, q in zip([p for _, p in sorted((n, p) for n, p in pm.named_parameters() if p.requires_grad)],
                        [p for _, p in sorted((n.replace("prompts.", ""), p) for n, p in model.named_parameters()
                                              if p.requires_grad)], strict=True):
            p.normal_(0, 0.7)
            q.copy_(p)


def test_outputs_and_generate_match_peft_on_llama() -> None:
    base = tiny_llama()
    pm, model = _pair(base, task_type="CAUSAL_LM")
    _perturb_both(pm, model)
    with torch.no_grad():
        ref = pm(input_ids=IDS).logits
        assert (ref - base(input_ids=IDS).logits).abs().max() > 1e-3
        assert_near(model(input_ids=IDS).logits, ref, 64)
        kw = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = pm.generate(input_ids=IDS, **kw)
        got = model.generate(input_ids=IDS, **kw)
        plain = base.generate(input_ids=IDS, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b, c in zip(got.scores, want.scores, plain.scores, strict=True):  # every cached step, prompt included
        assert_near(a, b, 64)
        assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_files_both_directions(kind, tmp_path) -> None:
    if kind == "llama":
        base, ids, run = tiny_llama(), IDS, (lambda m, x: m(input_ids=x).logits)
    else:
        base = tiny_gpt2()
        ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
        run = lambda m, x: m(input_ids=x).last_hidden_state  # noqa: E731
    layers = 2 if kind == "llama" else 1
    pm, model = _pair(base, layers=layers)
    _perturb_both(pm, model)
    with torch.no_grad():
        ref = run(pm, ids)
    pm.save_pretrained(str(tmp_path / "from_peft"))
    fresh = copy.deepcopy(base)
    assert peftkit.load(fresh, tmp_path / "from_peft") == "default"
    assert peftkit.get_config(fresh, "default").method == "llama_adapter"
    with torch.no_grad():
        assert_near(run(fresh, ids), ref, 64)
    peftkit.save(model, tmp_path / "to_peft", format="hf")
    back = load_with_peft(base, tmp_path / "to_peft")
    with torch.no_grad():
        assert_near(run(back, ids), run(model, ids), 64)


def test_delete_and_disable_restore_the_base(tmp_path) -> None:
    base = tiny_llama()
    _, model = _pair(base)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
        y = model(input_ids=IDS).logits
        with peftkit.disable(model):
            assert torch.equal(model(input_ids=IDS).logits, base(input_ids=IDS).logits)
        assert torch.equal(model(input_ids=IDS).logits, y)
        peftkit.delete(model, "default")
        assert torch.equal(model(input_ids=IDS).logits, base(input_ids=IDS).logits)
    assert not model.model.layers[1].self_attn._forward_hooks


def test_bad_settings_are_refused() -> None:
    model = tiny_llama()
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="adapter_layers=5 exceeds the model's 2 layers"):
        peftkit.adapt(model, peftkit.config("llama_adapter", adapter_len=2, adapter_layers=5))
    with pytest.raises(peftkit.PeftkitError, match="no decoder-layer submodule named 'attention'"):
        peftkit.adapt(model, peftkit.config("llama_adapter", adapter_len=2, adapter_layers=1,
                                            attention_module="attention"))
    assert same_state(state_copy(model), before)
