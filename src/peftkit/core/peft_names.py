"""Hugging Face PEFT's config names, read once: what each PEFT field means in peftkit.

A config class lists its PEFT fields in ``peft_names`` (a dict of :class:`PeftName`) and the PEFT config class it
mirrors in ``peft_type``; :func:`translate` turns constructor keywords spelled either way into peftkit's fields, so
``peftkit.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="SEQ_CLS")``,
``peftkit.config("lora", **peft_config.to_dict())`` and :func:`peftkit.from_peft_config` all work. A PEFT field is

* an alias: it sets a peftkit field, its value converted (``lora_alpha`` → ``alpha``; ``bias="lora_only"`` →
  ``"adapter_only"``; ``rank_pattern`` / ``alpha_pattern`` → ``overrides``);
* a method switch (``use_dora``): the keywords build the named method's config instead;
* inert: no meaning in peftkit — accepted while it holds PEFT's default (or any value, for metadata and for what
  peftkit reads from the model), refused by name otherwise, saying what to use instead.

Unknown names fail with a "did you mean" (:func:`peftkit.core.errors.did_you_mean`). The Hugging Face ``LORA``
translation shared by LoRA and DoRA lives here too, and :mod:`peftkit.core.hf` reads PEFT files with it.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import PeftkitError, did_you_mean

ANY = object()   #: inert default: every value is accepted (metadata, or something peftkit reads from the model)
DROP = object()  #: returned by a converter: leave the peftkit field at its default
#: adapter_config.json fields that are metadata, not settings of the method
PEFT_METADATA = frozenset({"peft_type", "task_type", "inference_mode", "auto_mapping", "peft_version",
                           "base_model_name_or_path", "revision"})


@dataclass(frozen=True)
class PeftName:
    """How one Hugging Face PEFT config field reads in peftkit.

    ``field``: the peftkit field it sets (``"method"``: the value names the peftkit method whose config to build);
    ``value(v, fields)``: the peftkit value of PEFT's ``v`` (``fields``: every keyword given; may return
    :data:`DROP`; raises :class:`PeftkitError` to refuse). ``field=None``: no peftkit meaning — accepted while the
    value equals ``default`` (an unset default — None, False, {} — accepts any unset value; :data:`ANY` accepts
    all), refused otherwise with ``instead``."""

    field: str | None = None
    value: Callable[[Any, Mapping[str, Any]], Any] | None = None
    default: Any = ANY
    instead: str = ""


def alias(field: str, convert: Callable[[Any], Any] | None = None) -> PeftName:
    return PeftName(field, (lambda v, _: convert(v)) if convert else None)


def inert(default: Any = ANY, instead: str = "") -> PeftName:
    return PeftName(None, None, default, instead)


def or_default(field: str, convert: Callable[[Any], Any] | None = None) -> PeftName:
    """An alias where PEFT's None means "PEFT picks" (e.g. targets from its per-architecture tables): None leaves
    peftkit's default."""
    return alias(field, lambda v: DROP if v is None else (convert(v) if convert else v))


def bias_alias(only: str) -> PeftName:
    """PEFT's ``bias`` of a method whose adapter-only mode is named ``only`` (``"boft_only"``, …): that mode reads
    as peftkit's ``"adapter_only"``, other values as they are."""
    return alias("bias", lambda v: "adapter_only" if plain(v) == only else plain(v))


#: PEFT's boolean ``init_weights`` of the orthogonal methods: True = the identity rotation, False = a random one
INIT_IDENTITY = alias("init", lambda v: "identity" if v else "random")


def submodules(v: Any, _: Mapping[str, Any]) -> Any:
    """``num_transformer_submodules``: PEFT sets 2 for encoder-decoder models, which peftkit's prompt methods refuse."""
    if v in (None, 1):
        return DROP
    raise PeftkitError(f"field num_transformer_submodules={v!r} is not supported: peftkit's prompt methods adapt "
                       "decoder-only and encoder-only models (one transformer stack)")


#: prompt-learning fields PEFT fills from the model's config; peftkit reads them from the model itself
FROM_MODEL: dict[str, PeftName] = {
    "token_dim": inert(), "num_attention_heads": inert(), "num_layers": inert(),
    "num_transformer_submodules": PeftName("num_transformer_submodules", submodules),
}


def plain(v: Any) -> Any:
    """PEFT's value in JSON terms: enums → their value, dataclasses → dicts, sets → sorted lists."""
    if isinstance(v, enum.Enum):
        return v.value
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    if isinstance(v, set | frozenset):
        return sorted(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def unset(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, dict | list | tuple | set | str) and not v)


def names_list(v: Any) -> Any:
    """A module-name list in PEFT's spellings (a set, a tuple) as a list; a regex string stays a string."""
    v = plain(v)
    return list(v) if isinstance(v, list) else v


