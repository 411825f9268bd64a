"""MoS property tests (spec: shared/methods/weight-space.md §12)."""

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.lora import Lora
from tolerance import assert_near


class Stack(nn.Module):
    def __init__(self, n: int = 4, d: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(d, d), "up": nn.Linear(d, 2 * d)}) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.layers:
            x = x + torch.tanh(blk["q"](x)) + blk["up"](x)[..., : x.shape[-1]]
        return x


def _cfg(**kw):
    return peftkit.config("mos", target_modules=["q", "up"], **{"r": 4, "r_e": 2, "r_p": 1, "l": 2, **kw})


def _perturb(model):
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))


def test_init_identity_params_and_pools_saved_once(tmp_path):
    torch.manual_seed(0)
    m = Stack()
    x = torch.randn(3, 5, 16)
    base = m(x)
    peftkit.adapt(m, _cfg())
    assert torch.equal(m(x), base)
    # per module type: r_e·L·(d_in + d_out): q 2·4·32, up 2·4·48 — LoRA's count at rank r_e
    assert peftkit.summary(m).trainable == 2 * 4 * 32 + 2 * 4 * 48
    peftkit.save(m, tmp_path)
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    pools = [k for k in keys if "pool_" in k]
    assert len(pools) == 4  # (A, B) x two module types, stored once


def test_each_layer_has_rank_r_and_merge():
    torch.manual_seed(0)
    m = Stack()
    peftkit.adapt(m, _cfg())
    _perturb(m)
    for blk in m.layers:
        dw = blk["q"].adapters["default"].delta_weight()
        assert torch.linalg.matrix_rank(dw) == 4
    x = torch.randn(2, 3, 16)
    y = m(x)
    peftkit.merge(m)
    assert torch.allclose(m(x), y, atol=1e-5 * y.abs().max().item())


def test_reduces_to_lora_with_private_rows_only():
    torch.manual_seed(0)
    m = Stack(n=2)
    peftkit.adapt(m, _cfg(r=3, r_e=3, r_p=3, l=1, alpha=6))
    _perturb(m)
    x = torch.randn(4, 16)
    for blk in m.layers:
        ad = blk["q"].adapters["default"]
        a, b = ad.factors()
        lora = Lora(ad.host, peftkit.config("lora", target_modules=["q"], r=3, alpha=6))
        with torch.no_grad():
            lora.lora_A.copy_(a)
            lora.lora_B.copy_(b)
        assert_near(ad.delta(x, None), lora.delta(x, None), 32, layers=3)
    # disjoint private rows: the two layers use different shards
    i0, i1 = (blk["q"].adapters["default"].idx_a for blk in m.layers)
    assert not set(i0.tolist()) & set(i1.tolist())


def test_private_shards_get_gradient_only_from_owner():
    torch.manual_seed(0)
    m = Stack(n=3)
    peftkit.adapt(m, _cfg())
    _perturb(m)
    owner = m.layers[1]["q"].adapters["default"]
    private = owner.idx_a[-owner.config.r_p * owner.l:]
    pool = m.layers[0]["q"].adapters["default"].pool_a
    # gradient through layer 0 only: private shards of layer 1 get none
    x = torch.randn(2, 16)
    m.layers[0]["q"](x).sum().backward()
    assert pool.grad[private].abs().sum() == 0
    pool.grad = None
    m.layers[1]["q"](x).sum().backward()
    assert pool.grad[private].abs().sum() > 0


def test_pair_dissociation_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = Stack()
    ref = copy.deepcopy(m)
    peftkit.adapt(m, _cfg())
    ad = m.layers[0]["q"].adapters["default"]
    assert not torch.equal(ad.idx_a, ad.idx_b)
    _perturb(m)
    x = torch.randn(2, 3, 16)
    y = m(x)
    peftkit.save(m, tmp_path)
    peftkit.load(ref, tmp_path)
    assert torch.equal(ref(x), y)


def test_bad_shapes():
    m = Stack(n=1, d=15)
    with pytest.raises(peftkit.PeftkitError, match="l=2 to divide"):
        peftkit.adapt(m, _cfg())
    m = Stack(n=1)
    with pytest.raises(peftkit.PeftkitError, match="public ranks"):
        peftkit.adapt(m, _cfg(r=8))
    assert not any(True for _ in peftkit.adapted_layers(m))
