"""What is on an adapted model: its adapters' configs and names, the adapted layers, the saved copies of
``modules_to_save``, and an adapter's tensors — read by the model API (:mod:`.model`), the PEFT format (:mod:`.hf`)
and the procedures, without importing either of them (no import circle inside the core)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from . import model_level as ml
from .config import AdapterConfig
from .errors import PeftkitError
from .layer import AdaptedLayer, SavedModule


def configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """Adapter name -> config, kept on the model (created empty on first use)."""
    cfgs = model.__dict__.get("peftkit_configs")
    if cfgs is None:
        cfgs = {}
        model.__dict__["peftkit_configs"] = cfgs
    return cfgs


def adapter_names(model: nn.Module) -> list[str]:
    return list(configs(model))


def get_config(model: nn.Module, name: str) -> AdapterConfig:
    cfgs = configs(model)
    if name not in cfgs:
        raise PeftkitError(f"no adapter named {name!r}; loaded adapters: {sorted(cfgs) or '(none)'}")
    return cfgs[name]


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("peftkit_active", []))


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for n, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            yield n, m


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for n, m in model.named_modules():
        if isinstance(m, SavedModule):
            yield n, m


def single_name(model: nn.Module, name: str | None) -> str:
    """``name`` if it is loaded; else the one active adapter, else the one loaded adapter; else an error."""
    if name is not None:
        get_config(model, name)
        return name
    act = active_adapters(model)
    if len(act) == 1:
        return act[0]
    names = adapter_names(model)
    if len(names) == 1:
        return names[0]
    raise PeftkitError(f"several adapters loaded ({names}); say which one with name=")


def bias_params(model: nn.Module, mode: str, layers: set[str]) -> list[tuple[str, nn.Parameter]]:
    """Host biases made trainable by ``bias="all"`` (every bias) or ``"adapter_only"`` (biases of ``layers``)."""
    out = []
    for n, p in model.named_parameters():
        if not n.endswith("bias") or ".adapters." in n or ".copies." in n or ".fusions." in n:
            continue
        clean = n.replace(".base_layer", "").replace(".original_module", "")
        if mode == "all" or clean.rsplit(".", 1)[0] in layers:
            out.append((clean, p))
    return out


def adapter_bias_params(model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    mode = configs(model)[name].bias
    if mode == "none":
        return []
    return bias_params(model, mode, {path for path, layer in adapted_layers(model) if name in layer.adapters})


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors that make up adapter ``name``, keyed ``adapter.<module>.<tensor>``, ``saved.<module>.<tensor>``
    and ``bias.<module>.bias`` (a model-level adapter's own tensors: ``model.<tensor>``)."""
    name = single_name(model, name)
    out: dict[str, torch.Tensor] = {}
    if name in ml.model_adapters(model):
        out.update({f"model.{k}": v for k, v in ml.model_adapters(model)[name].state_dict().items()})
    for path, layer in adapted_layers(model):
        if name in layer.adapters:
            a = layer.adapters[name]
            for k, v in a.state_dict().items():
                if k.split(".")[0] not in a.regenerated:
                    out[f"adapter.{path}.{k}"] = v
    for path, sm in saved_modules(model):
        if name in sm.copies:
            for k, v in sm.copies[name].state_dict().items():
                out[f"saved.{path}.{k}"] = v
    for n, p in adapter_bias_params(model, name):
        out[f"bias.{n}"] = p
    return out
