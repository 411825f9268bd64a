"""Per-layer key/value prefixes injected through a Hugging Face model's key/value cache — the machinery shared by the
methods that learn deep prompts (they differ in how the prefix table is parametrised and in their defaults).

A prefix table ``T ∈ R^{P × 2·L·d_kv}`` (``d_kv = H_kv·d_h``, the width of one layer's keys; grouped-query models
have fewer key/value heads than query heads) is read as ``(P, L, 2, H_kv, d_h)`` — the layout of the official code
and of Hugging Face PEFT: per layer ``l`` the pair ``(K_l, V_l)``, each ``(B, H_kv, P, d_h)``. Before the model's
first forward of a sequence a cache (``transformers.DynamicCache``) is filled with the pairs and passed as the
model's ``cache`` / ``past_key_values``: each attention layer then computes ``K = [K_l; X·W_k]``, ``V = [V_l; X·W_v]``
with queries from the real tokens only. The attention mask gains ``P`` visible columns and position ids move by
``P`` (what a cache of length ``P`` means to the model; rotary models are unaffected in relative terms). During
``generate`` the cache object comes back at every step, already holding the prefix, and is recognised by its tag.

``T`` is either a table of its own (``prefix_projection=False``) or ``MLP(E)`` with ``E ∈ R^{P×d}`` and
``MLP = Linear(d, m) → tanh → Linear(m, 2·L·d_kv)`` (Li & Liang's reparametrisation). :func:`fold_projection`
replaces the MLP by the table it computes (for inference and smaller files).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import model_level as ml
from .errors import PeftkitError


@dataclass
class KVPrefixConfig(ml.ModelLevelConfig):
    """``num_virtual_tokens`` P (prefix length per layer); ``prefix_projection``: parametrise the prefixes as
    ``MLP(E)`` (hidden width ``encoder_hidden_size``) instead of a free table; ``dropout``: on the prefix keys and
    values (independently per sample, training mode only)."""

    num_virtual_tokens: int = 10
    prefix_projection: bool = True
    encoder_hidden_size: int = 512

    def validate(self) -> None:
        super().validate()
        self.positive(f"{type(self).__name__}.num_virtual_tokens", self.num_virtual_tokens)
        if self.encoder_hidden_size is not None:  # None: a subclass fills it from the model in resolve()
            self.positive(f"{type(self).__name__}.encoder_hidden_size", self.encoder_hidden_size)


@dataclass(frozen=True)
class KVGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int

    @property
    def width(self) -> int:
        """Columns of the prefix table: 2·L·d_kv."""
        return 2 * self.layers * self.kv_heads * self.head_dim


def geometry(model: nn.Module, method: str) -> KVGeometry:
    """Layers, key/value heads, head size and hidden size of a Hugging Face decoder or encoder (clear error naming
    the model class when its config does not say)."""
    cfg = ml.hf_config(model, method)
    try:
        layers, heads, hidden = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    except AttributeError as e:
        raise PeftkitError(f"{method}: cannot read the attention geometry of {type(model).__name__} "
                           f"({type(cfg).__name__} has no {e.name!r})") from None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return KVGeometry(int(layers), int(kv_heads), int(head_dim), int(hidden))


def cache_argument(model: nn.Module, method: str) -> str:
    """The keyword the model's attention cache travels under: the model's own ``cache`` / ``past_key_values``
    argument, or its backbone's (``model.base_model``) when the model passes ``**kwargs`` through to it."""
    params = ml.forward_params(model)
    for name in ml.CACHE_ARGS:
        if name in params:
            return name
    base = getattr(model, "base_model", None)
    passes_kwargs = "kwargs" in params
    if isinstance(base, nn.Module) and base is not model and passes_kwargs:
        base_params = ml.forward_params(base)
        for name in ml.CACHE_ARGS:
            if name in base_params:
                return name
    where = f"{type(model).__name__}" + (f" (backbone {type(base).__name__})" if isinstance(base, nn.Module)
                                         and base is not model else "")
    raise PeftkitError(f"{method} needs attention that takes a key/value cache, but {where} accepts no "
                       f"{' / '.join(ml.CACHE_ARGS)} argument; this architecture cannot take per-layer prefixes")


def new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - configs that do not describe their layer types get the plain lazy cache
        return DynamicCache()


