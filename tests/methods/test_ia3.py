"""IA3 (shared/methods/activation-space-and-procedures.md §4 "Sanity"): identity at the IA3 ones; merged equals
unmerged (rows and bias for output scaling, columns for input scaling, exact weights checked); plus the forward against
explicit references (Linear, Conv2d, GPT-2 Conv1D; fused and generic paths), the default targets on BERT- and
LLaMA-style names, parameter counts, clear errors that change nothing, and the Hugging Face PEFT IA3 format both ways
through the installed ``peft`` package on tiny BERT and GPT-2 models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
import peftkit.methods.ia3 as ia3
from conformance.models import MODELS, NormFeedForward, same_state, state_copy
from tolerance import assert_near


def _perturb(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * std)


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    return LlamaModel(cfg).eval()


def _ids(b: int = 3, t: int = 7) -> torch.Tensor:
    return torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(3))


def test_init_is_the_base_bit_for_bit() -> None:
    spec = MODELS["block"]
    x = spec.input()
    y0 = spec.build()(x)
    model = spec.build()
    peftkit.adapt(model, peftkit.config("ia3", target_modules=spec.targets, feedforward_modules=["fc2"]))
    assert all(torch.equal(p, torch.ones_like(p)) for p in peftkit.trainable_parameters(model))
    assert torch.equal(model(x), y0)
    with peftkit.mixed_batch(model, ["default"] * 4):  # the generic delta path too
        assert torch.equal(model(x), y0)


def test_linear_output_and_input_scaling_match_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).eval()
    peftkit.adapt(model, peftkit.config("ia3", target_modules=["0", "1"], feedforward_modules=["1"]))
    _perturb(model)
    out_l, in_l = model[0].adapters["default"].ia3_l, model[1].adapters["default"].ia3_l
    assert out_l.shape == (5,) and in_l.shape == (5,)
    l0, l1 = model[0].base_layer, model[1].base_layer
    x = torch.randn(2, 3, 6)
    h = out_l * l0(x)  # y = l ⊙ (W·x + b): the bias is scaled too
    ref = F.linear(in_l * h, l1.weight, l1.bias)  # y = W·(l ⊙ x) + b
    assert_near(model(x), ref, 64, layers=6)  # fused path (one adapter per layer)
    with peftkit.mixed_batch(model, ["default", "default"]):  # generic delta path
        assert_near(model(x), ref, 64, layers=6)


def test_conv2d_and_gpt2_conv1d_match_reference() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3)).eval()
    peftkit.adapt(model, peftkit.config("ia3", target_modules=["0", "1"], feedforward_modules=["1"]))
    _perturb(model)
    a, b = model[0].adapters["default"].ia3_l, model[1].adapters["default"].ia3_l
    assert a.shape == (4,) and b.shape == (4,)  # output channels of conv 0, input channels of conv 1
    x = torch.randn(2, 3, 6, 6)
    ref = model[1].base_layer(b.view(-1, 1, 1) * (a.view(-1, 1, 1) * model[0].base_layer(x)))
    assert_near(model(x), ref, 64, layers=6)
    with peftkit.mixed_batch(model, ["default", "default"]):
        assert_near(model(x), ref, 64, layers=6)

    g = nn.Sequential(Conv1D(5, 6)).eval()
    peftkit.adapt(g, peftkit.config("ia3", target_modules=["0"], feedforward_modules=["0"]))
    _perturb(g)
    lv = g[0].adapters["default"].ia3_l
    x = torch.randn(2, 3, 6)
    assert_near(g(x), (lv * x) @ g[0].base_layer.weight + g[0].base_layer.bias, 64, layers=6)


def test_merge_scales_rows_and_bias_or_columns() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Conv2d(5, 3, 3)).eval()
    peftkit.adapt(model, peftkit.config("ia3", target_modules=["0", "1", "2"], feedforward_modules=["1", "2"]))
    _perturb(model)
    w = {i: (model[i].weight.detach().clone(), model[i].bias.detach().clone()) for i in range(3)}
    lv = {i: model[i].adapters["default"].ia3_l.detach().clone() for i in range(3)}
    x = torch.randn(2, 6)
    lin_y = model[1](model[0](x))
    peftkit.merge(model)
    torch.testing.assert_close(model[0].weight, lv[0][:, None] * w[0][0], rtol=0, atol=0)
    torch.testing.assert_close(model[0].bias, lv[0] * w[0][1], rtol=0, atol=0)
    torch.testing.assert_close(model[1].weight, w[1][0] * lv[1][None, :], rtol=0, atol=0)
    assert torch.equal(model[1].bias, w[1][1])  # input scaling leaves the bias
    torch.testing.assert_close(model[2].weight, w[2][0] * lv[2].view(1, -1, 1, 1), rtol=0, atol=0)
    assert_near(model[1](model[0](x)), lin_y, 64, layers=6)
    peftkit.unmerge(model)
    for i in range(3):
        assert_near(model[i].weight, w[i][0], 1, layers=2)  # (w·l)/l: two roundings, no reduction
        assert_near(model[i].bias, w[i][1], 1, layers=2)


def test_zero_scale_is_not_merged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).eval()
    peftkit.adapt(model, peftkit.config("ia3", target_modules=["0"]))
    with torch.no_grad():
        model[0].adapters["default"].ia3_l[2] = 0.0
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="zero scales.*nothing was merged"):
        peftkit.merge(model)
    assert same_state(before, state_copy(model)) and model[0].merged == []


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_default_targets_on_bert_and_llama_names(family: str) -> None:
    # BERT: the FFN's down projection is layer.N.output.dense, not attention.output.dense; l_k, l_v ∈ R^16, l_ff ∈ R^32.
    # LLaMA: one kv head of 8, FFN width 24
    model, (k, v, ff), n = {
        "bert": (_tiny_bert(), ("attention.self.key", "attention.self.value", "output.dense"), 16 + 16 + 32),
        "llama": (_tiny_llama(), ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"), 8 + 8 + 24),
    }[family]
    prefix = "encoder.layer" if family == "bert" else "layers"
    peftkit.adapt(model, ia3.IA3Config())
    got = {p: layer.adapters["default"].feedforward for p, layer in peftkit.adapted_layers(model)}
    assert got == {f"{prefix}.{i}.{m}": m == ff for i in range(2) for m in (k, v, ff)}
    assert peftkit.summary(model).trainable == 2 * n


def test_bad_input_is_refused_and_changes_nothing() -> None:
    spec = MODELS["embedding"]
    model = spec.build()
    before, modules = state_copy(model), [type(m) for m in model.modules()]
    with pytest.raises(peftkit.PeftkitError, match="'emb' is an Embedding.*feedforward"):
        peftkit.adapt(model, peftkit.config("ia3", target_modules=["proj", "emb"], feedforward_modules=["emb"]))
    assert same_state(before, state_copy(model)) and [type(m) for m in model.modules()] == modules
    with pytest.raises(peftkit.PeftkitError, match=r"subset of target_modules: \['fc3'\]"):
        peftkit.config("ia3", target_modules=["fc1", "fc2"], feedforward_modules=["fc2", "fc3"])
    with pytest.raises(peftkit.PeftkitError, match="dropout"):
        peftkit.config("ia3", dropout=0.1)
    with pytest.raises(peftkit.PeftkitError, match="matched no module"):  # the defaults on a model without such names
        peftkit.adapt(model, ia3.IA3Config())
    assert same_state(before, state_copy(model))


def test_only_the_scales_train() -> None:
    spec = MODELS["block"]
    model = spec.build()
    peftkit.adapt(model, peftkit.config("ia3", target_modules=["k", "v", "fc2"], feedforward_modules=["fc2"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(f"{m}.adapters.default.ia3_l" for m in ("attn.k", "attn.v", "mlp.fc2"))
    model(spec.input()).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peftkit.trainable_parameters(model))
    assert peftkit.summary(model).trainable == 16 + 16 + 32


# -- Hugging Face PEFT format, through the installed peft package ---------------------------------------------
def test_hf_peft_adapter_loads_with_identical_outputs(tmp_path) -> None:
    from peft import IA3Config, get_peft_model

    ids = _ids()
    pm = get_peft_model(_tiny_bert(), IA3Config(target_modules=["key", "value", "output.dense"],
                                                feedforward_modules=["output.dense"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.3)
        y = pm(input_ids=ids).last_hidden_state
    pm.save_pretrained(tmp_path / "hf")
    fresh = _tiny_bert()
    peftkit.load(fresh, tmp_path / "hf")
    # PEFT matches "output.dense" as a plain suffix: attention.output.dense is an input-scaled target there too
    ff = {p for p, layer in peftkit.adapted_layers(fresh) if layer.adapters["default"].feedforward}
    assert ff == {f"encoder.layer.{i}.{m}output.dense" for i in range(2) for m in ("", "attention.")}
    with torch.no_grad():
        assert_near(fresh(input_ids=ids).last_hidden_state, y, 64, layers=6)


def test_peftkit_adapter_exports_to_hf_peft(tmp_path) -> None:
    from peft import PeftModel

    ids = _ids()
    model = _tiny_bert()
    peftkit.adapt(model, ia3.IA3Config())
    _perturb(model)
    with torch.no_grad():
        y = model(input_ids=ids).last_hidden_state
    peftkit.save(model, tmp_path / "hf", format="hf")
    meta = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "IA3"
    assert meta["feedforward_modules"] == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    pm = PeftModel.from_pretrained(_tiny_bert(), tmp_path / "hf").eval()
    with torch.no_grad():
        assert_near(pm(input_ids=ids).last_hidden_state, y, 64, layers=6)
    back = _tiny_bert()  # and back into peftkit
    peftkit.load(back, tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).last_hidden_state, y)


def test_gpt2_conv1d_exports_to_hf_peft(tmp_path) -> None:
    from peft import PeftModel

    spec = MODELS["gpt2"]
    ids = spec.input()
    model = spec.build()
    peftkit.adapt(model, peftkit.config("ia3", target_modules=["c_attn", "c_fc", "c_proj"],
                                        feedforward_modules=["c_proj"]))
    _perturb(model)
    with torch.no_grad():
        y = spec.run(model, ids)
    peftkit.save(model, tmp_path / "hf", format="hf")
    assert json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm = PeftModel.from_pretrained(spec.build(), tmp_path / "hf").eval()
    with torch.no_grad():
        assert_near(spec.run(pm, ids), y, 64, layers=6)


def test_hf_export_refuses_what_the_format_cannot_hold(tmp_path) -> None:
    spec = MODELS["conv1d"]  # PEFT's IA3 has no nn.Conv1d layer
    model = spec.build()
    peftkit.adapt(model, peftkit.config("ia3", target_modules=spec.targets))
    with pytest.raises(peftkit.PeftkitError, match="no place in that format"):
        peftkit.save(model, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()
    mlp = MODELS["mlp"].build()
    peftkit.adapt(mlp, peftkit.config("ia3", target_modules=["fc1"], bias="all"))
    with pytest.raises(peftkit.PeftkitError, match="no trainable biases"):
        peftkit.save(mlp, tmp_path / "hf2", format="hf")
    with pytest.raises(peftkit.PeftkitError, match="unknown Hugging Face PEFT IA3 option"):
        ia3.IA3.from_hf_config({"peft_type": "IA3", "target_modules": ["k"], "some_new_option": True})


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model.zero_grad(set_to_none=True)
    x.grad = None
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    return (y.detach(), x.grad.clone(), *(p.grad.clone() for p in peftkit.trainable_parameters(model)))


@pytest.mark.parametrize("rows", [64, 4], ids=["folded", "few_rows"])
@pytest.mark.parametrize("feedforward", [["down"], ["up", "down"]], ids=["gelu_input", "ln_and_gelu_inputs"])
def test_input_scaling_fused_path_equals_the_generic_path(rows: int, feedforward: list[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With ≥ d_out rows an input-scaled Linear runs x·(W·diag(l))ᵀ + b with its own backward (∂l from the kept or
    rebuilt input); it gives the generic path's outputs and gradients (float64), and steps aside for few rows."""
    model = NormFeedForward().double()
    peftkit.adapt(model, peftkit.config("ia3", target_modules=["up", "down"], feedforward_modules=feedforward))
    _perturb(model, std=0.1)
    x = torch.randn(rows, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    calls: list[int] = []
    real = ia3._InputScaledLinear.apply
    monkeypatch.setattr(ia3._InputScaledLinear, "apply", lambda *a: calls.append(1) or real(*a))
    fused = _grads(model, x)
    assert len(calls) == (len(feedforward) if rows >= 32 else 0)
    with peftkit.mixed_batch(model, ["default"] * rows):  # the generic delta path
        ref = _grads(model, x)
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_input_scaling_keeps_no_copy_of_a_gelu_output() -> None:
    """Hugging Face PEFT's ``x * l`` keeps the FFN's GELU output for ∂l; the fused path rebuilds it in backward."""
    from peftkit.bench.timing import kept_storages

    model = NormFeedForward()
    peftkit.adapt(model, peftkit.config("ia3", target_modules=["down"], feedforward_modules=["down"]))
    seen: list[torch.Tensor] = []
    model.down.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.randn(64, 16).requires_grad_()
    kept = kept_storages(model(x).sum())
    assert seen and seen[0].untyped_storage().data_ptr() not in kept
    layer = model.down
    y_generic = (layer.base_layer(seen[0] * layer.adapters["default"].ia3_l)).sum()
    assert seen[0].untyped_storage().data_ptr() in kept_storages(y_generic)  # the plain product keeps it


def test_input_scaling_fused_path_on_a_gated_llama_mlp(monkeypatch: pytest.MonkeyPatch) -> None:
    """``down_proj``'s input is act(gate) ⊙ up, rebuilt from what its product keeps: the fused path's ∂l and ∂x equal
    the generic path's (float64) on a training batch of a tiny Llama."""
    model = _tiny_llama().double().train()
    peftkit.adapt(model, peftkit.config("ia3"))
    _perturb(model, std=0.1)
    ids = _ids(4, 12)
    calls: list[int] = []
    real = ia3._InputScaledLinear.apply
    monkeypatch.setattr(ia3._InputScaledLinear, "apply", lambda *a: calls.append(1) or real(*a))

    def run() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids).last_hidden_state
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        return [out.detach(), *(p.grad.clone() for p in peftkit.trainable_parameters(model))]

    fused = run()
    assert len(calls) == 2  # down_proj of both layers (48 rows ≥ d_out = 16)
    with peftkit.mixed_batch(model, ["default"] * 4):
        ref = run()
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
