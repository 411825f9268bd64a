"""LoRA on substituted hosts — nn.MultiheadAttention and bare parameters (``target_parameters``) — and the MiCA init,
as a peftkit user meets them: outputs against a hand-computed reference, gradients only to the adapter, merge and
unmerge, saving in both formats, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from tolerance import assert_near


class Attn(nn.Module):
    """Linear 8 → 8, then an nn.MultiheadAttention (E = 8, 2 heads, batch first) over it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        return self.mha(h, h, h, need_weights=False)[0]


class Gate(nn.Module):
    """A module that uses its parameter ``w`` (6 × 10) as ``x·w`` and also reads it in a norm term: not a layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 10) / 3)
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w) * self.scale + self.w.pow(2).sum()


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = Gate()
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(x))


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _randomise(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _mha_reference(model: Attn, x: torch.Tensor) -> torch.Tensor:
    """The adapted attention computed by hand: in_proj W + s·B·A, out_proj W_o + 2·s·B_o·A_o (PEFT's function)."""
    layer = model.mha
    m, a = layer.base_layer, layer.adapters["default"]
    w_in = m.in_proj_weight + a.s * a.lora_B @ a.lora_A
    w_out = m.out_proj.weight + 2 * a.s * a.lora_B_out @ a.lora_A_out
    h = model.pre(x).transpose(0, 1)
    out, _ = F.multi_head_attention_forward(h, h, h, 8, 2, w_in, m.in_proj_bias, None, None, False, 0.0, w_out,
                                            m.out_proj.bias, training=False, need_weights=False)
    return out.transpose(0, 1)


def test_mha_output_is_the_attention_with_the_adapted_projections() -> None:
    model = peftkit.adapt(Attn(), peftkit.LoraConfig(target_modules=["mha"], r=2, alpha=4)).eval()
    x = _x(3, 5, 8)
    base = model(x).detach()
    _randomise(model)
    with torch.no_grad():
        y = model(x)
        assert_near(y, _mha_reference(model, x))
        assert (y - base).abs().max() > 1e-2  # the update does something
        with peftkit.disable(model):
            assert_near(model(x), base)


def test_mha_gradients_reach_only_the_adapter_and_the_base_is_untouched() -> None:
    model = peftkit.adapt(Attn(), peftkit.LoraConfig(target_modules=["mha"], r=2))
    _randomise(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    model(_x(2, 4, 8)).square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"mha.adapters.default.{k}" for k in ("lora_A", "lora_B", "lora_A_out", "lora_B_out")}
    assert all(p.grad.abs().sum() > 0 for p in peftkit.trainable_parameters(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    m = model.mha.base_layer
    assert isinstance(m.in_proj_weight, nn.Parameter) and not m.in_proj_weight.requires_grad
    s = peftkit.summary(model)
    assert s.trainable == 6 * 2 * 8 == peftkit.get_method("lora").adapter.expected_params(model.mha.host,
                                                                                          model.peftkit_configs["default"])


def test_mha_merge_equals_forward_and_unmerge_restores_the_weights() -> None:
    model = peftkit.adapt(Attn(), peftkit.LoraConfig(target_modules=["mha"], r=3)).eval()
    _randomise(model)
    x = _x(2, 6, 8)
    m = model.mha.base_layer
    w_in, w_out = m.in_proj_weight.detach().clone(), m.out_proj.weight.detach().clone()
    with torch.no_grad():
        y = model(x)
        peftkit.merge(model)
        assert_near(model(x), y)
        assert not torch.equal(m.in_proj_weight, w_in) and not torch.equal(m.out_proj.weight, w_out)
        peftkit.unmerge(model)
        assert_near(m.in_proj_weight, w_in)
        assert_near(m.out_proj.weight, w_out)
        assert_near(model(x), y)
    assert all(p.requires_grad for p in model.mha.adapters["default"].parameters())


@pytest.mark.parametrize("fmt", ["peftkit", "hf"])
def test_mha_and_parameter_adapters_reload_exactly(fmt: str, tmp_path: Path) -> None:
    for make, cfg, x in [(Attn, peftkit.LoraConfig(target_modules=["mha", "pre"], r=2), _x(2, 5, 8)),
                         (WithGate, peftkit.LoraConfig(target_parameters=["gate.w"], r=2), _x(4, 6))]:
        model = peftkit.adapt(make(), cfg).eval()
        _randomise(model)
        with torch.no_grad():
            y = model(x)
        peftkit.save(model, tmp_path / make.__name__, format=fmt)
        fresh = make().eval()
        peftkit.load(fresh, tmp_path / make.__name__)
        with torch.no_grad():
            assert torch.equal(fresh(x), y)


def test_parameter_host_computes_the_module_with_p_plus_s_b_a() -> None:
    model = peftkit.adapt(WithGate(), peftkit.LoraConfig(target_parameters=["w"], r=2, alpha=2)).eval()
    _randomise(model)
    a = model.gate.adapters["default"]
    x = _x(4, 6)
    ref = WithGate().eval()
    with torch.no_grad():
        ref.gate.w += a.s * a.lora_B @ a.lora_A
        assert_near(model(x), ref(x))  # the norm term reads the adapted parameter too
        peftkit.merge(model)
        assert_near(model.gate.base_layer.w, ref.gate.w)
        assert_near(model(x), ref(x))
        peftkit.unmerge(model)
        assert_near(model.gate.base_layer.w, WithGate().gate.w)
    model.train()
    model(x).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        "gate.adapters.default.lora_A", "gate.adapters.default.lora_B"}


@pytest.mark.parametrize("cfg,pattern", [
    (dict(target_parameters=["nothing.here"]), "matched no parameter"),
    (dict(target_parameters=["gate.w"], dropout=0.1), r"dropout=0.1 .*not supported there"),
    (dict(target_parameters=["gate.w"], init="pissa"), r"init='pissa' is not supported there"),
    (dict(target_parameters=["gate.w"], target_modules=["gate"]), "matched no module|targeted both"),
    (dict(target_parameters=["gate.w", "gate.scale"]), "two targeted parameters"),
])
def test_parameter_refusals_name_the_option(cfg: dict, pattern: str) -> None:
    model = WithGate()
    with pytest.raises(peftkit.PeftkitError, match=pattern):
        peftkit.adapt(model, peftkit.LoraConfig(r=1, **cfg))
    assert not peftkit.adapter_names(model)


def test_expert_stacks_get_one_update_per_expert() -> None:
    """A 3-D (E, out, in) parameter: expert e gets ΔP_e = s·B_e·A_e, A_e = A[e·r:(e+1)·r], B_e = B[:, e::E]."""
    model = WithGate()
    model.gate.experts = nn.Parameter(torch.randn(3, 6, 10))  # read by nothing: its update is checked by merging
    peftkit.adapt(model, peftkit.LoraConfig(target_parameters=["experts"], r=2, alpha=4))
    _randomise(model)
    a = model.gate.adapters["default"]
    assert a.lora_A.shape == (6, 10) and a.lora_B.shape == (6, 6)
    before = model.gate.base_layer.experts.detach().clone()
    peftkit.merge(model)
    for e in range(3):
        want = before[e] + 2 * a.lora_B[:, e::3] @ a.lora_A[2 * e:2 * e + 2]
        assert_near(model.gate.base_layer.experts[e], want)
    peftkit.unmerge(model)
    assert_near(model.gate.base_layer.experts, before)
    expected = peftkit.get_method("lora").adapter.expected_params(model.gate.host, model.peftkit_configs["default"])
    assert peftkit.summary(model).trainable == 2 * (3 * 10 + 3 * 6) == expected


def test_four_dimensional_parameters_are_refused_by_name() -> None:
    model = WithGate()
    model.gate.experts = nn.Parameter(torch.randn(2, 2, 6, 10))
    with pytest.raises(peftkit.PeftkitError, match=r"gate.experts has 4 dimensions.*2-D parameters and 3-D"):
        peftkit.adapt(model, peftkit.LoraConfig(target_parameters=["experts"], r=1))


def test_mixed_batches_are_refused_on_a_substituted_host() -> None:
    model = peftkit.adapt(Attn(), peftkit.LoraConfig(target_modules=["mha"], r=2))
    peftkit.adapt(model, peftkit.LoraConfig(target_modules=["mha"], r=2), name="other")
    with pytest.raises(peftkit.PeftkitError, match="mixed batches"), peftkit.mixed_batch(model, ["default", "other"]):
        model(_x(2, 3, 8))


# -- MiCA ----------------------------------------------------------------------------------------------------------
def test_mica_starts_from_the_minor_singular_vectors_and_trains_a_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4))
    w = model[0].weight.detach().clone()
    peftkit.adapt(model, peftkit.LoraConfig(target_modules=["0"], r=3, init="mica"))
    a = model[0].adapters["default"]
    u = torch.linalg.svd(w, full_matrices=False)[0]
    assert_near(a.lora_B, u[:, -3:])
    assert torch.count_nonzero(a.lora_A) == 0
    assert not a.lora_B.requires_grad and a.lora_A.requires_grad
    assert peftkit.summary(model).trainable == 3 * 12
    b0 = a.lora_B.detach().clone()
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-2)  # weight decay would move B if it trained
    x = _x(8, 12)
    for _ in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert torch.equal(a.lora_B, b0) and torch.count_nonzero(a.lora_A) > 0
    peftkit.merge(model)
    peftkit.unmerge(model)
    assert not a.lora_B.requires_grad and a.lora_A.requires_grad  # unmerge gives back the trainable state
    peftkit.set_active(model, "default")
    assert not a.lora_B.requires_grad


