"""The group-wise RTN quantiser (peftkit.quant.rtn): codes and dequantised values equal a per-group loop written
here, every element lies within half a step of its weight, each group's minimum is reproduced exactly and its
maximum gets the top code, constant groups round-trip, quantising a dequantised weight gives the same codes, the
short last group and the one-group-per-row case, and clear errors for bad bit widths / group sizes / shapes."""

from __future__ import annotations

import math

import pytest
import torch

from peftkit.core.errors import PeftkitError
from peftkit.quant import rtn
from tolerance import assert_near


def _w(d_out: int = 6, d_in: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))


def _reference(w: torch.Tensor, bits: int, gs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, step, offset, dequantised) by an explicit loop over rows and groups."""
    d_out, d_in = w.shape
    qmax = 2**bits - 1
    n_groups = math.ceil(d_in / gs)
    codes = torch.zeros(d_out, d_in, dtype=torch.uint8)
    deq = torch.zeros(d_out, d_in)
    step = torch.zeros(d_out, n_groups)
    offset = torch.zeros(d_out, n_groups)
    for i in range(d_out):
        for k in range(n_groups):
            cols = slice(k * gs, min((k + 1) * gs, d_in))
            grp = w[i, cols]
            lo, hi = grp.min(), grp.max()
            d = max(float((hi - lo) / qmax), 1e-8)
            step[i, k], offset[i, k] = d, lo
            q = torch.clamp((grp - lo) / step[i, k], 0, qmax).round()
            codes[i, cols] = q.to(torch.uint8)
            deq[i, cols] = q * step[i, k] + lo
    return codes, step, offset, deq


@pytest.mark.parametrize("bits,gs", [(4, 8), (3, 20), (2, 7), (8, 64), (1, 5)])
def test_matches_per_group_loop(bits: int, gs: int) -> None:
    w = _w()
    q = rtn.rtn(w, bits, gs)
    codes, step, offset, deq = _reference(w, bits, min(gs, w.shape[1]))
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert q.step.shape == (6, math.ceil(20 / min(gs, 20))) == q.offset.shape
    assert torch.equal(q.codes, codes)
    torch.testing.assert_close(q.step, step, rtol=1e-6, atol=0.0)
    assert torch.equal(q.offset, offset)
    assert_near(q.dequantize(), deq, 1, layers=2)  # code · step + offset, elementwise
    assert int(q.codes.max()) <= 2**bits - 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_is_at_most_half_a_step_and_group_extremes(bits: int) -> None:
    w = _w(8, 24, seed=1)
    gs = 8
    q = rtn.rtn(w, bits, gs)
    deq = q.dequantize()
    half = q.step.repeat_interleave(gs, dim=1) / 2
    assert ((w - deq).abs() <= half * (1 + 1e-5)).all()
    wg, cg, dg = w.view(8, 3, gs), q.codes.view(8, 3, gs), deq.view(8, 3, gs)
    lo, hi = wg.argmin(-1, keepdim=True), wg.argmax(-1, keepdim=True)
    assert (cg.gather(-1, lo) == 0).all() and (cg.gather(-1, hi) == 2**bits - 1).all()
    assert torch.equal(dg.gather(-1, lo), wg.gather(-1, lo))  # the group minimum comes back exactly


def test_short_last_group_and_one_group_per_row() -> None:
    w = _w(3, 10, seed=2)
    q = rtn.rtn(w, 4, 4)  # groups of 4, 4, 2
    assert q.step.shape == (3, 3)
    assert torch.equal(q.offset[:, 2], w[:, 8:].amin(1))
    torch.testing.assert_close(q.step[:, 2], (w[:, 8:].amax(1) - w[:, 8:].amin(1)) / 15)
    whole = rtn.rtn(w, 4, 1000)  # group_size >= d_in: one group per row
    assert whole.step.shape == (3, 1) and torch.equal(whole.offset[:, 0], w.amin(1))
    assert rtn.num_groups(10, 1000) == 1 and rtn.num_groups(10, 4) == 3
    assert torch.equal(rtn.group_sum(torch.ones(3, 10), 4), torch.tensor([[4.0, 4.0, 2.0]] * 3))


def test_constant_group_and_requantisation_round_trip() -> None:
    w = _w(4, 16, seed=3)
    w[1, :8] = 0.25  # a constant group
    q = rtn.rtn(w, 4, 8)
    deq = q.dequantize()
    assert torch.equal(deq[1, :8], w[1, :8]) and (q.codes[1, :8] == 0).all()
    # quantising the dequantised weight with the same grid gives the same codes
    assert torch.equal(rtn.quantize(deq, q.step, q.offset, 4, 8), q.codes)
    assert q.dequantize(torch.float64).dtype == torch.float64
    assert set(q.state_dict()) == {"codes", "step", "offset"} and q.shape == (4, 16)


@pytest.mark.parametrize("kw,msg", [
    ({"bits": 0}, "bits must be an integer in 1..8"),
    ({"bits": 9}, "bits must be an integer in 1..8"),
    ({"group_size": 0}, "group_size must be a positive integer"),
])
def test_bad_arguments(kw: dict, msg: str) -> None:
    with pytest.raises(PeftkitError, match=msg) as e:
        rtn.rtn(_w(), **{"bits": 4, "group_size": 8, **kw})
    assert "rtn" in str(e.value)


def test_bad_weight() -> None:
    with pytest.raises(PeftkitError, match="rtn: expected a 2-D floating-point weight"):
        rtn.rtn(torch.randn(16), 4, 8)
    with pytest.raises(PeftkitError, match="2-D floating-point"):
        rtn.rtn(torch.ones(2, 4, dtype=torch.long), 4, 8)
