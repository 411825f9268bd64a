"""LoRA's ``trainable_token_indices`` (Hugging Face PEFT's ``LoraConfig`` option): next to the low-rank updates,
chosen rows of embedding layers train as in :mod:`peftkit.methods.trainable_tokens` — one adapter, one file.

The field is ``{embedding module name: token ids}`` or a list of token ids for the model's input embedding
(``get_input_embeddings()``, as PEFT reads it). Resolving the config for a model makes it a dict keyed by full module
names, which are then targeted as named (:meth:`~peftkit.core.config.AdapterConfig.extra_targets`); on those layers
the adapter is a :class:`~peftkit.methods.trainable_tokens.TrainableTokens` one (rows replaced, not a low-rank
update — even where ``target_modules`` also matches), saved in PEFT's layout
``<module>.token_adapter.trainable_tokens_delta``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from peftkit.core.errors import PeftkitError
from peftkit.core.hf import HFTensor
from peftkit.core.host import Host
from peftkit.core.layer import AdaptedLayer
from peftkit.methods.trainable_tokens import TrainableTokens, TrainableTokensConfig


def check(value: Any) -> None:
    """Raise unless ``value`` is None, a list of token ids, or {module name: list of token ids}."""
    if value is None:
        return
    lists = list(value.values()) if isinstance(value, dict) else [value]
    if not isinstance(value, dict | list) or not value or (isinstance(value, dict) and not all(
            isinstance(k, str) for k in value)):
        raise PeftkitError(f"trainable_token_indices must be a list of token ids or {{module name: token ids}}, "
                           f"got {value!r}")
    for ids in lists:
        if not isinstance(ids, list) or not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                       for i in ids):
            raise PeftkitError(f"trainable_token_indices: {ids!r} is not a non-empty list of token ids (integers "
                               f">= 0)")


def token_ids(config: Any, name: str) -> list[int] | None:
    """The token ids whose rows train on module ``name``, or None (a low-rank layer)."""
    spec = getattr(config, "trainable_token_indices", None)
    if not isinstance(spec, dict):
        return None
    for key, ids in spec.items():
        if name == key or name.endswith("." + key):
            return list(ids)
    return None


def resolve(config: Any, model: nn.Module) -> Any:
    """``config`` with ``trainable_token_indices`` keyed by the full names of the embedding layers it means."""
    spec = config.trainable_token_indices
    if not spec:
        return config
    if isinstance(spec, list):
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        name = next((n for n, m in model.named_modules() if emb is not None and
                     (m is emb or (isinstance(m, AdaptedLayer) and m.base_layer is emb))), None)
        if name is None:
            raise PeftkitError("trainable_token_indices as a list needs a model with get_input_embeddings(); give "
                               "{embedding module name: token ids} instead")
        spec = {name: spec}
    out: dict[str, list[int]] = {}
    for key, ids in spec.items():
        found = [n for n, m in model.named_modules() if (n == key or n.endswith("." + key))
                 and isinstance(m.base_layer if isinstance(m, AdaptedLayer) else m, nn.Embedding)]
        if not found:
            raise PeftkitError(f"trainable_token_indices: {key!r} names no nn.Embedding layer of this model")
        out.update({n: list(ids) for n in found})
    return config if out == config.trainable_token_indices else dataclasses.replace(config, trainable_token_indices=out)


def token_adapter(host: Host, config: Any, ids: list[int]) -> TrainableTokens:
    """The rows adapter of an embedding named in ``trainable_token_indices`` (it keeps ``config``, LoRA's)."""
    adapter = TrainableTokens(host, TrainableTokensConfig(target_modules=[host.name], token_indices=ids,
                                                          init_weights=config.init != "random"))
    adapter.config = config
    return adapter


def token_layout(host: Host, ids: list[int]) -> dict[str, HFTensor]:
    shape = (len(ids), host.d_out)
    return {"trainable_tokens_delta": HFTensor("token_adapter.trainable_tokens_delta", shape, shape)}


#: LoRA's fields that are Hugging Face PEFT options of the same name (read and written as they are)
OPTIONS = ("lora_bias", "trainable_token_indices", "use_bdlora", "kasa_config", "target_parameters")


def hf_fields(config: Any, hosts: list[Host]) -> dict[str, Any]:
    """PEFT's ``lora_bias`` / ``trainable_token_indices`` / ``use_bdlora`` / ``kasa_config`` / ``target_parameters``
    fields, and the
    low-rank layers alone as its ``target_modules`` (PEFT refuses a low-rank update on a token layer)."""
    out = {k: getattr(config, k) for k in OPTIONS}
    if config.trainable_token_indices:
        out["target_modules"] = [h.name for h in hosts if token_ids(config, h.name) is None]
    return out
