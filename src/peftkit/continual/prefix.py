"""LAE's calibration of a key/value-prefix PET (Gao et al., ICCV 2023, §3.2; official ``libml/model/pet/prefix.py``):

* **Prefix compensation** (:func:`compensate`). After the attention softmax over [prefix; tokens], the P prefix
  columns are divided by their sum λ (official ``Prefix.compensate``), so they sum to 1 while the tokens keep
  their mass 1 − λ: the output becomes (1 − λ)·O_tokens + O_prefix = O_all + (1 − λ)·O_prefix, where O_all is the
  ordinary attention output with the prefix and O_prefix = softmax(q·K_pᵀ·s)·V_p the attention over the prefix
  alone — a parallel-adapter form whose size no longer shrinks with the number of tokens.
  Route: the model keeps its own attention function (eager, SDPA, …, with its own masks and causality); peftkit
  registers a wrapper of it with ``transformers``' ``AttentionInterface`` under a name of its own and points the
  model's ``config._attn_implementation`` there. The wrapper calls the model's function once with the values
  augmented by an indicator column (1 on the prefix positions, 0 elsewhere), which gives O_all and, exactly, λ (the
  indicator's attention average), then adds (1 − λ)·O_prefix, computed over the first P keys (the prefix's place in
  peftkit's cache, :mod:`peftkit.core.kvprefix`). With attention dropout (training mode) the dropout acts on O_all
  and λ, not on O_prefix (officially it acts after the compensation). Returned attention weights (eager
  ``output_attentions``) are compensated the same way. Only while a key/value-prefix adapter is active; otherwise
  the wrapper is the model's own function.
* **Key and value scalars** (:class:`PrefixKVScale`, official ``Prefix(key_scale=None, val_scale=None)``): a
  learnable scalar per layer for the prefix keys and another for the prefix values, init 1 — a parametrisation of
  the prefix table (``embedding.weight``, or the rows of the projection MLP's last layer, which compute the table).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core import model_level as ml
from ..core.errors import PeftkitError
from ..core.kvprefix import KVPrefix

_ids = itertools.count()


def prefix_adapters(model: nn.Module, names: list[str] | None = None) -> dict[str, KVPrefix]:
    return {n: a for n, a in ml.model_adapters(model).items() if isinstance(a, KVPrefix) and (names is None or
                                                                                            n in names)}


def active_prefix_length(model: nn.Module) -> int:
    """P of the active key/value-prefix adapter (0: none active, or the model's adapters disabled)."""
    c = ml.container(model)
    if c is None or c.disabled:
        return 0
    return sum(a.P for n, a in prefix_adapters(model, c.active).items())


def compensated_attention(base: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix: int,
                          module: nn.Module, attention_mask: Any, scaling: float | None, dropout: float,
                          **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``base``'s attention (a ``transformers`` attention function: (B, H, L, d) inputs, (B, L, H, d) output) with the
    first ``prefix`` key positions compensated (see the module docstring)."""
    ind = torch.zeros(*value.shape[:-1], 1, dtype=value.dtype, device=value.device)
    ind[..., :prefix, :] = 1
    out, weights = base(module, query, key, torch.cat([value, ind], -1), attention_mask, scaling=scaling,
                        dropout=dropout, **kwargs)
    o_all, lam = out[..., :-1], out[..., -1:]
    kp, vp = key[:, :, :prefix], value[:, :, :prefix]
    if kp.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves several query heads
        kp = kp.repeat_interleave(query.shape[1] // kp.shape[1], 1)
        vp = vp.repeat_interleave(query.shape[1] // vp.shape[1], 1)
    s = scaling if scaling is not None else query.shape[-1] ** -0.5
    o_prefix = torch.matmul(torch.softmax(torch.matmul(query, kp.transpose(-1, -2)) * s, -1, dtype=torch.float32)
                            .to(query.dtype), vp).transpose(1, 2)
    out = o_all + (1 - lam) * o_prefix
    if weights is not None:
        lam_w = weights[..., :prefix].sum(-1, keepdim=True).clamp_min(1e-12)
        weights = torch.cat([weights[..., :prefix] / lam_w, weights[..., prefix:]], -1)
    return out.contiguous(), weights


def compensate(model: nn.Module) -> str:
    """Turn prefix compensation on for ``model`` (idempotent): every attention call while a key/value-prefix adapter
    is active is compensated. Returns the attention implementation name registered for it."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = getattr(model, "config", None)
    base_name = getattr(config, "_attn_implementation", None)
    if base_name is None:
        raise PeftkitError(f"prefix compensation needs a Hugging Face model with an attention implementation; "
                           f"{type(model).__name__} has none")
    if base_name.startswith("peftkit_prefix_compensated"):
        return base_name
    if base_name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise PeftkitError(f"prefix compensation wraps the model's attention function; {base_name!r} has no mask "
                           "function in transformers to reuse (use attn_implementation 'eager' or 'sdpa')")
    name = f"peftkit_prefix_compensated_{next(_ids)}_{base_name}"
    ref = weakref.ref(model)

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                  scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> Any:
        base = ALL_ATTENTION_FUNCTIONS.get_interface(base_name, _eager_of(module))
        owner = ref()
        prefix = active_prefix_length(owner) if owner is not None else 0
        if not prefix:
            return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if key.shape[-2] < prefix:
            raise PeftkitError(f"prefix compensation: {key.shape[-2]} keys cannot start with a prefix of {prefix}")
        return compensated_attention(base, query, key, value, prefix, module, attention_mask, scaling, dropout,
                                     **kwargs)

    ALL_ATTENTION_FUNCTIONS.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    config._attn_implementation = name
    return name


def _eager_of(module: nn.Module) -> Any:
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise PeftkitError(f"prefix compensation: cannot find the eager attention of {type(module).__name__}")
    return fn


def uncompensate(model: nn.Module) -> None:
    """Point the model back at its own attention implementation (the wrapper stays registered, unused)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None) or ""
    if name.startswith("peftkit_prefix_compensated_"):
        config._attn_implementation = name.split("_", 4)[4]


class PrefixKVScale(nn.Module):
    """Per-layer learnable scalars of a prefix table's keys and values (init 1): multiplies the table's columns
    (``dim=-1``, a free table) or the rows of the layer computing it (``dim=0``); layout (P, L, 2, H_kv, d_h)."""

    def __init__(self, layers: int, dim: int, tied: PrefixKVScale | None = None) -> None:
        super().__init__()
        if tied is None:
            self.key_scale = nn.Parameter(torch.ones(layers))
            self.value_scale = nn.Parameter(torch.ones(layers))
        self.__dict__["tied"] = tied  # the bias of a projection uses its weight's scalars (one copy in the state)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        own = self if self.tied is None else self.tied
        s = torch.stack([own.key_scale, own.value_scale], 1).to(t.dtype)  # (L, 2)
        width = t.shape[self.dim]
        v = s[:, :, None].expand(*s.shape, width // s.numel()).reshape(width)
        return t * (v if self.dim == -1 else v.view(-1, *[1] * (t.ndim - 1)))


def add_kv_scales(adapter: KVPrefix) -> PrefixKVScale | None:
    """Register :class:`PrefixKVScale` on ``adapter``'s table (once); returns it (None when already there)."""
    if adapter.config.prefix_projection:
        last = adapter.transform[-1]
        if parametrize.is_parametrized(last, "weight"):
            return None
        scale = PrefixKVScale(adapter.geo.layers, 0).to(last.weight.device)
        parametrize.register_parametrization(last, "weight", scale)
        parametrize.register_parametrization(last, "bias", PrefixKVScale(adapter.geo.layers, 0, tied=scale))
        return scale
    if parametrize.is_parametrized(adapter.embedding, "weight"):
        return None
    scale = PrefixKVScale(adapter.geo.layers, -1).to(adapter.embedding.weight.device)
    parametrize.register_parametrization(adapter.embedding, "weight", scale)
    return scale


def kv_scales(adapter: KVPrefix) -> PrefixKVScale | None:
    holder = adapter.transform[-1] if adapter.config.prefix_projection else adapter.embedding
    return holder.parametrizations.weight[0] if parametrize.is_parametrized(holder, "weight") else None


def scaled_tensors(adapter: KVPrefix) -> list[tuple[nn.Module, str]]:
    """The (module, tensor name) pairs of ``adapter`` that carry :class:`PrefixKVScale`."""
    if adapter.config.prefix_projection:
        last = adapter.transform[-1]
        return [(last, n) for n in ("weight", "bias") if parametrize.is_parametrized(last, n)]
    return [(adapter.embedding, "weight")] if parametrize.is_parametrized(adapter.embedding, "weight") else []
