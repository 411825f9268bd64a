"""Which modules of a model an adapter config targets.

Rules (Hugging Face PEFT compatible):
- a list of strings matches a module whose full name equals an entry or ends with ``"." + entry``;
- a single string other than ``"all-linear"`` / ``"all-norm"`` is a regular expression that must match the full name;
- ``"all-linear"`` selects every Linear / GPT-2 Conv1D (quantised Linear layers included) except the output head
  (output embeddings, the names in ``modules_to_save`` and the usual head names);
- ``"all-norm"`` selects every LayerNorm / RMSNorm with a learned scale (host kind ``"norm"``), heads excluded alike;
- ``target_types`` keeps modules whose class name is listed; ``layers_to_transform`` keeps modules whose layer
  index (the number after ``layers_pattern``, or after any of layers/layer/h/blocks/block) is listed;
- ``exclude_modules`` removes matches (same rules as targets);
- :meth:`~peftkit.core.config.AdapterConfig.parameter_targets` (LoRA's ``target_parameters``) names bare parameters
  (full name, or a suffix after a dot, as in Hugging Face PEFT): :func:`find_parameter_targets`.
A config that matches nothing raises an error listing the closest candidate module names.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from .config import AdapterConfig
from .errors import PeftkitError, did_you_mean
from .host import NORM_KINDS, QUANTIZED_KINDS, host_kind
from .model_level import CONTAINER

#: target keywords that select every layer of some host kinds (other than the output head)
ALL_KINDS = {"all-linear": ("linear", "gpt2_conv1d", *QUANTIZED_KINDS), "all-norm": NORM_KINDS}
HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "cls", "head", "heads", "output_projection"}
DEFAULT_LAYER_PATTERNS = ("layers", "layer", "h", "blocks", "block", "encoder_layers", "decoder_layers")


def matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


_matches = matches  # the older spelling, used inside the core
_DEFAULT_LAYER_PATTERNS = DEFAULT_LAYER_PATTERNS


def layer_index(name: str, pattern: str | None) -> int | None:
    pats = (pattern,) if pattern else _DEFAULT_LAYER_PATTERNS
    for p in pats:
        m = re.search(rf"(?:^|\.){re.escape(p)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def _is_head(model: nn.Module, name: str, module: nn.Module, config: AdapterConfig) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            if get_out() is module:
                return True
        except Exception:
            pass
    leaf = name.split(".")
    if config.modules_to_save and _matches(name, config.modules_to_save):
        return True
    return bool(set(leaf) & HEAD_NAMES)


def candidate_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and host_kind(m) is not None]


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs the config targets, in model order. Raises :class:`PeftkitError` on no match."""
    from .layer import AdaptedLayer  # local import: layer imports nothing from here

    spec = config.target_modules
    extra = set(config.extra_targets())
    if spec is None and not config.target_types and not extra:
        if config.parameter_targets():
            return []
        raise PeftkitError(
            f"{type(config).__name__}.target_modules is not set; give module names, a regex, or 'all-linear'. "
            f"Candidates: {', '.join(_short_list(candidate_names(model)))}"
        )
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or ".base_layer" in name or name.endswith("base_layer") or name.startswith(CONTAINER):
            continue  # model-level adapters' own layers (under CONTAINER) are never targets
        if ".modules_to_save." in name or name.endswith(".original_module") or ".original_module." in name:
            continue
        target = module.base_layer if isinstance(module, AdaptedLayer) else module
        if name in extra:
            out.append((name, module))
            continue
        if spec is None and not config.target_types:
            continue
        if isinstance(spec, str) and spec in ALL_KINDS:
            if host_kind(target) not in ALL_KINDS[spec] or _is_head(model, name, target, config):
                continue
        elif spec is not None and not _matches(name, spec):
            continue
        if config.target_types and type(target).__name__ not in config.target_types:
            continue
        if config.layers_to_transform is not None:
            idx = layer_index(name, config.layers_pattern)
            if idx is None or idx not in config.layers_to_transform:
                continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if isinstance(module, nn.ModuleList | nn.ModuleDict | nn.Sequential) and not (
                isinstance(spec, str) and spec in ALL_KINDS):
            # containers can only be matched by mistake (e.g. a suffix "layers")
            raise PeftkitError(f"target {name!r} is a container ({type(module).__name__}), not a layer")
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(parent, nn.MultiheadAttention):  # its forward reads out_proj.weight, never calls out_proj
            if isinstance(spec, str) and spec in ALL_KINDS:
                continue
            raise PeftkitError(
                f"target {name!r} is a projection of an nn.MultiheadAttention, which reads its weight directly and "
                f"never runs the layer: an adapter there would compute nothing; target the nn.MultiheadAttention "
                f"itself (its input and output projections are adapted together, as in Hugging Face PEFT)"
            )
        out.append((name, module))
    if not out:
        raise PeftkitError(_no_match_message(model, config))
    return out


