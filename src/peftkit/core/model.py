"""The model-level API. Everything happens in place on the user's ``nn.Module``: host layers are replaced by
:class:`AdaptedLayer` wrappers, the adapter configs are kept on the model (``model.peftkit_configs``), and the
model keeps its own ``forward``, ``generate`` and ``save_pretrained``."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from . import blocks, conventions, io, precision, registry
from . import model_level as ml
from .adapter import Adapter, PlanContext, SharedStore, ranks_from_file
from .config import AdapterConfig
from .errors import PeftkitError
from .host import QUANTIZED_KINDS, Host, host_kind
from .layer import AdaptedLayer, Route, SavedModule, SubstitutedLayer
from .state import (  # what is on a model: shared with the PEFT format (hf) and the procedures, no circle
    active_adapters,
    adapted_layers,
    adapter_names,
    adapter_state_dict,
    get_config,
)
from .state import adapter_bias_params as _adapter_bias_params
from .state import bias_params as _bias_params
from .state import configs as _configs
from .state import saved_modules as _saved_modules
from .state import single_name as _single_name
from .targeting import _matches, find_parameter_targets, find_targets

FORMAT_VERSION = 2  # 2: the weights carry sha256 checksums of the unit (1: older files, still read)


# -- bookkeeping on the model ---------------------------------------------------------------------------
def _adapter_id(model: nn.Module, name: str, new: str | None = None) -> str:
    """The identity of adapter ``name`` (random at creation, read from the file at load): saving over a folder that
    holds an adapter with another identity needs ``overwrite=True``; re-saving the same adapter does not."""
    ids = model.__dict__.setdefault("peftkit_ids", {})
    if new is not None:
        ids[name] = new
    return ids.setdefault(name, uuid.uuid4().hex)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# -- planning (build everything, change nothing) --------------------------------------------------------
@dataclass
class _Plan:
    name: str
    config: AdapterConfig
    layers: list[tuple[str, nn.Module, Host, Adapter]] = field(default_factory=list)
    saved: list[tuple[str, nn.Module]] = field(default_factory=list)
    biases: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    shared: SharedStore | None = None
    model_adapter: ml.ModelAdapter | None = None  # model-level methods: one adapter for the whole model


def _plan(model: nn.Module, config: AdapterConfig, name: str) -> _Plan:
    if not isinstance(config, AdapterConfig):
        raise PeftkitError(f"expected an adapter config, got {type(config).__name__}")
    if not isinstance(name, str) or not name or "." in name or name == "__base__":
        raise PeftkitError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in _configs(model):
        raise PeftkitError(f"an adapter named {name!r} already exists; loaded adapters: {adapter_names(model)}")
    info = registry.get(config.method)
    config = config.resolve(model)
    plan = _Plan(name, config)
    targets: list[tuple[str, nn.Module, Host]] = []
    params = {} if info.model_level else {p: (m, n) for p, m, n in find_parameter_targets(model, config)}
    found = [] if info.model_level else find_targets(model, config)
    both = next((p for p, _ in found if p in params), None)
    if both is not None:
        raise PeftkitError(f"module {both!r} is targeted both as a layer (target_modules) and through its parameter "
                           f"{params[both][1]!r} (target_parameters); target it one way")
    if params:  # in model order, with the module targets
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        found = sorted(found + [(p, m) for p, (m, _) in params.items()], key=lambda pm: order[pm[0]])
    for path, module in found:
        layer = module if isinstance(module, AdaptedLayer) else None
        host = layer.host if layer is not None else Host(module, path, param=params.get(path, (None, None))[1])
        if host.kind not in info.hosts:
            raise PeftkitError(
                f"method {info.name!r} does not support {type(host.module).__name__} layers "
                f"(module {path!r}); it supports: {', '.join(info.hosts)}"
            )
        targets.append((path, module, host))
    if info.model_level:
        plan.model_adapter = info.adapter(model, config)
    elif info.adapter.uses_context:
        plan.shared = SharedStore()
        hosts = [(p, h) for p, _, h in targets]
        for i, (path, module, host) in enumerate(targets):
            ctx = PlanContext(name, hosts, i, plan.shared)
            plan.layers.append((path, module, host, info.adapter.create(host, config.for_module(path), ctx)))
        # the first layer's adapter owns the store: saved, trained and copied once, through that adapter
        plan.layers[0][3].add_module("shared_store", plan.shared)
    else:
        for path, module, host in targets:
            plan.layers.append((path, module, host, info.adapter.create(host, config.for_module(path))))
    precision.prepare_adapters(info, model, [h for *_, h, _ in plan.layers], [a for *_, a in plan.layers]
                               + ([plan.model_adapter] if plan.model_adapter is not None else []))
    for target in config.modules_to_save or []:
        found = [(n, m) for n, m in model.named_modules() if n and _matches(n, [target])
                 and not isinstance(m, AdaptedLayer) and ".original_module" not in n and ".copies." not in n
                 and not n.startswith(ml.CONTAINER)]
        if not found:
            leaves = sorted({n.split(".")[-1] for n, _ in model.named_children()})
            raise PeftkitError(f"modules_to_save entry {target!r} matched no module; top-level modules: {leaves}")
        plan.saved.extend(found)
    if config.bias != "none":
        plan.biases = _bias_params(model, config.bias, {p for p, *_ in plan.layers})
    return plan


def _install(model: nn.Module, plan: _Plan) -> None:
    for path, module, host, adapter in plan.layers:
        layer = module if isinstance(module, AdaptedLayer) else None
        if layer is None:
            wrap = SubstitutedLayer if host.substituted else AdaptedLayer
            layer = wrap(module, host).train(module.training)  # new modules follow the model's mode
            _set_submodule(model, path, layer)
        layer.adapters[plan.name] = adapter.train(layer.training)
        adapter.on_install()
    if plan.model_adapter is not None:
        ml.install(model, plan.name, plan.model_adapter)
    for path, module in plan.saved:
        wrapper = module if isinstance(module, SavedModule) else None
        if wrapper is None:
            wrapper = SavedModule(module).train(module.training)
            _set_submodule(model, path, wrapper)
        wrapper.add(plan.name)
    _configs(model)[plan.name] = plan.config


def _refresh_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Freeze everything, then unfreeze the active adapters, their saved modules and configured biases (an adapter
    whose config has ``inference_mode`` stays frozen, as in Hugging Face PEFT)."""
    configs = _configs(model)
    active = {n for n in active_adapters(model) if not getattr(configs.get(n), "inference_mode", False)}
    for p in model.parameters():
        p.requires_grad_(False)
    if not trainable:
        return
    for _, layer in adapted_layers(model):
        for n, a in layer.adapters.items():
            if n in active and n not in layer.merged:  # a merged adapter stays frozen until unmerged
                for p in a.trainable_tensors().values():  # not its frozen_parameters()
                    p.requires_grad_(True)
    for _, sm in _saved_modules(model):
        for n, c in sm.copies.items():
            if n in active:
                for p in c.parameters():
                    p.requires_grad_(True)
    for n in active:
        for _, p in _adapter_bias_params(model, n):
            p.requires_grad_(True)
    for n, a in ml.model_adapters(model).items():
        if n in active:
            a.requires_grad_(True)
    if "peftkit_block" in model.__dict__:
        blocks.set_trainable(model, trainable)


