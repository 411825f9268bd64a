"""Spectral parametrisations of a weight update: a few coefficients at chosen frequencies of a d_out×d_in spectrum.

FourierFT (``methods/fourierft.py``) draws its frequencies at random from a seed and maps them to the weight domain
with the 2-D inverse DFT; LoCA (``methods/loca.py``) learns its locations and uses the orthonormal 2-D inverse DCT
(its ``dct_matrix`` / sparse iDCT could move here next to these). The index convention is shared: a location is a
flat index ``k`` into the row-major d_out×d_in grid, i.e. (row, col) = (k // d_in, k % d_in).
"""

from __future__ import annotations

import torch


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
