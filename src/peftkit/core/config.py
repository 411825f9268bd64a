"""Base adapter config: targeting, dropout, bias, per-module overrides, (de)serialisation with validation.

Every method's config is a dataclass that inherits :class:`AdapterConfig`. Constructing one (directly or with
``from_dict``) rejects unknown fields (with a "did you mean" and the valid ones) and wrong types (naming the
field), so configs read from JSON or the CLI fail loudly.

Hugging Face PEFT names: the config classes of the methods PEFT also has keep PEFT's class names
(``peftkit.LoraConfig``, ``IA3Config``, ``PromptTuningConfig``, ...) and — so that a PEFT snippet runs with only its
import changed — accept PEFT's field names and values too, in the constructor as in ``peftkit.config(name, ...)``:
``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="SEQ_CLS")`` is peftkit's
``LoraConfig(r=8, alpha=16, dropout=0.05, task_type="SEQ_CLS")``. A class lists its PEFT fields in ``peft_names``
(see :mod:`peftkit.core.peft_names`); the instance holds peftkit's fields only, so ``to_dict`` / saved files use
peftkit's names. ``task_type`` is stored; ``SEQ_CLS`` / ``TOKEN_CLS`` / ``QUESTION_ANS`` add the model's
``classifier`` / ``score`` / ``qa_outputs`` head to ``modules_to_save`` when the model has one, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from . import peft_names as _peft
from .errors import PeftkitError


def _type_ok(value: Any, tp: Any) -> bool:
    """Loose runtime check of ``value`` against a typing annotation (the subset configs use)."""
    if tp is Any:
        return True
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if origin is Literal:
        return value in get_args(tp)
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        args = get_args(tp)
        if not args:
            return True
        inner = args[0]
        return all(_type_ok(v, inner) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        kt, vt = get_args(tp) or (Any, Any)
        return all(_type_ok(k, kt) and _type_ok(v, vt) for k, v in value.items())
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def all_finite(value: Any) -> bool:
    """No NaN or infinity anywhere in ``value`` (floats, and inside lists and dicts: per-module overrides)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    return True


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any) -> Any:
    """Convert JSON lists back to tuples where the annotation asks for a tuple; ints to floats."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for a in get_args(tp):
            if a is not type(None) and _type_ok(value, a):
                return _coerce(value, a)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


class _ConfigType(type):
    """Metaclass of every config: keywords spelled the Hugging Face PEFT way are translated (and unknown ones
    refused with a "did you mean") before the dataclass constructor sees them; ``use_dora=True`` on LoRA's config
    builds DoRA's. ``dataclasses.replace``, copies and pickles go through it unchanged."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        target, kwargs = _peft.translate(cls, kwargs)
        return super(_ConfigType, target).__call__(*args, **kwargs)


#: Hugging Face PEFT task types whose head PEFT trains with the adapter (``modules_to_save``), by module name
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