# -- public API -----------------------------------------------------------------------------------------
def adapt(model: nn.Module, config: AdapterConfig, name: str = "default", *, activate: bool = True) -> nn.Module:
    """Attach a new adapter described by ``config`` to ``model`` in place and (by default) make it the active,
    trainable one. The whole adapter is built before the model is touched: any error leaves it unchanged."""
    plan = _plan(model, config, name)
    _install(model, plan)
    conventions.install(model)  # adapter_names= and an adapter save_pretrained, as a PEFT model has
    for path, m in model.named_modules():  # quantised layers (adapted or not) get ready to train
        if host_kind(m) in QUANTIZED_KINDS:
            Host(m, path).prepare()
    if activate:
        set_active(model, name)
    else:
        _refresh_trainable(model, trainable=bool(active_adapters(model)))
    return model


def set_active(model: nn.Module, names: Any, *, trainable: bool = True) -> None:
    """Make ``names`` the active adapters (their outputs add up); only active adapters are trainable. A composition
    block (``peftkit.compose.Stack("a", "b")`` etc., :mod:`.blocks`) makes its adapters active composed that way."""
    block = names if isinstance(names, blocks.Block) else None
    if model.__dict__.get("peftkit_block_merged") and block != blocks.active_block(model):
        raise PeftkitError(f"set_active: the composition {blocks.active_block(model)!r} is merged; unmerge first")
    if block is not None:
        blocks.validate(model, block)
        names = block.names()
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        get_config(model, n)
    ml.check_active(model, names)
    model.__dict__["peftkit_active"] = names
    for _, layer in adapted_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
    ml.set_active(model, names)
    for _, sm in _saved_modules(model):
        sm.active = next((n for n in names if n in sm.copies), None)
    blocks.activate(model, block)
    _refresh_trainable(model, trainable)


