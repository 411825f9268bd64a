"""The small protocol every method's adapter implements.

An adapter is a pure function of its parameters: given the host input ``x`` and the frozen host output
``base_out`` it returns its *contribution* ``delta`` so that the adapted output is ``base_out + Σ delta``.
Mergeable methods also give the merged weight. Everything else (naming, activation, merging into the host,
mixed batches, persistence) is the core's job.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Collection, Iterator, Sequence
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


_RANKS_FROM_FILE: contextvars.ContextVar[bool] = contextvars.ContextVar("peftkit_ranks_from_file", default=False)


@contextlib.contextmanager
def ranks_from_file() -> Iterator[None]:
    """Inside this block :meth:`Adapter.check_ranks` lets every rank pass: an adapter loaded from a file has the
    ranks its tensors have (Hugging Face PEFT allows a rank above min(d_in, d_out); it adds nothing, but the adapter
    computes exactly what was saved)."""
    token = _RANKS_FROM_FILE.set(True)
    try:
        yield
    finally:
        _RANKS_FROM_FILE.reset(token)


def fused_allowed() -> bool:
    """Whether an adapted layer may take an adapter's fused kernel: False inside :func:`unfused`, and False while
    ``torch.compile`` traces the model — the compiler then sees the generic path (plain autograd ops it can fuse
    itself) and never reads the context variable (a ``ContextVar.get`` is a graph break). The first test is a
    constant under tracing, so a compiled graph holds no trace of this switch; eager mode pays one call and one
    lookup, as before."""
    return not torch.compiler.is_compiling() and not _UNFUSED.get()


def check_first_order() -> None:
    """Called first in the backward of every fused kernel: a backward run with ``create_graph=True`` (grad mode on
    inside it) would return gradients with no graph behind them — refuse with the way out instead."""
    if torch.is_grad_enabled():
        raise PeftkitError(
            "second-order gradients (create_graph=True) do not flow through peftkit's fused adapter kernels; run the "
            "forward pass inside `with peftkit.unfused():` (every adapted layer then uses plain autograd ops)"
        )


class InputDropout(nn.Dropout):
    """``nn.Dropout`` that passes integer tensors through unchanged: an Embedding host's input is token ids, which
    dropout cannot apply to. So on an Embedding a method's input dropout is skipped (as Hugging Face PEFT's LoRA
    skips ``lora_dropout`` there), while dropout on a float tensor (an activation, an Embedding adapter's output)
    acts as usual — the same rule for every method."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if x.is_floating_point() else x


def make_dropout(p: float) -> nn.Module:
    """Every method's dropout (see :class:`InputDropout`: token ids pass through); no module at all when p == 0
    (keeps the hot path free of no-op calls)."""
    return InputDropout(p) if p > 0 else nn.Identity()


def drops(adapter: nn.Module, host: Host) -> bool:
    """Whether ``adapter``'s input dropout is active now: training, p > 0, and a host whose input is not token ids
    (fused paths that cannot apply dropout check this before running)."""
    return adapter.training and isinstance(getattr(adapter, "dropout", None), nn.Dropout) and host.kind != "embedding"


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
    #: the update does not depend on the host: ``delta`` reads neither ``base_out`` nor the host weight, and
    #: ``merge`` adds a ΔW (and bias change) that does not depend on the weight it is added to (the low-rank and dense
    #: families). Adapters that scale, normalise, re-project or replace the host's output or weight set False (IA3,
    #: DoRA, replaced weights, series adapters, ...): the core then merges them together with the layer's other
    #: adapters from the weight before any merge, and refuses to run them unmerged over a weight that holds others
    #: (see :meth:`AdaptedLayer.merge <peftkit.core.layer.AdaptedLayer.merge>`)
    additive: ClassVar[bool] = True
    #: True for a non-additive adapter whose ``delta(x, base_out)`` reads the host only through ``base_out`` (IA3 on
    #: outputs, series adapters): given another output it applies on that output, so it can follow another adapter
    #: in a :class:`~peftkit.core.blocks.Stack` (additive adapters always can: their delta ignores ``base_out``)
    output_only: ClassVar[bool] = False

    def __init__(self, host: Host, config: AdapterConfig, context: PlanContext | None = None) -> None:
        super().__init__()
        self.check_ranks(host, config)  # before a subclass allocates r-sized factors
        self.host = host
        self.config = config
        # a plain attribute (not a registered submodule): the store is saved once, not once per layer
        object.__setattr__(self, "shared", context.shared if context is not None else None)

    @classmethod
    def create(cls, host: Host, config: AdapterConfig, context: PlanContext | None = None) -> Adapter:
        """The adapter the core puts on one targeted layer: ``cls(host, config)``. A method whose config also puts
        another kind of update on some layers (e.g. trainable token rows on an embedding, named by the config)
        returns that adapter there instead."""
        return cls(host, config) if context is None else cls(host, config, context=context)

    @classmethod
    def require_context(cls, context: PlanContext | None) -> PlanContext:
        """``context``, or :class:`PeftkitError` when the adapter is built by hand (``uses_context`` adapters whose
        layers cannot exist without the others call this first)."""
        if context is None:
            raise PeftkitError(f"{cls.__name__} adapters are built by peftkit.adapt (the layers of one adapter share "
                               "tensors, which it sets up)")
        return context

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

    def is_additive(self) -> bool:
        """Whether this adapter's update is :attr:`additive` (a per-instance answer for methods whose configuration
        decides it)."""
        return self.additive

    def stacks(self) -> bool:
        """Whether this adapter can run on another adapter's output (a later member of a ``Stack``): its delta reads
        the host at most through ``base_out`` (:attr:`output_only`), or not at all (:attr:`additive`)."""
        return self.is_additive() or self.output_only

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

    # -- hot-swapping (see :mod:`.hotswap`) -------------------------------------------------------------------
    def pad_rank(self, r: int, scaling: float | None = None) -> None:
        """Grow this adapter's rank to ``r`` by zero padding, and with ``scaling`` re-express its update under that
        scale factor — the update stays the same, in place (the same parameter objects, new shapes and values).
        Lets :func:`peftkit.hotswap` copy an adapter of a lower rank or another α into a compiled model's adapter.
        Methods whose rank is plain zero-paddable factors implement it; others raise."""
        raise PeftkitError(f"{type(self).__name__} cannot change its rank or scale for hot-swapping; swap in an "
                           f"adapter of the same config")

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
        core calls it for every targeted layer before an adapter is built (no r-sized tensor is ever allocated);
        not for an adapter loaded from a file (:func:`ranks_from_file`)."""
        if _RANKS_FROM_FILE.get():
            return
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

    #: tensors a Hugging Face PEFT file holds once for the whole adapter, outside every module (keys as in the file,
    #: e.g. VeRA's ``base_model.vera_A``): written from :meth:`hf_shared_tensors`, checked by :meth:`check_hf_shared`
    hf_shared_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def hf_shared_tensors(cls, config: Any, adapters: list[Adapter]) -> dict[str, torch.Tensor]:
        """Export: what to write under :attr:`hf_shared_keys` for the adapter whose per-layer adapters are
        ``adapters`` (in model order); keys absent from the result are not written."""
        return {}

    @classmethod
    def check_hf_shared(cls, config: Any, hosts: list[Host], tensors: dict[str, torch.Tensor]) -> None:
        """Import: raise :class:`PeftkitError` when the file's shared tensors (those of :attr:`hf_shared_keys` it
        holds) are not what this adapter computes with on ``hosts`` (the targeted layers, in model order)."""

    @classmethod
    def to_hf_state(cls, config: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This adapter's saved tensors as Hugging Face PEFT stores them (keys of :meth:`hf_layout`); the default
        keeps them. E.g. PiSSA writes PEFT's converted LoRA of rank 2r, ``[A; A0]`` and ``[B, −B0]``."""
        return state

    #: tensors a Hugging Face PEFT file of this method may repeat that peftkit regenerates instead (e.g. RandLoRA's
    #: seeded bases, under ``<module>.<key>`` and ``base_model.<key>``): handed to :meth:`from_hf_state` to check
    hf_regenerated_keys: ClassVar[tuple[str, ...]] = ()
    #: small saved tensors PEFT's layout has no place for (e.g. a checksum of regenerated buffers): written into the
    #: weights' metadata, which PEFT ignores, and read back from there by peftkit
    hf_metadata_tensors: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_hf_state(cls, config: Any, tensors: dict[str, torch.Tensor], hosts: list[Host]) -> dict[str, torch.Tensor]:
        """The whole adapter's tensors read from a Hugging Face file (``adapter.<module>.<name>`` as laid out by
        :meth:`hf_layout`, plus ``hf_shared.<module>.<key>`` for :attr:`hf_regenerated_keys`) → what this adapter, built
        from ``config`` on ``hosts`` (the targets in model order), loads. Called with the config read from
        ``adapter_config.json`` and again, for a file peftkit wrote, with the peftkit config kept in its metadata
        (e.g. splitting PiSSA's rank-2r factors back): must leave tensors it already converted alone. Raise
        :class:`PeftkitError` for tensors that do not fit. The default keeps them."""
        return tensors

    @classmethod
    def hf_shared_state(
        cls, config: Any, hosts: list[Host], tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Import: the file's shared tensors that are saved state of the adapter (trained, not regenerated — e.g.
        VB-LoRA's vector bank), keyed as in the state of the first layer's adapter, which owns the shared store
        (``"shared_store.<name>"``). Raise :class:`PeftkitError` when one the adapter needs is missing."""
        return {}

    @classmethod
    def shared_params(cls, config: Any, hosts: list[Host]) -> int:
        """Trainable parameters of the whole adapter on top of the per-layer ``expected_params``: those held once in
        the shared store (``uses_context``) or sized by all targeted ``hosts`` together. Checked by the tests."""
        return 0

    def frozen_parameters(self) -> frozenset[str]:
        """Names (as in ``named_parameters()``) of this adapter's parameters that are saved but never trained (e.g.
        a factor fixed by its init): the core leaves them ``requires_grad=False`` when it makes the adapter
        trainable, after an unmerge too, and they do not count as trainable. None by default."""
        return frozenset()

    def is_frozen(self, name: str) -> bool:
        """Whether parameter ``name`` (as in ``named_parameters()``) is one of :meth:`frozen_parameters` — also
        under a ``torch.nn.utils.parametrize`` parametrisation, which renames ``p`` ``parametrizations.p.original``."""
        if name.startswith("parametrizations.") and name.endswith(".original"):
            name = name[len("parametrizations."):-len(".original")]
        return name in self.frozen_parameters()

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if not self.is_frozen(n)}

    def extra_repr(self) -> str:
        return f"host={self.host.kind}, d_in={self.host.d_in}, d_out={self.host.d_out}"


def fit_ranks(
    adapter: type[Adapter], config: AdapterConfig, targets: Sequence[tuple[str, Host]], fixed: Collection[str],
) -> tuple[AdapterConfig, dict[str, list[tuple[str, int, int]]]]:
    """``config`` with every rank field that the user did not set fitted to each targeted layer.

    The rule: a value the user gave (a field in ``fixed``, or set for that layer by one of the config's own
    ``overrides``) is theirs — above a layer's :meth:`Adapter.rank_limits` it stays an error
    (:meth:`Adapter.check_ranks`). A method's *default* is a ceiling: on a layer whose limit is below it (MTLoRA's
    r = 64 on EfficientNet's 32→16 convolutions) that layer gets its limit, recorded as an exact-name entry of
    ``overrides`` — saved with the adapter, so loading rebuilds the same shapes. ``targets``: (module name, host) of
    every targeted layer. Returns (config, {field: [(module, default, limit), ...]} of what was lowered)."""
    added: dict[str, dict[str, int]] = {}
    lowered: dict[str, list[tuple[str, int, int]]] = {}
    for path, host in targets:
        own = config.for_module(path)
        user = {f for p, ov in config.overrides.items() if re.match(rf"(.*\.)?({p})$", path) for f in ov}
        for name, limit in adapter.rank_limits(host, own).items():
            value = getattr(own, name)
            if name in fixed or name in user or value <= limit:
                continue
            added.setdefault(exact_name(path), {})[name] = limit
            lowered.setdefault(name, []).append((path, value, limit))
    if not added:
        return config, {}
    return dataclasses.replace(config, overrides={**config.overrides, **added}), lowered


def exact_name(path: str) -> str:
    """An ``overrides`` pattern that matches the module ``path`` and no other (not a longer name ending in it: the
    look-behind allows nothing before it)."""
    return "(?<!.)" + re.escape(path)
