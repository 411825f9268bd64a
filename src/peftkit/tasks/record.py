"""``train_info.json``: what a ``peftkit train`` run records, read back by ``peftkit eval`` / ``generate``, and the
verdict of a re-evaluation against it (any task)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..core.errors import PeftkitError
from ..core.io import read_json

TRAIN_INFO = "train_info.json"


def load_train_info(adapter: Path, *, required: bool = True) -> dict[str, Any]:
    """The ``train_info.json`` of ``adapter`` as a JSON object (read once; ``eval`` / ``generate`` dispatch on its
    ``task``); ``{}`` when it is missing and not ``required``."""
    if not adapter.is_dir():
        raise PeftkitError(f"adapter folder not found: {adapter}")
    path = adapter / TRAIN_INFO
    if not path.is_file():
        if not required:
            return {}
        raise PeftkitError(f"{adapter} has no {TRAIN_INFO}; only adapters made by 'peftkit train' can be evaluated")
    return read_json(path)  # a JSON object, else PeftkitError


def check_train_info(adapter: Path, info: dict[str, Any], need: tuple[str, ...] = ()) -> dict[str, Any]:
    """Refuse a ``train_info.json`` that lacks a field ``eval`` reads (``need``, besides the ones every labelled task
    has) or holds a bad value in one (named); returns ``info``."""
    path = adapter / TRAIN_INFO
    need = ("model", "data", "label_names", "max_length", "seed", "split_seed", "eval_size", *need)
    missing = [k for k in need if k not in info]
    if missing:
        raise PeftkitError(f"{path} lacks {missing}")
    _check_train_info(path, info)
    return info


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


#: what the fields of ``train_info.json`` that ``eval`` reads must hold (a hand-edited or damaged file is refused
#: with the field's name instead of failing deep inside the evaluation)
_INFO_FIELDS: dict[str, tuple[str, Any]] = {
    "model": ("a folder path", lambda v: isinstance(v, str) and v != ""),
    "data": ("a data source", lambda v: v is None or (isinstance(v, str) and v != "")),
    "label_names": ("a list of at least two distinct label names (strings)",
                    lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(n, str) for n in v)
                    and len(set(v)) == len(v)),
    "max_length": ("an integer >= 2", lambda v: _is_int(v, 2)),
    "seed": ("an integer >= 0", lambda v: _is_int(v, 0)),
    "split_seed": ("an integer >= 0", lambda v: _is_int(v, 0)),
    "eval_size": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "eval_batch_size": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "image_size": ("an integer >= 8", lambda v: _is_int(v, 8)),
    "threads": ("an integer >= 1 or null", lambda v: v is None or _is_int(v, 1)),
    "quantize": ("null, nf4, fp4 or int8", lambda v: v in (None, "nf4", "fp4", "int8")),
    "correct_after": ("an integer >= 0", lambda v: _is_int(v, 0)),
    "accuracy_after": ("a number in [0, 1]", lambda v: isinstance(v, int | float) and not isinstance(v, bool)
                       and 0 <= v <= 1),
}


def _check_train_info(path: Path, info: dict[str, Any]) -> None:
    for key, (what, ok) in _INFO_FIELDS.items():
        if key == "max_length" and "image_size" in info and info[key] is None:
            continue  # images have no max length
        if key in info and not ok(info[key]):
            raise PeftkitError(f"{path}: {key} must be {what}, got {json.dumps(info[key])[:80]}")


def acc_line(acc: tuple[float, int, int]) -> str:
    return f"{acc[0]:.4f} ({acc[1]}/{acc[2]})"


def accuracy_fields(before: tuple[float, int, int], after: tuple[float, int, int]) -> dict[str, Any]:
    """The ``train_info.json`` fields of an accuracy measured before and after training (what ``eval`` compares)."""
    return {"accuracy_before": before[0], "correct_before": before[1], "accuracy_after": after[0],
            "correct_after": after[1]}



def reproduction_verdict(recorded: int, measured: int, n: int, *, quantized: bool, other_device: bool = False
                         ) -> str:
    """Compare the correct count recorded after training with a re-evaluation. A full-precision base must match
    exactly. A quantised base runs bitsandbytes' CPU kernels, whose float rounding can depend on the CPU and on memory
    alignment, so a borderline example may flip between two processes: up to max(1, 0.5 %) of ``n`` is reported as
    such rather than hidden or called a failure. The same holds when the evaluation runs on another kind of device
    than the training's evaluation (``other_device``: different kernels, different rounding)."""
    delta = abs(recorded - measured)
    if delta == 0:
        return "reproduced"
    if (quantized or other_device) and delta <= max(1, round(0.005 * n)):
        what = "the quantised base" if quantized else "another device"
        return f"reproduced within float rounding of {what} ({delta} example(s) differ)"
    return "DIFFERENT"


