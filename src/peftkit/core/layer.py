"""The adapted-layer wrapper and the modules-to-save wrapper: named adapters, active set, merge/unmerge,
disable, and mixed-batch routing (one forward where each sample uses its own adapter)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import precision
from .adapter import Adapter, fused_allowed
from .errors import PeftkitError
from .host import Host

#: adapter parameters frozen because they are merged: [how many merges hold them, requires_grad before]
_FROZEN: Any = WeakIdKeyDictionary()

BASE = "__base__"  # route name meaning "no adapter" (None is accepted too)


class Route:
    """Per-sample adapter names, grouped once into index tensors shared by every layer of a forward pass."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = [BASE if n is None else n for n in names]
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            groups.setdefault(n, []).append(i)
        # ordered by name, not by first sample: the same adapters in another order give the same iteration order
        # (a compiled model's guards on this dict stay valid)
        self.groups = {n: torch.tensor(groups[n], dtype=torch.long) for n in sorted(groups)}
        self._index: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def index(self, names: Sequence[str], device: torch.device) -> torch.Tensor:
        """Per sample, the position of its adapter in ``names`` (−1: another one or none); cached per forward."""
        key = (tuple(names), device)
        if key not in self._index:
            pos = {n: i for i, n in enumerate(names)}
            self._index[key] = torch.tensor([pos.get(n, -1) for n in self.names], dtype=torch.long, device=device)
        return self._index[key]

    def check_batch(self, x: torch.Tensor, where: str) -> None:
        n, b = len(self.names), x.shape[0]
        if b != n:
            hint = ""
            if b > n and b % n == 0:
                hint = (f"; the batch is {b // n}× the names — generate(num_beams / num_return_sequences="
                        f"{b // n}) expands each sample into consecutive rows: pass mixed_batch(..., repeat={b // n})")
            raise PeftkitError(f"mixed batch: {n} adapter names given but {where} sees a batch of {b}{hint}")


