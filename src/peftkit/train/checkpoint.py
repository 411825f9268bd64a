"""Resumable training: periodic checkpoints of everything a run needs to continue exactly where it stopped.

A checkpoint of step ``s`` (``s`` optimiser steps done) is a folder ``DIR/step-000s/`` with

- ``model.safetensors`` — the training state of the model: every tensor of every adapter (layer adapters,
  model-level adapters such as prompts, the trained copies of ``modules_to_save``, buffers included) and every
  other parameter that requires grad (e.g. trainable biases);
- ``state.safetensors`` + ``state.json`` — the optimiser (its state keyed by parameter name, checked against the
  model on resume), the learning-rate schedule, the RNG states (torch, Python ``random``, NumPy), every
  procedure's ``state_dict()``, the losses so far and the caller's ``meta`` (the CLI stores the run's options
  there). Nested Python values are JSON; tensors inside them go to the safetensors file — no pickle.

``DIR/latest.json`` names the newest complete checkpoint and is replaced atomically only after that checkpoint's
files are all written, and older checkpoints are deleted only after that: a run killed at any moment (even while
writing) leaves a loadable checkpoint, the previous one.

Resuming (:func:`peftkit.train.train` with ``resume=True``) rebuilds the same model and procedures as the
interrupted run (same seed, same config), then in this order: procedures' ``load_state_dict`` → their
``on_train_start`` (a procedure that changes the adapter's structure during training — rank growth, module
selection — replays those changes here, so the shapes and the optimiser's parameter order match again) → the model
tensors (every name and shape checked first; on a mismatch nothing is changed) → optimiser → schedule → RNG → the
first ``s`` batches of the data are skipped (the batches must be the same fresh iterable as in the interrupted run:
``peftkit.data.Batches`` reshuffles each epoch from ``seed + epoch``, so re-iterating reproduces the order).
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..core.errors import PeftkitError
from ..core.io import atomic_write_bytes, read_json, write_json
from ..core.layer import AdaptedLayer, SavedModule
from ..core.model_level import ModelAdapters
from ..core.procedure import Procedure

LATEST = "latest.json"
_MODEL = "model.safetensors"
_STATE = "state.safetensors"
_STATE_JSON = "state.json"
FORMAT = 1


# -- nested values <-> JSON + tensors ------------------------------------------------------------------------
def pack(value: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """``value`` as JSON-able data; every tensor (and NumPy array) inside it moves to ``tensors`` under a fresh key.
    Tuples and dicts with non-string keys are tagged so that :func:`unpack` restores them exactly."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        if getattr(value, "ndim", 0) == 0:
            return value.item()
        raw = torch.from_numpy(value.reshape(-1).view("uint8").copy())  # exact bytes, whatever the dtype
        return {"__ndarray__": pack(raw, tensors, where)["__tensor__"], "dtype": value.dtype.str,
                "shape": list(value.shape)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: pack(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {"__items__": [[pack(k, tensors, where), pack(v, tensors, f"{where}[{k!r}]")]
                              for k, v in value.items()]}
    raise PeftkitError(f"cannot checkpoint {where}: a {type(value).__name__} is neither a tensor nor plain data")


def unpack(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`pack`."""
    if isinstance(data, list):
        return [unpack(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors[data["__tensor__"]]
    if "__ndarray__" in data:
        return tensors[data["__ndarray__"]].numpy().view(data["dtype"]).reshape(data["shape"])
    if "__tuple__" in data:
        return tuple(unpack(v, tensors) for v in data["__tuple__"])
    if "__items__" in data:
        return {_hashable(unpack(k, tensors)): unpack(v, tensors) for k, v in data["__items__"]}
    return {k: unpack(v, tensors) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


# -- what is saved --------------------------------------------------------------------------------------------
def training_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors a training run changes: everything inside adapters, model-level adapters and
    ``modules_to_save`` copies (buffers too), plus any other parameter that requires grad; keyed as in
    ``model.state_dict()``."""
    prefixes = []
    for name, module in model.named_modules():
        dot = f"{name}." if name else ""
        if isinstance(module, AdaptedLayer):
            prefixes.append(f"{dot}adapters.")
        elif isinstance(module, SavedModule):
            prefixes.append(f"{dot}copies.")
        elif isinstance(module, ModelAdapters):
            prefixes.append(dot)
    grad = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if k in grad or any(k.startswith(p) for p in prefixes)}


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out = []
    for g in optimizer.param_groups:
        missing = [p for p in g["params"] if id(p) not in names]
        if missing:
            raise PeftkitError(f"cannot checkpoint: the optimiser holds a parameter of shape {tuple(missing[0].shape)} "
                               "that is not in the model")
        out.append([names[id(p)] for p in g["params"]])
    return out


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


# -- writing ---------------------------------------------------------------------------------------------------
def save_checkpoint(
    directory: str | Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    schedule: Any, procedures: Sequence[Procedure] = (), losses: Sequence[float] = (), examples: int = 0,
    seconds: float = 0.0, meta: dict[str, Any] | None = None, keep: int = 1,
) -> Path:
    """Write the checkpoint of ``step`` under ``directory``, point ``latest.json`` at it, then delete all but the
    newest ``keep`` checkpoints. Returns the checkpoint folder."""
    d = Path(directory)
    folder = d / f"step-{step:06d}"
    model_blob = save({k: v.detach().cpu().contiguous() for k, v in training_state(model).items()})
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": FORMAT,
        "step": step,
        "examples": examples,
        "seconds": seconds,
        "losses": list(losses),
        "optimizer": pack(optimizer.state_dict(), tensors, "optimizer"),
        "optimizer_params": _param_names(model, optimizer),
        "schedule": pack(schedule.state_dict(), tensors, "schedule") if schedule is not None else None,
        "rng": pack(_rng_state(), tensors, "rng"),
        "procedures": [{"class": type(p).__name__, "state": pack(p.state_dict(), tensors, type(p).__name__)}
                       for p in procedures],
        "meta": meta or {},
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / _MODEL, model_blob)
        atomic_write_bytes(folder / _STATE, save(tensors))
        write_json(folder / _STATE_JSON, state)
        write_json(d / LATEST, {"step": step, "folder": folder.name})
    except OSError as e:
        raise PeftkitError(f"cannot write checkpoint {folder}: {e.strerror or e}") from None
    old = sorted(p for p in d.glob("step-*") if p.is_dir() and p.name != folder.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return folder


# -- reading ---------------------------------------------------------------------------------------------------
class Checkpoint:
    """A checkpoint read from disk (:func:`latest_checkpoint`); :meth:`restore` applies it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            self.model_tensors = load_file(str(folder / _MODEL))
            tensors = load_file(str(folder / _STATE))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise PeftkitError(f"checkpoint {folder} is corrupted or incomplete ({e})") from None
        raw = read_json(folder / _STATE_JSON)
        if raw.get("format") != FORMAT:
            raise PeftkitError(f"checkpoint {folder} has format {raw.get('format')!r}; this peftkit reads {FORMAT}")
        try:
            self.state = unpack(raw, tensors)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            raise PeftkitError(f"checkpoint {folder}: {_STATE_JSON} is damaged ({type(e).__name__}: {e})") from None
        _validate_state(self.state, f"checkpoint {folder}")
        for k, v in self.model_tensors.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise PeftkitError(f"checkpoint {folder}: tensor {k!r} holds NaN/inf; resume from an earlier one")
        self.step: int = self.state["step"]
        self.meta: dict[str, Any] = self.state["meta"]

    def restore_procedures(self, procedures: Sequence[Procedure]) -> None:
        saved = self.state["procedures"]
        names = [type(p).__name__ for p in procedures]
        if [s["class"] for s in saved] != names:
            raise PeftkitError(f"checkpoint {self.folder} was written with procedures {[s['class'] for s in saved]}, "
                               f"this run has {names}")
        for p, s in zip(procedures, saved):
            p.load_state_dict(s["state"])

    def restore_model(self, model: torch.nn.Module) -> None:
        """Copy the saved training state into ``model`` in place; every name and shape is checked first."""
        current = training_state(model)
        saved = self.model_tensors
        missing = sorted(set(current) - set(saved))
        extra = sorted(set(saved) - set(current))
        if missing or extra:
            what = (f"tensor {missing[0]!r} is not in it" if missing else f"it has tensor {extra[0]!r}, which the "
                    "model lacks")
            raise PeftkitError(f"checkpoint {self.folder} does not match this model: {what} "
                               f"({len(missing)} missing, {len(extra)} unexpected)")
        for k, v in current.items():
            if tuple(v.shape) != tuple(saved[k].shape):
                raise PeftkitError(f"checkpoint {self.folder}: tensor {k!r} has shape {tuple(saved[k].shape)}, the "
                                   f"model's is {tuple(v.shape)}")
            if v.is_floating_point() != saved[k].is_floating_point():
                raise PeftkitError(f"checkpoint {self.folder}: tensor {k!r} is stored as {saved[k].dtype}, the "
                                   f"model's is {v.dtype} (nothing is cast)")
        with torch.no_grad():
            for k, v in current.items():
                v.copy_(saved[k].to(v.dtype))

    def restore_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any) -> None:
        names = _param_names(model, optimizer)
        if names != self.state["optimizer_params"]:
            flat_now = [n for g in names for n in g]
            flat_saved = [n for g in self.state["optimizer_params"] for n in g]
            diff = next((f"{a!r} vs saved {b!r}" for a, b in zip(flat_now, flat_saved) if a != b),
                        f"{len(flat_now)} parameters vs {len(flat_saved)} saved")
            raise PeftkitError(f"checkpoint {self.folder}: the optimiser's parameters differ from the checkpoint's "
                               f"({diff}); the run must be rebuilt with the same method, config and procedures")
        optimizer.load_state_dict(self.state["optimizer"])
        if schedule is not None and self.state["schedule"] is not None:
            schedule.load_state_dict(self.state["schedule"])

    def restore_rng(self) -> None:
        _set_rng_state(self.state["rng"])


_REQUIRED = {"step": int, "examples": int, "seconds": (int, float), "losses": list, "optimizer": dict,
             "optimizer_params": list, "rng": dict, "procedures": list, "meta": dict}


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _validate_state(state: dict[str, Any], where: str) -> None:
    """Every field of ``state.json`` present with its type and range, the RNG states loadable: one clear error."""
    def bad(what: str) -> PeftkitError:
        return PeftkitError(f"{where}: {_STATE_JSON} is damaged: {what}")

    for key, tp in _REQUIRED.items():
        if key not in state:
            raise bad(f"required field {key!r} is missing")
        if not isinstance(state[key], tp) or isinstance(state[key], bool):
            raise bad(f"{key!r} must be {getattr(tp, '__name__', 'a number')}, got {state[key]!r:.80}")
    if state["step"] < 0 or state["examples"] < 0 or not _number(state["seconds"]) or state["seconds"] < 0:
        raise bad(f"step {state['step']}, examples {state['examples']} and seconds {state['seconds']} must be >= 0")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in state["losses"]):
        raise bad("'losses' must hold numbers")
    if len(state["losses"]) > state["step"]:
        raise bad(f"{len(state['losses'])} losses recorded for {state['step']} steps")
    groups = state["optimizer"].get("param_groups")
    if not isinstance(groups, list) or not isinstance(state["optimizer"].get("state"), dict):
        raise bad("the optimizer state has no 'param_groups' list or 'state' object")
    for g in groups:
        if not isinstance(g, dict) or not _number(g.get("lr")) or g["lr"] < 0:
            raise bad(f"an optimizer param group's lr is {g.get('lr') if isinstance(g, dict) else g!r}, not a "
                      "number >= 0")
    sched = state.get("schedule")
    if sched is not None:
        lrs = sched.get("base_lrs", []) if isinstance(sched, dict) else None
        if not isinstance(lrs, list) or not all(_number(x) for x in lrs):
            raise bad("the schedule's base_lrs must be numbers")
    if not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in state["optimizer_params"]):
        raise bad("'optimizer_params' must be lists of parameter names")
    if not all(isinstance(p, dict) and isinstance(p.get("class"), str) and "state" in p for p in state["procedures"]):
        raise bad("each procedure entry needs 'class' and 'state'")
    rng = state["rng"]
    try:
        torch.Generator().set_state(rng["torch"])
        random.Random().setstate(rng["python"])
        if "numpy" in rng:
            import numpy as np

            np.random.RandomState().set_state(rng["numpy"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise bad(f"the RNG state is unusable ({type(e).__name__}: {e})") from None


def latest_checkpoint(directory: str | Path) -> Checkpoint:
    """The newest complete checkpoint under ``directory``; a clear error when there is none."""
    d = Path(directory)
    if not (d / LATEST).is_file():
        raise PeftkitError(f"no checkpoint to resume from in {d} (no {LATEST}); checkpoints are written every "
                           "--save-every steps")
    pointer = read_json(d / LATEST)
    folder = d / str(pointer.get("folder", ""))
    if not folder.is_dir():
        raise PeftkitError(f"{d / LATEST} names {folder.name!r}, which does not exist")
    return Checkpoint(folder)


# -- the files a run reads ----------------------------------------------------------------------------------------
def file_fingerprints(paths: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{key: {"path": absolute path, "sha256": ...}}`` for every value of ``paths`` that names a file (a run's
    ``--data``): stored in the checkpoint so that a resumed run trains on the same bytes, from any directory."""
    import hashlib

    out = {}
    for key, value in paths.items():
        if isinstance(value, str) and value and Path(value).is_file():
            h = hashlib.sha256()
            with open(value, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[key] = {"path": str(Path(value).absolute()), "sha256": h.hexdigest()}
    return out


def check_fingerprints(stored: Any, where: str) -> None:
    """Refuse to resume when a file the run read (:func:`file_fingerprints`) is gone or its content changed."""
    if not isinstance(stored, dict):
        raise PeftkitError(f"{where}: the stored input fingerprints are damaged")
    for key, fp in stored.items():
        if not isinstance(fp, dict) or not isinstance(fp.get("path"), str) or not isinstance(fp.get("sha256"), str):
            raise PeftkitError(f"{where}: the stored fingerprint of --{key} is damaged")
        now = file_fingerprints({key: fp["path"]}).get(key)
        if now is None:
            raise PeftkitError(f"{where}: the run's --{key} file {fp['path']} is gone; cannot resume on other data")
        if now["sha256"] != fp["sha256"]:
            raise PeftkitError(f"{where}: the run's --{key} file {fp['path']} changed since the run started "
                               "(sha256 differs); resuming would train on other data")