def test_mica_reloads_with_b_frozen(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4))
    peftkit.adapt(model, peftkit.LoraConfig(target_modules=["0", "2"], r=2, init="mica"))
    _randomise(model)
    x = _x(3, 12)
    with torch.no_grad():
        y = model(x)
    for fmt in ("peftkit", "hf"):
        peftkit.save(model, tmp_path / fmt, format=fmt)
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4))
        peftkit.load(fresh, tmp_path / fmt, trainable=True)
        with torch.no_grad():
            assert torch.equal(fresh(x), y)
        assert not fresh[0].adapters["default"].lora_B.requires_grad
        assert fresh[0].adapters["default"].lora_A.requires_grad


def test_mica_on_a_convolution_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(peftkit.PeftkitError, match="init='mica' on '0': Linear, GPT-2 Conv1D and Embedding"):
        peftkit.adapt(model, peftkit.LoraConfig(target_modules=["0"], r=2, init="mica"))


def test_transformer_encoder_layer_reads_the_attention_only_when_it_holds_the_adapter() -> None:
    """nn.TransformerEncoderLayer's inference fast path runs attention from ``self_attn.in_proj_weight`` etc.: with
    the adapter live that would skip it (refused, naming what to do); merged, the fast path sees the merged weights
    and gives the adapted output."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    peftkit.adapt(layer, peftkit.LoraConfig(target_modules=["self_attn"], r=2, init="random"))
    x = _x(2, 3, 8)
    with torch.no_grad():
        y = layer(x)  # training mode: the slow path, through the adapted layer's forward
        base = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        base.load_state_dict({k.replace("self_attn.base_layer.", "self_attn."): v for k, v in layer.state_dict().items()
                              if ".adapters." not in k})
        assert (base.eval()(x) - y).abs().max() > 1e-3
        layer.eval()
        with pytest.raises(AttributeError, match="read past its adapter.*merge the adapter"):
            layer(x)
        peftkit.merge(layer)
        assert_near(layer(x), y)
        peftkit.unmerge(layer)
        with peftkit.disable(layer):
            assert_near(layer(x), base(x))
