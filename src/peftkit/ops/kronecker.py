"""Sums of Kronecker products, the parameterised hypercomplex multiplication (PHM) of Zhang et al. 2021 ("Beyond
Fully-Connected Layers with Quaternions", arXiv 2102.08597) that Compacter (Mahabadi et al. 2021) builds its adapter
projections from:

    H = Σ_{i=1..n} A_i ⊗ B_i,   A ∈ R^{n×n×n} (the "rule"), B ∈ R^{n×a×b}  ⇒  H ∈ R^{(n·a)×(n·b)}

with ``(A_i ⊗ B_i)[p·a + s, q·b + t] = A_i[p, q]·B_i[s, t]`` (``torch.kron``'s layout). Computed as one einsum and
reshape (no Python loop over i, no n separate (n·a)×(n·b) products). ``low_rank(left, right)`` gives the factorised
B_i = L_i·R_i of Compacter's low-rank weights.
"""

from __future__ import annotations

import torch


def kron_sum(rule: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``Σ_i rule[i] ⊗ blocks[i]`` for ``rule`` (n, p, q) and ``blocks`` (n, a, b): a (p·a, q·b) matrix."""
    if rule.dim() != 3 or blocks.dim() != 3 or rule.shape[0] != blocks.shape[0]:
        raise ValueError(f"kron_sum needs rule (n, p, q) and blocks (n, a, b) with the same n; got "
                         f"{tuple(rule.shape)} and {tuple(blocks.shape)}")
    n, p, q = rule.shape
    _, a, b = blocks.shape
    return torch.einsum("ipq,iab->paqb", rule, blocks).reshape(p * a, q * b)


def low_rank(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The blocks ``left[i] @ right[i]`` for ``left`` (n, a, r) and ``right`` (n, r, b): (n, a, b)."""
    return torch.bmm(left, right)