def _layers(v: Any) -> Any:
    return [v] if isinstance(v, int) and not isinstance(v, bool) else names_list(v)


def _layers_pattern(v: Any) -> Any:
    v = names_list(v)
    if isinstance(v, list):
        if len(v) > 1:
            raise PeftkitError(f"layers_pattern={v!r}: peftkit takes one layers_pattern (the name before the layer "
                               "index); leave it unset to try the usual ones (layers, layer, h, blocks, block)")
        return v[0] if v else None
    return v


def _task_type(v: Any) -> Any:
    v = plain(v)
    return None if v is None else str(v)


#: the fields of Hugging Face PEFT's ``PeftConfig`` base class, shared by every PEFT method
COMMON: dict[str, PeftName] = {
    "task_type": alias("task_type", _task_type),
    "inference_mode": alias("inference_mode"),
    "auto_mapping": inert(), "peft_version": inert(), "base_model_name_or_path": inert(), "revision": inert(),
    # peft_type is checked by translate() against the class's own
}


def mirrored(cls: Any) -> tuple[str | None, dict[str, PeftName]]:
    """(PEFT type, PEFT field table) that config class ``cls`` itself declares. Not inherited: a method whose config
    subclasses LoRA's (e.g. ExPLoRA) is not PEFT's LoRA, and ``use_dora`` must not turn it into DoRA."""
    return cls.__dict__.get("peft_type"), cls.__dict__.get("peft_names") or {}


