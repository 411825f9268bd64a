"""peftkit.ops.tensor_ring against explicit einsum contractions of the same cores."""

from __future__ import annotations

import math

import pytest
import torch

from peftkit.ops.tensor_ring import (
    balanced_factors,
    identity_cores,
    identity_distance,
    ring_apply,
    ring_chain,
    ring_lowrank,
    ring_matrix,
)
from tolerance import assert_near


def _cores(outs: list[int], ins: list[int], r: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (lambda o, i: (o, i, r, r)) if r > 1 else (lambda o, i: (o, i))
    return [torch.randn(*shape(o, i), generator=g, dtype=torch.float64) for o, i in zip(outs, ins)]


def test_ring_matrix_is_the_trace_of_the_core_products() -> None:
    outs, ins, r = [2, 3, 2], [3, 2, 4], 3
    c = _cores(outs, ins, r, 0)
    ref = torch.einsum("aixy,bjyz,ckzx->abcijk", *c).reshape(math.prod(outs), math.prod(ins))
    assert_near(ring_matrix(c), ref, r ** 3)


def test_kronecker_cores_give_the_kronecker_product() -> None:
    c = _cores([2, 3, 4], [3, 2, 2], 1, 1)
    assert_near(ring_matrix(c), torch.kron(torch.kron(c[0], c[1]), c[2]), 1)


@pytest.mark.parametrize("r", [1, 2, 4])
def test_ring_apply_equals_the_dense_product(r: int) -> None:
    outs, ins = [4, 2, 3], [2, 3, 2]
    c = _cores(outs, ins, r, r)
    x = torch.randn(5, 2, math.prod(ins), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    dense = torch.einsum("aixy,bjyz,ckzx->abcijk", *c) if r > 1 else torch.einsum("ai,bj,ck->abcijk", *c)
    dense = dense.reshape(math.prod(outs), math.prod(ins))
    assert_near(ring_apply(x, c), x @ dense.t(), math.prod(ins) * r ** 3)


def test_ring_chain_is_the_big_endian_product_of_vector_cores() -> None:
    g = torch.Generator().manual_seed(2)
    c = [torch.randn(k, 3, 3, generator=g, dtype=torch.float64) for k in (2, 3, 2)]
    ref = torch.einsum("kab,lbc,mcd->klmad", *c).reshape(12, 3, 3)
    assert_near(ring_chain(c), ref, 9)


@pytest.mark.parametrize(("n", "num"), [(768, 3), (64, 2), (12, 3), (97, 2), (1, 2)])
def test_balanced_factors_minimise_the_sum_of_squares(n: int, num: int) -> None:
    f = balanced_factors(n, num)
    assert len(f) == num and math.prod(f) == n and f == sorted(f)

    def all_splits(rest: int, k: int) -> list[list[int]]:
        if k == 1:
            return [[rest]]
        return [[d, *t] for d in range(1, rest + 1) if rest % d == 0 for t in all_splits(rest // d, k - 1)]

    assert sum(x * x for x in f) == min(sum(x * x for x in s) for s in all_splits(n, num))


def test_ring_lowrank_factors_give_the_trace_of_the_vector_core_products() -> None:
    g = torch.Generator().manual_seed(7)
    r, outs, ins = 2, [2, 3], [3, 2]
    b = [torch.randn(j, r, r, generator=g, dtype=torch.float64) for j in outs]
    c = [torch.randn(i, r, r, generator=g, dtype=torch.float64) for i in ins]
    ref = torch.einsum("axy,byz,czw,dwx->abcd", b[0], b[1], c[0], c[1]).reshape(math.prod(outs), math.prod(ins))
    a_mat, b_mat = ring_lowrank(b, c)
    assert a_mat.shape == (r * r, math.prod(ins)) and b_mat.shape == (math.prod(outs), r * r)
    assert_near(b_mat @ a_mat, ref, r ** 4)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_identity_cores_give_the_identity_and_zero_distance(rank: int) -> None:
    like = torch.empty(0, dtype=torch.float64)
    cores = identity_cores([2, 3, 4], rank, like)
    assert_near(ring_matrix(cores), torch.eye(24, dtype=torch.float64), rank ** 3)
    assert float(identity_distance(cores)) == 0.0
    shift = 0.5 * torch.eye(2, dtype=torch.float64).reshape(2, 2, *([1, 1] if rank > 1 else []))
    moved = [cores[0] + shift] + cores[1:]
    # every one of the rank² slices of the first core moved by 0.5·I: ‖0.5·I₂‖_F = 0.5·√2 each
    assert float(identity_distance(moved)) == pytest.approx(rank * rank * 0.5 * math.sqrt(2), rel=1e-12)
