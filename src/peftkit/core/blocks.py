"""Composition blocks (AdapterHub's ``Stack``, ``Parallel``, ``Fuse``, ``Split``, ``BatchSplit``, ``Average``): a
small tree of adapter names set as the model's active composition. It names no method: every rule below is written
in terms of the adapter protocol (``delta(x, base_out)``, ``merge``, :meth:`Adapter.stacks`).

On one adapted layer with host output ``h = W·x`` (each node maps the output it is given to a new output):

- a name ``a``:            ``h + δ_a(x, h)`` (the adapter alone; ``h`` where the layer has no adapter ``a``);
- ``Stack(a, b, …)``:      ``b`` applied on ``a``'s output: ``h_a = a(h)``, then ``b(h_a)`` — a later member must read
  the host only through its output (:meth:`Adapter.stacks`: additive or output-only adapters), else refused;
- ``Parallel(a, b, …)``:   the model's input batch is replicated k times (one forward of k·B rows); rows
  ``[iB, (i+1)B)`` go through child ``i``;
- ``Split(a, b, splits=i)``: positions ``[0, i)`` of the sequence (dim 1) through ``a``, the rest through ``b``;
- ``BatchSplit(a, b, batch_sizes=[n_a, n_b])``: the first ``n_a`` rows through ``a``, the next ``n_b`` through ``b``
  (what :func:`peftkit.mixed_batch` does with ``[a]*n_a + [b]*n_b``);
- ``Average(a, b, weights=[w_a, w_b])``: ``Σ w_i·child_i(h)`` (weights normalised to sum 1 unless
  ``normalize_weights=False``) — output space; weight-space averaging is :func:`peftkit.combine`;
- ``Fuse(a, b, …)`` (AdapterFusion, Pfeiffer et al. 2021, as AdapterHub's ``BertFusion`` with its default dynamic
  configuration): with ``d_i = child_i(h) − h``, ``q = Q·h``, ``k_i = K·d_i``, ``v_i = V·d_i``,
  ``p = softmax_i(q·k_i)``, the output is ``h + Σ_i p_i·v_i``; Q, K (bias, N(0, 0.02) weights) and V (identity,
  no bias) are per layer and trainable, the fused adapters frozen while the fusion is active.

Merging: a composition merges as one (``peftkit.merge(model)`` while it is active): a name folds as its own
``merge``, ``Stack`` folds its members in order onto the weight so far, ``Average`` takes ``Σ w_i·W_i`` of its
children's folded weights (exact: each child is affine in x). ``Parallel``, ``Split``, ``BatchSplit`` and ``Fuse``
cannot be one weight: refused, naming the block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import io
from . import model_level as ml
from . import state as m  # what is on a model; model.py's own API is bound below (no import circle)
from .errors import PeftkitError
from .host import CONV_KINDS

FORMAT = "peftkit_fusion"


#: model.py's functions this module calls (``set_active``, ``adapter_id``, ``check_mergeable``), bound by model.py
#: when it is imported: model.py calls into the blocks, so the blocks must not import model.py back
_MODEL_API: dict[str, Any] = {}


def bind_model_api(**functions: Any) -> None:
    _MODEL_API.update(functions)


class Block:
    """A composition node: ordered children (adapter names or blocks)."""

    mergeable = True

    def run_layer(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The adapted ``layer``'s output with this composition active (the layer calls it: no import of this
        module from the layer, so the core has no import circle)."""
        return forward(layer, self, x, *args, **kwargs)

    def __init__(self, *children: Any) -> None:
        if len(children) == 1 and isinstance(children[0], list | tuple):
            children = tuple(children[0])
        if len(children) < 2:
            raise PeftkitError(f"{type(self).__name__} needs at least two adapters, got {list(children)!r}")
        for c in children:
            if not isinstance(c, str | Block) or (isinstance(c, str) and not c):
                raise PeftkitError(f"{type(self).__name__}: children are adapter names or blocks, got {c!r}")
        self.children: tuple[Any, ...] = tuple(children)

    def names(self) -> list[str]:
        """Every adapter name under this block, in order, each once."""
        out: list[str] = []
        for c in self.children:
            for n in ([c] if isinstance(c, str) else c.names()):
                if n not in out:
                    out.append(n)
        return out

    def walk(self) -> Iterator[Block]:
        yield self
        for c in self.children:
            if isinstance(c, Block):
                yield from c.walk()

    def _args(self) -> list[str]:
        return [repr(c) for c in self.children]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._args())})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


