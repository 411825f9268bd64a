"""peftkit.ops.hadamard against a dense reference: scipy's Sylvester Hadamard matrix for powers of two, the
definition H = (H_{2^k} ⊗ H_m)/√d with H·Hᵀ = d·I for the Paley orders."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.linalg import hadamard

from peftkit.ops.hadamard import hadamard_factor, hadamard_matrix, paley_hadamard, wht
from tolerance import assert_near


@pytest.mark.parametrize("d", [1, 2, 8, 64, 256])
def test_power_of_two_matches_scipy(d: int) -> None:
    ref = torch.from_numpy(hadamard(d)).double() / math.sqrt(d)
    x = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    assert torch.equal(hadamard_matrix(d), ref)
    assert_near(wht(x), x @ ref, d)
    assert_near(wht(x, transpose=True), x @ ref.t(), d)


@pytest.mark.parametrize("m", [4, 12, 20, 28, 36, 44])
def test_paley_orders_are_hadamard(m: int) -> None:
    h = paley_hadamard(m)
    assert h.shape == (m, m) and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("d", [12, 24, 40, 96, 384])
def test_fast_transform_matches_the_dense_matrix(d: int) -> None:
    n, m = hadamard_factor(d)
    assert n * m == d and m > 1 and n & (n - 1) == 0
    hm = paley_hadamard(m) / math.sqrt(m)
    dense = hadamard_matrix(d)
    assert_near(dense @ dense.t(), torch.eye(d, dtype=torch.float64), d)  # orthonormal
    x = torch.randn(3, 2, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    assert_near(wht(x, hm), x @ dense, d)
    assert_near(wht(x, hm, transpose=True), x @ dense.t(), d)


def test_sizes_without_a_hadamard_matrix_are_refused() -> None:
    with pytest.raises(ValueError, match="not 2"):
        hadamard_factor(2 * 1021)  # 1021 is prime and > 256: no small Paley factor
    with pytest.raises(ValueError):
        paley_hadamard(6)