def find_parameter_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every bare parameter ``config.parameter_targets()`` names, in model
    order: a parameter whose full name equals an entry or ends with ``"." + entry``. One parameter per module, on a
    module no other target of the config adapts; an entry that matches nothing is an error."""
    from .layer import AdaptedLayer

    wanted = config.parameter_targets()
    if not wanted:
        return []
    out: list[tuple[str, nn.Module, str]] = []
    used: set[str] = set()
    for name, module in model.named_modules():
        if ".base_layer" in name or name.endswith("base_layer") or name.startswith(CONTAINER) or (
                ".original_module" in name or ".copies." in name):
            continue
        owner = module.base_layer if isinstance(module, AdaptedLayer) else module
        for pname, _ in owner.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            hit = [t for t in wanted if key == t or key.endswith("." + t)]
            if not hit:
                continue
            used.update(hit)
            if out and out[-1][0] == name:
                raise PeftkitError(f"target_parameters: module {name!r} holds two targeted parameters "
                                   f"({out[-1][2]!r}, {pname!r}); peftkit adapts one parameter per module")
            if isinstance(module, AdaptedLayer) and module.host.param != pname:
                raise PeftkitError(f"target_parameters: {key!r} belongs to {name!r}, which is already adapted "
                                   f"as a {module.host.kind!r} host; one kind of host per module")
            out.append((name, module, pname))
    missing = [t for t in wanted if t not in used]
    if missing:
        raise PeftkitError(f"target_parameters entry {missing[0]!r} matched no parameter of the model (give the "
                           f"parameter's full name, e.g. 'mlp.experts.w1', or its last parts)")
    return out


def _short_list(names: list[str], n: int = 12) -> list[str]:
    return names if len(names) <= n else names[:n] + [f"... ({len(names) - n} more)"]


def _no_match_message(model: nn.Module, config: AdapterConfig) -> str:
    cands = candidate_names(model)
    leaves = sorted({n.split(".")[-1] for n in cands})
    spec = config.target_modules
    wanted = [spec] if isinstance(spec, str) else list(spec or [])
    close: list[str] = []
    for w in wanted:
        close += difflib.get_close_matches(w, leaves, n=5, cutoff=0.3)
        close += difflib.get_close_matches(w, cands, n=3, cutoff=0.3)
    close = list(dict.fromkeys(close))
    msg = f"target_modules={spec!r} matched no module"
    keyword = next((h for h in (did_you_mean(w, ALL_KINDS) for w in wanted) if h), "")
    msg += keyword  # e.g. all_linear: " (did you mean 'all-linear'?)"
    if config.target_types:
        msg += f" of type {config.target_types}"
    if config.layers_to_transform is not None:
        msg += f" in layers {config.layers_to_transform}"
    msg += f". Closest candidates: {', '.join(close) if close else '(none)'}"
    msg += f". Adaptable module names: {', '.join(leaves) if leaves else '(none)'}"
    return msg
