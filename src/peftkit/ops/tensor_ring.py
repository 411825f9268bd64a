"""Tensor-ring / tensor-train matrices kept as their cores: ``x·Mᵀ`` contracted one core at a time (M never built),
the dense M for checks, the chained products of vector cores, and the balanced factorisation of a size into a
given number of factors. Used by TLoRA (:mod:`peftkit.methods.tlora`); tested against explicit ``einsum``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def balanced_factors(n: int, num: int) -> list[int]:
    """``n`` as ``num`` ascending factors with the fewest Σ f² (the smallest cores)."""
    best: tuple[int, list[int]] | None = None

    def walk(rest: int, k: int, lo: int, acc: list[int]) -> None:
        nonlocal best
        if k == 1:
            cand = acc + [rest]
            key = sum(f * f for f in cand)
            if rest >= lo and (best is None or key < best[0]):
                best = (key, cand)
            return
        f = lo
        while f**k <= rest:
            if rest % f == 0:
                walk(rest // f, k - 1, f, acc + [f])
            f += 1

    walk(n, num, 1, [])
    if best is None:
        raise ValueError(f"{n} cannot be written as a product of {num} factors")
    return best[1]


def ring_apply(x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x·Mᵀ`` for the tensor-ring matrix ``M[ō, ī] = tr(G¹[o₁,i₁]⋯Gᴰ[o_D,i_D])`` (big-endian multi-indices),
    contracting the reshaped ``x`` with one core at a time (M is never built). Cores are (O_d, I_d, R, R), or
    (O_d, I_d) Kronecker factors (R = 1: M = G¹ ⊗ ⋯ ⊗ Gᴰ)."""
    lead = x.shape[:-1]
    h = x.reshape(-1, *[c.shape[1] for c in cores])  # (N, I₁, …, I_D)
    ring = cores[0].dim() == 4
    for d, c in enumerate(cores):  # h: (N, O₁..O_d, I_{d+1}..I_D[, ρ₀, ρ_d])
        c = c.to(h.dtype)  # under autocast the first contraction already gives the autocast dtype
        if not ring:
            h = torch.tensordot(h, c, dims=([1 + d], [1])).movedim(-1, 1 + d)
        elif d == 0:
            h = torch.tensordot(h, c, dims=([1], [1])).movedim(-3, 1)
        else:
            h = torch.tensordot(h, c, dims=([1 + d, h.dim() - 1], [1, 2])).movedim(-2, 1 + d)
    if ring:
        h = h.diagonal(dim1=-2, dim2=-1).sum(-1)
    return h.reshape(*lead, -1)


def ring_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense (∏O_d, ∏I_d) matrix of :func:`ring_apply`'s cores."""
    n_in = math.prod(c.shape[1] for c in cores)
    eye = torch.eye(n_in, dtype=cores[0].dtype, device=cores[0].device)
    return ring_apply(eye, cores).t()


def ring_chain(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """(∏K_d, R, R): the products G¹[k₁]⋯Gᴰ[k_D] of (K_d, R, R) vector cores (big-endian)."""
    out = cores[0]
    for c in cores[1:]:
        out = torch.einsum("kab,lbc->klac", out, c).reshape(-1, c.shape[1], c.shape[2])
    return out


def ring_lowrank(
    out_cores: Sequence[torch.Tensor], in_cores: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor-ring matrix Δ[ō, ī] = tr(B¹[o₁]⋯Bᴰ[o_D]·C¹[i₁]⋯Cᴰ[i_D]) of (J_d, R, R) ``out_cores`` Bᵈ and
    (I_d, R, R) ``in_cores`` Cᵈ as a rank-R² product Δ = B·A: returns (A ∈ R^{R²×∏I_d}, B ∈ R^{∏J_d×R²}), with
    Δ[o, i] = Σ_{ρσ} B̄[o]_{ρσ}·C̄[i]_{σρ} for the chained products B̄, C̄ of :func:`ring_chain`."""
    b_full, c_full = ring_chain(out_cores), ring_chain(in_cores)
    rr = b_full.shape[1] * b_full.shape[2]
    return c_full.transpose(1, 2).reshape(-1, rr).t(), b_full.reshape(-1, rr)


def identity_cores(sizes: Sequence[int], rank: int, like: torch.Tensor) -> list[torch.Tensor]:
    """Cores whose tensor-ring matrix is the identity: (I_d, I_d) identities for ``rank`` 1 (Kronecker factors), else
    (I_d, I_d, R, R) with Aᵈ[:, :, ρ, ρ'] = I/R (tr of the R×R all-(1/R) products is 1 on the diagonal, 0 off it).
    In ``like``'s dtype and device."""
    out = []
    for n in sizes:
        eye = torch.eye(n, dtype=like.dtype, device=like.device)
        out.append(eye if rank == 1 else (eye[:, :, None, None] / rank).expand(n, n, rank, rank).clone())
    return out


def identity_distance(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_d Σ_{ρ,ρ'} ‖Aᵈ[:, :, ρ, ρ'] − I/R‖_F: how far each core slice is from :func:`identity_cores`' (R = 1 for
    (I_d, I_d) cores)."""
    total = cores[0].new_zeros(())
    for core in cores:
        eye = torch.eye(core.shape[0], dtype=core.dtype, device=core.device)
        if core.dim() == 4:
            eye = (eye / core.shape[2])[:, :, None, None]
        total = total + torch.linalg.vector_norm(core - eye, dim=(0, 1)).sum()
    return total
