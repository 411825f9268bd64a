"""Model-level adapters: methods that change what the whole model sees (virtual input tokens, per-layer key/value
prefixes) instead of wrapping host layers.

A model-level adapter is an ``nn.Module`` with one job: given the keyword arguments of the model's forward, return
them rewritten (:meth:`ModelAdapter.rewrite`). The core keeps every model-level adapter of a model in one container,
``model.peftkit_model_adapters`` (so its tensors train, save, copy, pickle and move with the model), and registers
one forward pre-hook on the model through which the active adapter rewrites each call — including the calls that
``generate`` makes. The model keeps its own ``forward`` and ``generate``.

Virtual positions. Both kinds of model-level method put ``n`` positions in front of the real tokens, which every
per-token input must follow:

* in the current sequence (virtual input tokens): attention mask ``[1ₙ, mask]``, labels ``[-100ₙ, labels]``,
  token types ``[0ₙ, types]``, position ids ``[0..n-1, pos + n]`` (:func:`prepend_in_sequence`);
* in the past, i.e. in the key/value cache (prefixes, or virtual tokens during cached generation): attention mask
  ``[1ₙ, mask]`` and position ids ``pos + n`` (:func:`prepend_in_past`).

A cache that holds virtual positions is tagged (:func:`tag_cache`) so that later generation steps — which pass the
same cache object back — are recognised and only their mask and positions are shifted.

At most one model-level adapter is active at a time (next to any number of layer adapters); it is never mergeable
and never routed per sample in a mixed batch (it changes the whole call). Only Hugging Face models (a config,
keyword inputs, ``get_input_embeddings`` / a key/value cache as the method needs) can host one; encoder-decoder
models are refused.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import AdapterConfig
from .errors import PeftkitError

CONTAINER = "peftkit_model_adapters"
CACHE_ARGS = ("cache", "past_key_values")  # transformers 5.x name first, the deprecated name second
_TAG = "peftkit_virtual_positions"
_LAYER_FIELDS = ("target_modules", "exclude_modules", "target_types", "layers_to_transform", "layers_pattern")


@dataclass
class ModelLevelConfig(AdapterConfig):
    """Base config of model-level methods. They adapt no layers, so the layer-targeting fields must stay unset;
    ``modules_to_save`` (e.g. a classification head) and ``bias="all"`` work as for any method."""

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        for f in _LAYER_FIELDS:
            if getattr(self, f) is not None:
                raise PeftkitError(
                    f"{name}.{f}: {self.method or name} is a model-level method (it adapts the model's inputs, "
                    f"not its layers); leave {f} unset"
                )
        if self.overrides:
            raise PeftkitError(f"{name}.overrides: a model-level method has no per-module settings")
        if self.bias == "adapter_only":
            raise PeftkitError(f"{name}.bias: 'adapter_only' needs adapted layers; use 'none' or 'all'")


class ModelAdapter(nn.Module):
    """Base class of a model-level method's adapter (one per adapter name, not one per layer).

    Subclasses implement :meth:`rewrite` and :meth:`expected_params`. The adapter never holds the model (it would
    become a submodule of itself); ``rewrite`` receives it. ``added_positions`` is how many positions the adapter
    puts in front of the model's output sequence (virtual input tokens: ``n``; prefixes: 0).
    """

    method: ClassVar[str] = ""
    #: Hugging Face PEFT format (methods registered with ``hf_peft_type``): the state key of this adapter that holds
    #: the file's single tensor ``prompt_embeddings`` when read; :meth:`hf_embeddings` gives it when written
    hf_state_key: ClassVar[str | None] = None

    def __init__(self, model: nn.Module, config: ModelLevelConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def added_positions(self) -> int:
        return 0

    def rewrite(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of ``model.forward`` rewritten for this adapter (positional arguments are already
        turned into keywords)."""
        raise NotImplementedError

    @classmethod
    def expected_params(cls, model: nn.Module, config: Any) -> int:
        """Trainable parameters of this adapter on ``model`` (the method's formula)."""
        raise NotImplementedError

    def check_loaded(self) -> None:
        """Called after saved tensors were loaded, before the adapter is installed (raise on inconsistency)."""

    # -- Hugging Face PEFT format -------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> ModelLevelConfig | None:
        """This method's config for a Hugging Face PEFT config of its ``hf_peft_type``, or None (not mine)."""
        return None

    def to_hf_config(self, model: nn.Module) -> dict[str, Any] | None:
        """The method's fields of a Hugging Face PEFT config; None: cannot be exported."""
        return None

    def hf_embeddings(self) -> torch.Tensor:
        """The tensor Hugging Face PEFT saves as ``prompt_embeddings``."""
        assert self.hf_state_key is not None
        return self.state_dict()[self.hf_state_key]

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """Export: this adapter's own tensors of a Hugging Face PEFT file, by file key (default: the prompt-learning
        ``prompt_embeddings``)."""
        return {"prompt_embeddings": self.hf_embeddings().detach().contiguous()}

    @classmethod
    def hf_state(cls, model: nn.Module, config: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Import: this adapter's state (keys as in its ``state_dict``) from a Hugging Face PEFT file's ``tensors``
        (file keys), removing the ones it takes from ``tensors`` (the rest are ``modules_to_save`` copies). Default:
        the prompt-learning ``prompt_embeddings``."""
        if "prompt_embeddings" not in tensors:
            raise PeftkitError("tensor 'prompt_embeddings' is missing from the file")
        if cls.hf_state_key is None:
            raise PeftkitError(f"{cls.__name__} has no Hugging Face PEFT state key; it cannot read a PEFT file")
        return {cls.hf_state_key: tensors.pop("prompt_embeddings")}

    def extra_repr(self) -> str:
        return f"method={self.method}"


class ModelAdapters(nn.Module):
    """The container attached to the model as ``peftkit_model_adapters``; its :meth:`hook` is the model's forward
    pre-hook. At most one model-level adapter is active at a time."""

    def __init__(self, arg_names: list[str]) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        self.arg_names = arg_names  # the model's positional forward parameters, to turn args into keywords

    def hook(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.disabled or not self.active:
            return None
        if len(args) > len(self.arg_names):
            raise PeftkitError(f"{type(model).__name__}.forward got {len(args)} positional arguments; a model-level "
                               f"adapter can name only {len(self.arg_names)} ({', '.join(self.arg_names)})")
        inputs = dict(kwargs)
        for n, a in zip(self.arg_names, args):
            if n in inputs:
                raise TypeError(f"{type(model).__name__}.forward got multiple values for argument {n!r}")
            inputs[n] = a
        for n in self.active:
            inputs = self.adapters[n].rewrite(model, inputs)
        return (), inputs

    def extra_repr(self) -> str:
        return f"active={self.active}"


# -- the core's side: install, activate, remove ---------------------------------------------------------------
def container(model: nn.Module) -> ModelAdapters | None:
    c = model._modules.get(CONTAINER)
    return c if isinstance(c, ModelAdapters) else None


def model_adapters(model: nn.Module) -> dict[str, ModelAdapter]:
    """Every model-level adapter of ``model`` by name."""
    c = container(model)
    return dict(c.adapters.items()) if c is not None else {}


def _positional_names(model: nn.Module) -> list[str]:
    out = []
    for p in inspect.signature(model.forward).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        out.append(p.name)
    return out


def install(model: nn.Module, name: str, adapter: ModelAdapter) -> None:
    c = container(model)
    if c is None:
        c = ModelAdapters(_positional_names(model)).train(model.training)
        model.add_module(CONTAINER, c)
        model.register_forward_pre_hook(c.hook, with_kwargs=True)
    c.adapters[name] = adapter.train(model.training)


def live(model: nn.Module, adapter: ModelAdapter) -> bool | None:
    """For a model-level adapter that works through hooks on the model's modules: None when ``adapter`` is no longer
    installed on ``model`` (its hooks should remove themselves), else whether it is the active one now (and the model's
    adapters are not disabled)."""
    c = container(model)
    if c is None or not any(a is adapter for a in c.adapters.values()):
        return None
    return not c.disabled and any(c.adapters[n] is adapter for n in c.active if n in c.adapters)


def check_active(model: nn.Module, names: list[str]) -> None:
    level = [n for n in names if n in model_adapters(model)]
    if len(level) > 1:
        raise PeftkitError(f"at most one model-level adapter can be active at a time, got {level}")


def set_active(model: nn.Module, names: list[str]) -> None:
    c = container(model)
    if c is not None:
        c.active = [n for n in names if n in c.adapters]


def remove(model: nn.Module, name: str) -> None:
    """Delete adapter ``name``; the container and its hook go with the last one."""
    c = container(model)
    if c is None or name not in c.adapters:
        return
    del c.adapters[name]
    c.active = [n for n in c.active if n != name]
    if not len(c.adapters):
        for k, fn in list(model._forward_pre_hooks.items()):
            if getattr(fn, "__self__", None) is c:
                del model._forward_pre_hooks[k]
                model._forward_pre_hooks_with_kwargs.pop(k, None)
        del model._modules[CONTAINER]


def check_mixable(model: nn.Module, names: list[str | None]) -> None:
    """Mixed batches route layers per sample; a model-level adapter changes the whole call, so it cannot take part."""
    c = container(model)
    if c is None:
        return
    involved = sorted({n for n in names if n in c.adapters} | set(c.active))
    if involved:
        raise PeftkitError(f"model-level adapter(s) {involved} cannot be routed per sample in a mixed batch; "
                           "deactivate them (set_active) or run separate batches")


# -- helpers for methods ----------------------------------------------------------------------------------
def hf_config(model: nn.Module, method: str) -> Any:
    """The text config of a Hugging Face model, or a clear error naming the model class."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise PeftkitError(f"{method} needs a Hugging Face model (a PreTrainedModel with a config); "
                           f"got {type(model).__name__}")
    if getattr(cfg, "is_encoder_decoder", False):
        raise PeftkitError(f"{method}: encoder-decoder models ({type(model).__name__}) are not supported")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return n if isinstance(n, int) else None


