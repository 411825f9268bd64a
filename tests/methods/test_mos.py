"""MoS property tests (spec: shared/methods/weight-space.md §12)."""

import copy

import pytest
import torch
from torch import nn

import peftkit


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


def _spec_factors(pool_a, pool_b, idx_a, idx_b, r, l):
    """A_j and B_j by the spec's vector sharding, written with loops over shards (independent of the adapter's
    gather/reshape): row k of A is the concatenation of the pool-A shards idx_A[k·l+u], u < l; column k of B the
    concatenation of the pool-B columns idx_B[k·l+u]."""
    sa, sb = pool_a.shape[1], pool_b.shape[0]
    a = torch.zeros(r, sa * l, dtype=torch.float64)
    b = torch.zeros(sb * l, r, dtype=torch.float64)
    for k in range(r):
        for u in range(l):
            a[k, u * sa:(u + 1) * sa] = pool_a[int(idx_a[k * l + u])].double()
            b[u * sb:(u + 1) * sb, k] = pool_b[:, int(idx_b[k * l + u])].double()
    return a, b


def test_layers_match_the_spec_assembled_by_hand():
    """Every layer's output equals x·(W0 + (α/r)·B_j·A_j)ᵀ + b with A_j, B_j assembled from the pools by hand, the
    routing follows the spec's layout (r − r_p public shards drawn from the first (r_e − r_p)·L·l, then the layer's
    own private block), and the pools are shared by the layers of one module type."""
    torch.manual_seed(0)
    m = Stack(n=3)
    r, r_e, r_p, l, alpha = 4, 3, 1, 2, 6.0
    peftkit.adapt(m, _cfg(r=r, r_e=r_e, r_p=r_p, l=l, alpha=alpha))
    _perturb(m)
    L = len(m.layers)
    n_pub = (r_e - r_p) * L * l
    x = torch.randn(5, 16)
    for name in ("q", "up"):
        pools = {id(blk[name].adapters["default"].pool_a) for blk in m.layers}
        assert len(pools) == 1  # one pool per module type
        for j, blk in enumerate(m.layers):
            ad = blk[name].adapters["default"]
            assert ad.pool_a.shape == (r_e * L * l, 16 // l)
            for idx in (ad.idx_a, ad.idx_b):
                assert len(idx) == r * l
                public, private = idx[: (r - r_p) * l].tolist(), idx[(r - r_p) * l:].tolist()
                assert all(0 <= i < n_pub for i in public) and len(set(public)) == len(public)
                assert private == list(range(n_pub + j * r_p * l, n_pub + (j + 1) * r_p * l))
            a, b = _spec_factors(ad.pool_a.detach(), ad.pool_b.detach(), ad.idx_a, ad.idx_b, r, l)
            w0 = blk[name].base_layer.weight.detach().double()
            bias = blk[name].base_layer.bias.detach().double()
            expected = x.double() @ (w0 + alpha / r * b @ a).t() + bias
            torch.testing.assert_close(blk[name](x).double(), expected, rtol=0, atol=1e-5 * expected.abs().max())
            torch.testing.assert_close(ad.delta_weight().double(), alpha / r * b @ a, rtol=0, atol=1e-6)


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
