"""Keep a layer's input for backward without a copy of it when autograd already holds what makes it.

A low-rank adapter's factor gradient needs its layer input only as ``Gᵀ·x`` (``G`` = the N×r gradient of the
rank-r activation). Saving ``x`` costs N×d_in per adapted layer, and in a transformer that input is almost always
the output of an op whose own backward already keeps everything needed to rebuild it:

* **LayerNorm** (``NativeLayerNormBackward0`` keeps ``u``, μ, ρ = 1/σ, γ, β): with x = ((u − μ)·ρ)⊙γ + β and
  ``G̃ = diag(ρ)·G``,
  ``Gᵀ·x = (G̃ᵀ·u − (G̃ᵀ·μ)·1ᵀ) ⊙ γ + (Gᵀ·1)·βᵀ`` — one GEMM over ``u``, as over ``x`` before, no elementwise pass.
  float32/64 only: a half-precision LayerNorm saves μ and ρ rounded to its dtype, too coarse to rebuild x from. The
  two terms cancel when the rows' mean is large against their spread: the relative error of ``Gᵀ·x`` grows like
  ``ε·|μ|/σ`` (about 1e-5 at |μ|/σ = 40 in float32; every LayerNorm input row of all-MiniLM-L6-v2 has
  |μ|/σ < 0.1, where it matches the direct product's ~3e-7).
* **GELU / SiLU** of a kept input, and **products** whose factors are kept or are themselves rebuildable — a gated
  MLP's ``act(gate) ⊙ up``, GPT-2's ``0.5·z ⊙ (1 + tanh …)``, a Llama RMSNorm's ``γ ⊙ (u ⊙ rsqrt(mean(u²) + ε))``
  (with γ frozen the outer product keeps only γ; the normalised u is rebuilt from the inner product's u and rsqrt):
  x is recomputed in row blocks of about 2 MiB, each folded into ``Gᵀ·x`` at once, so the block never grows to the
  layer's size. Factors are row-wise (x's shape, or rows × 1) or broadcast over the rows ((d,), a scalar).

Under ``torch.autocast`` the input a fused kernel keeps is the half-precision cast of such an output (the
LayerNorm and a Llama RMSNorm run in float32; ``ToCopyBackward0`` keeps nothing): the source is rebuilt as above in
float32, row block by row block, and each block cast to the half dtype with the same conversion as the forward's
cast, into one N×d_in half-precision buffer for the one ``Gᵀ·x`` GEMM the kept copy got before. For the recomputed
kinds that buffer is the forward's bit for bit, so the gradient is too; a LayerNorm rebuilt from (u − μ)·ρ·γ + β
differs from the fused LayerNorm kernel in the last float32 bit, which moves about 2 in 10⁵ elements by one bfloat16
step. The buffer is transient (one layer's input during its backward), where the kept copy was held for all layers
from forward to backward.

Anything else (a plain input, a view, an op not listed, a producer that did not keep its tensors, saved-tensor hooks
in force as under activation checkpointing or offloading, ``torch.compile`` tracing) saves ``x`` itself. The rebuilt
values are the forward's bit for bit (same kernels on the same inputs) for the recomputed kinds; the LayerNorm
identity is exact algebra, equal up to float rounding (see above). No memory is added: the tensors referenced are
the ones the producer's node holds until its own backward, which runs after the consumer's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F

_BLOCK_ELEMENTS = 1 << 19  # rows per recompute block: about 2 MiB of fp32

Packed = tuple[str, Any, tuple[torch.Tensor, ...]]


def _hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _saved(node: Any, *names: str) -> list[torch.Tensor] | None:
    try:
        out = [getattr(node, name) for name in names]
    except RuntimeError:  # not saved by this node (conditional saving), or already freed
        return None
    return out if all(isinstance(t, torch.Tensor) for t in out) else None


def _leaf(t: torch.Tensor, shape: torch.Size, leaves: list[torch.Tensor]) -> tuple[str, int, bool] | None:
    """A saved tensor as a leaf of the rebuild: row-wise (x's shape, or x's rows × 1) or fixed (broadcast over the
    rows: shape (d,) / (1, …, 1, d) / a scalar)."""
    d = shape[-1]
    if t.shape == shape or t.shape == (*shape[:-1], 1):
        rows = True
    elif t.numel() in (1, d) and all(n == 1 for n in t.shape[:-1]):
        rows = False
    else:
        return None
    leaves.append(t)
    return "leaf", len(leaves) - 1, rows


def _plan(node: Any, shape: torch.Size, leaves: list[torch.Tensor], depth: int) -> tuple[Any, ...] | None:
    """How to rebuild the output of ``node`` (shape ``shape``) from tensors autograd already keeps: GELU / SiLU of a
    saved input, or a product whose factors are saved or are themselves rebuilt (a Llama RMSNorm's
    ``γ ⊙ (u ⊙ rsqrt(mean(u²) + ε))`` keeps γ, u and the rsqrt but not the normalised u). None if it cannot."""
    kind = type(node).__name__
    if kind in ("GeluBackward0", "SiluBackward0"):
        t = _saved(node, "_saved_self")
        leaf = None if t is None or t[0].shape != shape else _leaf(t[0], shape, leaves)
        if leaf is None:
            return None
        return ("gelu", node._saved_approximate, leaf) if kind == "GeluBackward0" else ("silu", None, leaf)
    if kind == "MulBackward0" and depth < 3:
        parts = []
        for i, name in enumerate(("_saved_self", "_saved_other")):
            t = _saved(node, name)
            if t is not None:
                part = _leaf(t[0], shape, leaves)
            else:  # not kept by this node: rebuild it from its own producer, if that is the whole factor
                producer = node.next_functions[i][0]
                part = None if producer is None else _plan(producer, shape, leaves, depth + 1)
            if part is None:
                return None
            parts.append(part)
        return "mul", *parts
    return None


def _leaf_kinds(plan: tuple[Any, ...], row_wise: dict[int, bool]) -> None:
    if plan[0] == "leaf":
        row_wise[plan[1]] = plan[2]
    else:
        for part in plan[1:]:
            if isinstance(part, tuple):
                _leaf_kinds(part, row_wise)


def _rebuild(plan: tuple[Any, ...], leaves: list[torch.Tensor]) -> torch.Tensor:
    op = plan[0]
    if op == "leaf":
        return leaves[plan[1]]
    if op == "mul":
        return torch.mul(_rebuild(plan[1], leaves), _rebuild(plan[2], leaves))
    z = _rebuild(plan[2], leaves)
    return F.gelu(z, approximate=plan[1]) if op == "gelu" else F.silu(z)


def _pack_node(node: Any, shape: torch.Size, dtype: torch.dtype | None) -> Packed | None:
    """How to rebuild the output (shape ``shape``) of ``node`` from what it keeps, or None. ``dtype``: the dtype
    the output must have; None accepts any float32/64 one (the source of a cast, rebuilt then cast)."""
    kind = type(node).__name__
    d = shape[-1]
    wide = (torch.float32, torch.float64)
    if kind == "NativeLayerNormBackward0":
        if tuple(node._saved_normalized_shape) != (d,):
            return None
        t = _saved(node, "_saved_input", "_saved_result1", "_saved_result2")
        if t is None or t[0].shape != shape or t[0].dtype not in wide or (dtype is not None and t[0].dtype != dtype):
            return None  # half precision: μ and ρ are saved rounded to the half dtype, too coarse to rebuild from
        w, b = node._saved_weight, node._saved_bias
        affine = tuple(v for v in (w, b) if isinstance(v, torch.Tensor))
        return "layer_norm", (isinstance(w, torch.Tensor), isinstance(b, torch.Tensor)), (*t, *affine)
    leaves: list[torch.Tensor] = []
    plan = _plan(node, shape, leaves, 0)
    if plan is None or not leaves:
        return None
    dt = leaves[0].dtype
    if any(t.dtype != dt for t in leaves) or (dtype is not None and dt != dtype) or (dtype is None and dt not in wide):
        return None
    return "rebuild", plan, tuple(leaves)


def pack(x: torch.Tensor) -> Packed:
    """What to save for ``x`` (N-D, features last): ``(kind, extra, tensors)``; ``tensors`` go to
    ``ctx.save_for_backward`` and come back in :func:`left_matmul`.

    A half-precision ``x`` that is a dtype cast of a rebuildable float32/64 output (under ``torch.autocast`` a
    fused kernel casts its input to the autocast dtype, so a LayerNorm / RMSNorm / GELU / SiLU / gated product in
    float32 reaches it through a ``ToCopyBackward0``) is packed as ``"cast"``: the source rebuilt, then cast to x's
    dtype with the same conversion (round to nearest even) the forward's cast used."""
    node = x.grad_fn
    if node is None or torch.compiler.is_compiling() or getattr(x, "output_nr", 0) != 0 or _hooks_active():
        return "plain", None, (x,)
    if type(node).__name__ == "ToCopyBackward0" and x.dtype in (torch.float16, torch.bfloat16):
        src, nr = node.next_functions[0]
        inner = None if src is None or nr != 0 else _pack_node(src, x.shape, None)
        if inner is not None and all(t.device == x.device for t in inner[2]):
            return "cast", (inner[0], inner[1], x.dtype, x.shape[-1]), inner[2]
        return "plain", None, (x,)
    packed = _pack_node(node, x.shape, x.dtype)
    return ("plain", None, (x,)) if packed is None else packed


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _layer_norm_rows(tensors: tuple[torch.Tensor, ...], extra: Any, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of a LayerNorm's output rebuilt from its saved input, mean and 1/σ (and affine γ, β)."""
    u, mean, rstd, *affine = tensors
    has_w, has_b = extra
    x = (_rows(u)[rows] - mean.reshape(-1, 1)[rows]).mul_(rstd.reshape(-1, 1)[rows])
    if has_w:
        x.mul_(affine[0])
    if has_b:
        x.add_(affine[-1])
    return x


def unpack(kind: str, extra: Any, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The packed input itself as a 2-D (rows × features) tensor — rebuilt whole, for the rare caller that needs
    all of x at once (most need only :func:`left_matmul`)."""
    if kind == "plain":
        return _rows(tensors[0])
    if kind == "layer_norm":
        return _layer_norm_rows(tensors, extra, slice(None))
    if kind == "cast":
        return unpack(extra[0], extra[1], tensors).to(extra[2])
    return _rows(_rebuild(extra, list(tensors)))


def left_matmul(kind: str, extra: Any, tensors: tuple[torch.Tensor, ...], g: torch.Tensor) -> torch.Tensor:
    """``Gᵀ·x`` (k × d_in) for the packed input ``x`` and ``G`` (N × k).

    A LayerNorm's output enters through the identity above when ``G`` is no wider than x (k ≤ d_in: a low-rank
    factor's gradient, where it adds no pass over anything d_in wide); a wider ``G`` (a dense weight's gradient into
    a widening layer) would pay three passes over it, more than rebuilding x — then x is rebuilt in row blocks, as
    the recomputed kinds are."""
    if kind == "plain":
        return torch.mm(g.t(), _rows(tensors[0]))
    if kind == "cast":  # x rebuilt in its half dtype (row blocks of the source, each cast), then one GEMM as before
        x = g.new_empty(g.shape[0], extra[3], dtype=extra[2])
        for rows, xb in _row_blocks(kind, extra, tensors, g.shape[0]):
            x[rows] = xb
        return torch.mm(g.t(), x)
    if kind == "layer_norm" and g.shape[1] <= tensors[0].shape[-1]:
        u, mean, rstd, *affine = tensors
        has_w, has_b = extra
        gt = g * rstd.reshape(-1, 1)
        out = torch.mm(gt.t(), _rows(u))
        out.sub_(torch.mm(gt.t(), mean.reshape(-1, 1)))
        if has_w:
            out.mul_(affine[0])
        if has_b:
            out.addr_(g.sum(0), affine[-1])
        return out
    # x rebuilt in row blocks, each folded into Gᵀ·x at once
    out: torch.Tensor | None = None
    for rows, xb in _row_blocks(kind, extra, tensors, g.shape[0]):
        gb = g[rows].t()
        out = torch.mm(gb, xb) if out is None else out.addmm_(gb, xb)
    assert out is not None
    return out


def column_dot(kind: str, extra: Any, tensors: tuple[torch.Tensor, ...], h: torch.Tensor) -> torch.Tensor:
    """``Σ_rows h ⊙ x`` (d_in) for the packed input ``x`` and ``h`` (N × d_in) — the gradient of a per-feature
    scale applied to x (an input-scaling vector l: ∂l = Σ_n x_n ⊙ (g_n·W)). In row blocks of about 2 MiB, x rebuilt per
    block where it is not kept, so no N × d_in temporary is made."""
    out = h.new_zeros(h.shape[-1])
    for rows, xb in _row_blocks(kind, extra, tensors, h.shape[0]):
        out.add_((h[rows] * xb).sum(0))
    return out


def _row_blocks(
    kind: str, extra: Any, tensors: tuple[torch.Tensor, ...], n: int,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, x[rows])`` over row blocks of about 2 MiB of the packed input (N rows), rebuilt where not kept."""
    if kind == "cast":
        for rows, xb in _row_blocks(extra[0], extra[1], tensors, n):
            yield rows, xb.to(extra[2])
        return
    if kind == "plain":
        x = _rows(tensors[0])
        width = x.shape[-1]

        def block(rows: slice) -> torch.Tensor:
            return x[rows]
    elif kind == "layer_norm":
        width = tensors[0].shape[-1]

        def block(rows: slice) -> torch.Tensor:
            return _layer_norm_rows(tensors, extra, rows)
    else:
        row_wise: dict[int, bool] = {}
        _leaf_kinds(extra, row_wise)
        views = [t.reshape(n, -1) if row_wise[i] else t.reshape(-1) for i, t in enumerate(tensors)]
        width = max((v.shape[-1] for i, v in enumerate(views) if row_wise[i]), default=1)

        def block(rows: slice) -> torch.Tensor:
            return _rebuild(extra, [v[rows] if row_wise[k] else v for k, v in enumerate(views)])
    step = max(1, _BLOCK_ELEMENTS // width)
    for i in range(0, n, step):
        rows = slice(i, i + step)
        yield rows, block(rows)
