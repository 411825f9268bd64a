"""peftkit — parameter-efficient fine-tuning for any PyTorch module.

    import peftkit
    cfg = peftkit.config("lora", target_modules=["query", "value"], r=8, alpha=16)
    peftkit.adapt(model, cfg)              # in place; the model keeps forward / generate / save_pretrained
    ...train...
    peftkit.save(model, "my-adapter")      # adapter_config.json + adapter_model.safetensors
    peftkit.load(fresh_model, "my-adapter")

Hugging Face PEFT names work too: ``peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["q"], lora_dropout=0.05)``,
``peftkit.config("lora", **peft_config.to_dict())``, ``peftkit.from_peft_config(peft_config)`` (see
:mod:`peftkit.core.peft_names`).
"""

from __future__ import annotations

from typing import Any

from . import compose
from .core.adapter import unfused
from .core.compose import combine
from .core.config import AdapterConfig
from .core.errors import PeftkitError
from .core.hotswap import hotswap, prepare_hotswap
from .core.model import (
    active_adapters,
    adapt,
    adapted_layers,
    adapter_names,
    adapter_state_dict,
    condition,
    delete,
    disable,
    get_config,
    load,
    merge,
    merge_and_unload,
    mixed_batch,
    save,
    set_active,
    set_rank,
    summary,
    trainable_parameters,
    unload,
    unmerge,
)
from .core.peft_api import PeftModel, TaskType, get_peft_model, print_trainable_parameters
from .core.procedure import Procedure
from .core.registry import all_methods, from_peft_config
from .core.registry import get as get_method
from .quant import bnb as _bnb  # noqa: F401 - registers the quantised host kinds (bitsandbytes) with the core

__version__ = "0.1.0"


def config(method: str, **fields: Any) -> AdapterConfig:
    """Build the config of a registered method by name, validating every field."""
    return get_method(method).config.from_dict(fields)


def __getattr__(name: str) -> Any:
    """``peftkit.LoraConfig`` etc.: every registered method's config class by its class name."""
    for info in all_methods():
        if info.config.__name__ == name:
            return info.config
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")


__all__ = [
    "AdapterConfig", "PeftModel", "PeftkitError", "Procedure", "TaskType", "get_peft_model",
    "print_trainable_parameters", "active_adapters", "adapt", "adapted_layers", "adapter_names",
    "adapter_state_dict", "all_methods", "combine", "compose", "condition", "config", "delete", "disable",
    "from_peft_config", "get_config", "get_method", "hotswap", "load",
    "merge", "merge_and_unload", "mixed_batch", "prepare_hotswap", "save", "set_active", "set_rank", "summary",
    "trainable_parameters",
    "unload",
    "unfused", "unmerge",
]
