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
before installing them. Writing (:func:`export_adapter`) is the inverse, atomic through :mod:`peftkit.core.io`; it is
``peftkit.save``'s default for every method with a PEFT type. It writes a real ``task_type`` (:func:`task_type_of`),
the task head PEFT's ``PeftModelFor…`` requires, and — in the safetensors metadata, which PEFT ignores — the peftkit
config and adapter name, from which :func:`restore` rebuilds what PEFT's config has no field for (e.g. PiSSA's
initial factors, written as PEFT's converted rank-2r LoRA). An adapter the format cannot hold raises
:class:`NoHFFormat` (``save`` then writes peftkit's format).

The shared Hugging Face ``LORA`` config (r, lora_alpha, use_rslora, rank/alpha patterns, the options peftkit
cannot reproduce) is translated here for every low-rank method that reads or writes that format, with the tables of
:mod:`.peft_names` that the config constructors also use.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import io, registry
from .config import AdapterConfig
from .errors import PeftkitError
from .hf_tensor import HFTensor as HFTensor  # re-exported: methods import it from here
from .host import HOST_NAMES, Host, host_kind
from .model_level import CONTAINER
from .peft_names import (
    BASE_CHANGING_INITS,
    BIAS_IN,
    BIAS_OUT,
    INIT_TO_PEFT,
    LORA_BLOCK_DIAGONAL,
    LORA_TRAINING_ONLY,
    LORA_UNSUPPORTED,
    overrides_to_patterns,
    plain_number,
)
from .targeting import find_parameter_targets

if TYPE_CHECKING:
    from .registry import MethodInfo

PREFIX = "base_model.model."
DEFAULT_NAME = "default"
#: safetensors metadata keys (PEFT ignores that metadata): the peftkit config and adapter name behind an HF file
META_CONFIG, META_NAME = "peftkit_config", "peftkit_name"
#: ... and small tensors PEFT's layout has no place for (an adapter's ``hf_metadata_tensors``, e.g. a checksum)
META_TENSORS = "peftkit_tensors"


class NoHFFormat(PeftkitError):
    """This adapter uses something Hugging Face PEFT's format for its type cannot hold (the message says what):
    ``save``'s default format then falls back to peftkit's own."""


#: PEFT task type -> transformers' auto mapping whose classes it loads (``AutoPeftModelFor…`` uses the same auto class)
TASK_MAPPINGS = {"SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                 "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                 "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                 "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
                 "FEATURE_EXTRACTION": "MODEL_MAPPING_NAMES"}
_SUFFIXES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
             ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def task_type_of(model: nn.Module, given: str | None = None) -> str | None:
    """PEFT's ``task_type`` for ``model``: ``given`` when set, else from its class — ``*ForSequenceClassification``
    SEQ_CLS, ``*ForCausalLM`` (and the other classes transformers' causal-LM auto class loads, e.g.
    ``GPT2LMHeadModel``) CAUSAL_LM, ``*ForTokenClassification`` TOKEN_CLS, ``*ForQuestionAnswering`` QUESTION_ANS, a
    base model (``BertModel``, ``LlamaModel``) FEATURE_EXTRACTION; a plain ``nn.Module`` or another head None."""
    if given:
        return given
    cls = type(model).__name__
    found = next((t for suffix, t in _SUFFIXES if cls.endswith(suffix)), None)
    if found is not None:
        return found
    try:
        from transformers import PreTrainedModel
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - transformers is a dependency of the CLI only
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    for task, mapping in TASK_MAPPINGS.items():
        names = getattr(modeling_auto, mapping, {}).values()
        if any(cls == n or (isinstance(n, tuple | list) and cls in n) for n in names):
            return task
    return None


#: the heads PEFT's PeftModelFor… class of a task always trains and saves (``modules_to_save``, matched as name
#: suffixes); its loader requires them in the file
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _head_copies(model: nn.Module, task: str | None, saved: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The task heads PEFT's loader expects in the file that the adapter does not save itself, with the model's own
    weights (PEFT then loads exactly what the model has: the same outputs)."""
    from .layer import AdaptedLayer

    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, module in _user_modules(model):
        if (any(path.endswith(h) for h in TASK_HEADS.get(task or "", ())) and path not in saved
                and not isinstance(module, AdaptedLayer) and not any(path.startswith(p + ".") for p in out)):
            out[path] = {k: v.detach() for k, v in module.state_dict().items()}
    return out


def _base_name(model: nn.Module) -> str | None:
    return getattr(model, "name_or_path", None) or None


def _meta_opts(opts: dict[str, Any], cfg: AdapterConfig, name: str) -> dict[str, str]:
    """The safetensors metadata of an HF file: the caller's, plus the peftkit config and name PEFT has no place for
    (read back by :func:`restore`)."""
    return {"format": "pt", **opts.pop("metadata", {}), META_CONFIG: io.dumps(cfg.to_dict(), sort=False).decode(),
            META_NAME: name}


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


#: fields of every Hugging Face PEFT config that are metadata (they never change what the adapter computes)
PEFT_META = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                       "revision", "inference_mode"})


def config_from_hf(config_cls: type[AdapterConfig], hf: dict[str, Any]) -> AdapterConfig:
    """The config of a method that mirrors a Hugging Face PEFT config (``peft_type`` / ``peft_names``) from that
    method's ``adapter_config.json``: metadata dropped, unset fields this peftkit does not know dropped, the rest
    translated by the config constructor — a set option peftkit cannot honour or does not know is refused by name."""
    from .peft_names import COMMON, mirrored, unset

    known = set(mirrored(config_cls)[1]) | set(COMMON) | {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in hf.items()
                         if k not in PEFT_META and (k in known or not unset(v))})


def lowrank_config_from_hf(config_cls: type[AdapterConfig], hf: dict[str, Any]) -> AdapterConfig:
    """A low-rank config (fields r, alpha, rslora, init + the shared ones) from a Hugging Face ``LORA`` config.

    Raises :class:`PeftkitError` naming the option when the file uses one that changes the math and that peftkit
    does not reproduce, or an option this peftkit does not know."""
    own = {f.name for f in dataclasses.fields(config_cls)}  # options the config implements under PEFT's name
    for key, what in LORA_UNSUPPORTED.items():
        if key not in own and not _is_unset(hf.get(key)):
            raise PeftkitError(
                f"Hugging Face PEFT option {key}={hf[key]!r} ({what}) is not supported by peftkit; "
                f"the adapter cannot be loaded without changing its outputs"
            )
    for key, (what, _) in LORA_TRAINING_ONLY.items():
        if not _is_unset(hf.get(key)):
            warnings.warn(f"Hugging Face PEFT option {key}: loaded as plain LoRA, which computes the same outputs; "
                          f"training differs: {what}", stacklevel=2)
    bd = hf.get(LORA_BLOCK_DIAGONAL)
    if not _is_unset(bd) and LORA_BLOCK_DIAGONAL not in own:
        blocks = bd.get("nblocks", 1) if isinstance(bd, dict) else getattr(bd, "nblocks", None)
        if blocks != 1:
            raise PeftkitError(
                f"Hugging Face PEFT option {LORA_BLOCK_DIAGONAL}={bd!r} (block-diagonal LoRA with {blocks} blocks) is "
                f"not supported by peftkit; the adapter cannot be loaded without changing its outputs (one block, "
                f"plain LoRA, loads)"
            )
        warnings.warn(f"Hugging Face PEFT option {LORA_BLOCK_DIAGONAL} with nblocks=1: block-diagonal LoRA with one "
                      f"block is plain LoRA; loaded as such", stacklevel=2)
    unknown = sorted(k for k in hf if k not in _LORA_IGNORED | _LORA_USED | set(LORA_UNSUPPORTED)
                     | set(LORA_TRAINING_ONLY) | {LORA_BLOCK_DIAGONAL} and not _is_unset(hf[k]))
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
    # the weights come from the file, so the init only matters if training continues; eva/orthogonal -> kaiming;
    # MiCA's is kept: its B stays frozen when training continues, as in PEFT
    init = init_hf.lower() if isinstance(init_hf, str) and init_hf.lower() in ("gaussian", "mica") else True
    bias = hf.get("bias", "none")
    if bias not in BIAS_IN:
        raise PeftkitError(f"Hugging Face PEFT option bias={bias!r} is not one of {sorted(BIAS_IN)}")
    # names and values translated by the config constructor, as for peftkit.config("lora", lora_alpha=..., ...)
    fields = {k: hf[k] for k in _LORA_USED | (own & {*LORA_UNSUPPORTED, LORA_BLOCK_DIAGONAL}) if hf.get(k) is not None}
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
    if host.experts > 1:  # a stack of experts: PEFT's lora_A (E·r, in), lora_B (out, E·r)
        a, b = (host.experts * r, host.d_in), (host.d_out // host.experts, host.experts * r)
    if host.kind == "embedding":
        return {"lora_A": HFTensor("lora_embedding_A", a, a), "lora_B": HFTensor("lora_embedding_B", b, b)}
    if host.is_conv:  # a grouped convolution's B is grouped: (d_out, r/G) (see Host.dense_up)
        w, rb = host.weight.shape, r // host.groups
        return {
            "lora_A": HFTensor("lora_A.weight", (r, *host.filter_shape), a),
            "lora_B": HFTensor("lora_B.weight", (host.d_out, rb, *(1,) * (len(w) - 2)), (host.d_out, rb)),
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
    directory: str | os.PathLike, source: str, files: io.AdapterFiles | None = None, shared: tuple[str, ...] = (),
    regenerated: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], str, dict[str, torch.Tensor]]:
    """The file's tensors keyed by module path + tensor name, the prefix the file puts before them, and the tensors
    it holds under the adapter-wide keys ``shared`` (:attr:`~peftkit.core.adapter.Adapter.hf_shared_keys`). The
    model-wide copies ``base_model.<key>`` of a method's ``regenerated`` tensors (PEFT repeats them under every
    module too; :attr:`~peftkit.core.adapter.Adapter.hf_regenerated_keys`) are dropped: the per-module copies are
    checked."""
    d = Path(directory)
    if not (d / io.WEIGHTS_NAME).is_file() and (d / "adapter_model.bin").is_file():
        raise PeftkitError(
            f"{source}: only adapter_model.bin (a pickle) is present; peftkit reads safetensors only — re-save the "
            f"adapter with PEFT's save_pretrained(..., safe_serialization=True)"
        )
    raw = dict((files or io.read_adapter_files(directory)).tensors())
    common = {k: raw.pop(k) for k in shared if k in raw}
    raw = {k: v for k, v in raw.items() if k not in {f"base_model.{key}" for key in regenerated}}
    prefixed = [k for k in raw if k.startswith(PREFIX)]
    if prefixed and len(prefixed) != len(raw):
        odd = next(k for k in raw if not k.startswith(PREFIX))
        raise PeftkitError(f"{source}: tensor {odd!r} does not start with {PREFIX!r} like the others")
    if not prefixed:  # e.g. saved through transformers' PEFT integration
        return raw, "", common
    return {k[len(PREFIX):]: v for k, v in raw.items()}, PREFIX, common


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


def _why_no_place(model: nn.Module, key: str, info: Any) -> str:
    """Why a file tensor fits no layer: the layer it belongs to is one peftkit cannot adapt (or this method does not
    adapt), or the model has no such layer at all (the adapter was made for another architecture)."""
    clean = key.replace(".base_layer.", ".")
    owner, module = max(((p, m) for p, m in _user_modules(model) if clean.startswith(p + ".")),
                        key=lambda pm: len(pm[0]), default=(None, None))
    parent = None if owner is None else owner.rsplit(".", 1)[0] if "." in owner else None
    if owner is not None and parent is not None and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
        owner, module = parent, model.get_submodule(parent)
    if owner is None or module is None:
        return " — was the adapter made for another architecture?"
    what = f"; it belongs to {owner!r}, a {type(module).__name__} layer"
    kind = host_kind(module)
    if kind is None:
        return what + f", which peftkit cannot adapt (host layers: {', '.join(HOST_NAMES)})"
    try:
        Host(module, owner)
    except PeftkitError as e:
        return what + f": {str(e).split(': ', 1)[-1]}"
    if kind not in info.hosts:
        return what + f"; peftkit's {info.name} supports {', '.join(info.hosts)} layers only"
    return what + f", which peftkit's {info.name} adapts with other tensors (the file uses an option it does not read)"


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
    hf, prefix, common = _read_hf_tensors(directory, source, files, info.adapter.hf_shared_keys,
                                          info.adapter.hf_regenerated_keys)

    # 1. adapter tensors: every host layer says where its tensors would be (a bare parameter the config targets is
    # the host on its module: PEFT keys its tensors by that module's path)
    hosts = _hosts(model)
    try:
        from .layer import AdaptedLayer

        hosts.update({path: module.host if isinstance(module, AdaptedLayer) else Host(module, path, param=pname)
                      for path, module, pname in find_parameter_targets(model, cfg)})
    except PeftkitError as e:
        raise PeftkitError(f"{source}: {e}") from None
    wanted: dict[str, tuple[str, str, HFTensor]] = {}
    layouts: dict[str, dict[str, HFTensor]] = {}
    for path, host in hosts.items():
        if host.substituted and host.kind not in info.hosts:
            continue
        layout = info.adapter.hf_layout(host, cfg.for_module(path))
        if not layout:
            continue
        layouts[path] = layout
        for ours, spec in layout.items():
            if spec.value is None:
                wanted[f"{path}.{spec.key}"] = (path, ours, spec)
    out: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    rest: list[str] = []
    shared: dict[str, torch.Tensor] = {}
    for k, t in hf.items():
        owner, _, leaf = k.rpartition(".")
        if leaf in info.adapter.hf_regenerated_keys and owner in layouts:
            shared[k] = t
            continue
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
        for ours, spec in layouts[path].items():
            if spec.value is not None:
                out[f"adapter.{path}.{ours}"] = spec.value
            elif f"{path}.{spec.key}" not in hf:
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
        if any(f".{frag}" in f".{k}" for opt, (_, frags) in LORA_TRAINING_ONLY.items()
               if not _is_unset(meta.get(opt)) for frag in frags):
            continue  # the training-only state of an option that leaves the outputs alone (warned about above)
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
            + _why_no_place(model, unknown[0], info)
        )
    if not targets:
        raise PeftkitError(f"{source}: the file holds no {info.name} tensors for any layer of this model")

    order = [p for p in hosts if p in targets]
    try:
        info.adapter.check_hf_shared(cfg, [hosts[p] for p in order], common)
        shared_state = info.adapter.hf_shared_state(cfg, [hosts[p] for p in order], common)
    except PeftkitError as e:
        raise PeftkitError(f"{source}: {e}") from None
    out.update({f"adapter.{order[0]}.{k}": v for k, v in shared_state.items()})  # the store lives on the first layer
    out.update({f"hf_shared.{k}": t for k, t in shared.items() if k.rpartition(".")[0] in targets})
    out = info.adapter.from_hf_state(cfg, out, [hosts[p] for p in order])
    modules = [p for p in order if hosts[p].kind != "parameter"] or None  # parameters: by target_parameters
    cfg = dataclasses.replace(
        cfg, target_modules=modules, exclude_modules=None, target_types=None, layers_to_transform=None,
        layers_pattern=None, modules_to_save=[p for p in saved_paths if p in saved_used] or None,
    )
    return cfg, out, DEFAULT_NAME


def _metadata_tensors(raw: str, source: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, spec in io.parse_json(raw, f"{source}: {META_TENSORS}").items():
        try:
            out[k] = torch.tensor(spec["values"], dtype=getattr(torch, spec["dtype"])).reshape(spec["shape"])
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise PeftkitError(f"{source}: damaged {META_TENSORS} entry {k!r} in the weights' metadata ({e})") from None
    return out


def restore(
    model: nn.Module, cfg: AdapterConfig, tensors: dict[str, torch.Tensor], name: str, metadata: dict[str, str],
    source: str,
) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    """For a file peftkit wrote in the Hugging Face format: its adapter name and its peftkit config (options PEFT
    has no field for, e.g. PiSSA's initial factors, kept in the weights' metadata, which PEFT ignores), with the
    targets the file's keys gave. A file from another writer keeps the config read from ``adapter_config.json``."""
    stored_name = metadata.get(META_NAME)
    if isinstance(stored_name, str) and stored_name and "." not in stored_name:
        name = stored_name
    if metadata.get(META_TENSORS):
        tensors = {**tensors, **_metadata_tensors(metadata[META_TENSORS], source)}
    raw = metadata.get(META_CONFIG)
    if not raw:
        return cfg, tensors, name
    try:
        stored = registry.config_from_dict(io.parse_json(raw, f"{source}: {META_CONFIG}"))
    except PeftkitError:
        return cfg, tensors, name
    if stored.method != cfg.method:  # e.g. ExPLoRA written as LORA: read back as the LoRA it is in the file
        return cfg, tensors, name
    info = registry.get(cfg.method)
    if info.model_level:  # the stored config, when it holds what the file holds (the file keeps the final virtual
        # tokens: a reparametrisation's network is not in it, and the config read from the file says so)
        try:
            stored = dataclasses.replace(stored, modules_to_save=cfg.modules_to_save)
            wanted = set(info.adapter(model, stored.resolve(model)).state_dict())
        except PeftkitError:
            return cfg, tensors, name
        have = {k[len("model."):] for k in tensors if k.startswith("model.")}
        return (stored if wanted == have else cfg), tensors, name
    try:  # the file's targets (exact paths) with the stored rest; a rest tied to the stored targeting form (IA3's
        # feedforward_modules as a subset of its target list) keeps the config read from the file, which is complete
        stored = dataclasses.replace(
            stored, target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules,
            target_types=cfg.target_types, layers_to_transform=cfg.layers_to_transform,
            layers_pattern=cfg.layers_pattern, modules_to_save=cfg.modules_to_save,
        )
    except PeftkitError:
        return cfg, tensors, name
    if not isinstance(cfg.target_modules, list):
        return stored, tensors, name
    hosts = _hosts(model)
    return stored, info.adapter.from_hf_state(stored, tensors, [hosts[p] for p in cfg.target_modules]), name


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
        raise NoHFFormat(f"method {info.name!r} has no Hugging Face PEFT counterpart; save it in peftkit format")
    if info.model_level:
        _export_model_level(model, directory, name, cfg, info, **opts)
        return
    layers: list[tuple[str, AdaptedLayer]] = [(p, layer) for p, layer in adapted_layers(model)
                                              if name in layer.adapters]
    for path, layer in layers:
        if name in layer.merged:
            raise PeftkitError(f"adapter {name!r} is merged into {path!r}; unmerge before saving")
    try:
        method_cfg = info.adapter.to_hf_config(cfg, [layer.host for _, layer in layers])
    except NoHFFormat:
        raise
    except PeftkitError as e:
        raise NoHFFormat(str(e)) from None
    if method_cfg is None:
        raise NoHFFormat(f"method {info.name!r} cannot write the Hugging Face PEFT format")

    tensors: dict[str, torch.Tensor] = {}
    kept: dict[str, dict[str, Any]] = {}
    for path, layer in layers:
        adapter = layer.adapters[name]
        layout = info.adapter.hf_layout(layer.host, adapter.config) or {}
        state = {k: v for k, v in adapter.state_dict().items() if k.split(".")[0] not in adapter.regenerated}
        for k in info.adapter.hf_metadata_tensors:  # first: they may live in the shared store (RandLoRA's checksum)
            if k in state:
                t = state.pop(k).detach().cpu()
                kept[f"adapter.{path}.{k}"] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                                               "values": t.flatten().tolist()}
        state = {k: v for k, v in state.items() if k.split(".")[0] != "shared_store"}  # via hf_shared_tensors
        state = info.adapter.to_hf_state(adapter.config, state)
        missing = sorted(set(state) - set(layout))
        if missing:
            raise NoHFFormat(
                f"cannot export adapter {name!r} to Hugging Face PEFT format: tensor {missing[0]!r} of module "
                f"{path!r} has no place in that format"
            )
        for ours, spec in layout.items():
            if spec.value is not None:
                continue
            t = state[ours]
            if spec.base is not None:
                t = _host_tensor(layer.host, spec.base).reshape(t.shape).to(t.dtype) + t
            tensors[f"{PREFIX}{path}.{spec.key}"] = t.reshape(spec.hf_shape)
    tensors.update(info.adapter.hf_shared_tensors(cfg, [layer.adapters[name] for _, layer in layers]))
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
    meta = _peft_meta(model, info, task_type_of(model, cfg.task_type), saved, tensors, PREFIX, method_cfg,
                      target_modules=[p for p, la in layers if la.host.kind != "parameter"] or None)
    metadata = _meta_opts(opts, cfg, name)
    if kept:
        metadata[META_TENSORS] = io.dumps(kept).decode()
    io.write_adapter(directory, meta, tensors, metadata=metadata, **opts)


