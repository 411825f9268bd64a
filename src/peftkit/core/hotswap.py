"""Hot-swapping: new weights for a loaded adapter, copied into its existing tensors, so that a ``torch.compile``'d
model runs the new adapter without recompiling (no module, parameter object, Python attribute the compiled graph
guards on, or shape changes — only tensor values).

* :func:`hotswap` replaces adapter ``name``'s weights with those of a saved folder (peftkit or Hugging Face PEFT
  format) or a state dict. Everything is checked before anything is written; on an error nothing changes. The
  incoming adapter must be of the same method and config, except that — for methods whose rank is zero-paddable
  factors (:meth:`~peftkit.core.adapter.Adapter.pad_rank`: LoRA, DoRA) — its rank may be lower (zero-padded up to
  the live one) and its α / rsLoRA scaling may differ (the ratio of the two scale factors is folded into its B, the
  live adapter keeps its own scale): the swapped-in model computes the incoming adapter's update exactly.
* :func:`prepare_hotswap` (call before ``torch.compile``) pads a live adapter up to ``target_rank`` — the largest rank
  that will be swapped in — with zeros, keeping its update and its scale; its config records the new ``r`` (and the α
  that keeps the scale). Hugging Face PEFT's ``prepare_model_for_compiled_hotswap`` does the same and also turns the
  scale into a tensor; here the scale never changes, because a swap folds the difference into B instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import model as m
from .errors import PeftkitError
from .lowrank import LowRankConfig

_TARGETING = {"target_modules", "exclude_modules", "target_types", "layers_to_transform", "layers_pattern"}
_SCALE_FIELDS = {"r", "alpha", "rslora"}  # what pad_rank reconciles (rank by padding, scale by folding into B)


def _live_adapters(model: nn.Module, name: str) -> dict[str, nn.Module]:
    return {p: layer.adapters[name] for p, layer in m.adapted_layers(model) if name in layer.adapters}


@torch.no_grad()
def hotswap(
    model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], name: str | None = None, *,
    config: Any = None,
) -> str:
    """Replace the weights of the loaded adapter ``name`` by those in ``source``, copying every tensor in place.

    ``source``: an adapter folder (peftkit or Hugging Face PEFT format), or a state dict keyed as
    :func:`peftkit.adapter_state_dict` gives it (its config is ``config``, by default the live adapter's). Returns the
    adapter's name. See the module docstring for what may differ between the two adapters."""
    name = m._single_name(model, name)
    old = m.get_config(model, name)
    if isinstance(source, Mapping):
        where = "state dict"
        new_cfg = old if config is None else config
        tensors = dict(source)
    else:
        if config is not None:
            raise PeftkitError("hotswap: config= is for a state dict; an adapter folder brings its own config")
        where = str(source)
        new_cfg, tensors, _ = m.read_adapter(model, source)
    if new_cfg.method != old.method:
        raise PeftkitError(f"hotswap {where}: it holds a {new_cfg.method!r} adapter but {name!r} is "
                           f"{old.method!r}; nothing was changed")
    merged = [p for p, layer in m.adapted_layers(model) if name in layer.merged]
    if merged:
        raise PeftkitError(f"hotswap: adapter {name!r} is merged into {merged[0]!r}; unmerge first")
    tmp = "__hotswap__"
    while tmp in m.adapter_names(model):
        tmp += "_"
    try:  # build (but do not install) the adapter from the source: full shape and consistency checks
        plan = m._plan(model, new_cfg, tmp)
    except PeftkitError as e:
        raise PeftkitError(f"hotswap {where}: {e}") from None
    rest = m.load_into_plan(plan, tensors, where)
    new_d, old_d = plan.config.to_dict(), old.to_dict()
    differ = {k for k in set(new_d) | set(old_d) if k not in _TARGETING and new_d.get(k) != old_d.get(k)}
    live_ad = _live_adapters(model, name)
    if differ and differ <= _SCALE_FIELDS:
        fit = _fit(plan, live_ad)
        if fit != "no":  # fitted, or a higher rank: the shape check below says so, with the way out
            differ = set()
    for k in sorted(differ):
        raise PeftkitError(f"hotswap {where}: config field {k!r} is {new_d.get(k)!r} there but {old_d.get(k)!r} in "
                           f"adapter {name!r}; load it as a new adapter instead")
    new_t = {**m._expected_tensors(plan), **rest}
    live = m.adapter_state_dict(model, name)
    for k in sorted(set(new_t) ^ set(live)):
        side = "adapter " + repr(name) if k in live else where
        raise PeftkitError(f"hotswap {where}: tensor {k!r} exists only in {side} (the adapters target different "
                           f"layers); nothing was changed")
    for k, v in live.items():
        if tuple(v.shape) != tuple(new_t[k].shape):
            hint = ""
            if isinstance(plan.config, LowRankConfig) and isinstance(old, LowRankConfig) and plan.config.r > old.r:
                hint = f" — pad the live adapter first: peftkit.prepare_hotswap(model, {plan.config.r}, name={name!r})"
            raise PeftkitError(f"hotswap {where}: tensor {k!r} has shape {tuple(new_t[k].shape)} there but "
                               f"{tuple(v.shape)} in adapter {name!r}; nothing was changed{hint}")
    for k, v in live.items():
        v.copy_(new_t[k].to(device=v.device, dtype=v.dtype))
    return name


def _fit(plan: Any, live: dict[str, nn.Module]) -> str:
    """Re-express each planned (not installed) adapter in its live counterpart's rank and scale: ``"ok"``;
    ``"rank"`` when a layer's rank is above the live one; ``"no"`` when the method cannot."""
    planned = {path: ad for path, _, _, ad in plan.layers}
    if set(planned) != set(live):
        return "no"
    for path, ad in planned.items():
        target = live[path]
        r_live, s_live = getattr(target.config, "r", None), getattr(target, "s", None)
        if not isinstance(r_live, int) or not isinstance(s_live, float | int):
            return "no"
        if ad.config.r > r_live:
            return "rank"
    for path, ad in planned.items():
        try:
            ad.pad_rank(live[path].config.r, float(live[path].s))
        except PeftkitError:
            return "no"
    return "ok"


@torch.no_grad()
def prepare_hotswap(model: nn.Module, target_rank: int, name: str | None = None) -> str:
    """Zero-pad adapter ``name`` (LoRA, DoRA: methods that implement ``pad_rank``) to rank ``target_rank`` on every
    layer, keeping its update and its scale, so that adapters up to that rank can later be hot-swapped into a
    compiled model without recompiling. Call it before ``torch.compile`` (the shapes change) and before creating an
    optimiser. Checked on every layer first; on an error nothing changes. Returns the adapter's name."""
    name = m._single_name(model, name)
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise PeftkitError(f"prepare_hotswap: target_rank must be a positive integer, got {target_rank!r}")
    cfg = m.get_config(model, name)
    if not isinstance(cfg, LowRankConfig):
        raise PeftkitError(f"prepare_hotswap: adapter {name!r} ({cfg.method}) has no rank to pad")
    if any(_SCALE_FIELDS & set(ov) for ov in cfg.overrides.values()):
        raise PeftkitError(f"prepare_hotswap: adapter {name!r} sets r / alpha per module (overrides); pad a "
                           f"single-rank adapter")
    live = _live_adapters(model, name)
    if not live:
        raise PeftkitError(f"prepare_hotswap: adapter {name!r} adapts no layer")
    if target_rank < cfg.r:
        raise PeftkitError(f"prepare_hotswap: target_rank {target_rank} is below adapter {name!r}'s rank {cfg.r}")
    s = cfg.scaling
    alpha = s * (math.sqrt(target_rank) if cfg.rslora else target_rank)  # the same scale at the new rank
    new_cfg = dataclasses.replace(cfg, r=target_rank, alpha=alpha)
    for path, ad in live.items():
        type(ad).check_ranks(ad.host, new_cfg.for_module(path))
    for ad in live.values():  # does the method pad? (its own rank: changes nothing)
        try:
            ad.pad_rank(ad.config.r)
        except PeftkitError as e:
            raise PeftkitError(f"prepare_hotswap: {e}") from None
    for path, ad in live.items():
        ad.pad_rank(target_rank)
        ad.config = new_cfg.for_module(path)
    m._configs(model)[name] = new_cfg
    return name
