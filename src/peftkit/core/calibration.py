"""Calibration data for methods that initialise from the inputs their layers see (GPTQ-style Grams).

:func:`input_grams` runs batches through the model with its adapters disabled (the base model's activations) and
returns, for every layer of one adapter whose adapter is of a given class, the Gram ``G = Σ xᵀx`` of the layer's
inputs as the columns its 2-D weight ``W ∈ R^{d_out×d_in}`` multiplies (convolutions: the unfolded patches;
embeddings: the one-hot tokens, i.e. a diagonal of token counts), in float64. Methods use it to weigh the error
``‖(W − Ŵ)·X‖²_F = tr((W − Ŵ)·G·(W − Ŵ)ᵀ)`` of an approximation Ŵ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PeftkitError
from .host import Host
from .model import adapter_names, disable, get_layer
from .procedure import find_adapters


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def checked_gram(host: Host, gram: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """``gram`` as the symmetric float64 (d_in, d_in) matrix (G + Gᵀ)/2 on ``device``, after checking that it is a
    finite matrix of the layer's input width and not zero (a clear PeftkitError naming the module otherwise)."""
    d_in = host.d_in
    if tuple(gram.shape) != (d_in, d_in) or not torch.isfinite(gram).all():
        raise PeftkitError(f"module {host.name!r}: the calibration Gram must be a finite ({d_in}, {d_in}) matrix, "
                           f"got shape {tuple(gram.shape)}")
    g = gram.detach().to(device=device, dtype=torch.float64)
    g = (g + g.t()) / 2
    if float(g.diagonal().sum()) <= 0:  # a Gram Σ xᵀx is positive semi-definite: zero iff its trace is
        raise PeftkitError(f"module {host.name!r}: the calibration Gram is zero (all calibration inputs were 0)")
    return g


def input_columns(host: Host, x: torch.Tensor) -> torch.Tensor:
    """The host input as an (N, d_in) float64 matrix of the vectors its (d_out, d_in) weight multiplies."""
    m = host.module
    if host.kind == "embedding":
        return F.one_hot(x.reshape(-1).long(), host.d_in).double()
    if host.kind == "conv3d":
        raise PeftkitError(f"module {host.name!r}: calibration does not support Conv3d layers (target other layers)")
    if host.is_conv:
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise PeftkitError(f"module {host.name!r}: calibration supports zero-padded convolutions with numeric "
                               f"padding only (padding={m.padding!r}, padding_mode={m.padding_mode!r})")
        if host.kind == "conv1d":  # as a (1, k) 2-D convolution
            x = x.unsqueeze(-2)
            k, d, p, s = (1, *m.kernel_size), (1, *m.dilation), (0, *m.padding), (1, *m.stride)
        else:
            k, d, p, s = m.kernel_size, m.dilation, m.padding, m.stride
        cols = F.unfold(x.double(), k, dilation=d, padding=p, stride=s)  # (B, d_in, L), channel-major like W
        return cols.transpose(1, 2).reshape(-1, host.d_in)
    return x.detach().reshape(-1, host.d_in).double()


def visit_inputs(
    model: nn.Module, adapter_cls: type, batches: Iterable[Any], visit: Callable[[str, Host, torch.Tensor, Any], None],
    name: str | None = None, *, who: str = "calibrate",
) -> list[str]:
    """Run ``batches`` through the model (``no_grad``, every adapter disabled) and call ``visit(path, host, x, batch)``
    with the input ``x`` (as it reaches the layer, detached) of every layer where adapter ``name`` (default: the
    only adapter) is an ``adapter_cls``, and the batch it came from. Returns those layers' paths; ``who`` prefixes
    the errors (no such adapter, merged adapter, a layer that no batch reached)."""
    names = adapter_names(model)
    if name is None:
        if len(names) != 1:
            raise PeftkitError(f"{who}: {len(names)} adapters loaded ({names}); say which one with name=")
        name = names[0]
    layers = find_adapters(model, adapter_cls).get(name, [])
    if not layers:
        raise PeftkitError(f"{who}: adapter {name!r} has no {adapter_cls.__name__} layers (adapters: {names})")
    merged = [p for p, _ in layers if name in get_layer(model, p).merged]
    if merged:
        raise PeftkitError(f"{who}: adapter {name!r} is merged into {merged}; unmerge before calibrating")
    seen: set[str] = set()
    current: list[Any] = [None]

    def hook(path: str, host: Host) -> Any:
        def fn(_module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.add(path)
            visit(path, host, args[0].detach(), current[0])
        return fn

    handles = [get_layer(model, p).register_forward_pre_hook(hook(p, a.host)) for p, a in layers]
    try:
        with torch.no_grad(), disable(model):
            for batch in batches:
                current[0] = batch
                run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [p for p, _ in layers if p not in seen]
    if missing:
        raise PeftkitError(f"{who}: no calibration batch reached {missing} (was any batch given?)")
    return [p for p, _ in layers]


def input_grams(
    model: nn.Module, adapter_cls: type, batches: Iterable[Any], name: str | None = None, *, who: str = "calibrate"
) -> dict[str, torch.Tensor]:
    """Module path -> ``G = Σ xᵀx`` (d_in×d_in, float64) for every layer where adapter ``name`` (default: the only
    adapter) is an ``adapter_cls`` (:func:`visit_inputs`, ``x`` as :func:`input_columns`)."""
    grams: dict[str, torch.Tensor] = {}

    def add(path: str, host: Host, x: torch.Tensor, _batch: Any) -> None:
        x = input_columns(host, x)
        grams[path] = grams[path] + x.t() @ x if path in grams else x.t() @ x

    visit_inputs(model, adapter_cls, batches, add, name, who=who)
    return grams