def translate(cls: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(config class to build, its keywords) for constructor keywords spelled the peftkit or the PEFT way.

    Raises :class:`PeftkitError` naming an unknown field (with a "did you mean"), a PEFT field peftkit cannot honour
    (with what to use instead), or two spellings of one field that disagree."""
    ptype, own = mirrored(cls)
    table = {**COMMON, **own} if ptype else dict(own)
    native = {f.name for f in dataclasses.fields(cls) if f.init}
    if not table and set(kwargs) <= native:
        return cls, kwargs
    what = f"peftkit's {cls.method}" if getattr(cls, "method", "") else cls.__name__
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    method: str | None = None
    unknown: list[str] = []
    for k, v in kwargs.items():
        if k == "peft_type" and ptype:
            if v is not None and plain(v) != ptype:
                raise PeftkitError(f"peft_type={plain(v)!r} is not {cls.__name__}'s {ptype!r}; build "
                                   f"configs of other Hugging Face PEFT methods with peftkit.from_peft_config(...)")
            continue
        entry = table.get(k)
        if entry is None:
            if k in native:
                entry = PeftName(k)
            else:
                unknown.append(k)
                continue
        if entry.field is None:
            d = entry.default
            if d is ANY or plain(v) == plain(d) or (unset(d) and unset(plain(v))):
                continue
            raise PeftkitError(f"field {k}={plain(v)!r} is not supported by {what}"
                               + (f": {entry.instead}" if entry.instead else "")
                               + ("" if d is None or unset(d) else f" (accepted only at PEFT's default {plain(d)!r})"))
        val = entry.value(v, kwargs) if entry.value else v
        if val is DROP:
            continue
        if entry.field == "method":
            method = val
            continue
        if entry.field in out and out[entry.field] != val:
            raise PeftkitError(f"{cls.__name__}: {source[entry.field]}={kwargs[source[entry.field]]!r} and "
                               f"{k}={v!r} both set {entry.field}, to different values; give one of them")
        out[entry.field], source[entry.field] = val, k
    if unknown:
        hint = did_you_mean(unknown[0], sorted(native | set(table)))
        also = f" and Hugging Face PEFT's {ptype} field names" if ptype else ""
        raise PeftkitError(f"{cls.__name__} has no field(s) {sorted(unknown)}{hint}; valid fields: "
                           f"{', '.join(sorted(native))}{also}")
    if method is not None and method != getattr(cls, "method", None):
        from .registry import get

        target = get(method).config
        have = {f.name for f in dataclasses.fields(target) if f.init}
        for k in [k for k in out if k not in have]:  # an option of this class that the switched-to one lacks
            if not unset(plain(out[k])):
                raise PeftkitError(f"field {source[k]}={plain(out[k])!r} is not supported by peftkit's {method}")
            del out[k]
        return target, out
    return cls, out


# -- the Hugging Face LORA config, shared by the low-rank methods that read and write it ----------------------
#: PEFT's bias modes → peftkit's, and back
BIAS_IN = {"none": "none", "all": "all", "lora_only": "adapter_only"}
BIAS_OUT = {v: k for k, v in BIAS_IN.items()}
#: peftkit's LoRA inits that a PEFT file can name (the others keep their initial factors next to the trained ones)
INIT_TO_PEFT: dict[str, Any] = {"kaiming": True, "gaussian": "gaussian", "random": False, "mica": "mica"}
#: init_lora_weights values that make PEFT rewrite the base weight (or swap in a LoRA variant) when it loads
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
#: PEFT LoRA options that change the function the adapter computes and that peftkit does not reproduce
LORA_UNSUPPORTED = {
    "lora_bias": "a trainable bias on lora_B",
    "layer_replication": "duplicated transformer layers",
    "target_parameters": "LoRA on bare nn.Parameters (e.g. MoE expert weights)",
    "trainable_token_indices": "trainable token embeddings",
    "use_qalora": "QA-LoRA's pooled input",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron parallel layers",
    "ensure_weight_tying": "adapters tied across tied embedding / head layers",
}
#: PEFT LoRA options that change only how the adapter trains, not what the trained adapter computes: a file that
#: uses one loads as plain LoRA with a warning saying what differs if training continues (option -> (what differs,
#: the file's training-only tensors, by name fragment))
LORA_TRAINING_ONLY = {
    "velora_config": ("VeLoRA compresses the activations kept for the backward pass (an approximate gradient); "
                      "peftkit keeps them exactly", ("lora_velora_embed",)),
    "monteclora_config": ("MonteCLoRA samples the low-rank factors around their mean while training (its sampler "
                          "is dropped); peftkit computes with the mean, as MonteCLoRA does in eval",
                          ("lora_monteclora_sampler.",)),
}
#: block-diagonal LoRA with one block is plain LoRA; with more it is refused
LORA_BLOCK_DIAGONAL = "use_bdlora"
_LORA_INSTEAD = {
    "lora_bias": "use bias='lora_only' (the adapted layers' own biases train) instead",
    "target_parameters": "peftkit's lora has it (peftkit.config('lora', target_parameters=[...])); PEFT has no "
                         "DoRA on a bare parameter either",
    "trainable_token_indices": "train the whole embedding with modules_to_save instead",
    "megatron_config": "adapt the unsharded model instead",
}
#: PEFT init_lora_weights values without a peftkit counterpart, and what to use instead
_INIT_REFUSED = {
    "eva": "EVA is an init of peftkit's lora: init='eva' or 'eva_rho_X' (ρ), then peftkit.methods.lora calibrate "
           "(no eva_config)",
    "corda": "CorDA is an init of peftkit's lora: init='corda' (IPM) or 'corda_kpm', then calibrate (no corda_config)",
    "loftq": "LoftQ is an init of peftkit's lora: init='loftq' or 'loftq_iter_T' (4-bit NF4; no loftq_config)",
    "lora_ga": "LoRA-GA initialises from gradients of data; use init_lora_weights=True or 'pissa'",
    "orthogonal": "use init_lora_weights='olora' (orthonormal B from the weight's QR) or True",
}


def patterns_to_overrides(rank: dict[str, int], alpha: dict[str, float]) -> dict[str, dict[str, Any]]:
    """HF ``rank_pattern`` / ``alpha_pattern`` -> our ``overrides``, same function of the module name.

    HF takes the *first* pattern that matches ``(.*\\.)?(pattern)$`` (per field; ``peft.utils.other.get_pattern_key``);
    ``AdapterConfig.for_module`` applies every match of the same expression in order, so the last one wins:
    reversing each dict gives the same choice. A pattern present in both dicts gets an equivalent spelling ``(?:p)``
    for its alpha entry so the two orders stay independent."""
    out: dict[str, dict[str, Any]] = {}
    for p, v in reversed(list(rank.items())):
        out[p] = {"r": v}
    for p, v in reversed(list(alpha.items())):
        key = p
        while key in out:
            key = f"(?:{key})"
        out[key] = {"alpha": v}
    return out


def overrides_to_patterns(overrides: dict[str, dict[str, Any]]) -> tuple[dict[str, int], dict[str, float]]:
    """Our ``overrides`` -> HF ``rank_pattern``, ``alpha_pattern`` (the inverse of :func:`patterns_to_overrides`)."""
    rank: dict[str, int] = {}
    alpha: dict[str, float] = {}
    for p, ov in reversed(list(overrides.items())):
        bad = sorted(set(ov) - {"r", "alpha", "init"})
        if bad:
            raise PeftkitError(
                f"cannot export to Hugging Face PEFT format: overrides[{p!r}] sets {bad}; Hugging Face PEFT can only "
                f"vary r and alpha per module (rank_pattern / alpha_pattern)"
            )
        if "r" in ov:
            rank[p] = ov["r"]
        if "alpha" in ov:
            alpha[p] = plain_number(ov["alpha"])
    return rank, alpha


def plain_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _bias(v: Any) -> Any:
    v = plain(v)
    return BIAS_IN.get(v, v) if isinstance(v, str) else v  # an unknown mode fails the field's own check


def _overrides(_: Any, fields: Mapping[str, Any]) -> Any:
    rank, alpha = plain(fields.get("rank_pattern")) or {}, plain(fields.get("alpha_pattern")) or {}
    return patterns_to_overrides(dict(rank), dict(alpha)) if rank or alpha else DROP


def lora_init(v: Any, allowed: tuple[str, ...], method: str = "lora") -> str:
    """PEFT's ``init_lora_weights`` → peftkit's ``init`` (True → kaiming, False → random B, strings as named)."""
    if v is True:
        return "kaiming"
    if v is False:
        name = "random"
    elif isinstance(v, str):
        name = v.lower() if v.lower() in ("gaussian", "olora", "mica") else v
    else:
        raise PeftkitError(f"init_lora_weights must be True, False or a string, got {v!r}")
    if re.fullmatch("|".join(allowed), name):
        return name
    base = name.split("_niter_")[0]
    instead = _INIT_REFUSED.get(base) or _INIT_REFUSED.get(name.lower())
    raise PeftkitError(f"field init_lora_weights={v!r} is not supported by peftkit's {method}"
                       + (f": {instead}" if instead else f"; supported: {', '.join(allowed)}"))


def lora_names(*, inits: tuple[str, ...], dora: bool, own: tuple[str, ...] = ()) -> dict[str, PeftName]:
    """PEFT ``LoraConfig``'s fields for a peftkit config with fields r, alpha, rslora, init and the shared ones.
    ``inits``: the regexes of the init names the method implements; ``dora``: the method is DoRA (``use_dora``
    must then be True) rather than plain LoRA (``use_dora=True`` builds DoRA's config); ``own``: options of
    :data:`LORA_UNSUPPORTED` that the config implements as fields of the same name (read as they are)."""

    def use_dora(v: Any, _: Mapping[str, Any]) -> str:
        if dora and not v:
            raise PeftkitError("use_dora=False describes plain LoRA; build it with peftkit.config('lora', ...)")
        return "dora" if v else "lora"

    def init(v: Any, _: Mapping[str, Any]) -> str:
        return lora_init(plain(v), inits, "dora" if dora else "lora")

    table: dict[str, PeftName] = {
        "lora_alpha": alias("alpha"),
        "lora_dropout": alias("dropout", lambda v: 0.0 if v is None else v),
        "use_rslora": alias("rslora"),
        "use_dora": PeftName("method", use_dora),
        "init_lora_weights": PeftName("init", init),
        "rank_pattern": PeftName("overrides", _overrides),
        "alpha_pattern": PeftName("overrides", _overrides),
        "bias": alias("bias", _bias),
        "target_modules": alias("target_modules", names_list),
        "exclude_modules": alias("exclude_modules", names_list),
        "modules_to_save": alias("modules_to_save", names_list),
        "layers_to_transform": alias("layers_to_transform", _layers),
        "layers_pattern": alias("layers_pattern", _layers_pattern),
        # peftkit reads the layout from the layer: GPT-2 Conv1D is transposed, nn.Linear is not (PEFT corrects the
        # flag the same way, with a warning)
        "fan_in_fan_out": inert(),
        "megatron_core": inert(), "runtime_config": inert(), "qalora_group_size": inert(),
        "loftq_config": inert({}, _INIT_REFUSED["loftq"]),
        "eva_config": inert(None, _INIT_REFUSED["eva"]),
        "corda_config": inert(None, _INIT_REFUSED["corda"]),
        "lora_ga_config": inert(None, _INIT_REFUSED["lora_ga"]),
    }
    for key in own:  # read as they are (a PEFT sub-config object as its dict)
        table[key] = alias(key, plain)
    for key, what in LORA_UNSUPPORTED.items():
        if key in own:
            continue
        table[key] = inert(None, f"{what} — " + _LORA_INSTEAD.get(key, "peftkit has no counterpart"))
    for key, (what, _) in LORA_TRAINING_ONLY.items():
        table[key] = inert(None, f"{what} — peftkit trains plain LoRA (a saved adapter with it loads as such)")
    if LORA_BLOCK_DIAGONAL not in own:
        table[LORA_BLOCK_DIAGONAL] = inert(None, "block-diagonal LoRA — peftkit has it for plain LoRA only (a saved "
                                                 "adapter with one block loads as plain LoRA)")
    return table


#: fields shared by PEFT's layer-targeting configs that read the same in peftkit
TARGETING: dict[str, PeftName] = {
    "target_modules": alias("target_modules", names_list),
    "exclude_modules": alias("exclude_modules", names_list),
    "modules_to_save": alias("modules_to_save", names_list),
    "layers_to_transform": alias("layers_to_transform", _layers),
    "layers_pattern": alias("layers_pattern", _layers_pattern),
    "bias": alias("bias", _bias),
    "fan_in_fan_out": inert(),
}
