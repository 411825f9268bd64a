"""Serving-time operations on loaded adapters: combining low-rank adapters into a new one (hot-swapping an adapter's
weights in place lives in :mod:`.hotswap`). It names no method: it works on every adapter that exposes its update as
``s·B·A`` through :class:`~peftkit.core.lowrank.LowRankUpdate`.

Combining adapters ``i`` with weights ``w_i`` (``ΔW_i = s_i·B_i·A_i`` on every layer):

- ``cat``: ``A = [w_1 s_1 A_1; …; w_n s_n A_n]``, ``B = [B_1, …, B_n]`` (rank Σ r_i) — exactly ``Σ w_i ΔW_i``;
- ``svd``: ``ΔW = Σ w_i ΔW_i``, then ``B = U_k·Σ_k``, ``A = V_kᵀ`` with ``k = rank`` (the best rank-k approximation;
  exact when k ≥ rank(ΔW));
- ``linear`` (Hugging Face PEFT's ``add_weighted_adapter(combination_type="linear")`` convention, same rank):
  ``A = Σ sign(w_i s_i)·√|w_i s_i|·A_i``, ``B = Σ √|w_i s_i|·B_i`` — NOT ``Σ w_i ΔW_i`` in general (it adds the
  cross terms ``B_i A_j``); it equals it only for a single adapter or when the adapters share their factors.
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (same rank): the ``linear`` split of the weights
  (``√|w_i s_i|`` on B, its signed twin on A), each factor merged by :mod:`peftkit.ops.merging` (trim / drop with
  ``density``, TIES' sign election with ``majority_sign_method``) — Hugging Face PEFT's combination types of those
  names, with its numbers;
- ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the same merges of the whole
  ``w_i ΔW_i``, then the best rank-``rank`` approximation, as ``svd``.

The new adapter is of the first source's method with ``r`` set to the combined rank (ranks that differ per layer are
zero-padded to the largest, which adds exact zeros) and its factors written so that its own ``s·B·A`` is the result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..ops.merging import SIGN_METHODS, merge_task_tensors
from . import model as m
from .errors import PeftkitError
from .lowrank import LowRankConfig, LowRankUpdate


# -- combining ------------------------------------------------------------------------------------------------------
def _factors_2d(adapter: LowRankUpdate) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B, A) in float64: ΔW = (s·B)·A."""
    a, b = adapter.factors()
    return b.detach().double() * float(adapter.s), a.detach().double()


#: combination types that merge the factors A and B separately (one rank), and their ΔW-space variants (+ SVD)
_FACTOR_MERGES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD_MERGES = tuple(f"{h}_svd" for h in _FACTOR_MERGES)
HOWS = ("cat", "svd", "linear", *_FACTOR_MERGES, *_SVD_MERGES)


def _combine_layer(
    parts: list[tuple[float, LowRankUpdate]], how: str, rank: int | None, where: str, merge: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with ΔW' = B'·A' for one layer."""
    if how == "linear" or how in _FACTOR_MERGES:  # in the factors' dtype, as PEFT (random drops draw alike)
        ranks = {a.factors()[0].shape[0] for _, a in parts}
        if len(ranks) != 1:
            instead = "'cat' or 'svd'" if how == "linear" else repr(how + "_svd")
            raise PeftkitError(f"combine(how={how!r}) needs adapters of one rank; layer {where!r} has ranks "
                               f"{sorted(ranks)} — use how={instead}")
        ws = [w * float(a.s) for w, a in parts]
        a_w = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in ws])
        b_w = torch.tensor([math.sqrt(abs(x)) for x in ws])
        a_new = merge_task_tensors(how, [a.factors()[0].detach() for _, a in parts], a_w, **merge)
        b_new = merge_task_tensors(how, [a.factors()[1].detach() for _, a in parts], b_w, **merge)
        return b_new.double(), a_new.double()
    if how in _SVD_MERGES:
        deltas = [(bb @ aa).float() for bb, aa in (_factors_2d(a) for _, a in parts)]
        dw = merge_task_tensors(how.removesuffix("_svd"), deltas, torch.tensor([w for w, _ in parts]), **merge)
        u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
        k = min(rank, s.shape[0])
        return u[:, :k] * s[:k], vh[:k]
    if how == "cat":
        bs, as_ = zip(*[_factors_2d(a) for _, a in parts])
        return torch.cat(bs, 1), torch.cat([w * a for (w, _), a in zip(parts, as_)], 0)
    dw = sum(w * (bb @ aa) for w, (bb, aa) in ((w, _factors_2d(a)) for w, a in parts))
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    k = min(rank, s.shape[0])
    return u[:, :k] * s[:k], vh[:k]


def combine(
    model: nn.Module, weights: Mapping[str, float], new_name: str, *, how: str = "cat", rank: int | None = None,
    density: float | None = None, majority_sign_method: str = "total", generator: torch.Generator | None = None,
) -> str:
    """Add adapter ``new_name`` combining the low-rank adapters ``weights = {name: w}`` (see the module docstring for
    ``how``: ``"cat"``, ``"svd"``, ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``
    and their ``"…_svd"`` forms; ``rank`` is required for the SVD forms, ``density`` ∈ (0, 1] — the share of entries
    kept — for the pruning ones, ``majority_sign_method`` ∈ {"total", "frequency"} for the TIES ones; DARE's random
    drops use ``generator``, or torch's global one). The sources must expose ``s·B·A`` (the low-rank family) and adapt
    the same layers; the new adapter is not activated. Every check runs before anything is added; on an error the
    model is left as it was. Returns ``new_name``."""
    if how not in HOWS:
        raise PeftkitError(f"combine: how must be one of {', '.join(HOWS)}; got {how!r}")
    if not isinstance(weights, Mapping) or not weights:
        raise PeftkitError("combine: weights must be a non-empty {adapter name: weight} mapping")
    svd = how == "svd" or how in _SVD_MERGES
    if svd and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise PeftkitError(f"combine(how={how!r}) needs rank= a positive integer, got {rank!r}")
    if not svd and rank is not None:
        raise PeftkitError(f"combine: rank= is only used by the SVD forms (how={how!r} fixes the rank)")
    pruning = how.removesuffix("_svd") in _FACTOR_MERGES
    if pruning and (isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1):
        raise PeftkitError(f"combine(how={how!r}) needs density= the share of entries kept, in (0, 1]; got {density!r}")
    if not pruning and density is not None:
        raise PeftkitError(f"combine: density= is only used by the pruning forms (ties, dare_*, magnitude_prune), "
                           f"not how={how!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise PeftkitError(f"combine: majority_sign_method must be 'total' or 'frequency', "
                           f"got {majority_sign_method!r}")
    merge = {"density": float(density or 1.0), "sign_method": majority_sign_method, "generator": generator}
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
        layers[path] = _combine_layer([(float(weights[n]), layer.adapters[n]) for n in held], how, rank, path, merge)
    if not layers:
        raise PeftkitError(f"combine: adapters {list(weights)} adapt no layer")
    first = cfgs[next(iter(weights))]
    r_new = rank if svd else max(b.shape[1] for b, _ in layers.values())
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