def _peft_meta(model: nn.Module, info: MethodInfo, task: str | None, saved: list[str], tensors: dict[str, Any],
               prefix: str, method_cfg: dict[str, Any], **targets: Any) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for both file kinds (layer and prompt learning); adds the copies of the task's
    head that PEFT saves (:func:`_head_copies`) to ``tensors`` under ``prefix`` and to ``saved``."""
    for path, state in _head_copies(model, task, saved).items():
        saved.append(path)
        tensors.update({f"{prefix}{path}.{k}": v for k, v in state.items()})
    return {"peft_type": info.hf_peft_type, "task_type": task, "inference_mode": True,
            "base_model_name_or_path": _base_name(model), **targets, "modules_to_save": saved or None, **method_cfg}


# -- prompt learning (model-level methods): one ``prompt_embeddings`` tensor plus modules_to_save copies ---------
PROMPT_KEY = "prompt_embeddings"
_PROMPT_PREFIX = "base_model."  # PEFT's prompt-learning models save the wrapped model's modules under this prefix


def _import_model_level(
    model: nn.Module, directory: str | os.PathLike, meta: dict[str, Any], info: MethodInfo, cfg: AdapterConfig,
    source: str, files: io.AdapterFiles | None = None,
) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    if meta.get("num_transformer_submodules") not in (None, 1):
        raise PeftkitError(f"{source}: num_transformer_submodules={meta['num_transformer_submodules']} (prompts for "
                           "an encoder-decoder model) is not supported")
    hf, _, _ = _read_hf_tensors(directory, source, files)
    try:
        out = {f"model.{k}": v for k, v in info.adapter.hf_state(model, cfg, hf).items()}
    except PeftkitError as e:
        raise PeftkitError(f"{source}: {e}") from None
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
        raise NoHFFormat(f"method {info.name!r} cannot write the Hugging Face PEFT format")
    if cfg.bias != "none":
        raise NoHFFormat(f"adapter {name!r}: bias={cfg.bias!r} has no place in Hugging Face PEFT's prompt-learning "
                           "format")
    tensors = dict(adapter.hf_tensors())
    for k, v in adapter_state_dict(model, name).items():
        kind, _, rest = k.partition(".")
        if kind == "saved":
            tensors[f"{_PROMPT_PREFIX}{rest}"] = v
    task = task_type_of(model, cfg.task_type) or "FEATURE_EXTRACTION"  # PEFT's prompt models need one
    saved = [p for p, sm in saved_modules(model) if name in sm.copies]
    meta = _peft_meta(model, info, task, saved, tensors, _PROMPT_PREFIX, method_cfg)
    io.write_adapter(directory, meta, tensors, metadata=_meta_opts(opts, cfg, name), **opts)
