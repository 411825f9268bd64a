"""Name -> method. A method file calls :func:`register`; the core, the CLI and the tests read the registry."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import PeftkitError, did_you_mean

if TYPE_CHECKING:
    from .adapter import Adapter
    from .config import AdapterConfig

HOST_KINDS = ("linear", "conv1d", "conv2d", "embedding", "gpt2_conv1d")
#: bitsandbytes NF4/FP4 and int8 linear layers (frozen quantised bases); a method opts in by listing them in hosts
QUANTIZED_HOSTS = ("bnb_4bit", "bnb_8bit")
#: LayerNorm / RMSNorm layers (their scale γ and shift β); only methods written for norms list them in hosts
NORM_HOSTS = ("norm",)
#: 3-D convolutions (volumes, video); methods written against the host view opt in by listing them
CONV3D_HOSTS = ("conv3d",)
#: grouped convolutions (any dimension, groups > 1), seen through their dense block-diagonal weight; methods whose
#: update keeps that view honest (and that refuse a merge leaving the blocks) opt in by listing them
GROUPED_CONV_HOSTS = ("grouped_conv",)
#: weights a module reads directly (nn.MultiheadAttention's projections; one bare nn.Parameter named by the
#: config's ``target_parameters``), adapted by running the module with the weight substituted (core.host); methods
#: whose ΔW does not need an activation path opt in by listing them
SUBSTITUTED_HOSTS = ("mha", "parameter")
#: the families of the PEFT survey's taxonomy (Han et al. 2024, "Parameter-Efficient Fine-Tuning for Large Models: A
#: Comprehensive Survey", arXiv 2403.14608: additive, selective, reparameterised, hybrid), plus what peftkit also
#: registers: quantisation-aware methods, methods defined by their training procedure, and heads over a frozen model.
#: ``peftkit methods`` groups by them, in this order.
FAMILIES = {
    "adapter": "additive — adapters: new trainable modules in the forward path",
    "soft-prompt": "additive — soft prompts: virtual tokens or key/value prefixes",
    "scaling": "additive — learned rescaling (and shift) of activations",
    "selective": "selective — a chosen subset of the existing parameters trains",
    "reparameterized": "reparameterised — ΔW as a structured low-rank / Kronecker / transform-domain matrix",
    "hybrid": "hybrid / composition — several updates combined: multi-task, mixtures, gates, unfrozen blocks",
    "quantization": "quantisation-aware — a low-bit base or update, trained with the quantiser in the loop",
    "procedure": "procedures — defined by a training schedule: rank sampling, rank growth, module search",
    "head": "heads — over a frozen model, outside its layers (peftkit.heads)",
}


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method.

    ``params`` is the trainable-parameter formula in words (shown by ``peftkit methods``); the adapter class
    computes the exact count with ``expected_params``. ``procedure`` is a training-procedure class that the
    trainer attaches automatically. ``hf_peft_type`` names the Hugging Face PEFT ``peft_type`` whose files this
    method reads and writes, if any. ``calibrate(model, batches)`` initialises the method's adapters from data
    before training (the trainer calls it on a few training batches) and returns, per module, an error
    ``(before, after)`` that the caller reports. ``model_level`` marks a method that adapts the whole model's
    inputs (a :class:`~peftkit.core.model_level.ModelAdapter`, e.g. virtual tokens or key/value prefixes) instead
    of host layers; it has no ``hosts``. ``lr_scale`` multiplies a task's default learning rate (LoRA's) when
    ``peftkit train`` gets no ``--lr``: the factor at which the method trained in the method table (methods that train
    few values per layer take larger steps, methods whose trained values are weights or carry a large built-in scale
    smaller ones); ``head_lr_scale`` likewise sets the fresh task head's rate when ``--head-lr`` is not given (None:
    the head trains at the method's rate). ``half_precision``: False for a method that cannot run on a bfloat16 /
    float16 base (``peftkit.adapt`` then refuses such a model with ``half_precision_note``, the way out, instead of
    failing mid-training); every method registered today runs in half precision (see :mod:`.precision`).
    ``float32_params``: on a half-precision base the adapter's parameters are stored in float32 (the default);
    False keeps them in the base's dtype — for a method whose parameters are the layer's weights in another form
    (SketchTune's tables), where the model's dtype is part of what the method claims in memory. ``family``: the
    method's family in the PEFT survey's taxonomy (:data:`FAMILIES`), which ``peftkit methods`` groups by.
    ``compile_breaks``: empty for a method whose forward ``torch.compile`` traces without a graph break inside an
    adapted layer (``fullgraph=True`` works); otherwise why it cannot — the data-dependent control flow of its
    forward and when that runs (the conformance test ``tests/conformance/test_compile.py`` asserts the declared
    break instead of none).
    """

    name: str
    config: type[AdapterConfig]
    adapter: type[Adapter]
    paper: str
    description: str
    params: str
    mergeable: bool = True
    hosts: tuple[str, ...] = HOST_KINDS
    procedure: type | None = None
    hf_peft_type: str | None = None
    init_is_identity: bool = True
    calibrate: Callable[..., dict[str, tuple[float, float]]] | None = None
    model_level: bool = False
    lr_scale: float = 1.0
    head_lr_scale: float | None = None
    half_precision: bool = True
    half_precision_note: str = ""
    float32_params: bool = True
    compile_breaks: str = ""
    family: str = "reparameterized"


