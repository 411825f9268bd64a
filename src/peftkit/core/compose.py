"""Serving-time operations on loaded adapters: hot-swapping an adapter's weights in place, and combining low-rank
adapters into a new one. Neither names a method: hot-swapping works on any adapter's tensors, combining on every
adapter that exposes its update as ``s·B·A`` through :class:`~peftkit.core.lowrank.LowRankUpdate`.

Combining adapters ``i`` with weights ``w_i`` (``ΔW_i = s_i·B_i·A_i`` on every layer):

- ``cat``: ``A = [w_1 s_1 A_1; …; w_n s_n A_n]``, ``B = [B_1, …, B_n]`` (rank Σ r_i) — exactly ``Σ w_i ΔW_i``;
- ``svd``: ``ΔW = Σ w_i ΔW_i``, then ``B = U_k·Σ_k``, ``A = V_kᵀ`` with ``k = rank`` (the best rank-k approximation;
  exact when k ≥ rank(ΔW));
- ``linear`` (Hugging Face PEFT's ``add_weighted_adapter(combination_type="linear")`` convention, same rank):
  ``A = Σ sign(w_i)·√|w_i|·A_i``, ``B = Σ √|w_i|·s_i·B_i`` — NOT ``Σ w_i ΔW_i`` in general (it adds the cross terms
  ``B_i A_j``); it equals it only for a single adapter or when the adapters share their factors.

The new adapter is of the first source's method with ``r`` set to the combined rank (ranks that differ per layer are
zero-padded to the largest, which adds exact zeros) and its factors written so that its own ``s·B·A`` is the result.
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
from .lowrank import LowRankConfig, LowRankUpdate
from .state import single_name

_TARGETING = {"target_modules", "exclude_modules", "target_types", "layers_to_transform", "layers_pattern"}


# -- hot-swapping ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def hotswap(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> str:
    """Replace the weights of the loaded adapter ``name`` by those saved in ``directory`` (peftkit or Hugging Face
    PEFT format), copying every tensor in place: no module is created or replaced, so a ``torch.compile``'d model
    keeps working. Checked first, with nothing changed on any error: same method, same config (apart from the
    targeting fields, which must select the same layers), the same tensors with the same shapes, and the method's own
    ``check_loaded``. Returns the adapter's name."""
    name = single_name(model, name)
    old = m.get_config(model, name)
    source = str(directory)
    config, tensors, _ = m.read_adapter(model, directory)
    if config.method != old.method:
        raise PeftkitError(f"hotswap {source}: the file holds a {config.method!r} adapter but {name!r} is "
                           f"{old.method!r}; nothing was changed")
    merged = [p for p, layer in m.adapted_layers(model) if name in layer.merged]
    if merged:
        raise PeftkitError(f"hotswap: adapter {name!r} is merged into {merged[0]!r}; unmerge first")
    tmp = "__hotswap__"
    while tmp in m.adapter_names(model):
        tmp += "_"
    try:  # build (but do not install) the adapter from the file: full shape and consistency checks
        plan = m._plan(model, config, tmp)
    except PeftkitError as e:
        raise PeftkitError(f"hotswap {source}: {e}") from None
    rest = m.load_into_plan(plan, tensors, source)
    new_t = {**m._expected_tensors(plan), **rest}
    live = m.adapter_state_dict(model, name)
    for k in sorted(set(new_t) ^ set(live)):
        where = "adapter " + repr(name) if k in live else "the file"
        raise PeftkitError(f"hotswap {source}: tensor {k!r} exists only in {where} (the adapters target different "
                           f"layers); nothing was changed")
    for k, v in live.items():
        if tuple(v.shape) != tuple(new_t[k].shape):
            raise PeftkitError(f"hotswap {source}: tensor {k!r} has shape {tuple(new_t[k].shape)} in the file but "
                               f"{tuple(v.shape)} in adapter {name!r}; nothing was changed")
    new_d, old_d = plan.config.to_dict(), old.to_dict()
    for k in sorted(set(new_d) | set(old_d)):
        if k not in _TARGETING and new_d.get(k) != old_d.get(k):
            raise PeftkitError(f"hotswap {source}: config field {k!r} is {new_d.get(k)!r} in the file but "
                               f"{old_d.get(k)!r} in adapter {name!r}; load it as a new adapter instead")
    for k, v in live.items():
        v.copy_(new_t[k].to(device=v.device, dtype=v.dtype))
    return name


