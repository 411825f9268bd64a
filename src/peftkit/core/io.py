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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path`` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_adapter(
    directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Serialise both files in memory first, then replace them atomically (weights first, config last)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise PeftkitError(f"cannot save adapter: {d} exists and is not a directory")
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    cfg = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    try:
        _atomic_write_bytes(d / WEIGHTS_NAME, blob)
        _atomic_write_bytes(d / CONFIG_NAME, cfg)
    except OSError as e:
        raise PeftkitError(f"cannot save adapter to {d}: {e.strerror or e}") from None


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    p = Path(directory) / CONFIG_NAME
    if not p.is_file():
        raise PeftkitError(f"no adapter found: {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftkitError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"{p} must hold a JSON object")
    return data


def read_tensors(directory: str | os.PathLike, name: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    p = Path(directory) / name
    if not p.is_file():
        raise PeftkitError(f"adapter weights missing: {p} does not exist")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PeftkitError(f"{p} is corrupted or truncated ({e})") from None
