"""The Walsh–Hadamard transform for any size 2^k·m (m a Paley order): the orthonormal H = (H_{2^k} ⊗ H_m)/√d, applied
fast (:func:`wht`: log₂ n butterflies plus one m×m product) or built densely (:func:`hadamard_matrix`, for checks).
Used by QWHA (:mod:`peftkit.methods.qwha`); tested against ``scipy.linalg.hadamard``."""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) for the quadratic character χ mod the prime q (float64, q×q)."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[(torch.arange(1, q) ** 2) % q] = 1.0
    chi[0] = 0.0
    ar = torch.arange(q)
    return chi[(ar[None, :] - ar[:, None]) % q]


MAX_M = 256  # largest non-power-of-two Hadamard factor (an m×m buffer per layer, m multiply-adds per entry)


@lru_cache(maxsize=32)
def paley_hadamard(m: int) -> torch.Tensor:
    """An m×m ±1 Hadamard matrix (H·Hᵀ = m·I, float64): Paley II (symmetric) for m = 2(q+1), q ≡ 1 mod 4 prime,
    else Paley I for m = q+1, q ≡ 3 mod 4 prime. Raises ValueError when m is neither."""
    q2, q1 = m // 2 - 1, m - 1
    if m % 4 == 0 and _is_prime(q2) and q2 % 4 == 1:
        jac = _jacobsthal(q2)
        c = torch.zeros(q2 + 1, q2 + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, jac  # symmetric conference matrix, C·Cᵀ = q·I
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q2 + 1, dtype=torch.float64), b)
    if m % 4 == 0 and _is_prime(q1) and q1 % 4 == 3:
        jac = _jacobsthal(q1)
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac  # skew: S = −Sᵀ, S·Sᵀ = q·I
        return torch.eye(m, dtype=torch.float64) + s
    raise ValueError(f"no Paley Hadamard matrix of order {m}")


def hadamard_factor(d: int) -> tuple[int, int]:
    """``(n, m)`` with d = n·m, n a power of two and m = 1 or a Paley order, m as small as possible."""
    if d < 1:
        raise ValueError(f"size must be positive, got {d}")
    n = d & -d  # the largest power of two dividing d
    while n >= 1 and d // n <= MAX_M:
        m = d // n
        if m == 1:
            return n, 1
        try:
            paley_hadamard(m)
            return n, m
        except ValueError:
            n //= 2
    raise ValueError(
        f"size {d} is not 2^k·m with m <= {MAX_M} a Paley Hadamard order (q+1 for a prime q ≡ 3 mod 4, or 2(q+1) "
        "for a prime q ≡ 1 mod 4)"
    )


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense normalised H = (H_{2^k} ⊗ H_m)/√d by its definition (Sylvester recursion; for tests and checks)."""
    n, m = hadamard_factor(d)
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    if m > 1:
        h = torch.kron(h, paley_hadamard(m))
    return (h / math.sqrt(d)).to(dtype)


def wht(x: torch.Tensor, hm: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
    """``x·H`` (``transpose``: ``x·Hᵀ``) along the last dim, with H = (H_{2^k} ⊗ H_m)/√d, ``hm`` = H_m/√m (None
    when d is a power of two). Fast: log₂(n) butterflies on the power-of-two factor plus one (…, n, m)·(m, m)."""
    d = x.shape[-1]
    m = 1 if hm is None else hm.shape[0]
    n = d // m
    lead = x.shape[:-1]
    if hm is not None:  # x·(A⊗B) is Aᵀ·X·B for X = x viewed (n, m): the m-side first
        x = x.reshape(*lead, n, m).matmul(hm.t() if transpose else hm).reshape(*lead, d)
    h = 1
    while h < n:  # Sylvester butterflies: stage h pairs rows i and i + h (of the (n, m) view) in blocks of 2h
        x = x.reshape(*lead, n // (2 * h), 2, h * m)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    x = x.reshape(*lead, d)
    return x * (1.0 / math.sqrt(n)) if n > 1 else x