def set_rank(model: nn.Module, b: int, name: str | None = None) -> int:
    """Evaluate with rank ``b`` in every adapter that supports a rank change after training (DyLoRA-style methods),
    or only in adapter ``name``. Everything is checked before anything changes; returns the layers changed."""
    found = [(path, n, layer, a) for path, layer in adapted_layers(model) for n, a in layer.adapters.items()
             if (name is None or n == name) and a.rank_range() is not None]
    if name is not None:
        get_config(model, name)
    if not found:
        which = f"adapter {name!r} ({get_config(model, name).method})" if name is not None else "the model"
        raise PeftkitError(f"set_rank: {which} has no adapter with an adjustable rank (e.g. dylora)")
    for path, n, layer, a in found:
        lo, hi = a.rank_range()
        if isinstance(b, bool) or not isinstance(b, int) or not lo <= b <= hi:
            raise PeftkitError(f"set_rank: adapter {n!r} on {path!r} takes ranks {lo}..{hi}, got {b!r}")
        if n in layer.merged:
            raise PeftkitError(f"set_rank: adapter {n!r} is merged into {path!r}; unmerge before changing its rank")
    for *_, a in found:
        a.set_rank(b)
    return len(found)


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first if it was merged)."""
    get_config(model, name)
    if model.__dict__.get("peftkit_block_merged"):  # a merged composition comes out as a whole
        unmerge(model)
    for path, layer in list(adapted_layers(model)):
        if name in layer.adapters:
            remove_from_layer(model, path, name)
    for path, sm in list(_saved_modules(model)):
        if name in sm.copies:
            del sm.copies[name]
            if not len(sm.copies):
                _set_submodule(model, path, sm.original_module)
    ml.remove(model, name)
    blocks.on_delete(model, name)
    del _configs(model)[name]
    model.__dict__.get("peftkit_ids", {}).pop(name, None)
    model.__dict__["peftkit_active"] = [n for n in active_adapters(model) if n != name]
    set_active(model, active_adapters(model))
    if not _configs(model):
        conventions.remove(model)


def remove_from_layer(model: nn.Module, path: str, name: str) -> None:
    """Take adapter ``name`` off the one layer at ``path`` (unmerged first); the layer goes back to its base module
    when no adapter is left. The adapter's config is left as is (e.g. a data-driven init that gives a layer rank 0
    also excludes it there)."""
    layer = get_layer(model, path)
    if name in layer.merged:
        layer.unmerge([name])
    layer.adapters[name].on_remove()
    del layer.adapters[name]
    layer.active = [n for n in layer.active if n != name]
    if not len(layer.adapters):
        _set_submodule(model, path, layer.base_layer)


def _check_mergeable(model: nn.Module, names: Sequence[str]) -> None:
    for n in names:
        info = registry.get(get_config(model, n).method)
        if not info.mergeable:
            raise PeftkitError(f"adapter {n!r} ({info.name}) is not mergeable; nothing was merged")


def _merge_args(model: nn.Module, names: Sequence[str] | None, what: str) -> list[str] | None:
    if names is None:
        return None
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        get_config(model, n)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PeftkitError(f"{what}: adapter {dup[0]!r} named more than once; nothing was changed")
    return names


def merge(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Fold the active (or the named) adapters into the base weights; the adapters stay and can be unmerged.

    Every layer's merged weight is computed and checked (finite) before any layer is written: a refused merge
    leaves every weight bit-identical. While merged, an adapter's parameters are frozen (``requires_grad`` False,
    restored by :func:`unmerge`), and :func:`unmerge` subtracts exactly the update that was added, even if the
    adapter's tensors were edited in place meanwhile (see :class:`~peftkit.core.layer.AdaptedLayer`). An active
    composition (:mod:`.blocks`) merges as a whole, or is refused naming the block that cannot merge."""
    block = blocks.active_block(model)
    if block is not None:
        if model.__dict__.get("peftkit_block_merged"):
            return
        if names is not None:
            raise PeftkitError(f"merge: the composition {block!r} is active; it merges as a whole (merge(model)), "
                               "not adapter by adapter")
        blocks.merge(model, block)
        return
    names = active_adapters(model) if names is None else _merge_args(model, names, "merge")
    _check_mergeable(model, names)
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:  # check everything first, write nothing
        layer.merged_weights(names)
    done: list[AdaptedLayer] = []
    try:
        for layer in layers:
            layer.merge(names)
            done.append(layer)
    except PeftkitError:  # pragma: no cover - the check above makes this unreachable for float hosts
        for layer in done:
            layer.unmerge(names)
        raise


