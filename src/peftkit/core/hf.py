"""Hugging Face PEFT file format, both directions.

A Hugging Face adapter folder holds ``adapter_config.json`` (with a ``peft_type``) and
``adapter_model.safetensors`` keyed ``base_model.model.<module path>.<tensor>``. Reading one:

1. the registry gives the methods whose ``hf_peft_type`` is the file's ``peft_type``; each adapter class's
   ``from_hf_config`` either returns a peftkit config or None (not mine: e.g. LoRA declines ``use_dora``);
2. every host layer of the model asks that adapter class for its ``hf_layout`` (which HF key holds which of its
   tensors, in which shape); the layers whose keys are in the file are the targets — the file, not the HF
   targeting rules, decides what is adapted, so ``target_modules`` lists, regexes, ``layers_to_transform`` and
   ``exclude_modules`` all come out exactly as Hugging Face applied them;
3. the other keys are ``modules_to_save`` copies, trainable biases, or base weights the file repeats (kept only
   when they equal the model's); anything else means the adapter belongs to another architecture.

Nothing touches the model here: :func:`peftkit.core.model.load` plans and checks the returned config and tensors
before installing them. Writing (:func:`export_adapter`) is the inverse, atomic through :mod:`peftkit.core.io`.

The shared Hugging Face ``LORA`` config (r, lora_alpha, use_rslora, rank/alpha patterns, the options peftkit
cannot reproduce) is translated here for every low-rank method that reads or writes that format, with the tables of
:mod:`.peft_names` that the config constructors also use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import io, registry
from .config import AdapterConfig
from .errors import PeftkitError
from .hf_tensor import HFTensor as HFTensor  # re-exported: methods import it from here
from .host import Host, host_kind
from .model_level import CONTAINER
from .peft_names import (
    BASE_CHANGING_INITS,
    BIAS_IN,
    BIAS_OUT,
    INIT_TO_PEFT,
    LORA_UNSUPPORTED,
    overrides_to_patterns,
    plain_number,
)

if TYPE_CHECKING:
    from .registry import MethodInfo

PREFIX = "base_model.model."
DEFAULT_NAME = "default"


def _host_tensor(host: Host, name: str) -> torch.Tensor:
    t = getattr(host.module, name, None)
    if not isinstance(t, torch.Tensor):
        raise PeftkitError(f"module {host.name!r} has no tensor {name!r}")
    return t.detach()


# -- the Hugging Face LORA config, shared by the low-rank methods --------------------------------------------
#: fields that are metadata, only steer initialisation, or decide targeting (which the file's keys settle)
_LORA_IGNORED = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "fan_in_fan_out", "megatron_core", "runtime_config", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "use_dora",
})
_LORA_USED = frozenset({
    "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "modules_to_save", "init_lora_weights",
    "rank_pattern", "alpha_pattern",
})


def _is_unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, dict | list | tuple | str) and not value)


def lowrank_config_from_hf(config_cls: type[AdapterConfig], hf: dict[str, Any]) -> AdapterConfig:
    """A low-rank config (fields r, alpha, rslora, init + the shared ones) from a Hugging Face ``LORA`` config.

    Raises :class:`PeftkitError` naming the option when the file uses one that changes the math and that peftkit
    does not reproduce, or an option this peftkit does not know."""
    for key, what in LORA_UNSUPPORTED.items():
        if not _is_unset(hf.get(key)):
            raise PeftkitError(
                f"Hugging Face PEFT option {key}={hf[key]!r} ({what}) is not supported by peftkit; "
                f"the adapter cannot be loaded without changing its outputs"
            )
    unknown = sorted(k for k in hf if k not in _LORA_IGNORED | _LORA_USED | set(LORA_UNSUPPORTED)
                     and not _is_unset(hf[k]))
    if unknown:
        raise PeftkitError(
            f"unknown Hugging Face PEFT LoRA option {unknown[0]}={hf[unknown[0]]!r}; peftkit cannot tell whether it "
            f"changes the adapter's outputs, so it refuses to load the adapter"
        )
    init_hf = hf.get("init_lora_weights", True)
    if isinstance(init_hf, str) and init_hf.lower().startswith(BASE_CHANGING_INITS):
        raise PeftkitError(
            f"Hugging Face PEFT option init_lora_weights={init_hf!r} rewrites the base weights when PEFT loads the "
            f"adapter; peftkit cannot load it as is — convert it to a plain LoRA adapter first (PEFT's "
            f"save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    # the weights come from the file, so the init only matters if training continues; eva/orthogonal -> kaiming
    init = "gaussian" if isinstance(init_hf, str) and init_hf.lower() == "gaussian" else True
    bias = hf.get("bias", "none")
    if bias not in BIAS_IN:
        raise PeftkitError(f"Hugging Face PEFT option bias={bias!r} is not one of {sorted(BIAS_IN)}")
    # names and values translated by the config constructor, as for peftkit.config("lora", lora_alpha=..., ...)
    fields = {k: hf[k] for k in _LORA_USED if hf.get(k) is not None}
    fields.update(init_lora_weights=init, modules_to_save=hf.get("modules_to_save") or None)
    return config_cls.from_dict(fields)


def lowrank_config_to_hf(config: Any, hosts: list[Host]) -> dict[str, Any]:
    """The Hugging Face ``LORA`` config fields of a low-rank config (r, alpha, rslora, init, dropout, bias and
    the per-module overrides as rank/alpha patterns). ``hosts``: the adapted layers (for ``fan_in_fan_out``)."""
    if config.init not in INIT_TO_PEFT:
        raise PeftkitError(
            f"cannot export to Hugging Face PEFT format: init={config.init!r} keeps the initial factors next to the "
            f"trained ones, which that format cannot hold; merge the adapter instead"
        )
    rank, alpha = overrides_to_patterns(config.overrides)
    return {
        "r": config.r,
        "lora_alpha": plain_number(config.alpha),
        "use_rslora": config.rslora,
        "init_lora_weights": INIT_TO_PEFT[config.init],
        "lora_dropout": config.dropout,
        "bias": BIAS_OUT[config.bias],
        "rank_pattern": rank,
        "alpha_pattern": alpha,
        "fan_in_fan_out": bool(hosts) and all(h.kind == "gpt2_conv1d" for h in hosts),
    }


def lowrank_layout(host: Host, r: int) -> dict[str, HFTensor]:
    """Where Hugging Face PEFT keeps the factors ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r) on ``host``:
    ``lora_A.weight`` / ``lora_B.weight`` (convolutions: A as a kernel like the host's, B as a 1×1 kernel),
    embeddings: ``lora_embedding_A`` / ``lora_embedding_B``."""
    a, b = (r, host.d_in), (host.d_out, r)
    if host.kind == "embedding":
        return {"lora_A": HFTensor("lora_embedding_A", a, a), "lora_B": HFTensor("lora_embedding_B", b, b)}
    if host.is_conv:
        w = host.weight.shape
        return {
            "lora_A": HFTensor("lora_A.weight", (r, *w[1:]), a),
            "lora_B": HFTensor("lora_B.weight", (host.d_out, r, *(1,) * (len(w) - 2)), b),
        }
    return {"lora_A": HFTensor("lora_A.weight", a, a), "lora_B": HFTensor("lora_B.weight", b, b)}


# -- reading ---------------------------------------------------------------------------------------------------
def _method_for(meta: dict[str, Any], source: str) -> tuple[MethodInfo, AdapterConfig]:
    peft_type = meta.get("peft_type")
    infos = [i for i in registry.all_methods() if i.hf_peft_type is not None and i.hf_peft_type == peft_type]
    if not infos:
        known = sorted({i.hf_peft_type for i in registry.all_methods() if i.hf_peft_type})
        raise PeftkitError(
            f"{source}: Hugging Face PEFT type {peft_type!r} is not supported; peftkit reads: {', '.join(known)}"
        )
    found: list[tuple[MethodInfo, AdapterConfig]] = []
    for info in infos:
        try:
            cfg = info.adapter.from_hf_config(meta)
        except PeftkitError as e:
            raise PeftkitError(f"{source}: {e}") from None
        if cfg is not None:
            found.append((info, cfg))
    if not found:
        raise PeftkitError(
            f"{source}: no peftkit method reads this Hugging Face PEFT {peft_type} config "
            f"(tried {', '.join(i.name for i in infos)})"
        )
    if len(found) > 1:
        raise PeftkitError(
            f"{source}: ambiguous Hugging Face PEFT {peft_type} config: methods "
            f"{', '.join(i.name for i, _ in found)} all accept it"
        )
    return found[0]


def _read_hf_tensors(
    directory: str | os.PathLike, source: str, files: io.AdapterFiles | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The file's tensors keyed by module path + tensor name, and the prefix the file puts before them."""
    d = Path(directory)
    if not (d / io.WEIGHTS_NAME).is_file() and (d / "adapter_model.bin").is_file():
        raise PeftkitError(
            f"{source}: only adapter_model.bin (a pickle) is present; peftkit reads safetensors only — re-save the "
            f"adapter with PEFT's save_pretrained(..., safe_serialization=True)"
        )
    raw = (files or io.read_adapter_files(directory)).tensors()
    prefixed = [k for k in raw if k.startswith(PREFIX)]
    if prefixed and len(prefixed) != len(raw):
        odd = next(k for k in raw if not k.startswith(PREFIX))
        raise PeftkitError(f"{source}: tensor {odd!r} does not start with {PREFIX!r} like the others")
    if not prefixed:  # e.g. saved through transformers' PEFT integration
        return dict(raw), ""
    return {k[len(PREFIX):]: v for k, v in raw.items()}, PREFIX


def _user_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's modules under their own names: peftkit wrappers stand for the module they wrap, their
    insides (``base_layer``, ``adapters``, ``original_module``, ``copies``) are skipped."""
    from .layer import AdaptedLayer, SavedModule

    inside: list[str] = [CONTAINER]  # model-level adapters' own modules are not the model's
    for path, module in model.named_modules():
        if not path or any(path.startswith(w) for w in inside):
            continue
        if isinstance(module, AdaptedLayer | SavedModule):
            inside.append(path + ".")
        yield path, module


def _hosts(model: nn.Module) -> dict[str, Host]:
    from .layer import AdaptedLayer, SavedModule

    out: dict[str, Host] = {}
    for path, module in _user_modules(model):
        if isinstance(module, AdaptedLayer):
            out[path] = module.host
        elif not isinstance(module, SavedModule) and host_kind(module) is not None:
            try:
                out[path] = Host(module, path)
            except PeftkitError:  # e.g. grouped convolutions: never a target
                continue
    return out


def _module_state_keys(module: nn.Module) -> set[str]:
    from .layer import SavedModule

    src = module.original_module if isinstance(module, SavedModule) else module
    return set(src.state_dict())


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own tensors under the names it has without peftkit wrappers."""
    out = {}
    for k, v in model.state_dict().items():
        if ".adapters." in k or ".copies." in k:
            continue
        out[k.replace(".base_layer.", ".").replace(".original_module.", ".")] = v
    return out


def import_adapter(
    model: nn.Module, directory: str | os.PathLike, meta: dict[str, Any], files: io.AdapterFiles | None = None,
) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    """Read a Hugging Face PEFT adapter for ``model``: (peftkit config, tensors keyed the peftkit way, name).

    The config targets exactly the modules that have tensors in the file; every tensor is checked by name and
    shape (the error names the Hugging Face key). The model is not modified."""
    source = str(directory)
    info, cfg = _method_for(meta, source)
    if info.model_level:
        return _import_model_level(model, directory, meta, info, cfg, source, files)
    hf, prefix = _read_hf_tensors(directory, source, files)

    # 1. adapter tensors: every host layer says where its tensors would be
    hosts = _hosts(model)
    wanted: dict[str, tuple[str, str, HFTensor]] = {}
    layouts: dict[str, dict[str, HFTensor]] = {}
    for path, host in hosts.items():
        layout = info.adapter.hf_layout(host, cfg.for_module(path))
        if not layout:
            continue
        layouts[path] = layout
        for ours, spec in layout.items():
            wanted[f"{path}.{spec.key}"] = (path, ours, spec)
    out: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    rest: list[str] = []
    for k, t in hf.items():
        if k not in wanted:
            rest.append(k)
            continue
        path, ours, spec = wanted[k]
        if tuple(t.shape) != spec.hf_shape:
            raise PeftkitError(
                f"{source}: tensor {prefix + k!r} has shape {tuple(t.shape)} in the file but {spec.hf_shape} fits "
                f"module {path!r} of this model ({hosts[path]!r}) — the adapter was made for another base model "
                f"(or its rank_pattern is wrong)"
            )
        t = t.reshape(spec.shape)
        if spec.base is not None:
            t = t - _host_tensor(hosts[path], spec.base).reshape(spec.shape).to(t.dtype)
        out[f"adapter.{path}.{ours}"] = t
        targets.add(path)
    for path in targets:
        for spec in layouts[path].values():
            if f"{path}.{spec.key}" not in hf:
                raise PeftkitError(f"{source}: tensor {prefix}{path}.{spec.key} is missing from the file")
        if hosts[path].kind not in info.hosts:
            raise PeftkitError(
                f"{source}: the adapter targets {path!r}, a {type(hosts[path].module).__name__} layer; peftkit's "
                f"{info.name} supports {', '.join(info.hosts)} layers only"
            )

    # 2. modules_to_save copies (PEFT matches entries as name suffixes), trainable biases, repeated base weights
    ms_entries = meta.get("modules_to_save") or []
    saved_paths = [p for p, _ in _user_modules(model) if any(p.endswith(e) for e in ms_entries)]
    saved_used: set[str] = set()
    base = None
    unknown: list[str] = []
    for k in rest:
        owner = max((p for p in saved_paths if k.startswith(p + ".")), key=len, default=None)
        if owner is not None:
            sub = k[len(owner) + 1:]
            if sub.startswith("modules_to_save."):  # PEFT's bias="all" repeats the copy's bias under this name
                continue
            if sub.startswith("original_module.") and cfg.bias == "all":
                out[f"bias.{owner}.{sub[len('original_module.'):]}"] = hf[k]
                continue
            if sub in _module_state_keys(model.get_submodule(owner)):
                out[f"saved.{owner}.{sub}"] = hf[k]
                saved_used.add(owner)
                continue
        if cfg.bias != "none" and (k == "bias" or k.endswith(".bias")):
            out[f"bias.{k.replace('.base_layer.', '.')}"] = hf[k]
            continue
        base = _base_state(model) if base is None else base
        clean = k.replace(".base_layer.", ".")
        if clean in base:  # e.g. save_embedding_layers: harmless when it is the model's own weight
            if base[clean].shape == hf[k].shape and torch.equal(base[clean].to(hf[k].dtype), hf[k]):
                continue
            raise PeftkitError(
                f"{source}: the file holds base-model weight {prefix + k!r}, which differs from this model's (PEFT "
                f"saves embeddings when the vocabulary was resized or save_embedding_layers=True); peftkit loads "
                f"adapters only — resize or load that weight into the base model first"
            )
        unknown.append(k)
    if unknown:
        raise PeftkitError(
            f"{source}: tensor {prefix + unknown[0]!r} has no place in this model"
            + (f" ({len(unknown)} such tensors)" if len(unknown) > 1 else "")
            + " — was the adapter made for another architecture?"
        )
    if not targets:
        raise PeftkitError(f"{source}: the file holds no {info.name} tensors for any layer of this model")

    order = [p for p in hosts if p in targets]
    cfg = dataclasses.replace(
        cfg, target_modules=order, exclude_modules=None, target_types=None, layers_to_transform=None,
        layers_pattern=None, modules_to_save=[p for p in saved_paths if p in saved_used] or None,
    )
    return cfg, out, DEFAULT_NAME


# -- writing ---------------------------------------------------------------------------------------------------
def export_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None, **opts: Any) -> None:
    """Write adapter ``name`` as a Hugging Face PEFT adapter (``PeftModel.from_pretrained`` reads it), as one unit
    (:func:`peftkit.core.io.write_adapter`, which takes ``opts``: ``metadata``, ``extra``, ``overwrite``, …)."""
    from .layer import AdaptedLayer
    from .state import adapted_layers, adapter_state_dict, get_config, saved_modules, single_name

    name = single_name(model, name)
    cfg = get_config(model, name)
    info = registry.get(cfg.method)
    if info.hf_peft_type is None:
        raise PeftkitError(f"method {info.name!r} has no Hugging Face PEFT counterpart; save it in peftkit format")
    if info.model_level:
        _export_model_level(model, directory, name, cfg, info, **opts)
        return
    layers: list[tuple[str, AdaptedLayer]] = [(p, layer) for p, layer in adapted_layers(model)
                                              if name in layer.adapters]
    for path, layer in layers:
        if name in layer.merged:
            raise PeftkitError(f"adapter {name!r} is merged into {path!r}; unmerge before saving")
    method_cfg = info.adapter.to_hf_config(cfg, [layer.host for _, layer in layers])
    if method_cfg is None:
        raise PeftkitError(f"method {info.name!r} cannot write the Hugging Face PEFT format")

    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers:
        adapter = layer.adapters[name]
        layout = info.adapter.hf_layout(layer.host, adapter.config) or {}
        state = {k: v for k, v in adapter.state_dict().items() if k.split(".")[0] not in adapter.regenerated}
        missing = sorted(set(state) - set(layout))
        if missing:
            raise PeftkitError(
                f"cannot export adapter {name!r} to Hugging Face PEFT format: tensor {missing[0]!r} of module "
                f"{path!r} has no place in that format"
            )
        for ours, spec in layout.items():
            t = state[ours]
            if spec.base is not None:
                t = _host_tensor(layer.host, spec.base).reshape(t.shape).to(t.dtype) + t
            tensors[f"{PREFIX}{path}.{spec.key}"] = t.reshape(spec.hf_shape)
    adapted = {p for p, _ in layers}
    saved = [p for p, sm in saved_modules(model) if name in sm.copies]
    for k, v in adapter_state_dict(model, name).items():
        kind, _, rest = k.partition(".")
        if kind == "saved":
            tensors[f"{PREFIX}{rest}"] = v
        elif kind == "bias":
            owner = rest.rsplit(".", 1)[0]
            sm = max((p for p in saved if rest.startswith(p + ".")), key=len, default=None)
            if owner in adapted:
                rest = f"{owner}.base_layer.{rest.rsplit('.', 1)[1]}"
            elif sm is not None:
                rest = f"{sm}.original_module.{rest[len(sm) + 1:]}"
            tensors[f"{PREFIX}{rest}"] = v
    meta = {
        "peft_type": info.hf_peft_type,
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "target_modules": [p for p, _ in layers],
        "modules_to_save": saved or None,
        **method_cfg,
    }
    io.write_adapter(directory, meta, tensors, metadata={"format": "pt", **opts.pop("metadata", {})}, **opts)


