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
* **GELU / SiLU** (their nodes keep the input ``z``): ``x = act(z)`` is recomputed in row blocks of about 2 MiB,
  each folded into ``Gᵀ·x`` at once, so the block never grows to the layer's size.
* **Product** ``x = a ⊙ b`` where the node keeps both factors (a gated MLP's ``act(gate) ⊙ up``): recomputed the
  same way.

Anything else (a plain input, a view, an op not listed, a producer that did not keep its tensors, saved-tensor hooks
in force as under activation checkpointing or offloading, ``torch.compile`` tracing) saves ``x`` itself. The rebuilt
values are the forward's bit for bit (same kernels on the same inputs) for the recomputed kinds; the LayerNorm
identity is exact algebra, equal up to float rounding (see above). No memory is added: the tensors referenced are
the ones the producer's node holds until its own backward, which runs after the consumer's.
"""

from __future__ import annotations

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


def pack(x: torch.Tensor) -> Packed:
    """What to save for ``x`` (N-D, features last): ``(kind, extra, tensors)``; ``tensors`` go to
    ``ctx.save_for_backward`` and come back in :func:`left_matmul`."""
    node = x.grad_fn
    if node is None or getattr(x, "output_nr", 0) != 0 or _hooks_active() or torch.compiler.is_compiling():
        return "plain", None, (x,)
    kind = type(node).__name__
    d = x.shape[-1]
    if (kind == "NativeLayerNormBackward0" and x.dtype in (torch.float32, torch.float64)
            and tuple(node._saved_normalized_shape) == (d,)):
        t = _saved(node, "_saved_input", "_saved_result1", "_saved_result2")
        if t is not None and t[0].shape == x.shape and t[0].dtype == x.dtype:
            w, b = node._saved_weight, node._saved_bias
            affine = tuple(v for v in (w, b) if isinstance(v, torch.Tensor))
            return "layer_norm", (isinstance(w, torch.Tensor), isinstance(b, torch.Tensor)), (*t, *affine)
    elif kind in ("GeluBackward0", "SiluBackward0"):
        t = _saved(node, "_saved_self")
        if t is not None and t[0].shape == x.shape and t[0].dtype == x.dtype:
            return ("gelu", node._saved_approximate, tuple(t)) if kind == "GeluBackward0" else ("silu", None, tuple(t))
    elif kind == "MulBackward0":
        t = _saved(node, "_saved_self", "_saved_other")
        if t is not None and all(v.shape == x.shape for v in t) and torch.result_type(*t) == x.dtype:
            return "mul", None, tuple(t)
    return "plain", None, (x,)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def left_matmul(kind: str, extra: Any, tensors: tuple[torch.Tensor, ...], g: torch.Tensor) -> torch.Tensor:
    """``Gᵀ·x`` (r × d_in) for the packed input ``x`` and ``G`` (N × r)."""
    if kind == "plain":
        return torch.mm(g.t(), _rows(tensors[0]))
    if kind == "layer_norm":
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
    rows = [_rows(t) for t in tensors]
    n, d = rows[0].shape
    step = max(1, _BLOCK_ELEMENTS // d)
    out = g.new_zeros(g.shape[1], d)
    for i in range(0, n, step):
        block = [t[i:i + step] for t in rows]
        if kind == "gelu":
            xb = F.gelu(block[0], approximate=extra)
        elif kind == "silu":
            xb = F.silu(block[0])
        else:
            xb = torch.mul(block[0], block[1])
        out.addmm_(g[i:i + step].t(), xb)
    return out
