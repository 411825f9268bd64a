"""The small protocol every method's adapter implements.

An adapter is a pure function of its parameters: given the host input ``x`` and the frozen host output
``base_out`` it returns its *contribution* ``delta`` so that the adapted output is ``base_out + Σ delta``.
Mergeable methods also give the merged weight. Everything else (naming, activation, merging into the host,
mixed batches, persistence) is the core's job.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .config import AdapterConfig
from .host import Host


def make_dropout(p: float) -> nn.Module:
    """Dropout on the adapter input; no module at all when p == 0 (keeps the hot path free of no-op calls)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Adapter(nn.Module):
    """Base class for a method's per-layer adapter.

    Subclasses implement ``delta`` and, when mergeable, ``delta_weight`` (or override ``merge``/``unmerge`` for
    non-additive updates). Optional hooks: ``fused_forward`` (a fast path that returns the whole output when this
    adapter is the only active one), ``on_install``/``on_remove`` (methods that re-parametrise the host weight,
    e.g. PiSSA's residual), and ``expected_params`` (the trainable-parameter formula, checked by the tests).
    """

    method: ClassVar[str] = ""
    #: tensors (attribute names) excluded from saving because they are regenerated (e.g. seeded random bases)
    regenerated: ClassVar[tuple[str, ...]] = ()

    def __init__(self, host: Host, config: AdapterConfig) -> None:
        super().__init__()
        self.host = host
        self.config = config

    # -- forward ---------------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the host output."""
        raise NotImplementedError

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Return ``base(x) + delta`` computed in one place, or None to use the generic path."""
        return None

    # -- merging ---------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW as a (d_out, d_in) matrix (additive methods)."""
        raise NotImplementedError(f"{type(self).__name__} is not mergeable")

    def merge(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New (d_out, d_in) weight and bias with this adapter folded in."""
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerge(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of :meth:`merge`."""
        return weight - self.delta_weight().to(weight.dtype), bias

    # -- lifecycle -------------------------------------------------------------------------------------
    def on_install(self) -> None:
        """Called once the adapter is attached (after any saved state was loaded into it)."""

    def on_remove(self) -> None:
        """Called when the adapter is deleted or the model is unloaded without merging."""

    # -- bookkeeping -----------------------------------------------------------------------------------
    @classmethod
    def expected_params(cls, host: Host, config: Any) -> int:
        """Trainable parameters this adapter has on ``host`` (the method's formula)."""
        raise NotImplementedError

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters()}

    def extra_repr(self) -> str:
        return f"host={self.host.kind}, d_in={self.host.d_in}, d_out={self.host.d_out}"