def unmerge(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Undo :func:`merge` for the named (default: all merged) adapters; an unknown name is an error."""
    names = _merge_args(model, names, "unmerge")
    if model.__dict__.get("peftkit_block_merged"):
        if names is not None and set(names) != set(n for _, la in adapted_layers(model) for n in la.merged):
            raise PeftkitError("unmerge: the active composition was merged as a whole; unmerge it as a whole "
                               "(unmerge(model))")
        for _, layer in adapted_layers(model):
            layer.unmerge()
        del model.__dict__["peftkit_block_merged"]
        return
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:  # an adapter left merged must not sit under an active non-additive one left unmerged
        layer.check_live([n for n in layer.merged if names is not None and n not in names], "unmerge")
    for layer in layers:
        layer.unmerge(names)


def _dequantize_hosts(model: nn.Module) -> None:
    """Swap every quantised host (adapted or not) for its float32 equivalent; adapters follow their layer."""
    for _path, layer in list(adapted_layers(model)):
        if layer.host.quantized:
            layer.unmerge()
            layer.base_layer = layer.host.float_module()
            layer.host = Host(layer.base_layer, layer.host.name)
            for a in layer.adapters.values():
                a.host = layer.host
    for path, m in list(model.named_modules()):
        if host_kind(m) in QUANTIZED_KINDS and not isinstance(m, AdaptedLayer):
            _set_submodule(model, path, Host(m, path).float_module())


def merge_and_unload(model: nn.Module, names: Sequence[str] | None = None, *, dequantize: bool = False) -> nn.Module:
    """Merge the active (or named) adapters and return the model with plain modules only. ``dequantize=True``
    first turns every quantised base layer (bitsandbytes) into a float32 ``nn.Linear``, so the result is a
    full-precision model with ΔW added exactly (no re-quantisation rounding)."""
    if dequantize:
        _dequantize_hosts(model)
    merge(model, names)
    for path, layer in list(adapted_layers(model)):
        for n, a in layer.adapters.items():
            if n not in layer.merged:
                a.on_remove()
        _set_submodule(model, path, layer.base_layer)
    for path, sm in list(_saved_modules(model)):
        keep = sm.copies[sm.active] if sm.active in sm.copies else sm.original_module
        _set_submodule(model, path, keep)
    for n in ml.model_adapters(model):  # inactive model-level adapters (an active one cannot merge) are dropped
        ml.remove(model, n)
    conventions.remove(model)
    blocks._set_replicate(model, None)
    for k in ("peftkit_block", "peftkit_block_merged", "peftkit_fusions"):
        model.__dict__.pop(k, None)
    model.__dict__.pop("peftkit_configs", None)
    model.__dict__.pop("peftkit_ids", None)
    model.__dict__.pop("peftkit_active", None)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the plain base model again."""
    for n in list(adapter_names(model)):
        delete(model, n)
    return model


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable(model): ...`` runs the base model (merged adapters are unmerged first)."""
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer | SavedModule | ml.ModelAdapters)]
    with _temporarily(layers, "disabled", True):
        yield model


@contextlib.contextmanager
def _temporarily(objs: Sequence[Any], attr: str, value: Any) -> Iterator[None]:
    """Set ``attr`` to ``value`` on every object for the duration of the block, then restore each one's own value."""
    prev = [getattr(m, attr) for m in objs]
    for m in objs:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m, p in zip(objs, prev):
            setattr(m, attr, p)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None], *, repeat: int = 1) -> Iterator[nn.Module]:
    """``with mixed_batch(model, ["a", "b", None]): model(x)`` — sample i uses adapter ``names[i]``
    (None or ``"__base__"``: no adapter), all in one forward pass. The names hold for every forward inside the block,
    so ``with mixed_batch(model, names): model.generate(ids)`` decodes each sequence with its own adapter.
    ``repeat=k``: each name stands for k consecutive rows (``generate(num_beams=k)`` or ``num_return_sequences=k``
    expands every sample that way). Adapters of one family that share :meth:`Adapter.batched_delta` (e.g. the
    low-rank family, any mix of ranks) run together as one gathered batched matmul per layer."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise PeftkitError(f"mixed batch: names must be a non-empty list of adapter names (one per sample), got "
                           f"{names!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise PeftkitError(f"mixed batch: repeat must be a positive integer, got {repeat!r}")
    names = [n for n in names for _ in range(repeat)]
    known = set(adapter_names(model))
    unknown = sorted({n for n in names if n not in (None, "__base__") and n not in known}, key=str)
    if unknown:
        raise PeftkitError(f"mixed batch names unknown adapter(s) {unknown}; loaded adapters: {sorted(known)}")
    ml.check_mixable(model, list(names))
    route = Route(names)
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer | SavedModule)]
    cond = next((m.condition for m in layers if isinstance(m, AdaptedLayer) and m.condition is not None), None)
    if cond is not None:  # inside a ``condition`` block: each adapter now reads the ids of its own samples
        _check_condition_ids(model, cond, route)
    for m in layers:
        m.route = route
    try:
        yield model
    finally:
        for m in layers:
            m.route = None


def _check_condition_ids(model: nn.Module, ids: torch.Tensor, route: Route | None) -> None:
    """Check ``ids`` against the adapters that will read them: the active ones, or in a mixed batch each routed
    adapter on the ids of its own samples."""
    for path, layer in adapted_layers(model):
        for n, a in layer.adapters.items():
            if not a.uses_condition:
                continue
            if route is None:
                sub = ids if n in layer.active else None
            else:
                idx = route.groups.get(n)
                sub = None if idx is None or len(route) != len(ids) else ids.index_select(0, idx.to(ids.device))
            if sub is None:
                continue
            try:
                a.check_condition(sub)
            except PeftkitError as e:
                raise PeftkitError(f"condition: adapter {n!r} on {path!r}: {e}") from None


@contextlib.contextmanager
def condition(model: nn.Module, values: Sequence[Any] | torch.Tensor) -> Iterator[nn.Module]:
    """``with condition(model, [0, 2, 1]): model(x)`` — sample i is computed under condition ``values[i]`` by every
    adapter that reads conditions, all in one forward pass; adapters that read none are unaffected. ``values`` has
    one row per sample: integer ids (e.g. which input modalities are present; cast to int64) or float values (e.g. a
    per-sample gate, or a gate vector per sample; kept as given, so a gate computed by a trainable network passes its
    gradient on). Each reading adapter checks the values it gets (dtype, shape, range) before anything runs: the
    active ones, or — inside a mixed batch, and again when a mixed batch starts inside this block — each routed
    adapter on the rows of its own samples. Combines with :func:`mixed_batch`; refused by a layer where such an
    adapter is merged."""
    t = torch.as_tensor(values)
    if t.dim() == 0 or t.is_complex():
        raise PeftkitError(
            f"condition values must have one row per sample (integer ids or float values), got {t.dtype} of shape "
            f"{tuple(t.shape)}"
        )
    if not t.is_floating_point() and t.dtype != torch.bool:
        t = t.long()
    if not any(a.uses_condition for _, layer in adapted_layers(model) for a in layer.adapters.values()):
        methods = sorted({c.method for c in _configs(model).values()})
        raise PeftkitError(
            f"condition: no adapter of this model reads condition ids (loaded methods: {methods or '(none)'})"
        )
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    _check_condition_ids(model, t, next((m.route for m in layers if m.route is not None), None))
    with _temporarily(layers, "condition", t):
        yield model


# -- persistence ----------------------------------------------------------------------------------------
SAVE_FORMATS = ("auto", "hf", "peftkit")


def save(
    model: nn.Module, directory: str | os.PathLike, name: str | None = None, *, format: str = "auto",
    overwrite: bool = False, allow_nonfinite: bool = False, run_info: dict[str, Any] | None = None,
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``train_info.json`` from ``run_info``) for
    one adapter, as one unit: a reader — in another process, or after a crash at any instant — sees the old complete
    folder or the new one, never a mix (:mod:`peftkit.core.io`).

    ``format="auto"`` (the default) writes the Hugging Face PEFT format — ``peft.PeftModel.from_pretrained``, the
    ``AutoPeftModelFor…`` classes and serving engines read it — for every method that has a PEFT type, with the
    ``task_type`` given in the config or inferred from the model class (:func:`peftkit.core.hf.task_type_of`); the
    peftkit config and adapter name go into the weights' metadata, which PEFT ignores. Other methods, and adapters
    using an option PEFT's format cannot hold, are written in peftkit's format, whose ``peft_type``
    ``PEFTKIT_<METHOD>`` makes PEFT's loader stop naming peftkit. ``"hf"`` insists on PEFT's format (an error
    when impossible), ``"peftkit"`` on peftkit's; :func:`load` reads all of them.

    A folder that holds *another* adapter (not this one saved earlier) is replaced only with ``overwrite=True``, and
    then as a whole (its old ``train_info.json`` goes too). An adapter holding NaN/inf is refused unless
    ``allow_nonfinite=True``."""
    if format not in SAVE_FORMATS:
        raise PeftkitError(f"unknown adapter format {format!r}; use one of {', '.join(SAVE_FORMATS)}")
    if name is not None and name in blocks.fusion_names(model) and format != "hf":
        blocks.save_fusion(model, directory, name, overwrite=overwrite)  # an AdapterFusion's own layers (peftkit's)
        return
    name = _single_name(model, name)
    cfg = get_config(model, name)
    for path, layer in adapted_layers(model):
        if name in layer.merged:
            raise PeftkitError(f"adapter {name!r} is merged into {path!r}; unmerge before saving")
    opts: dict[str, Any] = {
        "metadata": {io.ID_KEY: _adapter_id(model, name)}, "overwrite": overwrite, "allow_nonfinite": allow_nonfinite,
        "extra": {io.RUN_INFO_NAME: io.dumps(run_info)} if run_info is not None else None,
    }
    from . import hf

    why_not = f"Hugging Face PEFT has no {cfg.method}"
    if format == "hf" or (format == "auto" and registry.get(cfg.method).hf_peft_type is not None):
        try:
            hf.export_adapter(model, directory, name, **dict(opts, metadata=dict(opts["metadata"])))
            return
        except hf.NoHFFormat as e:
            if format == "hf":
                raise PeftkitError(f"cannot save in Hugging Face PEFT format: {e}") from None
            why_not = str(e)
    tensors = adapter_state_dict(model, name)
    meta = {
        # PEFT's loaders look this type up and stop with its name: the folder is a peftkit adapter
        "peft_type": f"PEFTKIT_{cfg.method.upper()}",
        "format": "peftkit",
        "format_version": FORMAT_VERSION,
        "name": name,
        "base_model_class": type(model).__name__,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "task_type": hf.task_type_of(model, cfg.task_type),
        "not_hf_peft": f"a peftkit adapter (load it with peftkit.load(model, folder)); {why_not}",
        "config": cfg.to_dict(),
    }
    opts["metadata"] = {"format": "pt", "peftkit_method": cfg.method, **opts["metadata"]}
    io.write_adapter(directory, meta, tensors, **opts)