def check_room(model: nn.Module, method: str, field: str, n: int) -> None:
    """``n`` virtual positions must leave room for at least one real token within the model's positions."""
    limit = max_positions(model)
    if limit is not None and n >= limit:
        raise PeftkitError(f"{method}: {field}={n} leaves no room for input tokens: "
                           f"{type(model).__name__} has max_position_embeddings={limit}")


def check_length(model: nn.Module, method: str, n: int, length: int) -> None:
    """At the first forward of a sequence: ``n`` virtual + ``length`` real positions must fit the model."""
    limit = max_positions(model)
    if limit is not None and n + length > limit:
        raise PeftkitError(f"{method}: {n} virtual + {length} input positions exceed {type(model).__name__}'s "
                           f"max_position_embeddings={limit}; shorten the input to at most {limit - n} tokens")


def batch_and_length(inputs: dict[str, Any]) -> tuple[int, int, torch.device]:
    """Batch size, sequence length and device of the call, from ``input_ids`` or ``inputs_embeds``."""
    x = inputs.get("input_ids")
    if x is None:
        x = inputs.get("inputs_embeds")
    if x is None:
        raise PeftkitError("a model-level adapter needs input_ids or inputs_embeds in the model call")
    return x.shape[0], x.shape[1], x.device


def pop_cache(inputs: dict[str, Any]) -> tuple[str | None, Any]:
    """Take the key/value cache out of the call: ``(argument name it came under, cache)``, ``(None, None)`` if none.
    With ``use_cache=False`` a cache passed along is not continued (``generate(use_cache=False)`` hands back the
    cache the previous full-sequence call returned): the call starts afresh, as without a cache."""
    found = [(k, inputs.pop(k)) for k in CACHE_ARGS if k in inputs]
    found = [(k, c) for k, c in found if c is not None]
    if not found or inputs.get("use_cache") is False:
        return None, None
    return found[0]


