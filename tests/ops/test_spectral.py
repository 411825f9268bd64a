"""ops.spectral's DCT maths against references: scipy.fft's orthonormal DCT-II, and dense products of the matrices."""

from __future__ import annotations

import pytest
import scipy.fft
import torch

from peftkit.ops.spectral import dct2_entries, dct_matrix, sparse_idct2


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 37])
def test_dct_matrix_is_scipys_orthonormal_dct2(n: int) -> None:
    c = dct_matrix(n)
    x = torch.randn(4, n, generator=_g(n), dtype=torch.float64)
    ref = torch.from_numpy(scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1))
    torch.testing.assert_close(x @ c.t(), ref, rtol=0.0, atol=1e-12)
    inv = torch.from_numpy(scipy.fft.idct(x.numpy(), type=2, norm="ortho", axis=-1))
    torch.testing.assert_close(x @ c, inv, rtol=0.0, atol=1e-12)  # Cᵀ is the inverse
    assert dct_matrix(n, torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n_coef", [3, 40])  # below d_out + d_in: gathered rows; above: the dense product
def test_sparse_idct2_is_scipys_2d_inverse_dct_with_duplicates_summed(n_coef: int) -> None:
    d_out, d_in = 6, 9
    g = _g(n_coef)
    vals = torch.randn(n_coef, generator=g, dtype=torch.float64)
    rows = torch.randint(0, d_out, (n_coef,), generator=g)
    cols = torch.randint(0, d_in, (n_coef,), generator=g)
    rows[1], cols[1] = rows[0], cols[0]  # one duplicate location: its values add up
    s = torch.zeros(d_out, d_in, dtype=torch.float64)
    for v, r, c in zip(vals, rows, cols):
        s[r, c] += v
    ref = torch.from_numpy(scipy.fft.idctn(s.numpy(), type=2, norm="ortho"))
    out = sparse_idct2(vals, rows, cols, dct_matrix(d_out), dct_matrix(d_in))
    torch.testing.assert_close(out, ref, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("m", [4, 30])  # few entries gathered; many from the dense 2-D DCT
def test_dct2_entries_are_entries_of_scipys_2d_dct(m: int) -> None:
    d_out, d_in = 7, 5
    g = _g(100 + m)
    grad = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    rows = torch.randint(0, d_out, (m,), generator=g)
    cols = torch.randint(0, d_in, (m,), generator=g)
    full = torch.from_numpy(scipy.fft.dctn(grad.numpy(), type=2, norm="ortho"))
    out = dct2_entries(grad, dct_matrix(d_out), dct_matrix(d_in), rows, cols)
    torch.testing.assert_close(out, full[rows, cols], rtol=0.0, atol=1e-12)