def _expected_tensors(plan: _Plan) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if plan.model_adapter is not None:
        out.update({f"model.{k}": v for k, v in plan.model_adapter.state_dict().items()})
    for path, _, _, adapter in plan.layers:
        for k, v in adapter.state_dict().items():
            if k.split(".")[0] not in adapter.regenerated:
                out[f"adapter.{path}.{k}"] = v
    for path, module in plan.saved:
        src = module.original_module if isinstance(module, SavedModule) else module
        for k, v in src.state_dict().items():
            out[f"saved.{path}.{k}"] = v
    for n, p in plan.biases:
        out[f"bias.{n}"] = p
    return out


def _kind(t: torch.Tensor) -> str:
    return ("complex" if t.is_complex() else "floating point" if t.is_floating_point()
            else "bool" if t.dtype == torch.bool else "integer")


def load_into_plan(
    plan: _Plan, tensors: dict[str, torch.Tensor], source: str, *, allow_nonfinite: bool = False
) -> dict[str, torch.Tensor]:
    """Check every tensor's name, shape, dtype and values against the planned adapter; fill the planned adapters.
    Returns the tensors for saved modules and biases, written at install time.

    Floating tensors may come in another float precision (an fp32 adapter into a bf16 model, as PEFT allows); a tensor
    of another kind (integer or bool where a float is expected, or the reverse) is refused — never cast. NaN/inf is
    refused unless ``allow_nonfinite=True`` (to inspect a broken adapter)."""
    expected = _expected_tensors(plan)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise PeftkitError(
            f"{source}: tensor {extra[0]!r} has no place in this model"
            + (f" ({len(extra)} such tensors)" if len(extra) > 1 else "")
            + " — was the adapter made for another architecture?"
        )
    if missing:
        raise PeftkitError(f"{source}: tensor {missing[0]!r} is missing from the file ({len(missing)} missing)")
    for k, ref in expected.items():
        if tuple(tensors[k].shape) != tuple(ref.shape):
            raise PeftkitError(
                f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)} in the file but "
                f"{tuple(ref.shape)} in this model — the adapter was made for another base model"
            )
        if _kind(tensors[k]) != _kind(ref) or (_kind(ref) == "integer" and tensors[k].dtype != ref.dtype):
            raise PeftkitError(
                f"{source}: tensor {k!r} is stored as {str(tensors[k].dtype).replace('torch.', '')} but this adapter "
                f"holds {str(ref.dtype).replace('torch.', '')} there — the file is damaged or not this method's "
                "(nothing is cast)"
            )
    if not allow_nonfinite:
        io.check_finite(tensors, source)
    for path, _, _, adapter in plan.layers:
        prefix = f"adapter.{path}."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        adapter.load_state_dict(sub, strict=False)
    for *_, adapter in plan.layers:
        adapter.check_loaded()
    if plan.model_adapter is not None:
        plan.model_adapter.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        plan.model_adapter.check_loaded()
    return {k: v for k, v in tensors.items() if k.startswith(("saved.", "bias."))}


