"""Tolerances for comparing two *different* computations of the same floating-point result.

Two implementations of one formula (peftkit vs Hugging Face PEFT, a fused kernel vs the generic autograd path, one
process vs two, a merged weight vs base + delta, another summation order) agree only up to rounding, and how far
depends on the CPU: MKL and ATen pick their kernels (and so their reduction orders) per instruction set, so what is
bit-equal on one machine differs in the last bits on another (``MKL_CBWR=AVX2|COMPATIBLE`` and
``ATEN_CPU_CAPABILITY=default|avx2`` reproduce that here; ``scripts/portability`` runs the suite under each).

A sum of ``k`` rounded products has an error that grows like ``eps · sqrt(k)`` relative to the size of the terms
(random-walk rounding; the worst case is ``eps · k``), so the allowed difference is

    tol = safety · eps(dtype) · sqrt(k) · layers · scale

with ``scale`` the size of the compared values (by default the largest ``|expected|``) and ``layers`` the number of
chained reductions between the input and the compared value. ``safety`` (8) covers the constants the estimate
leaves out; it is far below any real bug's error (a wrong scale, a missing term) on the tiny test models.

Use :func:`assert_near` only between different implementations. Where the same code runs on the same inputs in the
same process (save → load → same forward, resume in one process, a deterministic op twice) keep ``torch.equal``: the
result is bit-identical on every CPU.
"""

from __future__ import annotations

import math

import torch

SAFETY = 8.0


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (float32: 1.19e-7, bfloat16: 7.8e-3, float16: 9.8e-4)."""
    return torch.finfo(dtype).eps


def tol(dtype: torch.dtype, reduction_size: int = 1, scale: float = 1.0, *, layers: int = 1,
        safety: float = SAFETY) -> float:
    """The allowed absolute difference: ``safety · eps(dtype) · sqrt(reduction_size) · layers · scale``."""
    return safety * eps(dtype) * math.sqrt(max(int(reduction_size), 1)) * max(int(layers), 1) * float(scale)


def _lowest(*dtypes: torch.dtype) -> torch.dtype:
    return max((d for d in dtypes if d.is_floating_point), key=eps, default=torch.float32)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, reduction_size: int = 1, *,
                scale: float | None = None, layers: int = 1, safety: float = SAFETY,
                dtype: torch.dtype | None = None, equal_nan: bool = False, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` within :func:`tol` — shapes and dtypes as ``torch.testing.assert_close``.

    ``dtype`` defaults to the less precise of the two tensors' dtypes; ``scale`` to ``max |expected|`` (pass the size
    of the intermediate terms where the compared values are small by cancellation, e.g. a difference of outputs);
    non-finite entries do not count towards the scale (they must match exactly, as in ``assert_close``).
    """
    dtype = dtype or _lowest(actual.dtype, expected.dtype)
    if scale is None:
        finite = expected.detach().abs()[torch.isfinite(expected.detach())]
        scale = float(finite.max()) if finite.numel() else 0.0
        scale = max(scale, torch.finfo(dtype).tiny)
    atol = tol(dtype, reduction_size, scale, layers=layers, safety=safety)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, equal_nan=equal_nan,
                               msg=(lambda m: f"{m}\n(tolerance: {atol:.3g} = {safety:g} · eps({dtype}) · "
                                              f"√{reduction_size} · {layers} layer(s) · scale {scale:.3g})"
                                              + (f"\n{msg}" if msg else "")))


def assert_argmax_near(logits: torch.Tensor, tokens: torch.Tensor, reduction_size: int = 1, *, layers: int = 1,
                       safety: float = SAFETY) -> None:
    """Greedy tokens from one computation (``tokens``) against the logits of another (e.g. cached decoding vs one full
    forward): at every position the token is the argmax of ``logits``, or within :func:`tol` of it (a near-tie that
    rounding may decide either way)."""
    assert logits.shape[:-1] == tokens.shape, (logits.shape, tokens.shape)
    top = logits.max(-1).values
    picked = logits.gather(-1, tokens[..., None].long()).squeeze(-1)
    atol = tol(_lowest(logits.dtype), reduction_size, float(logits.detach().abs().max()), layers=layers, safety=safety)
    gap = top - picked
    bad = gap > atol
    assert not bool(bad.any()), (f"{int(bad.sum())} token(s) are not the argmax within {atol:.3g}: "
                                 f"largest gap {float(gap.max()):.3g} at {tuple(bad.nonzero()[0].tolist())}")
