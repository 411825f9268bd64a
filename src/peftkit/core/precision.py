"""Mixed precision, decided once for every method: in which dtype an adapted layer computes, in which dtype the
adapter keeps its parameters, and what a merge into a half-precision weight does.

* **Compute dtype** — an adapted layer computes in the dtype its host layer alone would: under
  ``torch.autocast`` for the input's device, the autocast dtype (float32/half inputs; float64 is left alone, as
  autocast does); otherwise the host weight's dtype. The generic path gets this from autocast and from the
  ``.to(base_out.dtype)`` the core applies to every delta; a fused kernel asks :func:`fused_dtype` and, given a
  dtype, casts its operands to it once (:func:`cast`: differentiable, so float32 parameters get float32 gradients)
  and runs with autocast off inside (:func:`kernel`) — autocast would otherwise re-cast inside the hand-written
  forward and break its ``out=`` buffers.
* **Which fused kernels run in half precision** — :func:`fused_dtype` is the one predicate every fused entry
  consults, with ``folds=True`` for a kernel that adds the update into a weight-sized tensor (``W + s·B·A``,
  DoRA's ``diag(m/n)·V``, IA3's ``W·diag(l)``): in bfloat16/float16 that sum would round a small update away, so
  such a kernel gets None (the generic path, which adds the update to the *output*). Kernels that keep the update
  on the activation path (LoRA's r-wide GEMM) run in half precision: measured on LoRA r = 16 over two 1024-wide
  Linears, the fused path keeps as much for backward as the generic one under autocast and 26 % less with bfloat16
  weights and float32 factors (no float32 copy of the input), and its step was faster in every paired run.
* **Adapter parameter dtype** — float32 when the host weight is bfloat16/float16 (:func:`keep_float32_`, applied by
  ``peftkit.adapt`` to every adapter; Hugging Face PEFT's default ``autocast_adapter_dtype=True``): the optimiser
  updates master values at 24-bit precision, where in bfloat16 (8 bits) a step below 2⁻⁹ of a value is rounded
  away. The computation is still in the compute dtype above. ``modules_to_save`` copies keep the model's dtype
  (whole modules the model runs as it runs their originals). To train half-precision adapters instead, cast the
  model after ``adapt`` (``model.to(torch.bfloat16)`` casts the adapters too). A method whose parameters are the
  layer's weights in another form registers ``float32_params=False`` and keeps the base's dtype (SketchTune: its
  tables replace the weights, and the model's dtype is part of its memory claim).
* **Methods that cannot run in half precision** register with ``half_precision=False``: :func:`prepare_adapters`
  refuses a half-precision model at ``adapt`` time, naming the method and the way out. None needs it today.
* **Merging into a half-precision weight** — computed in float32 and rounded once (``W + ΔW`` in bfloat16 would
  round twice); the host keeps its weight from before the first merge (``Host.snapshot``, as a quantised host does:
  one copy of each merged layer's weight, freed by unmerge or ``merge_and_unload``), so unmerge restores it bit for
  bit — subtracting ΔW from the rounded sum would not. ``AdaptedLayer.merge_error`` records the largest rounding
  error of the merged weight, and a merge whose update the rounding mostly erases warns (:func:`check_merge_loss`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

HALF = (torch.float16, torch.bfloat16)
WIDE = (torch.float32, torch.float64)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a matmul on ``x`` in, or None when autocast is off for x's device or does
    not touch ``x`` (not floating point, or float64)."""
    dev = x.device.type
    if not x.is_floating_point() or x.dtype == torch.float64 or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a host layer computes in on input ``x``: the autocast dtype under autocast, else x's own dtype
    (which, outside autocast, must be the host weight's)."""
    return autocast_dtype(x) or x.dtype


def fused_dtype(x: torch.Tensor, w: torch.Tensor, *, folds: bool = False) -> torch.dtype | None:
    """The one decision every fused kernel consults: the dtype it runs in, or None to take the generic path.

    None when the host would not run on ``x`` as given (outside autocast, x and the frozen weight ``w`` differ in
    dtype: the generic path raises the host layer's own error), and in half precision for a kernel that ``folds``
    the update into a weight-sized sum (the sum would round the update away)."""
    if not w.is_floating_point():
        return None
    dt = autocast_dtype(x)
    if dt is None:
        if x.dtype != w.dtype:
            return None
        dt = x.dtype
    if folds and dt not in WIDE:
        return None
    return dt


def cast(dt: torch.dtype, *tensors: torch.Tensor | None) -> tuple[Any, ...]:
    """``tensors`` in dtype ``dt`` (floating ones; None and integer tensors pass through). Differentiable: a
    float32 parameter cast to bfloat16 for a kernel gets its gradient back in float32."""
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != dt else t for t in tensors)