class Stack(Block):
    """``b`` applied on ``a``'s output, per layer."""


class Parallel(Block):
    """The batch replicated, each copy through its child, in one forward (output: k·B rows)."""

    mergeable = False


class Average(Block):
    """Output-space weighted average of the children's outputs."""

    def __init__(self, *children: Any, weights: Sequence[float] | None = None, normalize_weights: bool = True):
        super().__init__(*children)
        n = len(self.children)
        w = [1.0 / n] * n if weights is None else list(weights)
        if len(w) != n or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                                  for x in w):
            raise PeftkitError(f"Average: weights must be {n} finite numbers (one per child), got {weights!r}")
        if normalize_weights:
            total = sum(w)
            if total == 0:
                raise PeftkitError("Average: the weights sum to 0 and cannot be normalised; pass "
                                   "normalize_weights=False")
            w = [x / total for x in w]
        self.weights = [float(x) for x in w]

    def _args(self) -> list[str]:
        return [*super()._args(), f"weights={self.weights}"]


class Split(Block):
    """Sequence positions ``[0, splits)`` through the first child, the rest through the second."""

    mergeable = False

    def __init__(self, *children: Any, splits: int):
        super().__init__(*children)
        if len(self.children) != 2:
            raise PeftkitError(f"Split takes two children (before / after the split index), got {len(self.children)}")
        if isinstance(splits, bool) or not isinstance(splits, int) or splits < 0:
            raise PeftkitError(f"Split: splits must be a non-negative position index, got {splits!r}")
        self.splits = splits

    def _args(self) -> list[str]:
        return [*super()._args(), f"splits={self.splits}"]


class BatchSplit(Block):
    """Batch rows split by ``batch_sizes``, each block of rows through its child (= :func:`peftkit.mixed_batch`)."""

    mergeable = False

    def __init__(self, *children: Any, batch_sizes: Sequence[int]):
        super().__init__(*children)
        sizes = list(batch_sizes) if isinstance(batch_sizes, Sequence) else None
        if sizes is None or len(sizes) != len(self.children) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
            raise PeftkitError(f"BatchSplit: batch_sizes must be {len(self.children)} non-negative integers (one per "
                               f"child), got {batch_sizes!r}")
        self.batch_sizes = sizes

    def _args(self) -> list[str]:
        return [*super()._args(), f"batch_sizes={self.batch_sizes}"]


class Fuse(Block):
    """AdapterFusion over the children's outputs; its per-layer query/key/value live under ``name``."""

    mergeable = False

    def __init__(self, *children: Any, name: str | None = None):
        super().__init__(*children)
        for c in self.children:
            if not isinstance(c, str):
                raise PeftkitError(f"Fuse: fuses adapters by name, got the block {c!r}")
        self.name = name or ",".join(self.children)

    def _args(self) -> list[str]:
        return [*super()._args(), f"name={self.name!r}"]