def other_device(info: dict[str, Any], device: Any) -> bool:
    """Whether an evaluation on ``device`` runs on another kind of device than the run in ``info`` did."""
    return str(info.get("device", "cpu")).split(":")[0] != device.type



def not_reproduced(verdict: str, measured: str, recorded: str) -> None:
    """``eval`` fails (exit status 1) when the re-evaluation differs from what training recorded."""
    if verdict.startswith("DIFFERENT"):
        raise PeftkitError(f"not reproduced: re-evaluation gives {measured}, training recorded {recorded}")


def eval_model_dir(info: dict[str, Any], default: Callable[[], Path]) -> Path:
    """The base model folder an adapter's ``train_info.json`` names; the task's packaged ``default()`` when the
    run used it and the package has moved (a new environment: same model, new place)."""
    from ..models import resolve_model_dir

    model_dir = Path(info["model"])
    if not (model_dir / "config.json").is_file() and info.get("model_is_default"):
        model_dir = default()
    return resolve_model_dir(model_dir)


def load_for_eval(model: nn.Module, adapter: Path, rank: int | None, what: str, device: Any = None) -> str:
    """Load the adapter saved in ``adapter`` into ``model`` (``peftkit eval``), at rank ``rank`` when given (methods
    trained for every rank, e.g. DyLoRA: ``--eval-rank``), then move it to ``device`` when given; returns ``what``
    (the evaluated data's description) saying so."""
    import peftkit

    peftkit.load(model, adapter)
    if device is not None:
        model.to(device)
    if rank is not None:
        peftkit.set_rank(model, rank)
        what += f", at rank {rank}"
    return what


def recorded_check(args: argparse.Namespace, info: dict[str, Any], key: str) -> bool:
    """Whether ``eval`` compares with what training recorded: the run's own held-out split at its own rank."""
    return args.data is None and getattr(args, "eval_rank", None) is None and key in info


def check_accuracy(args: argparse.Namespace, info: dict[str, Any], acc: tuple[float, int, int], what: str,
                   device: Any) -> None:
    """Print the re-evaluated accuracy ``acc`` on ``what`` and, on the run's own split, compare it with the accuracy
    recorded after training (``eval`` exits 1 when it differs)."""
    print(f"accuracy: {acc_line(acc)} on {what}")
    if recorded_check(args, info, "correct_after"):
        rec = (info["accuracy_after"], info["correct_after"], int(info["eval_size"]))
        verdict = reproduction_verdict(rec[1], acc[1], rec[2], quantized=bool(info.get("quantize")),
                                       other_device=other_device(info, device))
        print(f"recorded after training: {acc_line(rec)} — {verdict}")
        not_reproduced(verdict, f"accuracy {acc_line(acc)}", acc_line(rec))


def text_eval_data(args: argparse.Namespace, info: dict[str, Any], names: list[str]) -> tuple[Any, str]:
    """(examples, description) ``eval`` scores a text run on: all of ``--data`` when given, else the run's own
    held-out split (its ``eval_size`` and ``split_seed``) of the data it trained on."""
    from .. import data as D

    if args.data is not None:
        data = D.load_table(args.data, names) if args.data != D.ROTTEN_TOMATOES else D.load_data(args.data, names)
        return data, f"all of {data.source}"
    data = D.load_data(info["data"], names)
    _, eval_idx = D.split_indices(len(data), int(info["eval_size"]), int(info["split_seed"]))
    return data.subset(eval_idx), f"the held-out split of {data.source}"