def autocast_off(*tensors: Any) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for the device of the first tensor among ``tensors`` (a no-op context when
    autocast is off there). Plain context objects, no generator: ``torch.compile`` traces through them."""
    dev = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), None)
    if dev is None or not torch.is_autocast_enabled(dev):
        return contextlib.nullcontext()
    return torch.autocast(dev, enabled=False)


def kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for the ``forward`` and ``backward`` of a fused autograd function: run with autocast off on the
    device of its tensors — the entry has already cast them to :func:`fused_dtype` (a backward called inside an
    autocast block would otherwise re-cast too)."""

    @functools.wraps(fn)
    def run(ctx: Any, *args: Any) -> Any:
        with autocast_off(*args):
            return fn(ctx, *args)

    return run


def keep_float32_(adapter: nn.Module) -> None:
    """Store the half-precision (bfloat16/float16) parameters and floating buffers (fixed bases the parameters are
    combined with) of ``adapter`` in float32, in place: the same tensor objects, so what layers share stays shared.
    The values are unchanged (an adapter that is the identity at init stays exactly so)."""
    with torch.no_grad():
        for t in [*adapter.parameters(), *adapter.buffers()]:
            if t.dtype in HALF:
                t.data = t.data.float()


def rounding_error(w_exact: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest absolute error of ``w_exact`` rounded to ``dtype``."""
    return float((w_exact.to(dtype).to(w_exact.dtype) - w_exact).abs().max()) if w_exact.numel() else 0.0


def upcast(w: torch.Tensor) -> torch.Tensor:
    """A half-precision weight as float32 (merge arithmetic runs there); other dtypes unchanged."""
    return w.float() if w.dtype in HALF else w


def merge_loss(w0: torch.Tensor, w: torch.Tensor) -> float:
    """‖round(W) − W‖ / ‖W − W0‖ for the exactly merged ``W`` of a weight ``w0`` rounded to w0's dtype: the share of
    the update that the weight's rounding erases (0 when there is no update)."""
    update = float((w - w0.to(w.dtype)).norm())
    err = float((w.to(w0.dtype).to(w.dtype) - w).norm())
    return err / update if update > 0 else 0.0


def check_merge_loss(where: str, names: list[str], w0: torch.Tensor, w: torch.Tensor) -> None:
    """Warn when rounding the merged weight ``w`` (float32) to w0's half-precision dtype erases at least half of
    the update (:func:`merge_loss` ≥ 0.5): the merged model would then compute visibly less than the adapter."""
    lost = merge_loss(w0, w)
    if lost >= 0.5:
        warnings.warn(
            f"merging {names} into the {str(w0.dtype).removeprefix('torch.')} weight of {where!r}: rounding to the "
            f"weight's precision erases most of the update (relative error {lost:.2f} of the update); keep the "
            f"adapter unmerged, or merge into a float32 copy of the model",
            stacklevel=5,
        )


def prepare_adapters(info: Any, model: nn.Module, hosts: list[Any], adapters: list[nn.Module]) -> None:
    """Called by ``peftkit.adapt`` on a freshly built adapter, before it touches the model: refuse a half-precision
    base for a method registered with ``half_precision=False`` (one clear error now, not a dtype error mid-training),
    then keep the adapter's half-precision parameters in float32 (:func:`keep_float32_`) unless the method registered
    with ``float32_params=False``."""
    from .errors import PeftkitError

    weights = [h.weight for h in hosts] if hosts else [p for p in model.parameters() if p.is_floating_point()]
    half = next((w.dtype for w in weights if w.dtype in HALF), None)
    if half is not None and not info.half_precision:
        note = f" ({info.half_precision_note})" if info.half_precision_note else ""
        raise PeftkitError(
            f"method {info.name!r} cannot run on a {str(half).removeprefix('torch.')} model{note}; adapt a float32 "
            f"model (model.float()) and train it under torch.autocast for mixed precision"
        )
    for a in adapters if info.float32_params else []:
        keep_float32_(a)
