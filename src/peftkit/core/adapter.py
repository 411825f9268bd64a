"""The small protocol every method's adapter implements.

An adapter is a pure function of its parameters: given the host input ``x`` and the frozen host output
``base_out`` it returns its *contribution* ``delta`` so that the adapted output is ``base_out + Σ delta``.
Mergeable methods also give the merged weight. Everything else (naming, activation, merging into the host,
mixed batches, persistence) is the core's job.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .config import AdapterConfig
from .errors import PeftkitError
from .host import Host

if TYPE_CHECKING:
    from .hf_tensor import HFTensor


_UNFUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("peftkit_unfused", default=False)


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Inside this block every adapted layer runs its generic path — ``base(x) + Σ delta(x)`` in plain autograd ops —
    instead of an adapter's fused kernel (a hand-written backward). For second-order gradients (``create_graph=True``:
    gradient penalties, meta-learning, Hessian-vector products), which the fused kernels do not propagate; the
    outputs are the same up to rounding."""
    token = _UNFUSED.set(True)
    try:
        yield
    finally:
        _UNFUSED.reset(token)


def fused_allowed() -> bool:
    """False inside :func:`unfused`."""
    return not _UNFUSED.get()


def check_first_order() -> None:
    """Called first in the backward of every fused kernel: a backward run with ``create_graph=True`` (grad mode on
    inside it) would return gradients with no graph behind them — refuse with the way out instead."""
    if torch.is_grad_enabled():
        raise PeftkitError(
            "second-order gradients (create_graph=True) do not flow through peftkit's fused adapter kernels; run the "
            "forward pass inside `with peftkit.unfused():` (every adapted layer then uses plain autograd ops)"
        )


