"""Hugging Face PEFT's entry points, so that code written against PEFT runs with only its import changed::

    from peftkit import LoraConfig, TaskType, get_peft_model          # was: from peft import ...
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

PEFT wraps the model in a ``PeftModel``; peftkit adapts it in place (DESIGN principle 5: the model stays the
user's model), so :func:`get_peft_model` returns the same object, given PEFT's two convenience methods
``print_trainable_parameters`` and ``get_nb_trainable_parameters``. :meth:`PeftModel.from_pretrained` loads an
adapter folder (peftkit's or PEFT's) into a base model the same way and returns it. A config may be a peftkit
config or a ``peft`` config object (translated by :func:`peftkit.from_peft_config`).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from .config import AdapterConfig
from .model import adapt, load, summary
from .registry import from_peft_config


class TaskType(enum.StrEnum):
    """PEFT's task types; a member is its own string (``TaskType.SEQ_CLS == "SEQ_CLS"``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each tensor counted once — PEFT's ``get_nb_trainable_parameters``."""
    s = summary(model)
    return s.trainable, s.total


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = get_nb_trainable_parameters(model)
    share = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


class _ModelMethod:
    """A PEFT convenience method put on an adapted model instance. It holds the model and a module-level function,
    and pickles / deep-copies as that pair (a bound method in a module's ``__dict__`` does not unpickle)."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module], Any]) -> None:
        self.model, self.fn = model, fn

    def __call__(self) -> Any:
        return self.fn(self.model)

    def __reduce__(self) -> tuple[Any, ...]:
        return _ModelMethod, (self.model, self.fn)


def _with_peft_methods(model: nn.Module) -> nn.Module:
    for fn in (print_trainable_parameters, get_nb_trainable_parameters):
        if not hasattr(type(model), fn.__name__):  # never shadow the model's own method
            object.__setattr__(model, fn.__name__, _ModelMethod(model, fn))
    return model


def _as_config(peft_config: Any) -> AdapterConfig:
    return peft_config if isinstance(peft_config, AdapterConfig) else from_peft_config(peft_config)


def get_peft_model(
    model: nn.Module, peft_config: Any, adapter_name: str = "default", **_peft_options: Any
) -> nn.Module:
    """Adapt ``model`` in place with ``peft_config`` (a peftkit or ``peft`` config) under ``adapter_name`` and return
    it. PEFT's other keywords (``mixed``, ``autocast_adapter_dtype``, ``revision``, ``low_cpu_mem_usage``) are
    accepted: peftkit keeps float32 adapters on half-precision bases by default and builds adapters in place."""
    adapt(model, _as_config(peft_config), adapter_name)
    return _with_peft_methods(model)


class PeftModel:
    """PEFT's ``PeftModel.from_pretrained`` for peftkit: the base model comes back adapted, not wrapped."""

    @staticmethod
    def from_pretrained(model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, **_peft_options: Any) -> nn.Module:
        """Load the adapter folder ``model_id`` (peftkit's or Hugging Face PEFT's format) into ``model`` as
        ``adapter_name``; frozen unless ``is_trainable`` (as PEFT)."""
        load(model, model_id, adapter_name, trainable=is_trainable)
        return _with_peft_methods(model)