@dataclass
class AdapterConfig(metaclass=_ConfigType):
    """Fields every method shares.

    Targeting (see :mod:`peftkit.core.targeting`): ``target_modules`` is a list of module names or name suffixes,
    a regex string (full match), or ``"all-linear"``; ``target_types`` restricts to module class names;
    ``layers_to_transform`` keeps modules whose layer index (found with ``layers_pattern``) is listed;
    ``exclude_modules`` removes matches. ``modules_to_save`` lists extra modules (e.g. a classification head) that
    train fully and are saved with the adapter. ``bias``: ``"none"``, ``"all"`` (every bias trains) or
    ``"adapter_only"`` (biases of adapted layers train). ``overrides`` maps a module-name pattern to field
    overrides for the modules it matches (``{"attn.q": {"r": 16}}``), Hugging Face PEFT ``rank_pattern`` style.
    ``task_type``: Hugging Face PEFT's task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...), stored; a classification /
    QA task adds the model's head to ``modules_to_save`` (see :data:`TASK_HEADS`). ``inference_mode``: as in Hugging
    Face PEFT, the adapter is attached frozen — nothing of it trains (its parameters, saved copies and biases keep
    ``requires_grad`` False). :func:`peftkit.load` does not keep it: its ``trainable`` decides, as PEFT's
    ``is_trainable`` does (PEFT writes ``inference_mode: true`` into every saved config).

    ``peft_type`` / ``peft_names``: the Hugging Face PEFT config this class mirrors and how its field names read
    here (:mod:`peftkit.core.peft_names`); empty for methods PEFT does not have. Declared per class, not inherited
    (a config subclassing LoRA's is another method).
    """

    method: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None
    peft_names: ClassVar[dict[str, _peft.PeftName]] = {}

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    target_types: list[str] | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: str | None = None
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "adapter_only"] = "none"
    dropout: float = 0.0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_type: str | None = None
    inference_mode: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a subclass's own resolve() runs after the task-head step below (so no method has to remember it)
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("resolve")
        if own is not None and not getattr(own, "_with_task_heads", False):
            def resolve(self: AdapterConfig, model: Any, _own: Any = own) -> AdapterConfig:
                return _own(AdapterConfig.resolve(self, model), model)

            resolve._with_task_heads = True  # type: ignore[attr-defined]
            resolve.__doc__ = own.__doc__
            cls.resolve = resolve  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    # -- validation ---------------------------------------------------------------------------------
    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints.get(f.name, Any)
            value = _coerce(value, tp)
            object.__setattr__(self, f.name, value)
            if not _type_ok(value, tp):
                raise PeftkitError(
                    f"{type(self).__name__}.{f.name} must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
                )
            if not all_finite(value):
                raise PeftkitError(f"{type(self).__name__}.{f.name} must be finite, got {value!r}")

    def validate(self) -> None:
        """Method configs extend this with their own constraints (call ``super().validate()``)."""
        for f in dataclasses.fields(self):  # NaN / inf in a float field (JSON reads NaN) would train silently wrong
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise PeftkitError(f"{type(self).__name__}.{f.name} must be a finite number, got {value}")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftkitError(f"{type(self).__name__}.dropout must be in [0, 1), got {self.dropout}")
        if self.layers_to_transform is not None and any(i < 0 for i in self.layers_to_transform):
            raise PeftkitError("layers_to_transform must hold non-negative layer indices")
        valid = {f.name for f in dataclasses.fields(self)}
        for pattern, ov in self.overrides.items():
            bad = set(ov) - valid
            if bad:
                raise PeftkitError(
                    f"overrides[{pattern!r}] names unknown field(s) {sorted(bad)}; valid: {sorted(valid)}"
                )

    @staticmethod
    def positive(name: str, value: float) -> None:
        if value <= 0:
            raise PeftkitError(f"{name} must be > 0, got {value}")

    @staticmethod
    def at_least(name: str, value: int, low: int) -> None:
        if value < low:
            raise PeftkitError(f"{name} must be >= {low}, got {value}")

    @staticmethod
    def positive_int(name: str, value: int) -> None:
        if value <= 0:
            raise PeftkitError(f"{name} must be a positive integer, got {value}")

    # -- model-dependent fields -----------------------------------------------------------------------
    def resolve(self, model: Any) -> AdapterConfig:
        """This config made concrete for ``model`` (an ``nn.Module``). Configs with fields that depend on the model's
        structure (e.g. "the last block") return a copy where they are explicit module names; the core calls this
        before targeting, on adapt and on load, and keeps the result. Must be idempotent and leave the model alone.

        Here: a ``task_type`` of :data:`TASK_HEADS` adds the heads the model has to ``modules_to_save``."""
        heads = TASK_HEADS.get(self.task_type or "", ())
        have = list(self.modules_to_save or [])
        names = [n for n, _ in model.named_modules()] if heads else []
        add = [h for h in heads if h not in have and any(n == h or n.endswith("." + h) for n in names)]
        return dataclasses.replace(self, modules_to_save=have + add) if add else self

    def extra_targets(self) -> list[str]:
        """Full module names the config adapts besides ``target_modules`` (after :meth:`resolve`; none here): they
        are targeted as named, whatever the other targeting fields say."""
        return []

    def parameter_targets(self) -> list[str]:
        """Parameter names (``"experts.w1"``, or a suffix of the full name) the config adapts as bare parameters —
        each one a substituted host (:mod:`peftkit.core.host`) on the module that holds it (none here)."""
        return []

    # -- per-module view ----------------------------------------------------------------------------
    def for_module(self, module_name: str) -> AdapterConfig:
        """This config with the ``overrides`` whose pattern matches ``module_name`` applied (last match wins)."""
        changes: dict[str, Any] = {}
        for pattern, ov in self.overrides.items():
            if re.match(rf"(.*\.)?({pattern})$", module_name):
                changes.update(ov)
        return dataclasses.replace(self, **changes) if changes else self

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"method": self.method, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        data.pop("method", None)
        try:
            return cls(**data)
        except TypeError as e:  # pragma: no cover - dataclass signature problems
            raise PeftkitError(f"{cls.__name__}: {e}") from None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