def cache_length(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def tag_cache(cache: Any, n: int) -> None:
    setattr(cache, _TAG, n)


def cache_tag(cache: Any) -> int | None:
    return getattr(cache, _TAG, None)


def _mask_2d(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise PeftkitError(f"a model-level adapter extends a 2-D attention mask (batch, length); got shape "
                           f"{tuple(mask.shape)}")


def prepend_in_sequence(inputs: dict[str, Any], n: int, batch: int, length: int, device: torch.device) -> None:
    """``n`` virtual positions in front of this call's ``length`` tokens: mask, labels, token types, positions."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        _mask_2d(mask)
        inputs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == length:
        inputs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
    types = inputs.get("token_type_ids")
    if types is not None:
        inputs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
    pos = inputs.get("position_ids")
    if pos is not None:
        head = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
        inputs["position_ids"] = torch.cat([head, pos + n], dim=-1)


def prepend_in_past(inputs: dict[str, Any], n: int, past: int, batch: int, length: int, device: torch.device) -> None:
    """``n`` virtual positions already in the cache (``past`` positions in all, virtual ones included): the mask
    gains ``n`` visible columns (or becomes all-ones of ``past + length`` when absent, as an encoder without a
    causal mask needs it to see the cache) and position ids move by ``n``."""
    mask = inputs.get("attention_mask")
    if mask is None:
        inputs["attention_mask"] = torch.ones(batch, past + length, dtype=torch.long, device=device)
    else:
        _mask_2d(mask)
        inputs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    pos = inputs.get("position_ids")
    if pos is not None:
        inputs["position_ids"] = pos + n