# -- the per-layer fusion module ---------------------------------------------------------------------------------
class FusionLayer(nn.Module):
    """AdapterHub's ``BertFusion`` (query, key, value; value before softmax; residual after; temperature 1)."""

    def __init__(self, d: int, device: Any = None) -> None:
        super().__init__()
        self.query = nn.Linear(d, d, device=device)
        self.key = nn.Linear(d, d, device=device)
        self.value = nn.Linear(d, d, bias=False, device=device)
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            self.value.weight.copy_(torch.eye(d, device=device))

    def forward(self, h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """``h`` (..., d), ``deltas`` (..., n, d) → ``h + Σ_i p_i·V·d_i``."""
        dt = self.query.weight.dtype
        q = self.query(h.to(dt)).unsqueeze(-2)  # (..., 1, d)
        k = self.key(deltas.to(dt))  # (..., n, d)
        v = self.value(deltas.to(dt))
        p = torch.softmax((q * k).sum(-1), dim=-1)  # (..., n)
        return h + (p.unsqueeze(-1) * v).sum(-2).to(h.dtype)


def _fusions(layer: nn.Module) -> nn.ModuleDict:
    if "fusions" not in layer._modules:
        layer.fusions = nn.ModuleDict()
    return layer._modules["fusions"]


def fusion_names(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("peftkit_fusions", {}))


def add_fusion(model: nn.Module, fuse: Fuse) -> str:
    """Create the trainable fusion layers of ``fuse`` (one per layer holding any fused adapter); returns its name."""
    if not isinstance(fuse, Fuse):
        raise PeftkitError(f"add_fusion takes a Fuse block, got {fuse!r}")
    fusions = model.__dict__.setdefault("peftkit_fusions", {})
    if fuse.name in fusions:
        if fusions[fuse.name] != list(fuse.children):
            raise PeftkitError(f"fusion {fuse.name!r} already fuses {fusions[fuse.name]}, not {list(fuse.children)}")
        return fuse.name
    if fuse.name in m.adapter_names(model):
        raise PeftkitError(f"fusion name {fuse.name!r} is an adapter's name; pick another name=")
    for n in fuse.children:
        m.get_config(model, n)
        if n in ml.model_adapters(model):
            raise PeftkitError(f"Fuse: {n!r} ({m.get_config(model, n).method}) is a model-level method; it has no "
                               "per-layer output to fuse")
    made = 0
    for _, layer in m.adapted_layers(model):
        if any(n in layer.adapters for n in fuse.children):
            w = layer.host.weight
            _fusions(layer)[fuse.name] = FusionLayer(layer.host.d_out, device=w.device).train(layer.training)
            made += 1
    if not made:
        raise PeftkitError(f"Fuse: adapters {list(fuse.children)} adapt no layer")
    fusions[fuse.name] = list(fuse.children)
    return fuse.name


def delete_fusion(model: nn.Module, name: str) -> None:
    fusions = model.__dict__.get("peftkit_fusions", {})
    if name not in fusions:
        raise PeftkitError(f"no fusion named {name!r}; fusions: {sorted(fusions) or '(none)'}")
    block = active_block(model)
    if block is not None and any(isinstance(b, Fuse) and b.name == name for b in block.walk()):
        _MODEL_API["set_active"](model, [])
    for _, layer in m.adapted_layers(model):
        if "fusions" in layer._modules and name in layer.fusions:
            del layer.fusions[name]
    del fusions[name]


def fusion_regularization(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """AdapterFusion's regulariser ``Σ_layers ‖I − V‖²`` over the value matrices of fusion ``name`` (default: every
    fusion), keeping V near the identity; add ``λ·`` it to the training loss (AdapterHub uses λ = 0.01)."""
    names = fusion_names(model) if name is None else [name]
    terms = [((torch.eye(f.value.weight.shape[0], device=f.value.weight.device) - f.value.weight) ** 2).sum()
             for _, layer in m.adapted_layers(model) if "fusions" in layer._modules
             for n, f in layer.fusions.items() if n in names]
    if not terms:
        raise PeftkitError(f"fusion_regularization: no fusion layers for {names or '(no fusions)'}")
    return torch.stack(terms).sum()


def fusion_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    if name not in fusion_names(model):
        raise PeftkitError(f"no fusion named {name!r}; fusions: {fusion_names(model) or '(none)'}")
    return {f"fusion.{path}.{k}": v for path, layer in m.adapted_layers(model)
            if "fusions" in layer._modules and name in layer.fusions
            for k, v in layer.fusions[name].state_dict().items()}


def save_fusion(model: nn.Module, directory: Any, name: str, *, overwrite: bool = False) -> None:
    tensors = fusion_state_dict(model, name)
    meta = {"format": FORMAT, "format_version": 1, "name": name, "adapters": model.__dict__["peftkit_fusions"][name],
            "base_model_class": type(model).__name__}
    ident = _MODEL_API["adapter_id"](model, "fusion:" + name)
    io.write_adapter(directory, meta, tensors, {"format": "pt", io.ID_KEY: ident}, overwrite=overwrite)


def is_fusion(meta: dict[str, Any]) -> bool:
    return meta.get("format") == FORMAT


def load_fusion(model: nn.Module, directory: Any, name: str | None = None) -> str:
    """Load a fusion saved by :func:`save_fusion` (its adapters must be loaded already); not activated."""
    files = io.read_adapter_files(directory)
    meta = files.config
    adapters = meta.get("adapters")
    if not isinstance(adapters, list) or len(adapters) < 2 or not all(isinstance(a, str) for a in adapters):
        raise PeftkitError(f"{directory}: a fusion's 'adapters' must list at least two adapter names")
    missing = [a for a in adapters if a not in m.adapter_names(model)]
    if missing:
        raise PeftkitError(f"{directory}: the fusion fuses adapters {missing} which this model does not hold; load "
                           "them first")
    name = name or meta.get("name") or ",".join(adapters)
    if name in fusion_names(model):
        raise PeftkitError(f"a fusion named {name!r} is already loaded; pass another name= or delete it first")
    tensors = files.tensors()
    io.check_finite(tensors, str(directory))
    add_fusion(model, Fuse(*adapters, name=name))
    try:
        expected = fusion_state_dict(model, name)
        if set(expected) != set(tensors):
            extra = sorted(set(tensors) ^ set(expected))
            raise PeftkitError(f"{directory}: fusion tensor {extra[0]!r} does not match this model's layers")
        for k, v in expected.items():
            if tuple(v.shape) != tuple(tensors[k].shape):
                raise PeftkitError(f"{directory}: fusion tensor {k!r} has shape {tuple(tensors[k].shape)} in the "
                                   f"file but {tuple(v.shape)} in this model")
        with torch.no_grad():
            for k, v in expected.items():
                v.copy_(tensors[k])
    except PeftkitError:
        delete_fusion(model, name)
        raise
    return name


# -- activation -------------------------------------------------------------------------------------------------
def active_block(model: nn.Module) -> Block | None:
    return model.__dict__.get("peftkit_block")


def validate(model: nn.Module, block: Block) -> None:
    """Refuse what cannot compose (naming the adapters involved), before anything changes."""
    names = block.names()
    for n in names:
        m.get_config(model, n)
    level = [n for n in names if n in ml.model_adapters(model)]
    if len(level) > 1:
        a, b = level[:2]
        raise PeftkitError(f"{type(block).__name__}: {a!r} ({m.get_config(model, a).method}) and {b!r} "
                           f"({m.get_config(model, b).method}) are both model-level methods (they rewrite the whole "
                           "input); they cannot be composed — at most one can be active")
    if level and not (isinstance(block, Stack) and level[0] in block.children):
        n = level[0]
        raise PeftkitError(f"{block!r}: {n!r} ({m.get_config(model, n).method}) is a model-level method; it can only "
                           "be a direct member of a top-level Stack (it changes the whole call, not one layer)")
    parallels = [b for b in block.walk() if isinstance(b, Parallel)]
    if len(parallels) > 1 or (parallels and parallels[0] is not block and not (
            isinstance(block, Stack) and parallels[0] in block.children)):
        raise PeftkitError("Parallel must be the composition itself or a member of a top-level Stack, once")
    fusions = model.__dict__.get("peftkit_fusions", {})
    for b in block.walk():
        if isinstance(b, Stack):
            _check_stack(model, b)
        if isinstance(b, Fuse) and b.name in fusions and fusions[b.name] != list(b.children):
            raise PeftkitError(f"fusion {b.name!r} already fuses {fusions[b.name]}, not {list(b.children)}; pass "
                               "another name=")
        if isinstance(b, Fuse) and b.name in m.adapter_names(model):
            raise PeftkitError(f"fusion name {b.name!r} is an adapter's name; pick another name=")


def _check_stack(model: nn.Module, stack: Stack) -> None:
    for i, c in enumerate(stack.children[1:], 1):
        below = stack.children[i - 1]
        for n in [c] if isinstance(c, str) else c.names():
            for path, layer in m.adapted_layers(model):
                if n in layer.adapters and not layer.adapters[n].stacks():
                    prev = below if isinstance(below, str) else repr(below)
                    raise PeftkitError(
                        f"Stack: {n!r} ({m.get_config(model, n).method}) cannot be applied on the output of {prev!r}"
                        f" ({m.get_config(model, below).method if isinstance(below, str) else 'a block'}): on "
                        f"{path!r} it reads the layer's input or weight, not its output. Put it first in the Stack")


def activate(model: nn.Module, block: Block | None) -> None:
    """Install ``block`` as the active composition (None: a plain list of names, summed); called by ``set_active``
    (after :func:`validate`) before it refreshes what trains."""
    if block is None:
        model.__dict__.pop("peftkit_block", None)
    else:
        model.__dict__["peftkit_block"] = block
    for _, layer in m.adapted_layers(model):
        layer.block = block if block is not None and any(n in layer.adapters for n in block.names()) else None
    _set_replicate(model, next((b for b in (block.walk() if block else ()) if isinstance(b, Parallel)), None))
    for f in (b for b in block.walk() if isinstance(b, Fuse)) if block is not None else ():
        add_fusion(model, f)


def set_trainable(model: nn.Module, trainable: bool) -> None:
    """Under an active ``Fuse`` the fused adapters stay frozen and its fusion layers train (AdapterHub's
    ``train_adapter_fusion``); called at the end of the core's trainable refresh."""
    block = active_block(model)
    if block is None or model.__dict__.get("peftkit_block_merged"):
        return
    for f in (b for b in block.walk() if isinstance(b, Fuse)):
        for _, layer in m.adapted_layers(model):
            for n in f.children:
                if n in layer.adapters:
                    layer.adapters[n].requires_grad_(False)
            if "fusions" in layer._modules and f.name in layer.fusions:
                layer.fusions[f.name].requires_grad_(trainable)


def on_delete(model: nn.Module, name: str) -> None:
    """Adapter ``name`` is being deleted: fusions over it go with it."""
    for f, children in list(model.__dict__.get("peftkit_fusions", {}).items()):
        if name in children:
            delete_fusion(model, f)


@contextlib.contextmanager
def active(model: nn.Module, block: Block | Sequence[str] | str) -> Iterator[nn.Module]:
    """``with active(model, Stack("a", "b")): model(x)`` — the composition for the block, then the previous one."""
    prev = active_block(model) or m.active_adapters(model)
    _MODEL_API["set_active"](model, block)
    try:
        yield model
    finally:
        _MODEL_API["set_active"](model, prev)


def _replicate(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Parallel: every tensor argument with the batch's leading size is repeated k times (copy i → child i)."""
    k = model.__dict__.get("peftkit_parallel", 0)
    if not k:
        return None
    first = next((t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if first is None:
        return None
    b = first.shape[0]

    def rep(t: Any) -> Any:
        return torch.cat([t] * k) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b else t

    return tuple(rep(a) for a in args), {n: rep(v) for n, v in kwargs.items()}


def _set_replicate(model: nn.Module, par: Parallel | None) -> None:
    hooks = model._forward_pre_hooks
    for hid in [h for h, fn in hooks.items() if fn is _replicate]:
        del hooks[hid]
        model._forward_pre_hooks_with_kwargs.pop(hid, None)
    model.__dict__.pop("peftkit_parallel", None)
    if par is not None:
        model.__dict__["peftkit_parallel"] = len(par.children)
        model.register_forward_pre_hook(_replicate, with_kwargs=True, prepend=True)


# -- the per-layer forward ----------------------------------------------------------------------------------------
def forward(layer: Any, block: Block, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if layer.route is not None:
        raise PeftkitError(f"mixed_batch routes each sample to one adapter, but the composition {block!r} is active;"
                           " use BatchSplit, or set_active a list of names first")
    h = layer.base_layer(x, *args, **kwargs)
    return _run(layer, block, x, h)


def _run(layer: Any, node: Any, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if isinstance(node, str):
        return h + layer._delta(node, x, h).to(h.dtype) if node in layer.adapters else h
    if isinstance(node, Stack):
        for c in node.children:
            h = _run(layer, c, x, h)
        return h
    if isinstance(node, Average):
        return sum(w * _run(layer, c, x, h) for w, c in zip(node.weights, node.children))
    if isinstance(node, Fuse):
        fusion = layer.fusions[node.name] if "fusions" in layer._modules and node.name in layer.fusions else None
        if fusion is None:
            raise PeftkitError(f"Fuse: layer {layer.host.name!r} has no fusion {node.name!r}; add it with "
                               "peftkit.compose.add_fusion")
        deltas = torch.stack([_run(layer, c, x, h) - h for c in node.children], dim=-2)
        return fusion(h, deltas)
    if isinstance(node, Parallel | BatchSplit):
        if isinstance(node, Parallel):
            k = len(node.children)
            if x.shape[0] % k:
                raise PeftkitError(f"Parallel: layer {layer.host.name!r} sees a batch of {x.shape[0]}, not a "
                                   f"multiple of {k} copies")
            sizes = [x.shape[0] // k] * k
        else:
            sizes = node.batch_sizes
            if sum(sizes) != x.shape[0]:
                raise PeftkitError(f"BatchSplit: batch_sizes {sizes} sum to {sum(sizes)} but layer "
                                   f"{layer.host.name!r} sees a batch of {x.shape[0]}")
        outs = [_run(layer, c, xi, hi) for c, xi, hi in
                zip(node.children, x.split(sizes), h.split(sizes))]
        return torch.cat(outs)
    if isinstance(node, Split):
        if h.dim() < 3 or layer.host.kind in CONV_KINDS:
            raise PeftkitError(f"Split: layer {layer.host.name!r} ({layer.host.kind}) has no sequence dimension to "
                               "split (Split needs (batch, positions, …) inputs)")
        i = min(node.splits, x.shape[1])
        a, b = node.children
        return torch.cat([_run(layer, a, x[:, :i], h[:, :i]), _run(layer, b, x[:, i:], h[:, i:])], dim=1)
    raise PeftkitError(f"unknown composition block {node!r}")  # pragma: no cover


# -- merging ------------------------------------------------------------------------------------------------------
def check_merge(model: nn.Module, block: Block) -> None:
    for b in block.walk():
        if not b.mergeable:
            raise PeftkitError(f"merge: the composition block {b!r} cannot be merged into one weight "
                               f"({type(b).__name__} runs its adapters on different inputs / rows or mixes them "
                               "by their outputs); nothing was merged")


def _fold(layer: Any, node: Any, w: torch.Tensor, b: torch.Tensor | None) -> tuple[Any, Any]:
    if isinstance(node, str):
        return layer.adapters[node].merge(w, b) if node in layer.adapters else (w, b)
    if isinstance(node, Stack):
        for c in node.children:
            w, b = _fold(layer, c, w, b)
        return w, b
    if not isinstance(node, Average):
        raise PeftkitError(f"merge: the composition block {node!r} cannot merge")
    parts = [_fold(layer, c, w.clone(), None if b is None else b.clone()) for c in node.children]
    w_new = sum(wt * pw for wt, (pw, _) in zip(node.weights, parts))
    if all(pb is None for _, pb in parts):
        return w_new, None
    zero = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return w_new, sum(wt * (zero if pb is None else pb) for wt, (_, pb) in zip(node.weights, parts))


@torch.no_grad()
def merge(model: nn.Module, block: Block) -> None:
    """Fold the whole composition into the host weights (see the module docstring); all checked before any write."""
    check_merge(model, block)
    _MODEL_API["check_mergeable"](model, block.names())
    plans = []
    for _, layer in m.adapted_layers(model):
        if layer.block is None:
            continue
        if layer.merged:
            raise PeftkitError(f"merge: layer {layer.host.name!r} already holds merged adapters {layer.merged}; "
                               "unmerge first")
        from . import precision

        host = layer.host
        w = precision.upcast(host.weight_2d().detach()).clone()
        bias = None if host.bias is None else precision.upcast(host.bias.detach()).clone()
        w, bias = _fold(layer, block, w, bias)
        if not torch.isfinite(w).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise PeftkitError(f"merging {block!r} into {host.name!r} gives non-finite weights; nothing was changed")
        plans.append((layer, w, bias))
    for layer, w, bias in plans:
        layer._snapshot = layer._state()  # unmerge restores the exact weight
        layer._write(w, bias)
        names = [n for n in block.names() if n in layer.adapters]
        for n in names:
            layer._freeze(n)
        layer.merged.extend(names)
    model.__dict__["peftkit_block_merged"] = True