# -- combining ------------------------------------------------------------------------------------------------------
def _factors_2d(adapter: LowRankUpdate) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B, A) in float64: ΔW = (s·B)·A."""
    a, b = adapter.factors()
    return b.detach().double() * float(adapter.s), a.detach().double()


def _combine_layer(
    parts: list[tuple[float, LowRankUpdate]], how: str, rank: int | None, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with ΔW' = B'·A' for one layer."""
    if how == "cat":
        bs, as_ = zip(*[_factors_2d(a) for _, a in parts])
        return torch.cat(bs, 1), torch.cat([w * a for (w, _), a in zip(parts, as_)], 0)
    if how == "linear":
        ranks = {a.factors()[0].shape[0] for _, a in parts}
        if len(ranks) != 1:
            raise PeftkitError(f"combine(how='linear') needs adapters of one rank; layer {where!r} has ranks "
                               f"{sorted(ranks)} — use how='cat' or 'svd'")
        b = sum(math.sqrt(abs(w)) * _factors_2d(a)[0] for w, a in parts)
        a = sum(math.copysign(math.sqrt(abs(w)), w) * _factors_2d(a)[1] for w, a in parts)
        return b, a
    dw = sum(w * (bb @ aa) for w, (bb, aa) in ((w, _factors_2d(a)) for w, a in parts))
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    k = min(rank, s.shape[0])
    return u[:, :k] * s[:k], vh[:k]


def combine(
    model: nn.Module, weights: Mapping[str, float], new_name: str, *, how: str = "cat", rank: int | None = None,
) -> str:
    """Add adapter ``new_name`` combining the low-rank adapters ``weights = {name: w}`` (see the module docstring for
    ``how`` = ``"cat"`` | ``"svd"`` | ``"linear"``; ``rank`` is required for ``"svd"``). The sources must expose
    ``s·B·A`` (the low-rank family) and adapt the same layers; the new adapter is not activated. Every check runs before
    anything is added; on an error the model is left as it was. Returns ``new_name``."""
    if how not in ("cat", "svd", "linear"):
        raise PeftkitError(f"combine: how must be 'cat', 'svd' or 'linear', got {how!r}")
    if not isinstance(weights, Mapping) or not weights:
        raise PeftkitError("combine: weights must be a non-empty {adapter name: weight} mapping")
    if how == "svd" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise PeftkitError(f"combine(how='svd') needs rank= a positive integer, got {rank!r}")
    if how != "svd" and rank is not None:
        raise PeftkitError(f"combine: rank= is only used by how='svd' (how={how!r} fixes the rank)")
    cfgs = {n: m.get_config(model, n) for n in weights}
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise PeftkitError(f"combine: the weight of {n!r} must be a finite number, got {w!r}")
        cfg = cfgs[n]
        if not isinstance(cfg, LowRankConfig):
            raise PeftkitError(f"combine: adapter {n!r} ({cfg.method}) is not a low-rank (s·B·A) adapter")
        if cfg.modules_to_save or cfg.bias != "none":
            raise PeftkitError(f"combine: adapter {n!r} has modules_to_save / trainable biases, which cannot be "
                               f"combined as low-rank factors")
    layers: dict[str, Any] = {}
    for path, layer in m.adapted_layers(model):
        held = [n for n in weights if n in layer.adapters]
        if not held:
            continue
        if len(held) != len(weights):
            missing = sorted(set(weights) - set(held))
            raise PeftkitError(f"combine: layer {path!r} has adapters {held} but not {missing}; the adapters must "
                               f"target the same layers")
        for n in held:
            a = layer.adapters[n]
            if not isinstance(a, LowRankUpdate):
                raise PeftkitError(f"combine: adapter {n!r} ({cfgs[n].method}) on {path!r} does not expose "
                                   f"low-rank factors")
            if n in layer.merged:
                raise PeftkitError(f"combine: adapter {n!r} is merged into {path!r}; unmerge first")
        layers[path] = _combine_layer([(float(weights[n]), layer.adapters[n]) for n in held], how, rank, path)
    if not layers:
        raise PeftkitError(f"combine: adapters {list(weights)} adapt no layer")
    first = cfgs[next(iter(weights))]
    r_new = rank if how == "svd" else max(b.shape[1] for b, _ in layers.values())
    new_cfg = dataclasses.replace(first, r=r_new, overrides={}, dropout=0.0)
    m.adapt(model, new_cfg, new_name, activate=False)
    try:
        _write_factors(model, new_name, layers)
    except PeftkitError:
        m.delete(model, new_name)
        raise
    return new_name


@torch.no_grad()
def _write_factors(model: nn.Module, name: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set the new adapter's factors so that its ``s·B·A`` is ``B'·A'`` (zero-padded to its rank) on every layer."""
    found = {p: layer.adapters[name] for p, layer in m.adapted_layers(model) if name in layer.adapters}
    if set(found) != set(layers):
        raise PeftkitError(f"combine: the new adapter's config selects layers {sorted(found)} but the sources adapt "
                           f"{sorted(layers)}")
    writes = []
    for path, ad in found.items():
        a, b = ad.factors()
        if not (isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter)):
            raise PeftkitError(f"combine: {type(ad).__name__} computes its factors from other tensors; it cannot "
                               f"hold a combination (put a plain low-rank adapter first)")
        b_new, a_new = layers[path]
        r = a_new.shape[0]
        writes.append((a, torch.cat([a_new, a_new.new_zeros(a.shape[0] - r, a_new.shape[1])]).to(a.dtype)))
        b_full = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], b.shape[1] - r)], 1) / float(ad.s)
        writes.append((b, b_full.to(b.dtype)))
    for dst, src in writes:
        dst.copy_(src)