class AdaptedLayer(nn.Module):
    """Wraps a host layer; holds its adapters by name. Output = base(x) + Σ_active adapter.delta(x, base(x))."""

    def __init__(self, base_layer: nn.Module, host: Host) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.host = host
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.route: Route | None = None
        self.block: Any = None  # the model's active composition (core.blocks) where it involves this layer
        self.condition: torch.Tensor | None = None  # per-sample condition rows of this forward (``condition``)
        self.merge_error: float | None = None  # quantised / half hosts: largest rounding error of the merged weight
        self._snapshot: tuple[Any, ...] | None = None  # quantised / half hosts: the weight before the first merge
        self._merged_copy: dict[str, dict[str, torch.Tensor]] = {}  # merged adapters' tensors as merged

    @property
    def weight(self) -> torch.Tensor:  # code that reads `layer.weight` (e.g. tied embeddings) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.condition is not None and self.merged:
            self._check_unmerged_for_condition()
        if self.host.substituted:
            return self._forward_substituted(x, *args, **kwargs)
        if self.block is not None and not self.merged:
            return self.block.run_layer(self, x, *args, **kwargs)
        if self.route is not None:
            return self._forward_mixed(x, *args, **kwargs)
        live = [n for n in self.active if n in self.adapters and n not in self.merged]
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            self.check_live(self.merged)
        # a fused path sees no per-sample conditions: adapters that read them take the generic path inside a block
        if len(live) == 1 and not args and not kwargs and fused_allowed() and not (
                self.condition is not None and self.adapters[live[0]].reads_condition()):
            y = self.adapters[live[0]].fused_forward(x)
            if y is not None:
                return y
        base_out = self.base_layer(x, *args, **kwargs)
        out = base_out
        for n in live:
            out = out + self._delta(n, x, base_out).to(base_out.dtype)
        return out

    def _forward_substituted(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """A host whose module reads its weight directly (:data:`~peftkit.core.host.SUBSTITUTED_KINDS`): the module
        runs with ``W + Σ ΔW`` in place of its weight — each active unmerged adapter's update taken from the weight
        as it is now, as a merge would add it (additive adapters: ``delta_weight``). No mixed batches or
        compositions here: one weight serves the whole batch."""
        if self.route is not None or self.block is not None:
            raise PeftkitError(
                f"layer {self.host.name!r} ({type(self.host.module).__name__}, adapted through its weight "
                f"{self.host.kind!r}) runs one weight for the whole batch: mixed batches and compositions are not "
                "supported there")
        live = [n for n in self.active if n in self.adapters and n not in self.merged]
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            self.check_live(self.merged)
        w0 = self.host.weight_2d()
        w = w0
        for n in live:
            adapter = self.adapters[n]
            if adapter.is_additive():
                w = w + adapter.delta_weight().to(w0.dtype)
            else:
                w = w + (adapter.merge(w0, None)[0].to(w0.dtype) - w0)
        return self.host.run(w, (x, *args), kwargs)

    def _check_unmerged_for_condition(self) -> None:
        """A merged adapter runs as part of the host weight: it cannot follow per-sample conditions."""
        merged = [n for n in self.merged if self.adapters[n].uses_condition]
        if merged:
            raise PeftkitError(
                f"condition: adapter(s) {merged} read per-sample conditions but are merged into "
                f"{self.host.name!r}; unmerge before running under peftkit.condition"
            )

    def _delta(
        self, name: str, x: torch.Tensor, base_out: torch.Tensor, idx: torch.Tensor | None = None, batch: int = 0
    ) -> torch.Tensor:
        """Adapter ``name``'s delta on ``x`` (the samples ``idx`` of a mixed batch of ``batch``, or the whole
        batch); adapters that read condition ids get those of exactly these samples."""
        adapter = self.adapters[name]
        if not adapter.uses_condition:
            return adapter.delta(x, base_out)
        cond = self.condition
        if cond is not None:
            batch = batch if idx is not None else x.shape[0]
            if cond.shape[0] != batch:
                raise PeftkitError(
                    f"condition: {cond.shape[0]} condition ids given but layer {self.host.name!r} sees a batch of "
                    f"{batch}"
                )
            cond = cond.to(x.device)
            cond = cond if idx is None else cond.index_select(0, idx)
        return adapter.delta(x, base_out, condition=cond)

    def _forward_mixed(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        route = self.route
        assert route is not None
        route.check_batch(x, f"layer {self.host.name!r}")
        if self.merged:
            raise PeftkitError(
                f"layer {self.host.name!r} has merged adapters {self.merged}; unmerge before a mixed batch"
            )
        base_out = self.base_layer(x, *args, **kwargs)
        out = base_out
        routed = [n for n in route.groups if n != BASE and n in self.adapters]
        if len(routed) > 1:
            out, routed = self._batched(x, out, routed, route)
        for name in routed:  # the per-adapter path (index_add makes new tensors: base_out stays the base output)
            idx = route.groups[name].to(x.device)
            d = self._delta(name, x.index_select(0, idx), base_out.index_select(0, idx), idx, x.shape[0])
            out = out.index_add(0, idx, d.to(out.dtype))
        return out

    def _batched(
        self, x: torch.Tensor, out: torch.Tensor, routed: list[str], route: Route
    ) -> tuple[torch.Tensor, list[str]]:
        """Routed adapters whose classes share an :meth:`Adapter.batched_delta` run together in one call; returns
        the output so far and the adapters left for the one-``delta``-per-adapter path."""
        families: dict[Any, list[str]] = {}
        for n in routed:
            a = self.adapters[n]
            fn = getattr(type(a).batched_delta, "__func__", None)
            if fn is not None and fn is not Adapter.batched_delta.__func__ and not a.uses_condition:
                families.setdefault(fn, []).append(n)
        groups = [names for names in families.values() if len(names) > 1]
        batched = {n for names in groups for n in names}
        rest = [n for n in routed if n not in batched]
        base_out = out
        for name in rest:  # adapters without a shared hook first (they may read the untouched base output)
            idx = route.groups[name].to(x.device)
            d = self._delta(name, x.index_select(0, idx), base_out.index_select(0, idx), idx, x.shape[0])
            out = out.index_add(0, idx, d.to(out.dtype))
        left: list[str] = []
        for names in groups:
            adapters = [self.adapters[n] for n in names]
            # accumulate in place only into a tensor this layer made, or into the base output once nothing reads it
            inplace = out is not base_out or (len(groups) == 1 and not rest)
            y = type(adapters[0]).batched_delta(adapters, x, route.index(names, x.device), out, inplace)
            if y is None:
                left.extend(names)
            else:
                out = y
        return out, left

    # -- merging ---------------------------------------------------------------------------------------
    # Bookkeeping (exact): while an adapter is merged its parameters are frozen (requires_grad False; the previous
    # setting comes back on unmerge), so an optimiser cannot train it into a state that no longer matches the base
    # weight. Merge also keeps a copy of the adapter's own tensors (small next to the base weight): unmerge subtracts
    # exactly the update that was added even if the adapter was edited in place while merged (the edit then takes
    # effect once unmerged). A float host gets its weight back to rounding; a quantised host bit-exactly (snapshot).
    #
    # Several adapters (merge equals forward). The forward adds every active adapter's delta, each computed against
    # the unmerged host W0, so the merged weight is W0 + Σ_i (merge_i(W0) − W0). Additive adapters (ΔW independent of
    # W0, see Adapter.additive) commute, so with at most one non-additive adapter the layer folds that one first and
    # adds the others on top (invertible in reverse order, no copy of W0 kept); with two or more it sums their
    # updates taken from W0 and keeps W0 (a snapshot) for an exact unmerge. A non-additive adapter merged into a
    # layer that already holds merged adapters is folded again with them from W0. A non-additive adapter never runs
    # unmerged over a weight that holds other adapters (its output would differ from the unmerged model):
    # ``merge`` refuses to leave one so and the forward refuses to run one so.
    def _merge_names(self, names: Sequence[str] | None) -> list[str]:
        names = list(self.active if names is None else names)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PeftkitError(f"merge: adapter {dup[0]!r} named more than once; nothing was merged")
        return [n for n in names if n in self.adapters and n not in self.merged]

    def _additive(self, name: str) -> bool:
        return self.adapters[name].is_additive()

    def _fold_order(self, names: Sequence[str]) -> list[str]:
        """Non-additive adapters first, then the additive ones (whose updates are constants added on top)."""
        return [n for n in names if not self._additive(n)] + [n for n in names if self._additive(n)]

    def check_live(self, merged: Sequence[str], what: str = "") -> None:
        """Refuse when, with ``merged`` folded into the host, an active adapter left unmerged reads the host's
        output or weight (not :attr:`~peftkit.core.adapter.Adapter.additive`): it would compute on a weight holding
        the merged adapters, which the unmerged model does not do."""
        if not merged:
            return
        live = [n for n in self.active if n in self.adapters and n not in merged and not self._additive(n)]
        if live:
            n = live[0]
            head = f"{what}: " if what else ""
            raise PeftkitError(
                f"{head}adapter {n!r} ({self.adapters[n].method}) on {self.host.name!r} reads the layer's output or "
                f"weight, which would then hold the merged adapter(s) {list(merged)}; unmerged over them it computes "
                f"something else than the unmerged model. Merge or unmerge {n!r} together with them, or deactivate "
                f"it first"
            )

    def _state(self) -> tuple[Any, ...]:
        """An exact copy of the host's weight state (quantised codes, or the weight and bias as stored)."""
        return self.host.snapshot(force=True)

    @contextlib.contextmanager
    def _at_base(self) -> Iterator[None]:
        """For the duration of the block the host holds its weight from before any merge (bit-exactly its own weight
        again afterwards), so that adapters reading the host see what the unmerged model computes with."""
        host = self.host
        if not self.merged:
            yield
            return
        if self._snapshot is not None:
            current = self._state()
            host.restore(self._snapshot)
            try:
                yield
            finally:
                host.restore(current)
            return
        # a float host with no snapshot holds at most one non-additive adapter: undone exactly to rounding in reverse
        w = precision.upcast(host.weight_2d().detach()).clone()
        b = None if host.bias is None else precision.upcast(host.bias.detach()).clone()
        w, b = self._undo(self.merged, w, b)
        if host.substituted:  # no bias of its own; the weight may span several tensors (restored bit-exactly)
            current = self._state()
            host.write_weight_2d(w)
            try:
                yield
            finally:
                host.restore(current)
            return
        m = host.module
        kept_w = m.weight.data
        kept_b = None if m.bias is None else m.bias.data
        m.weight.data = host.to_native(w).to(kept_w.dtype)
        if kept_b is not None and b is not None:
            m.bias.data = b.to(kept_b.dtype)
        try:
            yield
        finally:
            m.weight.data = kept_w
            if kept_b is not None:
                m.bias.data = kept_b

    def _fold(self, names: Sequence[str], w: torch.Tensor, b: torch.Tensor | None) -> tuple[Any, Any]:
        """(w, b) with ``names`` folded in as the forward adds them (see the comment above)."""
        order = self._fold_order(names)
        multiplicative = [n for n in order if not self._additive(n)]
        if len(multiplicative) > 1:
            w0, b0 = w, b
            w, b = w0.clone(), None if b0 is None else b0.clone()
            for n in multiplicative:
                with self._as_merged(n):
                    wn, bn = self.adapters[n].merge(w0.clone(), None if b0 is None else b0.clone())
                w = w + (wn.to(w.dtype) - w0)
                if bn is not None:
                    db = bn if b0 is None else bn - b0.to(bn.dtype)
                    b = db if b is None else b + db.to(b.dtype)
            order = order[len(multiplicative):]
        for n in order:
            with self._as_merged(n):
                w, b = self.adapters[n].merge(w, b)
        return w, b

    def _undo(self, names: Sequence[str], w: torch.Tensor, b: torch.Tensor | None) -> tuple[Any, Any]:
        """(w, b) with ``names`` (at most one of them non-additive) taken out again, in reverse fold order."""
        for n in reversed(self._fold_order(names)):
            with self._as_merged(n):
                w, b = self.adapters[n].unmerge(w, b)
        return w, b

    @torch.no_grad()
    def _plan_merge(self, names: Sequence[str] | None) -> tuple[list[str], Any, Any, Any]:
        """(names to merge here, new 2-D weight, new bias, snapshot of the unmerged weight to keep or None)."""
        new = self._merge_names(names)
        if not new:
            return new, None, None, None
        host = self.host
        union = self.merged + new
        refold = bool(self.merged) and not all(self._additive(n) for n in new)
        need_snapshot = self._snapshot is None and (
            host.quantized or host.half or sum(not self._additive(n) for n in union) > 1)
        snap = None
        with self._at_base() if refold else contextlib.nullcontext():
            if need_snapshot:
                snap = self._state()
            w = precision.upcast(host.weight_2d().detach()).clone()
            b = None if host.bias is None else precision.upcast(host.bias.detach()).clone()
            w, b = self._fold(union if refold else new, w, b)
        if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
            raise PeftkitError(f"merging {new} into {host.name!r} gives non-finite weights; nothing was changed")
        host.check_writable(w)
        return new, w, b, snap

    @torch.no_grad()
    def merged_weights(self, names: Sequence[str] | None = None) -> tuple[list[str], Any, Any]:
        """(names to merge here, new 2-D weight, new bias) — computed and checked, nothing written; a bfloat16 /
        float16 weight is merged in float32 (rounded once when written, see :mod:`.precision`). Raises when the
        result is not finite, or when an active adapter left unmerged would read a weight holding merged ones
        (:meth:`check_live`)."""
        new = self._merge_names(names)
        self.check_live(self.merged + new, "merge")
        names, w, b, _ = self._plan_merge(new)
        return names, w, b

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        """Fold adapters into the host weight; checks for non-finite values before writing anything."""
        names, w, b, snap = self._plan_merge(names)
        if not names:
            return
        host = self.host
        if snap is not None:
            self._snapshot = snap
        if host.half:
            precision.check_merge_loss(host.name, names, host.weight_2d().detach(), w)
        self._write(w, b)
        for n in names:
            self._freeze(n)
        self.merged.extend(names)

    @staticmethod
    def _merge_inputs(adapter: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor an adapter's merge reads: its parameters and buffers, and those of the store it shares with
        the adapter's other layers (held as a plain attribute ``shared`` by all but the first layer); each once."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        shared = getattr(adapter, "shared", None)
        groups = [adapter] + ([shared] if isinstance(shared, nn.Module) else [])
        for prefix, m in zip(("", "shared."), groups):
            for k, t in [*m.named_parameters(), *m.named_buffers()]:
                if id(t) not in seen:
                    seen.add(id(t))
                    out[prefix + k] = t
        return out

    def _freeze(self, name: str) -> None:
        tensors = self._merge_inputs(self.adapters[name])
        self._merged_copy[name] = {k: t.detach().clone() for k, t in tensors.items()}
        for p in tensors.values():
            if not isinstance(p, nn.Parameter):
                continue
            entry = _FROZEN.get(p)
            if entry is None:
                _FROZEN[p] = [1, p.requires_grad]
                p.requires_grad_(False)
            else:
                entry[0] += 1

    def _thaw(self, name: str) -> None:
        self._merged_copy.pop(name, None)
        adapter = self.adapters[name]  # its frozen_parameters() are never trained: they stay frozen after an unmerge
        for k, p in self._merge_inputs(adapter).items():
            entry = _FROZEN.get(p)
            if entry is None:
                continue
            entry[0] -= 1
            if entry[0] <= 0:
                del _FROZEN[p]
                p.requires_grad_(entry[1] and not adapter.is_frozen(k))

    @contextlib.contextmanager
    def _as_merged(self, name: str) -> Iterator[None]:
        """Adapter ``name`` holds the tensors it had when it was merged (for an exact unmerge), then its own again."""
        adapter, kept_copy = self.adapters[name], self._merged_copy.get(name)
        if kept_copy is None:
            yield
            return
        live = self._merge_inputs(adapter)
        own = {k: t.data for k, t in live.items() if k in kept_copy}
        try:
            for k in own:
                live[k].data = kept_copy[k]
            yield
        finally:
            for k, v in own.items():
                live[k].data = v

    @torch.no_grad()
    def unmerge(self, names: Sequence[str] | None = None) -> None:
        names = list(self.merged if names is None else [n for n in names if n in self.merged])
        if not names:
            return
        host = self.host
        if self._snapshot is not None:  # back to the exact weight before any merge, then re-merge the rest
            host.restore(self._snapshot)
            for n in names:
                self._thaw(n)
            self.merged = [n for n in self.merged if n not in names]
            rest, self.merged = self.merged, []
            for n in rest:
                self._thaw(n)
            self._snapshot, self.merge_error = None, None
            self.merge(rest)
            return
        rest = [n for n in self.merged if n not in names]
        if rest and not all(self._additive(n) for n in names):  # it sits under the additive ones: refold the rest
            self.unmerge()
            self.merge(rest)
            return
        w = host.weight_2d().detach().clone()
        b = None if host.bias is None else host.bias.detach().clone()
        w, b = self._undo(names, w, b)
        self._write(w, b)
        for n in names:
            self._thaw(n)
        self.merged = [n for n in self.merged if n not in names]

    def _write(self, w2d: torch.Tensor, b: torch.Tensor | None) -> None:
        host = self.host
        err = host.write_weight_2d(w2d)
        if err is not None:
            self.merge_error = err
        if b is not None:
            if host.bias is None:
                host.module.bias = nn.Parameter(b.to(host.weight.dtype) if host.half else b, requires_grad=False)
            else:
                host.bias.data.copy_(b)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


class SubstitutedLayer(AdaptedLayer):
    """The adapted layer of a substituted host (:data:`~peftkit.core.host.SUBSTITUTED_KINDS`: the module runs with
    its weight replaced, see :meth:`AdaptedLayer._forward_substituted`), which also answers for the module's own
    attributes (a parent module may read them instead of calling it)."""

    def __getattr__(self, item: str) -> Any:
        """A substituted host's module attributes (an nn.MultiheadAttention's ``batch_first``, ``in_proj_weight``,
        ...) read through the wrapper while nothing unmerged is live on it — its weights are then what the layer
        computes with. With a live adapter, code reading them (nn.TransformerEncoderLayer's inference fast path runs
        attention from them) would skip the adapter: refused, saying what to do."""
        try:
            return super().__getattr__(item)
        except AttributeError:
            host, base = self.__dict__.get("host"), self.__dict__.get("_modules", {}).get("base_layer")
            if host is None or base is None or not host.substituted or not hasattr(base, item):
                raise
            live = [n for n in self.__dict__.get("active", []) if n not in self.__dict__.get("merged", [])]
            if live and not self.__dict__.get("disabled", False):
                raise AttributeError(
                    f"{item!r} of {type(base).__name__} {host.name!r} is read past its adapter(s) {live}, which "
                    f"act through its weights when it runs (e.g. nn.TransformerEncoderLayer's inference fast path "
                    f"reads them instead): merge the adapter (peftkit.merge) or run in training mode") from None
            return getattr(base, item)


class SavedModule(nn.Module):
    """``modules_to_save``: the original module (frozen) plus a trainable copy per adapter."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.route: Route | None = None

    def add(self, name: str) -> nn.Module:
        c = copy.deepcopy(self.original_module)
        for p in c.parameters():
            p.requires_grad_(True)
        self.copies[name] = c
        return c

    def __getattr__(self, item: str) -> Any:
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(self._modules["original_module"], item)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.route is not None:
            route = self.route
            route.check_batch(x, "a modules_to_save module")
            out = self.original_module(x, *args, **kwargs)
            for name, idx in route.groups.items():
                if name in self.copies:
                    idx = idx.to(x.device)
                    out = out.index_copy(0, idx, self.copies[name](x.index_select(0, idx), *args, **kwargs))
            return out
        mod = self.copies[self.active] if self.active in self.copies else self.original_module
        return mod(x, *args, **kwargs)