class KVPrefix(ml.ModelAdapter):
    """A learned per-layer key/value prefix (see the module docstring); method files subclass it and register.

    Hugging Face PEFT's ``PREFIX_TUNING`` files hold the table T itself (``prompt_embeddings``, the MLP already
    applied, same layout; ``token_dim`` = d_kv and ``num_attention_heads`` = H_kv for grouped-query models)."""

    hf_state_key = "embedding.weight"  # where a file's table goes: an adapter read with prefix_projection=False

    def __init__(self, model: nn.Module, config: KVPrefixConfig) -> None:
        super().__init__(model, config)
        g = geometry(model, self.method)
        self.geo = g
        self.cache_arg = cache_argument(model, self.method)
        ml.check_room(model, self.method, "num_virtual_tokens", config.num_virtual_tokens)
        self.P = config.num_virtual_tokens
        self.embedding = nn.Embedding(self.P, g.hidden if config.prefix_projection else g.width)
        if config.prefix_projection:
            self.transform = nn.Sequential(
                nn.Linear(g.hidden, config.encoder_hidden_size), nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, g.width),
            )
        self.p_drop = config.dropout

    @classmethod
    def expected_params(cls, model: nn.Module, config: Any) -> int:
        g, P, m = geometry(model, cls.method), config.num_virtual_tokens, config.encoder_hidden_size
        if not config.prefix_projection:
            return P * g.width
        return P * g.hidden + (g.hidden * m + m) + (m * g.width + g.width)

    def table(self) -> torch.Tensor:
        """The prefix table T, (P, 2·L·d_kv)."""
        t = self.embedding.weight
        return self.transform(t) if self.config.prefix_projection else t

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(K_l, V_l)``, each (batch, H_kv, P, d_h)."""
        g = self.geo
        t = self.table().to(dtype).view(self.P, g.layers, 2, g.kv_heads, g.head_dim).permute(1, 2, 3, 0, 4)
        t = t.unsqueeze(2).expand(g.layers, 2, batch, g.kv_heads, self.P, g.head_dim)
        if self.p_drop > 0 and self.training:
            t = nn.functional.dropout(t, self.p_drop, training=True)
        return [(t[i, 0], t[i, 1]) for i in range(g.layers)]

    def rewrite(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        batch, length, device = ml.batch_and_length(inputs)
        _, cache = ml.pop_cache(inputs)
        if ml.cache_length(cache) == 0:  # first forward of a sequence: the prefix goes into the cache
            ml.check_length(model, self.method, self.P, length)
            cache = new_cache(model) if cache is None else cache
            dtype = model.get_input_embeddings().weight.dtype if hasattr(model, "get_input_embeddings") \
                else self.embedding.weight.dtype
            for i, (k, v) in enumerate(self.key_values(batch, dtype)):
                cache.update(k.to(device), v.to(device), i)
            ml.tag_cache(cache, self.P)
        elif ml.cache_tag(cache) != self.P:
            raise PeftkitError(f"{self.method}: the model was given a non-empty cache that does not start with this "
                               "adapter's prefix; start from an empty cache (or none)")
        inputs[self.cache_arg] = cache
        ml.prepend_in_past(inputs, self.P, ml.cache_length(cache), batch, length, device)
        return inputs

    @torch.no_grad()
    def fold(self) -> None:
        """Replace ``MLP(E)`` by the table it computes (the prefixes are unchanged; the MLP and E are dropped)."""
        if not self.config.prefix_projection:
            raise PeftkitError(f"{self.method}: this adapter has no projection MLP to fold")
        table = self.table().detach().clone()
        trainable = self.embedding.weight.requires_grad
        self.embedding = nn.Embedding(self.P, self.geo.width, device=table.device, dtype=table.dtype)
        self.embedding.weight.copy_(table)
        self.embedding.weight.requires_grad_(trainable)
        del self.transform
        self.config = dataclasses.replace(self.config, prefix_projection=False)

    def hf_embeddings(self) -> torch.Tensor:
        return self.table().detach()

    def to_hf_config(self, model: nn.Module) -> dict[str, Any]:
        g = self.geo
        return {"num_virtual_tokens": self.P, "token_dim": g.kv_heads * g.head_dim, "num_transformer_submodules": 1,
                "num_attention_heads": g.kv_heads, "num_layers": g.layers,
                "encoder_hidden_size": self.config.encoder_hidden_size,
                "prefix_projection": self.config.prefix_projection}

    def extra_repr(self) -> str:
        g = self.geo
        return (f"P={self.P}, layers={g.layers}, kv_heads={g.kv_heads}, head_dim={g.head_dim}, "
                f"projection={self.config.prefix_projection}")


def fold_projection(model: nn.Module, name: str | None = None) -> None:
    """Fold the projection MLP of key/value-prefix adapter ``name`` (default: the only / active one) into its
    prefix table, in place: outputs stay the same, the adapter then saves as a plain table
    (``prefix_projection=False``)."""
    from .state import configs, single_name

    name = single_name(model, name)
    adapter = ml.model_adapters(model).get(name)
    if not isinstance(adapter, KVPrefix):
        raise PeftkitError(f"adapter {name!r} is not a key/value prefix adapter")
    adapter.fold()
    configs(model)[name] = adapter.config
