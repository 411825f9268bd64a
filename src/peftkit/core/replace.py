"""What adapters that *replace* the host weight share (quantised or fake-quantised bases: the layer computes with a
whole new weight ``W' = f(W, θ)`` instead of ``W``).

A subclass defines ``new_weight() -> (d_out, d_in)``; this mixin gives the activation path
``delta = x·(W' − W)ᵀ`` (so ``base + delta`` is the layer with ``W'``), the fused path ``x·W'ᵀ + b`` (one product
instead of two), and a merge that writes ``W'`` itself (bit-exact, not ``W + (W' − W)``) and keeps the replaced weight
to restore it exactly on unmerge (``new_weight`` takes the host weight as an argument, so the unmerge recomputes
exactly what the merge wrote). ``W`` is the host's weight before any merge: such an adapter is not
:attr:`~peftkit.core.adapter.Adapter.additive`, so the core merges it together with the layer's other adapters from
that weight (their updates added on top) and does not run it unmerged over a weight that holds others.
"""

from __future__ import annotations

import torch

from .dense import host_forward, trainable
from .errors import PeftkitError


class ReplacedWeight:
    """Mixin for :class:`~peftkit.core.adapter.Adapter` subclasses that define ``new_weight(host_weight)``."""

    _replaced: torch.Tensor | None = None  # the host weight a merge overwrote
    additive = False  # the layer computes with W' = f(W): the update depends on the host weight

    def new_weight(self, host_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The (d_out, d_in) weight the adapted layer computes with when the host holds ``host_weight`` (default:
        what it holds now)."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        w = self.new_weight()
        xd = x if (not x.is_floating_point() or x.dtype == w.dtype) else x.to(w.dtype)
        return self.host.apply_weight(xd, w - self.host.weight_2d().to(w.dtype))

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad():
            w = self.new_weight()
        bias = self.host.bias
        if x.dtype != w.dtype or (bias is not None and bias.dtype != w.dtype):
            return None
        return host_forward(self.host, x, self.new_weight, trainable(self), bias, w)  # type: ignore[arg-type]

    def delta_weight(self) -> torch.Tensor:
        w = self.host.weight_2d().detach()
        return self.new_weight().detach().to(w.dtype) - w

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        host_w = self.host.weight_2d().detach()
        new = self.new_weight(host_w).detach().to(weight.dtype)
        self._replaced = host_w.clone()
        if torch.equal(weight, host_w):  # the usual case: nothing merged before this adapter in the same call
            return new, bias
        return new + (weight - host_w.to(weight.dtype)), bias

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._replaced is None:
            raise PeftkitError(f"module {self.host.name!r}: {type(self).__name__} was not merged here, nothing to "
                               "unmerge")
        old, self._replaced = self._replaced, None
        new = self.new_weight(old).detach().to(weight.dtype)  # what the merge wrote (same inputs, same bits)
        if torch.equal(weight, new):
            return old.to(weight.dtype), bias
        return old.to(weight.dtype) + (weight - new), bias