# -- prompt learning (model-level methods): one ``prompt_embeddings`` tensor plus modules_to_save copies ---------
PROMPT_KEY = "prompt_embeddings"
_PROMPT_PREFIX = "base_model."  # PEFT's prompt-learning models save the wrapped model's modules under this prefix
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def _import_model_level(
    model: nn.Module, directory: str | os.PathLike, meta: dict[str, Any], info: MethodInfo, cfg: AdapterConfig,
    source: str, files: io.AdapterFiles | None = None,
) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    if meta.get("num_transformer_submodules") not in (None, 1):
        raise PeftkitError(f"{source}: num_transformer_submodules={meta['num_transformer_submodules']} (prompts for "
                           "an encoder-decoder model) is not supported")
    hf, _ = _read_hf_tensors(directory, source, files)
    if PROMPT_KEY not in hf:
        raise PeftkitError(f"{source}: tensor {PROMPT_KEY!r} is missing from the file")
    out = {f"model.{info.adapter.hf_state_key}": hf.pop(PROMPT_KEY)}
    entries = meta.get("modules_to_save") or []
    saved_paths = [p for p, _ in _user_modules(model) if any(p.endswith(e) for e in entries)]
    used: set[str] = set()
    for k, t in hf.items():
        key = k[len(_PROMPT_PREFIX):] if k.startswith(_PROMPT_PREFIX) else k
        owner = max((p for p in saved_paths if key.startswith(p + ".")), key=len, default=None)
        if owner is None or key[len(owner) + 1:] not in _module_state_keys(model.get_submodule(owner)):
            raise PeftkitError(f"{source}: tensor {k!r} has no place in this model — was the adapter made for another "
                               "architecture?")
        out[f"saved.{key}"] = t
        used.add(owner)
    return dataclasses.replace(cfg, modules_to_save=[p for p in saved_paths if p in used] or None), out, DEFAULT_NAME