def make_dropout(p: float) -> nn.Module:
    """Dropout on the adapter input; no module at all when p == 0 (keeps the hot path free of no-op calls)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class SharedStore(nn.Module):
    """Tensors one adapter shares across all of its layers (e.g. shard pools, seeded random bases).

    The adapter of the first targeted layer owns it as its submodule ``shared_store`` (so it is trained, saved and
    copied once, through that adapter); the others reach it through the plain attribute ``shared``. Non-persistent
    buffers are regenerated at load instead of saved.
    """

    def parameter(self, key: str, make: Any) -> nn.Parameter:
        """The shared parameter ``key``, created with ``make()`` the first time it is asked for."""
        if key not in self._parameters:
            self.register_parameter(key, nn.Parameter(make()))
        return self._parameters[key]

    def buffer(self, key: str, make: Any, persistent: bool = True) -> torch.Tensor:
        """The shared buffer ``key``, created with ``make()`` the first time it is asked for."""
        if key not in self._buffers:
            self.register_buffer(key, make(), persistent=persistent)
        return self._buffers[key]


@dataclass
class PlanContext:
    """What an adapter that opts in with ``uses_context = True`` learns about the whole adapter it belongs to:
    every targeted (module name, host) in model order, its own position, and the shared store."""

    name: str
    targets: list[tuple[str, Host]]
    index: int
    shared: SharedStore


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
    #: adapters that share tensors across layers set this; the core then passes ``context=PlanContext(...)``
    uses_context: ClassVar[bool] = False
    #: adapters whose output depends on a per-sample condition (see :func:`peftkit.condition`) set this; the core
    #: then calls ``delta(x, base_out, condition=values)`` with the rows of exactly the samples in ``x`` (int64 ids
    #: or float values, one row per sample), or ``condition=None`` outside a ``condition`` block
    uses_condition: ClassVar[bool] = False

    def __init__(self, host: Host, config: AdapterConfig, context: PlanContext | None = None) -> None:
        super().__init__()
        self.check_ranks(host, config)  # before a subclass allocates r-sized factors
        self.host = host
        self.config = config
        # a plain attribute (not a registered submodule): the store is saved once, not once per layer
        object.__setattr__(self, "shared", context.shared if context is not None else None)

    # -- forward ---------------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the host output."""
        raise NotImplementedError

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Return ``base(x) + delta`` computed in one place, or None to use the generic path."""
        return None

    @classmethod
    def batched_delta(
        cls, adapters: Sequence[Adapter], x: torch.Tensor, index: torch.Tensor, out: torch.Tensor,
        inplace: bool = False,
    ) -> torch.Tensor | None:
        """Optional fast path for a mixed batch (see :func:`peftkit.mixed_batch`): ``out`` plus the deltas of several
        adapters of one method family at once, sample ``i`` computed by ``adapters[index[i]]`` (``index[i] == -1``:
        nothing added). ``x`` is the whole batch, ``out`` the layer output so far; ``inplace``: the core owns ``out``
        and allows accumulating into it (only do so when no gradient is recorded). Called by the core with ≥ 2
        adapters whose classes share this implementation; return None, before touching anything, to fall back to one
        ``delta`` per adapter."""
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

    def check_loaded(self) -> None:
        """Called after saved tensors were loaded into the adapter, before it is installed: raise
        :class:`PeftkitError` if they are inconsistent (e.g. a regenerated basis whose checksum differs)."""

    def reads_condition(self) -> bool:
        """Whether this layer's output depends on the per-sample condition (default: ``uses_condition``). Inside a
        ``condition`` block the core does not call ``fused_forward`` of an adapter that reads it (the fused path sees
        no condition); an adapter whose layer ignores it (e.g. a shared layer of a multi-task method) says False
        here to keep its fused path."""
        return self.uses_condition

    def check_condition(self, ids: torch.Tensor) -> None:
        """Adapters with ``uses_condition``: raise :class:`PeftkitError` when ``ids`` (one row per sample: int64
        ids, or float values) is not what this adapter reads — wrong dtype or shape, an id it has no parameters for,
        a value out of range. Called once when a ``condition`` block starts."""

    # -- adjustable rank (methods trained for several ranks at once) -------------------------------------------
    def rank_range(self) -> tuple[int, int] | None:
        """``(lowest, highest)`` rank this adapter can switch to after training, or None (a fixed-rank method)."""
        return None

    def set_rank(self, b: int) -> None:
        """Compute with rank ``b`` from now on (only called with ``b`` inside :meth:`rank_range`)."""
        raise PeftkitError(f"{type(self).__name__} has no adjustable rank")

    # -- bounds ----------------------------------------------------------------------------------------
    @classmethod
    def rank_limits(cls, host: Host, config: Any) -> dict[str, int]:
        """The largest value each rank field of ``config`` may take on ``host``. Default: a config field ``r`` (an
        integer) is a rank, at most min(d_in, d_out) — a larger one adds parameters and no expressiveness. A method
        whose ``r`` counts something else overrides this (e.g. PaCA's trained input columns: r <= d_in)."""
        r = getattr(config, "r", None)
        if isinstance(r, int) and not isinstance(r, bool):
            return {"r": min(host.d_in, host.d_out)}
        return {}

    @classmethod
    def check_ranks(cls, host: Host, config: Any) -> None:
        """:class:`PeftkitError` naming the layer when a rank field of ``config`` exceeds :meth:`rank_limits`. The
        core calls it for every targeted layer before an adapter is built (no r-sized tensor is ever allocated)."""
        for field_name, limit in cls.rank_limits(host, config).items():
            value = getattr(config, field_name)
            if value > limit:
                raise PeftkitError(
                    f"module {host.name!r}: rank {value} exceeds this layer's limit of {limit} "
                    f"({type(config).__name__}.{field_name}; d_in={host.d_in}, d_out={host.d_out}); use a rank <= "
                    f"{limit} or target other layers"
                )

    # -- bookkeeping -----------------------------------------------------------------------------------
    @classmethod
    def expected_params(cls, host: Host, config: Any) -> int:
        """Trainable parameters this adapter has on ``host`` (the method's formula)."""
        raise NotImplementedError

    # -- Hugging Face PEFT format (only methods registered with ``hf_peft_type`` implement these) ------------
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> AdapterConfig | None:
        """This method's config for a Hugging Face PEFT ``adapter_config.json`` of its ``hf_peft_type``, or None
        when the file is not for this method (e.g. LoRA declines ``use_dora: true``). Raise
        :class:`PeftkitError` naming the option when the file uses one that changes the math and is not supported.
        Targeting fields may be left as in the file: :mod:`peftkit.core.hf` replaces them with the exact list of
        modules that have tensors in it."""
        return None

    @classmethod
    def to_hf_config(cls, config: Any, hosts: list[Host]) -> dict[str, Any] | None:
        """The method's fields of a Hugging Face PEFT config for ``config`` (``hosts``: the adapted layers); the
        core adds ``peft_type``, ``target_modules`` and ``modules_to_save``. None: cannot be exported."""
        return None

    @classmethod
    def hf_layout(cls, host: Host, config: Any) -> dict[str, HFTensor] | None:
        """Where each saved tensor of this adapter on ``host`` (with per-module ``config``) lives in a Hugging Face
        PEFT file: our tensor name -> :class:`~peftkit.core.hf.HFTensor` (key after the module path, HF shape, our
        shape). None: no Hugging Face format."""
        return None

    @classmethod
    def shared_params(cls, config: Any, hosts: list[Host]) -> int:
        """Trainable parameters of the whole adapter on top of the per-layer ``expected_params``: those held once in
        the shared store (``uses_context``) or sized by all targeted ``hosts`` together. Checked by the tests."""
        return 0

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters()}

    def extra_repr(self) -> str:
        return f"host={self.host.kind}, d_in={self.host.d_in}, d_out={self.host.d_out}"
