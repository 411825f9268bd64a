"""Spectral parametrisations of a weight update: a few coefficients at chosen frequencies of a d_out×d_in spectrum.

FourierFT (``methods/fourierft.py``) draws its frequencies at random from a seed and maps them to the weight domain
with the 2-D inverse DFT; LoCA (``methods/loca.py``) learns its locations and uses the orthonormal 2-D inverse DCT
(:func:`dct_matrix`, :func:`sparse_idct2`, :func:`dct2_entries`). The index convention is shared: a location is a
flat index ``k`` into the row-major d_out×d_in grid, i.e. (row, col) = (k // d_in, k % d_in).
"""

from __future__ import annotations

import math

import torch


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix C_n (n×n): C[k, j] = √(2/n)·cos(π(2j+1)k/(2n)), row 0 divided by √2.
    ``C·x`` is the DCT of x (``scipy.fft.dct(x, norm="ortho")``), ``Cᵀ·y`` its inverse; computed in float64, then
    cast."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype=dtype, device=device)


def sparse_idct2(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, c_out: torch.Tensor,
                 c_in: torch.Tensor) -> torch.Tensor:
    """C_outᵀ·S·C_in, the 2-D inverse DCT of the sparse spectrum S with ``values`` (n,) at (``rows``, ``cols``)
    (duplicate locations add up), in the matrices' dtype. Built as Σ_k v_k·C_out[row_k]ᵀ ⊗ C_in[col_k] from gathered
    rows when n < d_out + d_in, else densely — whichever costs fewer multiply-adds (n·d_out·d_in against
    d_out·d_in·(d_out + d_in))."""
    d_out, d_in = c_out.shape[0], c_in.shape[0]
    if values.numel() < d_out + d_in:
        return (c_out[rows].t() * values) @ c_in[cols]
    s = values.new_zeros(d_out, d_in).index_put_((rows, cols), values, accumulate=True)
    return c_out.t() @ s @ c_in


def dct2_entries(g: torch.Tensor, c_out: torch.Tensor, c_in: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """K[rows, cols] for K = C_out·G·C_inᵀ (the 2-D DCT of G, i.e. the gradient of :func:`sparse_idct2` with respect
    to S): gathered (m·d_out·d_in multiply-adds for m entries) or from the dense K, whichever is cheaper."""
    d_out, d_in = g.shape
    if rows.numel() < d_out + d_in:
        return ((c_out[rows] @ g) * c_in[cols]).sum(1)
    return (c_out @ g @ c_in.t())[rows, cols]


def random_frequencies(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct (row, col) locations of a d_out×d_in spectrum as a (2, n) int64 tensor, drawn as the first n
    entries of a random permutation of the d_out·d_in flat positions from a CPU generator seeded with ``seed``
    (Hugging Face PEFT's FourierFT draw: the same seed gives the same locations there and here)."""
    if not 0 < n <= d_out * d_in:
        raise ValueError(f"need 0 < n <= d_out·d_in = {d_out * d_in} frequencies, got {n}")
    flat = torch.randperm(d_out * d_in, generator=torch.Generator(device="cpu").manual_seed(seed))[:n]
    return torch.stack([flat // d_in, flat % d_in])


def scatter_spectrum(values: torch.Tensor, locations: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """The dense d_out×d_in float32 spectrum with ``values`` (n,) at ``locations`` (2, n), zero elsewhere
    (differentiable in ``values``)."""
    dense = torch.zeros(d_out, d_in, device=values.device, dtype=torch.float32)
    return dense.index_put((locations[0], locations[1]), values.float())


def sparse_ifft2_real(values: torch.Tensor, locations: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """Re(IDFT2(S)) for the sparse spectrum S of :func:`scatter_spectrum`, in float32:
    ΔW[j, l] = 1/(d_out·d_in) · Σ_k v_k · cos(2π(j·r_k/d_out + l·c_k/d_in)).
    Computed by a dense FFT (O(d_out·d_in·log) — the size of the weight, never of the activations)."""
    return torch.fft.ifft2(scatter_spectrum(values, locations, d_out, d_in)).real