def _export_model_level(model: nn.Module, directory: str | os.PathLike, name: str, cfg: AdapterConfig,
                        info: MethodInfo, **opts: Any) -> None:
    from .model_level import model_adapters
    from .state import adapter_state_dict, saved_modules

    adapter = model_adapters(model)[name]
    method_cfg = adapter.to_hf_config(model)
    if method_cfg is None:
        raise PeftkitError(f"method {info.name!r} cannot write the Hugging Face PEFT format")
    if cfg.bias != "none":
        raise PeftkitError(f"adapter {name!r}: bias={cfg.bias!r} has no place in Hugging Face PEFT's prompt-learning "
                           "format")
    tensors = {PROMPT_KEY: adapter.hf_embeddings().detach().contiguous()}
    for k, v in adapter_state_dict(model, name).items():
        kind, _, rest = k.partition(".")
        if kind == "saved":
            tensors[f"{_PROMPT_PREFIX}{rest}"] = v
    cls = type(model).__name__
    meta = {
        "peft_type": info.hf_peft_type,
        "task_type": next((t for suffix, t in _TASKS if cls.endswith(suffix)), "FEATURE_EXTRACTION"),
        "inference_mode": True,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "modules_to_save": [p for p, sm in saved_modules(model) if name in sm.copies] or None,
        **method_cfg,
    }
    io.write_adapter(directory, meta, tensors, metadata={"format": "pt", **opts.pop("metadata", {})}, **opts)
