"""Loading the packaged models: Hugging Face transformers folders (:mod:`.transformers`: the packaged
all-MiniLM-L6-v2 by default, sequence / token classifiers and causal LMs, optionally quantised), the GGUF cache
(:mod:`.gguf`: SmolLM2-135M-Instruct converted once to safetensors), EfficientNet-Lite0 (:mod:`.efficientnet`) and
finding a pip package's files without importing it (:mod:`.packages`). Everything is re-exported here, where
``peftkit.models`` always had it."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import PeftkitError
from .efficientnet import BACKBONES
from .gguf import CACHE_ENV, cache_root, convert_gguf, is_complete, mark_complete, smollm2_folder
from .transformers import (
    DEFAULT_MODEL_PACKAGE,
    QUANTIZE_CHOICES,
    SMOLLM2_PACKAGE,
    classifier_head_names,
    default_model_dir,
    load_causal_lm,
    load_classifier,
    load_errors,
    load_message,
    load_token_classifier,
    quiet_transformers,
    resolve_model_dir,
)


def model_label(model: str | os.PathLike) -> str:
    """How a run names its base model: the packaged ones by name (all-MiniLM-L6-v2, the cached SmolLM2-135M-Instruct,
    a vision backbone), any other folder by its path."""
    if isinstance(model, str) and model in BACKBONES:
        return f"{model} ({BACKBONES[model][1]})"
    path = Path(model)
    if path == cache_root() / "smollm2":
        return f"SmolLM2-135M-Instruct (packaged, cached at {path})"
    try:
        if path == default_model_dir():
            return "all-MiniLM-L6-v2 (packaged)"
    except PeftkitError:
        pass
    return str(path)


__all__ = [
    "BACKBONES", "CACHE_ENV", "DEFAULT_MODEL_PACKAGE", "QUANTIZE_CHOICES", "SMOLLM2_PACKAGE", "cache_root",
    "classifier_head_names", "convert_gguf", "default_model_dir", "is_complete", "load_causal_lm", "load_classifier",
    "load_errors", "load_message", "load_token_classifier", "mark_complete", "model_label", "quiet_transformers",
    "resolve_model_dir", "smollm2_folder",
]
