"""What an adapted model answers to beyond peftkit's own functions, as a Hugging Face PEFT model does.

- ``model(**batch, adapter_names=[...])`` — PEFT's mixed-batch argument: sample ``i`` runs with adapter
  ``adapter_names[i]`` (``"__base__"`` or None: no adapter), exactly as inside :func:`peftkit.mixed_batch` (which
  it enters for the duration of the call; ``generate(..., adapter_names=...)`` likewise, each name covering the rows
  beam search or ``num_return_sequences`` expand its sequence into). Unknown
  names, a batch of another size, merged adapters and model-level adapters are refused as ``mixed_batch`` refuses
  them. A forward pre-hook on the adapted model takes the argument out before the model's own ``forward`` sees it.
- ``model.save_pretrained(directory)`` on a model that has one (a transformers ``PreTrainedModel``) saves the
  adapters, not the model: it writes what ``PeftModel.save_pretrained`` writes — the adapter named ``"default"`` (or
  the only / first one) in ``directory`` itself and every other adapter in ``directory/<name>`` — with
  :func:`peftkit.save` in its default format, and no base weights. Reload with ``peftkit.load(base, directory)``
  (or, for a Hugging Face PEFT format folder, ``PeftModel.from_pretrained(base, directory)``). ``transformers.Trainer``
  saves a model through ``save_pretrained``, so its checkpoints hold the adapters (and the optimiser state) only; a
  ``checkpoint-<step>`` folder also gets ``model.safetensors.index.json`` + ``adapter_resume.safetensors`` (the
  adapters' tensors under the model's own keys) so that ``Trainer.train(resume_from_checkpoint=...)`` finds and
  loads them (the Trainer then logs that the base weights were missing from the checkpoint: they were never saved).
  After :func:`peftkit.unload` / :func:`peftkit.merge_and_unload` the model's own ``save_pretrained`` is back.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PeftkitError
from .state import adapter_names

RESUME_INDEX = "model.safetensors.index.json"
RESUME_FILE = "adapter_resume.safetensors"
_STACK = "peftkit_adapter_names"  # per model: [call depth, [(depth, mixed_batch context), ...]]

#: what the conventions call back in :mod:`.model` (``mixed_batch``, ``save``), handed over by :func:`bind` when that
#: module loads: :mod:`.model` installs the conventions on ``adapt``, so importing it from here would be a circle
_MODEL: dict[str, Callable[..., Any]] = {}


def bind(*, mixed_batch: Callable[..., Any], save: Callable[..., Any]) -> None:
    """Called once by :mod:`.model`: the functions the hooks and ``save_pretrained`` use."""
    _MODEL.update(mixed_batch=mixed_batch, save=save)


def _names_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    state = module.__dict__.setdefault(_STACK, [0, []])
    state[0] += 1  # the post hook (always called, even when this one raises) takes it off again
    if "adapter_names" not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    if names is None:
        return args, kwargs
    if isinstance(names, str) or not hasattr(names, "__len__"):
        raise PeftkitError(f"adapter_names must be a list with one adapter name per sample, got {names!r}")
    ctx = _MODEL["mixed_batch"](module, list(names))
    ctx.__enter__()
    state[1].append((state[0], ctx))
    return args, kwargs


def _names_post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    state = module.__dict__.get(_STACK)
    if not state:
        return
    if state[1] and state[1][-1][0] == state[0]:
        state[1].pop()[1].__exit__(None, None, None)
    state[0] -= 1


def install(model: nn.Module) -> None:
    """Give an adapted model the ``adapter_names=`` argument and (when it has one) an adapter ``save_pretrained``."""
    if _names_pre_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_names_pre_hook, with_kwargs=True)
        model.register_forward_hook(_names_post_hook, always_call=True)
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        model.__dict__["save_pretrained"] = functools.partial(save_pretrained, model)
    if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
        model.__dict__["generate"] = functools.partial(generate, model)


def remove(model: nn.Module) -> None:
    """Undo :func:`install` (the model has no adapters left)."""
    for hooks, fn in ((model._forward_pre_hooks, _names_pre_hook), (model._forward_hooks, _names_post_hook)):
        for k in [k for k, v in hooks.items() if v is fn]:
            del hooks[k]
            model._forward_hooks_always_called.pop(k, None)
    model.__dict__.pop(_STACK, None)
    for attr in ("save_pretrained", "generate"):
        if isinstance(model.__dict__.get(attr), functools.partial):
            del model.__dict__[attr]


def generate(model: nn.Module, *args: Any, adapter_names: Any = None, **kwargs: Any) -> Any:
    """The model's own ``generate``; with ``adapter_names`` (one per input sequence) inside
    :func:`peftkit.mixed_batch`, each name standing for the rows that beam search / ``num_return_sequences`` expand
    its sequence into."""
    own = type(model).generate
    if adapter_names is None:
        return own(model, *args, **kwargs)
    if isinstance(adapter_names, str) or not hasattr(adapter_names, "__len__"):
        raise PeftkitError(f"adapter_names must be a list with one adapter name per sequence, got {adapter_names!r}")
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
    returns = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
    with _MODEL["mixed_batch"](model, list(adapter_names), repeat=max(int(beams), int(returns))):
        return own(model, *args, **kwargs)


def _layout(names: list[str]) -> dict[str, str]:
    """Adapter name -> sub-folder, as ``PeftModel.save_pretrained``: ``"default"`` (else the first) at the root."""
    root = "default" if "default" in names else names[0]
    return {n: "" if n == root else n for n in names}


def _resume_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything training changes, under the model's own ``state_dict`` keys: the adapters' and saved modules'
    tensors, the model-level adapters, and any other trainable parameter (e.g. trained biases)."""
    from .model_level import CONTAINER

    trained = {id(p) for p in model.parameters() if p.requires_grad}
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if (".adapters." in f".{k}" or ".copies." in f".{k}" or k.startswith(CONTAINER + ".")
                or id(v) in trained):
            out[k] = v.detach().contiguous().cpu()
    return out


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict[str, Any] | None = None, selected_adapters: list[str] | None = None,
                    push_to_hub: bool = False, **kwargs: Any) -> None:
    """Save the model's adapters as ``PeftModel.save_pretrained`` lays them out (see the module docstring): no base
    weights. ``selected_adapters``: only these (default: all). ``state_dict`` (which ``transformers.Trainer`` passes)
    is not used: the adapters are read from the model. Other transformers keywords (``safe_serialization``,
    ``max_shard_size``, ...) have no meaning for an adapter folder and are ignored."""
    if push_to_hub:
        raise PeftkitError("save_pretrained(push_to_hub=True): save to a folder, then upload it with "
                           "huggingface_hub.upload_folder")
    if not is_main_process:
        return
    names = adapter_names(model)
    if not names:
        raise PeftkitError("save_pretrained: the model has no adapters left")
    chosen = names if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise PeftkitError(f"save_pretrained: unknown adapter(s) {unknown}; loaded adapters: {names}")
    directory = Path(save_directory)
    for name, sub in _layout(chosen).items():
        _MODEL["save"](model, directory / sub if sub else directory, name, overwrite=True)
    if re.fullmatch(r"checkpoint-\d+", directory.name):  # a transformers.Trainer checkpoint: make it resumable
        from safetensors.torch import save_file

        tensors = _resume_tensors(model)
        save_file(tensors, str(directory / RESUME_FILE), metadata={"format": "pt"})
        index = {"metadata": {"peftkit": "adapter tensors only; the base model's weights are not in this folder"},
                 "weight_map": {k: RESUME_FILE for k in sorted(tensors)}}
        (directory / RESUME_INDEX).write_text(json.dumps(index, indent=2))
