"""UniPELT: LoRA + prefix tuning + bottleneck adapter behind learned gates σ(w·x + b), assembled from peftkit's own
lora / prefix_tuning / series_adapter — each component alone (the others gated off) equals that method's adapter
with the same weights; the gates are the paper's; counts, save/load, errors."""

from __future__ import annotations

import pytest
import torch

import peftkit
from conformance.models import MODELS, perturb, tiny_llama
from peftkit.core.errors import PeftkitError
from peftkit.core.model_level import model_adapters
from tolerance import assert_near


def tiny_gpt2(_width: int = 16):
    return MODELS["gpt2"].build()  # seeded: two builds have the same base weights


IDS = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(0))
SMALL = {"prefix_length": 4, "prefix_bottleneck_size": 8, "reduction_factor": 4.0}


def _unipelt(factory=lambda: tiny_gpt2(16), **fields):
    model = factory()
    peftkit.adapt(model, peftkit.config("unipelt", **{**SMALL, **fields}))
    perturb(model, seed=1)
    return model, model_adapters(model)["default"]


@torch.no_grad()
def _set_gate(gate, value: float | None) -> None:
    """Gate exactly ``value`` (0 or 1: σ(∓1e4) in fp32), or a random linear gate for None."""
    if value is None:
        return
    gate.gate.weight.zero_()
    gate.gate.bias.fill_(1e4 if value == 1 else -1e4)


def _out(model):
    with torch.no_grad():
        return model(IDS).last_hidden_state


def test_a_gate_is_the_mean_over_positions_of_a_sigmoid_of_a_linear() -> None:
    model, u = _unipelt()
    part = u.layer_parts["lora"][0]
    host = model.h[0].attn.c_attn
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = host(x)  # the hook has run: out = W·x + b + g(x)·lora(x)
        base = torch.addmm(host.bias, x.view(-1, 16), host.weight).view(2, 5, 48)
        lora = part.adapter
        g = torch.sigmoid(x @ part.gate.gate.weight.t() + part.gate.gate.bias).mean(dim=1, keepdim=True)
        expected = base + g * (x @ lora.lora_A.t() @ lora.lora_B.t()) * (2.0 / 8)
    assert g.shape == (2, 1, 1) and not torch.allclose(g[0], g[1])  # one gate value per sample, from its input
    assert_near(out, expected, 16, layers=3)


def test_lora_alone_equals_peftkits_lora() -> None:
    model, u = _unipelt(prefix_tuning=False)
    _set_gate(u.layer_parts["lora"][0].gate, 1)
    _set_gate(u.layer_parts["adapter"][0].gate, 0)
    ref = tiny_gpt2(16)
    peftkit.adapt(ref, peftkit.config("lora", target_modules=["c_attn"], r=8, alpha=2.0))
    ref.h[0].attn.c_attn.adapters["default"].load_state_dict(u.layer_parts["lora"][0].adapter.state_dict())
    assert_near(_out(model), _out(ref), 48, layers=4)


def test_adapter_alone_equals_peftkits_series_adapter() -> None:
    model, u = _unipelt(prefix_tuning=False)
    _set_gate(u.layer_parts["lora"][0].gate, 0)
    _set_gate(u.layer_parts["adapter"][0].gate, 1)
    ref = tiny_gpt2(16)
    peftkit.adapt(ref, peftkit.config("series_adapter", target_modules=["mlp.c_proj"], bottleneck_size=4,
                                      non_linearity="relu"))
    ref.h[0].mlp.c_proj.adapters["default"].load_state_dict(u.layer_parts["adapter"][0].adapter.state_dict())
    assert_near(_out(model), _out(ref), 64, layers=4)
    _set_gate(u.layer_parts["adapter"][0].gate, 0)  # every layer component gated off: the base model
    assert_near(_out(model), _out(tiny_gpt2(16)), 64, layers=4)


@pytest.mark.parametrize("gate", [1.0, 0.5])
def test_prefix_alone_equals_peftkits_prefix_tuning_scaled_by_its_gate(gate: float) -> None:
    model, u = _unipelt(factory=lambda: tiny_llama(hidden=32))
    for key in ("lora", "adapter"):
        for part in u.layer_parts[key]:
            _set_gate(part.gate, 0)
    for pg in u.prefix_gates:
        if gate == 1.0:
            _set_gate(pg.gate, 1)
        else:
            with torch.no_grad():
                pg.gate.gate.weight.zero_()
                pg.gate.gate.bias.zero_()  # σ(0) = ½
    ref = tiny_llama(hidden=32)
    peftkit.adapt(ref, peftkit.config("prefix_tuning", num_virtual_tokens=4, prefix_projection=False))
    with torch.no_grad():  # the gate multiplies the prefix's keys and values: a table scaled by it
        model_adapters(ref)["default"].embedding.weight.copy_(gate * u.prefix.table())
        ids = IDS % 50
        assert_near(model(ids).logits, ref(ids).logits, 32, layers=6)


def test_gated_prefix_generates_and_saves(tmp_path) -> None:
    model, u = _unipelt(factory=lambda: tiny_llama(hidden=32))
    ids = IDS[:2] % 50
    with torch.no_grad():
        first = model(ids).logits[:, -1].argmax(-1)
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, ids.shape[1]], first)  # the gated prefix in the cache gives the forward's next token
    peftkit.save(model, tmp_path / "u")
    fresh = tiny_llama(hidden=32)
    peftkit.load(fresh, tmp_path / "u")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_parameter_count() -> None:
    model, _ = _unipelt()
    d, P, mp, L, dkv, r = 16, 4, 8, 1, 16, 8
    prefix = P * d + (d + 1) * mp + (mp + 1) * 2 * L * dkv
    lora = r * (16 + 48) + 16 + 1  # c_attn 16 -> 48, its gate reads the 16-wide input
    adapter = 2 * 4 * 16 + 16 + 1  # mlp.c_proj 64 -> 16: m = 16 / 4 on its 16-wide output, gated on it
    assert peftkit.summary(model).trainable == prefix + lora + adapter + L * (d + 1)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(PeftkitError, match="all off"):
        peftkit.config("unipelt", prefix_tuning=False, adapter=False, lora=False)
    with pytest.raises(PeftkitError, match="target_modules: unipelt is a model-level method"):
        peftkit.config("unipelt", target_modules=["q"])
    with pytest.raises(PeftkitError, match="Hugging Face model"):
        peftkit.adapt(torch.nn.Sequential(torch.nn.Linear(4, 4)), peftkit.config("unipelt"))