def _write_rest(model: nn.Module, plan: _Plan, rest: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for path, _ in plan.saved:
            sm = model.get_submodule(path)
            assert isinstance(sm, SavedModule)
            prefix = f"saved.{path}."
            sm.copies[plan.name].load_state_dict({k[len(prefix):]: v for k, v in rest.items()
                                                   if k.startswith(prefix)})
        for n, p in plan.biases:
            p.copy_(rest[f"bias.{n}"])


def _read(model: nn.Module, directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], str, str]:
    files = io.read_adapter_files(directory)
    meta = files.config
    ident = str(files.metadata.get(io.ID_KEY, "")) or uuid.uuid4().hex
    if "peft_type" in meta and meta.get("format") != "peftkit":
        from . import hf

        cfg, tensors, name = hf.import_adapter(model, directory, meta, files)
        return (*hf.restore(model, cfg, tensors, name, files.metadata, str(directory)), ident)
    if meta.get("format") != "peftkit" or "config" not in meta:
        raise PeftkitError(f"{directory}: not a peftkit or Hugging Face PEFT adapter config")
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise PeftkitError(f"{directory}: adapter format_version {version!r} is not one this peftkit reads "
                           f"(1..{FORMAT_VERSION}); a newer peftkit wrote it, or the file is damaged")
    tensors = files.tensors()  # (weights rewritten by another tool carry no checksums: read unverified)
    if not isinstance(meta["config"], dict):
        raise PeftkitError(f"{directory}: 'config' must be a JSON object")
    name = meta.get("name", "default")
    if not isinstance(name, str) or not name:
        raise PeftkitError(f"{directory}: 'name' must be a non-empty string, got {name!r}")
    return registry.config_from_dict(meta["config"]), tensors, name, ident