_REGISTRY: dict[str, MethodInfo] = {}
_LOADED = False


def register(
    name: str,
    *,
    config: type[AdapterConfig],
    paper: str,
    description: str,
    params: str,
    mergeable: bool = True,
    hosts: tuple[str, ...] = HOST_KINDS,
    procedure: type | None = None,
    hf_peft_type: str | None = None,
    init_is_identity: bool = True,
    calibrate: Callable[..., dict[str, tuple[float, float]]] | None = None,
    model_level: bool = False,
    lr_scale: float = 1.0,
    head_lr_scale: float | None = None,
    half_precision: bool = True,
    half_precision_note: str = "",
    float32_params: bool = True,
    compile_breaks: str = "",
    family: str = "reparameterized",
) -> Any:
    """Class decorator: ``@register("lora", config=LoraConfig, ...)`` on the adapter class."""

    def deco(adapter_cls: type[Adapter]) -> type[Adapter]:
        known = HOST_KINDS + QUANTIZED_HOSTS + NORM_HOSTS + CONV3D_HOSTS + GROUPED_CONV_HOSTS + SUBSTITUTED_HOSTS
        bad = set(hosts) - set(known)
        if bad:
            raise ValueError(f"unknown host kinds {bad}; known: {known}")
        if family not in FAMILIES:
            raise ValueError(f"method {name!r}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
        if not lr_scale > 0 or (head_lr_scale is not None and not head_lr_scale > 0):
            raise ValueError(f"method {name!r}: learning-rate factors must be > 0")
        if model_level and (mergeable or hosts):
            raise ValueError(f"model-level method {name!r} must register with mergeable=False and hosts=()")
        if name in _REGISTRY and _REGISTRY[name].adapter is not adapter_cls:
            raise ValueError(f"method {name!r} registered twice")
        config.method = name
        adapter_cls.method = name
        _REGISTRY[name] = MethodInfo(
            name, config, adapter_cls, paper, description, params, mergeable, tuple(hosts), procedure,
            hf_peft_type, init_is_identity, calibrate, model_level, lr_scale, head_lr_scale, half_precision,
            half_precision_note, float32_params, compile_breaks, family,
        )
        return adapter_cls

    return deco


def _load_all() -> None:
    """Import every module in ``peftkit.methods`` so that each registers itself (no central list to edit)."""
    global _LOADED
    if _LOADED:
        return
    import peftkit.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    _LOADED = True


def get(name: str) -> MethodInfo:
    _load_all()
    if name not in _REGISTRY:
        raise PeftkitError(f"unknown method {name!r}{did_you_mean(name, sorted(_REGISTRY))}; registered methods: "
                           f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_methods() -> list[MethodInfo]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Build the right config class from a dict holding ``"method"``."""
    if "method" not in data:
        raise PeftkitError("adapter config has no 'method' field")
    return get(data["method"]).config.from_dict(data)


def from_peft_config(peft_config: Any) -> AdapterConfig:
    """The peftkit config of a Hugging Face PEFT config object (or its ``to_dict()`` / ``adapter_config.json``
    dict): the method whose config mirrors its ``peft_type`` (``LORA`` with ``use_dora`` gives DoRA), every field
    translated as the config constructors do — fields peftkit cannot honour are refused by name."""
    data = dict(peft_config.to_dict() if hasattr(peft_config, "to_dict") else peft_config)
    ptype = data.get("peft_type")
    ptype = getattr(ptype, "value", ptype)
    def mirrored(cls: Any) -> str | None:  # the PEFT type a config class itself declares (peft_names.mirrored)
        return cls.__dict__.get("peft_type")

    found = [i for i in all_methods() if mirrored(i.config) == ptype and ptype is not None]
    if not found:
        known = sorted({t for i in all_methods() if (t := mirrored(i.config))})
        raise PeftkitError(f"Hugging Face PEFT type {ptype!r} has no peftkit counterpart here"
                           f"{did_you_mean(str(ptype), known)}; peftkit reads the configs of: {', '.join(known)}")
    # several methods mirror one PEFT type (LORA: lora, dora): the one named like it, which switches as PEFT does
    squash = str(ptype).lower().replace("_", "")
    info = next((i for i in found if i.name.replace("_", "") == squash), found[0])
    return info.config(**data)
