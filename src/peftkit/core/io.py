"""Files: ``adapter_config.json`` + ``adapter_model.safetensors``, written atomically, read with validation."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import PeftkitError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write every file to a temp file in its folder and fsync them all, then rename each over its target.

    Staging all temp files before the first rename means a failed write (disk full, permissions) leaves every
    previous file untouched; no half-written file is ever visible under a target name."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path`` (never a half-written file)."""
    _atomic_write_files({path: data})


def write_adapter(
    directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Serialise both files in memory, stage both as temp files, then rename them (weights first, config last)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise PeftkitError(f"cannot save adapter: {d} exists and is not a directory")
    try:
        blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
        cfg = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    except (RuntimeError, TypeError, ValueError) as e:  # e.g. tensors sharing memory, unserialisable config
        raise PeftkitError(f"cannot serialise adapter for {d}: {e}") from None
    try:
        _atomic_write_files({d / WEIGHTS_NAME: blob, d / CONFIG_NAME: cfg})
    except OSError as e:
        raise PeftkitError(f"cannot save adapter to {d}: {e.strerror or e}") from None


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    _atomic_write_bytes(Path(path), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`PeftkitError` when it is not valid JSON or not an object."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftkitError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"{p} must hold a JSON object")
    return data


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    p = Path(directory) / CONFIG_NAME
    if not p.is_file():
        raise PeftkitError(f"no adapter found: {p} does not exist")
    return read_json(p)


def read_tensors(directory: str | os.PathLike, name: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    p = Path(directory) / name
    if not p.is_file():
        raise PeftkitError(f"adapter weights missing: {p} does not exist")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PeftkitError(f"{p} is corrupted or truncated ({e})") from None
