"""Frozen bitsandbytes bases (NF4 ``Linear4bit``, int8 ``Linear8bitLt``) under every method that declares them:
identity at init, training, merge with re-quantisation (error reported), exact unmerge, full-precision
merge_and_unload, save/load; plus the NF4 facts peftkit relies on (spec §18)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core.registry import QUANTIZED_HOSTS

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import dequantize_4bit, get_4bit_type, quantize_4bit  # noqa: E402

from conformance.models import METHOD_OVERRIDES  # noqa: E402
from peftkit.quant import bnb as qb  # noqa: E402
from tolerance import assert_near  # noqa: E402

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
QUANT_METHODS = [m.name for m in peftkit.all_methods() if set(QUANTIZED_HOSTS) <= set(m.hosts)]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _quantized(quant: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = Net()
    assert qb.quantize_model(net, quant, skip=["head"]) == 2
    return net


def _adapt(net: nn.Module, method: str, name: str = "default") -> None:
    cfg = peftkit.config(method, target_modules=["fc1", "fc2"], **METHOD_OVERRIDES.get(method, {}))
    torch.manual_seed(1)
    peftkit.adapt(net, cfg, name=name)


def _perturb(net: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(net):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


X = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _out(net: nn.Module) -> torch.Tensor:
    """Eval output without autograd. (bitsandbytes' CPU 4-bit layer takes a different kernel — codes repacked, block
    scales rounded to bf16 — when its input needs no grad; comparing outputs always in this mode keeps them exact.)"""
    return net.eval()(X)


def test_quantized_methods_are_the_additive_ones() -> None:
    assert {"lora", "dora", "dylora", "hydra", "kron", "loldu", "mos", "paca", "randlora", "svd", "tlora"} <= set(
        QUANT_METHODS)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("method", QUANT_METHODS)
def test_method_on_a_quantized_base(method: str, quant: str, tmp_path) -> None:
    net = _quantized(quant)
    base = net(X)
    _adapt(net, method)
    assert len(list(peftkit.adapted_layers(net))) == 2 and net.fc1.host.quantized
    if peftkit.get_method(method).init_is_identity:
        torch.testing.assert_close(net(X), base, rtol=0, atol=1e-5)
    # gradients reach every trainable tensor and nothing of the quantised base
    net.train()
    _perturb(net)
    net(X).pow(2).sum().backward()
    for n, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    net.zero_grad(set_to_none=True)
    out = _out(net)
    assert not torch.allclose(out, base, atol=1e-4)
    # (read after the eval forward: on CPUs with AVX512-BF16, bitsandbytes repacks the codes for its inference
    # kernel on the first eval forward and rounds the block scales to bf16 — the weight the layer now uses)
    codes_before = [qb.dequantize(m.base_layer) for m in (net.fc1, net.fc2)]

    # merge re-quantises W_q + ΔW; the reported error is the exact rounding error and within half a code gap
    layer = net.fc1
    target = (layer.host.weight_2d() + layer.adapters["default"].delta_weight()).detach() if method != "dora" else None
    peftkit.merge(net)
    for lay in (net.fc1, net.fc2):
        err = lay.merge_error
        assert err is not None and 0 < err
        w_now = qb.dequantize(lay.base_layer)
        # NF4: half the largest code gap times the block absmax; int8: half a step of the row scale (bitsandbytes
        # rounds in reduced precision, hence the 5% slack)
        bound = 0.1519 * w_now.abs().max() if quant == "nf4" else w_now.abs().max() / 254 * 1.05
        assert err <= float(bound) + 1e-6
    if target is not None:
        assert float((qb.dequantize(layer.base_layer) - target).abs().max()) == pytest.approx(layer.merge_error)
    # unmerge puts back the exact original codes
    peftkit.unmerge(net)
    for lay, w0 in zip((net.fc1, net.fc2), codes_before):
        assert torch.equal(qb.dequantize(lay.base_layer), w0) and lay.merge_error is None
    assert_near(_out(net), out, 32, layers=3)

    # save -> load into a freshly quantised base: identical outputs
    peftkit.save(net, tmp_path / "a")
    fresh = _quantized(quant)
    peftkit.load(fresh, tmp_path / "a")
    assert_near(_out(fresh), out, 32, layers=3)

    # full-precision merge_and_unload: plain nn.Linear with exactly dequant(W_q) + ΔW
    if peftkit.get_method(method).mergeable:
        want = [qb.dequantize(lay.base_layer) + lay.adapters["default"].delta_weight().detach()
                for lay in (net.fc1, net.fc2)] if method != "dora" else None
        plain = peftkit.merge_and_unload(net, dequantize=True)
        assert type(plain.fc1) is nn.Linear and type(plain.fc2) is nn.Linear
        assert not any(qb.kind(m) for m in plain.modules())
        if want is not None:
            for lin, w in zip((plain.fc1, plain.fc2), want):
                assert_near(lin.weight, w, 32, layers=3)
        # the same function up to the quantised layer's own arithmetic (bitsandbytes' CPU kernels compute in bf16 /
        # int8): the float model is the reference the quantised one approximates
        torch.testing.assert_close(_out(plain), out, rtol=0.05, atol=5e-3)


def test_unsupported_method_on_quantized_host_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from peftkit.core import registry

    # a method that declares only float hosts (every registered method here supports bnb, so take LoRA without it)
    info = registry.get("lora")
    monkeypatch.setitem(registry._REGISTRY, "lora", dataclasses.replace(info, hosts=registry.HOST_KINDS))
    net = _quantized("nf4")
    with pytest.raises(peftkit.PeftkitError, match="does not support Linear4bit"):
        _adapt(net, "lora")
    assert not list(peftkit.adapted_layers(net))


def test_partial_unmerge_of_two_adapters_is_exact() -> None:
    net = _quantized("nf4")
    _adapt(net, "lora", "a")
    _adapt(net, "lora", "b")
    _perturb(net)
    peftkit.set_active(net, ["a", "b"])
    out = _out(net)
    w0 = qb.dequantize(net.fc1.base_layer)
    peftkit.merge(net)
    net.fc1.unmerge(["a"])  # b stays merged: W = requant(W_q + ΔW_b)
    assert net.fc1.merged == ["b"]
    expected = w0 + net.fc1.adapters["b"].delta_weight().detach()
    assert float((qb.dequantize(net.fc1.base_layer) - expected).abs().max()) == pytest.approx(net.fc1.merge_error)
    peftkit.unmerge(net)
    assert torch.equal(qb.dequantize(net.fc1.base_layer), w0)
    assert_near(_out(net), out, 32, layers=3)


def test_linear_weight_bytes_shrink_about_7x() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    full = qb.linear_weight_bytes(net)
    qb.quantize_model(net, "nf4")
    ratio = full / qb.linear_weight_bytes(net)
    assert 6.0 < ratio < 8.0  # 4 bits + one fp32 absmax per 64 weights = 4.5 bits/param


def test_without_bitsandbytes_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(peftkit.PeftkitError, match=r"pip install 'peftkit\[quant\]'"):
        qb.quantize_model(Net(), "nf4")


# -- what we rely on from bitsandbytes' NF4 (spec §18) ------------------------------------------------------
def test_nf4_code_values() -> None:
    code = get_4bit_type("nf4", device="cpu")
    assert code.tolist() == pytest.approx(NF4, abs=1e-7)
    # the code is Φ⁻¹ quantiles, normalised (the spec's construction)
    from statistics import NormalDist

    delta, inv = 0.9677083, NormalDist().inv_cdf
    pos = [inv(delta * 0 + (0.5 + i * (delta - 0.5) / 8)) for i in range(1, 9)]
    neg = [-inv(0.5 + i * (delta - 0.5) / 7) for i in range(1, 8)]
    vals = sorted(pos + neg + [0.0])
    vals = [v / max(vals) for v in vals]
    assert vals == pytest.approx(NF4, abs=1e-6)


def test_nf4_round_trip_and_error_bound() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) * 0.02
    packed, st = quantize_4bit(w, quant_type="nf4", blocksize=64)
    deq = dequantize_4bit(packed, st)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    err = (w.view(-1, 64) - deq.view(-1, 64)).abs()
    assert bool((err <= absmax * 0.1519 + 1e-8).all())
    # values that are exactly code_j * absmax round-trip exactly; each block's absmax maps to ±1
    code = torch.tensor(NF4)
    idx = torch.randint(0, 16, (4, 64), generator=g)
    idx[:, 0] = 15  # make the block absmax a code point
    scale = torch.tensor([[0.5], [1.0], [2.0], [0.25]])
    exact = code[idx] * scale
    p2, s2 = quantize_4bit(exact.contiguous(), quant_type="nf4", blocksize=64)
    assert_near(dequantize_4bit(p2, s2), exact, 32, layers=3)


def test_cli_4bit_base_uses_double_quantisation_like_quantize_model(tmp_path) -> None:
    """QLoRA's NF4 stores the block scales themselves quantised (double quantisation): ``--quantize nf4`` (through
    transformers' BitsAndBytesConfig) and :func:`quantize_model` must build the same kind of layer."""
    from peftkit.models import load_classifier
    from test_cli import _make_tiny_bert

    d = _make_tiny_bert(tmp_path, hidden=64, intermediate=128)
    model, _ = load_classifier(d, 2, seed=0, quantize="nf4")
    cli = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    ours = [m for m in _quantized("nf4").modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert cli and ours
    assert all(m.weight.quant_state.nested for m in ours)  # quantize_model: double quantisation
    assert all(m.weight.quant_state.nested for m in cli)
    assert {m.weight.quant_state.quant_type for m in cli} == {"nf4"}
