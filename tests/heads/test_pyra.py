"""PYRA re-activation on ToMe token merging: plain ToMe at W_b = 0, weights in range, r = 0 has no parameters."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit import PeftkitError
from peftkit.heads.pyra import Matching, PyraReactivation, ToMeBlock, bipartite_soft_matching, merge_wavg
from tolerance import assert_near

D, H, N = 16, 4, 11


def _x(b: int = 2, n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed))


def _pair(r: int) -> tuple[ToMeBlock, ToMeBlock]:
    torch.manual_seed(0)
    plain = ToMeBlock(D, H, r, pyra=False)
    torch.manual_seed(0)
    with_pyra = ToMeBlock(D, H, r, pyra=True)
    return plain, with_pyra


def test_zero_wb_equals_plain_tome() -> None:
    plain, pyra = _pair(3)
    x = _x()
    (y0, s0), (y1, s1) = plain(x), pyra(x)
    assert y1.shape == (2, N - 3, D) and torch.equal(s0, s1)
    assert_near(y0, y1, 32, layers=3)
    with torch.no_grad():
        pyra.pyra.w_b.normal_()
    assert not torch.allclose(pyra(x)[0], y0, atol=1e-4)


def test_r_zero_has_no_pyra_parameters_and_is_a_plain_block() -> None:
    plain, pyra = _pair(0)
    assert pyra.pyra is None
    assert sum(p.numel() for p in pyra.parameters()) == sum(p.numel() for p in plain.parameters())
    x = _x()
    y, s = pyra(x)
    assert y.shape == x.shape and torch.equal(s, torch.ones(2, N, 1))
    _, p3 = _pair(3)
    assert sum(p.numel() for p in p3.pyra.parameters()) == 3 + D + 2 * D  # r + d + LayerNorm


def test_weights_stay_in_range() -> None:
    torch.manual_seed(1)
    pyra = PyraReactivation(D, 4)
    with torch.no_grad():
        pyra.w_b.normal_(0, 0.5)
        pyra.w_a.normal_(0, 0.5)
    src, dst = torch.randn(8, 4, D), torch.randn(8, 4, D)
    w_c, w_t = pyra.weights(src, dst)
    assert w_c.shape == (8, 1, D) and w_t.shape == (8, 4, 1)
    assert (w_c > 0).all() and (w_c < 2).all() and (w_t > -1).all() and (w_t < 1).all()
    assert torch.allclose(pyra(src, dst), src * (1 + w_c * w_t))
    # reference: X̂ = LN(S + D), w_c = 2σ(W_aᵀX̂), w_t = 2σ(X̂W_bᵀ) − 1
    xh = torch.nn.functional.layer_norm(src + dst, (D,))
    assert_near(w_c[:, 0], 2 * torch.sigmoid((xh * pyra.w_a[:, 0, None]).sum(1)), 32, layers=3)
    assert_near(w_t, 2 * torch.sigmoid(xh @ pyra.w_b.T) - 1, 32, layers=3)


def test_matching_and_weighted_merge_reference() -> None:
    x = _x(1, 7)
    m = bipartite_soft_matching(x, 2)
    assert m.r == 2 and 0 not in m.src_idx[0].tolist()  # the class token (A index 0) never merges
    assert m.unm_idx[0].tolist() == sorted(m.unm_idx[0].tolist()) and m.unm_idx[0, 0] == 0
    size = torch.tensor([1.0, 2, 1, 3, 1, 1, 2]).view(1, 7, 1)
    y, s = merge_wavg(m, x, size)
    assert y.shape == (1, 5, D) and s.sum() == size.sum()
    # reference: every B token is the size-weighted mean of itself and the A tokens merged into it
    xa, xb, sa, sb = x[0, ::2], x[0, 1::2], size[0, ::2], size[0, 1::2]
    for j in range(xb.shape[0]):
        srcs = [int(i) for i, d in zip(m.src_idx[0], m.dst_idx[0]) if int(d) == j]
        tot = sb[j] + sum(sa[i] for i in srcs)
        want = (xb[j] * sb[j] + sum(xa[i] * sa[i] for i in srcs)) / tot
        assert torch.allclose(y[0, 2 + j], want, atol=1e-6) and s[0, 2 + j, 0] == tot
    assert torch.equal(y[0, :2], xa[m.unm_idx[0]])
    none = Matching(m.src_idx[:, :0], m.dst_idx[:, :0], torch.arange(4).view(1, 4))
    assert_near(merge_wavg(none, x, size)[0], torch.cat([xa, xb])[None], 32, layers=3)


def test_pyra_acts_inside_the_size_weighted_merge() -> None:
    """Official ``merge_wavg``: ``merge(x * size)`` — PYRA sees the size-weighted source S = x_S·s_S and destination
    D = x_D·s_D; the merged token is (x_D·s_D + Σ S') / (s_D + Σ s_S). Hand-computed per pair, unequal sizes."""
    torch.manual_seed(2)
    x = _x(1, 9, seed=5) * 3
    size = torch.tensor([1.0, 3, 1, 2, 5, 1, 4, 1, 2]).view(1, 9, 1)
    m = bipartite_soft_matching(x, 3)
    pyra = PyraReactivation(D, 3)
    with torch.no_grad():
        pyra.w_b.normal_(0, 0.7)
        pyra.norm.weight.uniform_(0.5, 1.5)
        pyra.norm.bias.normal_(0, 0.2)
    y, s = merge_wavg(m, x, size, pyra)
    xa, xb, sa, sb = x[0, ::2], x[0, 1::2], size[0, ::2], size[0, 1::2]
    src = [int(i) for i in m.src_idx[0]]
    dst = [int(j) for j in m.dst_idx[0]]
    with torch.no_grad():
        pairs = torch.stack([xa[i] * sa[i] + xb[j] * sb[j] for i, j in zip(src, dst)])
        xh = torch.nn.functional.layer_norm(pairs, (D,), pyra.norm.weight, pyra.norm.bias)
        w_c = 2 * torch.sigmoid(sum(float(pyra.w_a[k, 0]) * xh[k] for k in range(3)))
        for j in range(xb.shape[0]):
            tot, acc = sb[j].clone(), xb[j] * sb[j]
            for k, (i, jj) in enumerate(zip(src, dst)):
                if jj == j:
                    w_t = 2 * torch.sigmoid(xh[k] @ pyra.w_b[0]) - 1
                    weighted = xa[i] * sa[i]
                    acc, tot = acc + weighted + weighted * w_c * w_t, tot + sa[i]
            assert_near(y[0, 9 - 3 - xb.shape[0] + j], acc / tot, 64, layers=4)
            assert s[0, 9 - 3 - xb.shape[0] + j, 0] == tot
    assert len(set(dst)) < 3 or any(float(size[0, 1::2][j]) != 1 for j in dst)  # unequal sizes are exercised


def test_gradients_and_lora_combination() -> None:
    _, block = _pair(3)
    peftkit.adapt(block, peftkit.config("lora", target_modules=["qkv", "fc1", "fc2"], r=2))
    for p in block.pyra.parameters():
        p.requires_grad_(True)
    trainable = {n for n, p in block.named_parameters() if p.requires_grad}
    assert {"pyra.w_a", "pyra.w_b", "pyra.norm.weight", "pyra.norm.bias"} <= trainable
    assert not any("base_layer" in n or n.startswith(("norm1", "norm2", "proj")) for n in trainable)
    ref = copy.deepcopy(block)
    with peftkit.disable(ref):
        y_base = ref(_x())[0]
    y = block(_x())[0]
    assert_near(y, y_base, 32, layers=3)  # LoRA B = 0 and PYRA W_b = 0: the frozen ToMe block
    y.pow(2).sum().backward()
    assert block.pyra.w_b.grad.abs().sum() > 0
    assert block.pyra.w_a.grad.abs().sum() == 0  # w_t = 0 at init, like LoRA's A behind B = 0


def test_bad_input() -> None:
    with pytest.raises(PeftkitError, match="r=2"):
        PyraReactivation(D, 2)(torch.zeros(1, 3, D), torch.zeros(1, 3, D))
    with pytest.raises(PeftkitError, match="n_heads"):
        ToMeBlock(10, 3, 1)
    with pytest.raises(PeftkitError, match="metric"):
        bipartite_soft_matching(torch.zeros(4, D), 1)
