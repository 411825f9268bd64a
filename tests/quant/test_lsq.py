"""LSQ fake quantisation (peftkit.quant.lsq): the forward is the RTN grid of the given step/offset, exported codes
dequantise to the fake-quantised weight bit for bit, the custom backward equals autograd of a straight-through
reference (round with an identity gradient, LSQ's gradient scale g on Δ and β) to 1e-6 and the hand formulas, and
outside the clip range — where the function is smooth — it is g times the finite-difference derivative."""

from __future__ import annotations

import math

import pytest
import torch

from peftkit.core.errors import PeftkitError
from peftkit.quant import lsq, rtn
from tolerance import assert_near


def _setup(d_out: int = 5, d_in: int = 22, gs: int = 8, bits: int = 3, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    step, offset = rtn.minmax_params(w, bits, gs)
    # move the grid so that some weights fall outside the clip range on both sides
    step = (step * 0.8).to(dtype)
    offset = (offset + 0.3 * torch.randn(offset.shape, generator=g)).to(dtype)
    return w, step, offset


def _reference(w, step, offset, bits: int, gs: int, g: float) -> torch.Tensor:
    """Autograd reference: straight-through round, LSQ gradient scaling of Δ and β by g."""
    qp = 2**bits - 1
    st = step * g + (step - step * g).detach()  # value = step, gradient scaled by g
    of = offset * g + (offset - offset * g).detach()
    n_groups = st.shape[1]
    st_e = st.repeat_interleave(gs, dim=1)[:, : w.shape[1]]
    of_e = of.repeat_interleave(gs, dim=1)[:, : w.shape[1]]
    assert st.shape[1] == n_groups
    v = ((w - of_e) / st_e).clamp(0, qp)
    v = v + (v.round() - v).detach()
    return v * st_e + of_e


def test_forward_is_the_rtn_grid_and_export_is_bit_exact() -> None:
    w, step, offset = _setup(dtype=torch.float32)
    wq = lsq.fake_quantize(w, step, offset, 3, 8)
    codes = rtn.quantize(w, step, offset, 3, 8)
    assert torch.equal(wq, rtn.dequantize(codes, step, offset, 8))
    exp = lsq.export(w, step, offset, 3, 8)
    assert torch.equal(exp.codes, codes) and exp.codes.dtype == torch.uint8
    assert torch.equal(exp.dequantize(), wq)  # bit for bit
    # every value lies on its group's grid β + k·Δ, k = 0..Qp
    k = (wq - offset.repeat_interleave(8, 1)[:, :22]) / step.repeat_interleave(8, 1)[:, :22]
    assert (k - k.round()).abs().max() < 1e-4 and k.round().min() >= 0 and k.round().max() <= 7


@pytest.mark.parametrize("gs,d_in", [(8, 22), (4, 16), (64, 10)])
def test_backward_matches_straight_through_autograd(gs: int, d_in: int) -> None:
    bits = 3
    w, step, offset = _setup(d_in=d_in, gs=gs, bits=bits)
    g = lsq.grad_scale(d_in, gs, bits)
    assert g == 1.0 / math.sqrt(min(gs, d_in) * (2**bits - 1))
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(4), dtype=w.dtype)
    leaves = [t.clone().requires_grad_(True) for t in (w, step, offset)]
    (lsq.fake_quantize(*leaves, bits, gs) * upstream).sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (w, step, offset)]
    (_reference(*ref, bits, min(gs, d_in), g) * upstream).sum().backward()
    for mine, theirs in zip(leaves, ref, strict=True):
        assert_near(mine.grad, theirs.grad, 32, layers=3)
        assert mine.grad.abs().sum() > 0


def test_backward_hand_formulas() -> None:
    bits, gs = 2, 4
    w = torch.tensor([[0.0, 0.5, 1.0, 3.0, -1.0, 7.0, 0.2, 0.9]], dtype=torch.float64)
    step = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    offset = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    grad = torch.arange(1.0, 9.0, dtype=torch.float64)[None, :]
    gw, gstep, goff = lsq.backward(w, step, offset, grad, bits, gs, g=0.5)
    # group 0: V = [0, .5, 1, 3] all inside [0, 3] (boundaries included); group 1: V = [-.5, 3.5, .1, .45]
    inside = torch.tensor([[1, 1, 1, 1, 0, 0, 1, 1]], dtype=torch.float64)
    torch.testing.assert_close(gw, grad * inside)
    v = torch.tensor([0.0, 0.5, 1.0, 3.0, -0.5, 3.5, 0.1, 0.45], dtype=torch.float64)
    term = torch.where(inside[0].bool(), v.round() - v, v.clamp(0, 3))
    expect_step = 0.5 * torch.stack([(term * grad[0])[:4].sum(), (term * grad[0])[4:].sum()])
    torch.testing.assert_close(gstep[0], expect_step)
    torch.testing.assert_close(goff[0], 0.5 * torch.tensor([0.0, 5.0 + 6.0], dtype=torch.float64))


def test_outside_the_range_it_is_g_times_finite_differences() -> None:
    bits, gs, g = 3, 4, 0.25
    w = torch.tensor([[-3.0, -2.5, 9.0, 10.0]], dtype=torch.float64)  # V < 0 or V > Qp: clamped, smooth in Δ, β
    step = torch.tensor([[1.0]], dtype=torch.float64)
    offset = torch.tensor([[-1.0]], dtype=torch.float64)
    up = torch.tensor([[0.3, -1.2, 0.7, 2.0]], dtype=torch.float64)

    def loss(st: torch.Tensor, of: torch.Tensor) -> float:
        return float((lsq.forward(w, st, of, bits, gs) * up).sum())

    _, gstep, goff = lsq.backward(w, step, offset, up, bits, gs, g)
    eps = 1e-6
    fd_step = (loss(step + eps, offset) - loss(step - eps, offset)) / (2 * eps)
    fd_off = (loss(step, offset + eps) - loss(step, offset - eps)) / (2 * eps)
    assert abs(float(gstep) - g * fd_step) < 1e-8 and abs(float(goff) - g * fd_off) < 1e-8


def test_bad_arguments() -> None:
    w, step, offset = _setup()
    with pytest.raises(PeftkitError, match="lsq: bits must be an integer in 1..8"):
        lsq.fake_quantize(w, step, offset, 12, 8)
    with pytest.raises(PeftkitError, match="lsq: group_size must be a positive integer"):
        lsq.fake_quantize(w, step, offset, 4, 0)