def read_adapter(model: nn.Module, directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    """(config, tensors keyed the peftkit way, saved name) of an adapter directory written by :func:`save` or by
    Hugging Face PEFT; the model is not modified. The files are read as one unit and verified (checksums, format
    version, config types and ranges); tensors are checked against the model by :func:`load`."""
    return _read(model, directory)[:3]


def load(
    model: nn.Module, directory: str | os.PathLike, name: str | None = None, *, trainable: bool = False,
    activate: bool = True, allow_nonfinite: bool = False,
) -> str:
    """Load an adapter saved by :func:`save` (or by Hugging Face PEFT) into ``model``; returns its name.

    Every tensor's name, shape, dtype kind and values (finite, unless ``allow_nonfinite=True``) is checked before
    the model is touched: on any problem the error names the tensor and the model is left as it was."""
    try:  # the config alone (the weights are read once, by whichever reader this is)
        head = io.read_json(os.path.join(directory, io.CONFIG_NAME))
    except (OSError, PeftkitError):
        head = {}
    if blocks.is_fusion(head):
        return blocks.load_fusion(model, directory, name)  # an AdapterFusion; activate it with a Fuse block
    config, tensors, default_name, ident = _read(model, directory)
    if config.inference_mode:  # what trains after a load is decided by `trainable` (PEFT: is_trainable), as always
        config = replace(config, inference_mode=False)
    source = str(directory)
    name = name or default_name
    try:
        with ranks_from_file():  # the file's tensors have the ranks they have
            plan = _plan(model, config, name)
    except PeftkitError as e:
        raise PeftkitError(f"cannot load adapter {source}: {e}") from None
    rest = load_into_plan(plan, tensors, source, allow_nonfinite=allow_nonfinite)
    _install(model, plan)
    _write_rest(model, plan, rest)
    _adapter_id(model, name, ident)
    if activate:
        set_active(model, name, trainable=trainable)
    else:
        _refresh_trainable(model, trainable)
    return name


# -- reporting ------------------------------------------------------------------------------------------
@dataclass
class Summary:
    trainable: int
    total: int
    adapters: dict[str, int]
    active: list[str]
    methods: dict[str, str]
    layers: dict[str, int]

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"trainable params: {self.trainable:,} / {self.total:,} ({100 * self.fraction:.4f}%)"]
        for n, c in self.adapters.items():
            mark = "*" if n in self.active else " "
            where = f"on {self.layers[n]} layers" if self.layers[n] else "(model-level)"
            lines.append(f" {mark} {n:<16} {self.methods[n]:<12} {c:>12,} params {where}")
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Trainable / total parameter counts and the size of every adapter (its tensors, saved modules, biases)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    counts: dict[str, int] = {}
    nlayers: dict[str, int] = {}
    for n in adapter_names(model):
        c = sum(p.numel() for _, layer in adapted_layers(model) if n in layer.adapters
                for p in layer.adapters[n].parameters())
        c += sum(p.numel() for _, sm in _saved_modules(model) if n in sm.copies for p in sm.copies[n].parameters())
        c += sum(p.numel() for p in ml.model_adapters(model)[n].parameters()) if n in ml.model_adapters(model) else 0
        counts[n] = c
        nlayers[n] = sum(1 for _, layer in adapted_layers(model) if n in layer.adapters)
    methods = {n: c.method for n, c in _configs(model).items()}
    return Summary(trainable, total, counts, active_adapters(model), methods, nlayers)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def get_layer(model: nn.Module, path: str) -> Any:
    m = model.get_submodule(path)
    if not isinstance(m, AdaptedLayer):
        raise PeftkitError(f"{path!r} is not an adapted layer")
    return m


conventions.bind(mixed_batch=mixed_batch, save=save)  # the callbacks of adapter_names= and save_pretrained


blocks.bind_model_api(set_active=set_active, adapter_id=_adapter_id, check_mergeable=_check_mergeable)
