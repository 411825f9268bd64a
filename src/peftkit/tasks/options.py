"""Option types and readers shared by the CLI and every task: argparse ``type=`` checks (a bad number is one
error line), ``--targets`` and ``--opt key=value`` read into config fields."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from typing import Any

from ..core.config import all_finite
from ..core.errors import PeftkitError


# -- argument types: a bad number is refused by argparse itself ("peftkit: error: argument --lr: ...") --------
def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not all_finite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def bounded(kind: type, lo: float | None = None, *, lo_open: bool = False, hi: float | None = None,
             hi_open: bool = False, name: str = "") -> Any:
    """An argparse ``type=``: a finite ``kind`` (int or float) in the given interval, else ``ArgumentTypeError``."""
    if hi is None:
        what = f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "finite"
    else:
        what = (f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}" if lo is not None
                else f"{'<' if hi_open else '<='} {hi:g}")

    def parse(text: str) -> float:
        value = _number(text, kind)
        if (lo is not None and (value < lo or (lo_open and value == lo))) or (
                hi is not None and (value > hi or (hi_open and value == hi))):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = name or f"{kind.__name__} in {what}"  # argparse names the type in some messages
    return parse


positive_int = bounded(int, 1, name="positive integer")
nonnegative_int = bounded(int, 0, name="non-negative integer")
positive_float = bounded(float, 0, lo_open=True, name="positive number")
nonnegative_float = bounded(float, 0, name="non-negative number")
finite_float = bounded(float, name="finite number")
probability = bounded(float, 0, lo_open=True, hi=1, name="number in (0, 1]")
SEED = bounded(int, 0, hi=2**63 - 1, name="seed")  # what torch.manual_seed takes


def parse_targets(spec: str) -> list[str] | str:
    """``all-linear`` / ``all-norm``; a comma list of module names / suffixes (``query,key,value``); else a full-match
    regex."""
    spec = spec.strip()
    if spec in ("all-linear", "all-norm"):
        return spec
    if re.fullmatch(r"[\w.\-]+(\s*,\s*[\w.\-]+)*", spec):
        return [s.strip() for s in spec.split(",")]
    try:
        re.compile(spec)
    except re.error as e:
        msg = f"--targets {spec!r} is neither a comma list of module names nor a valid regex: {e}"
        raise PeftkitError(msg) from None
    return spec


def parse_opts(opts: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; the value is read as JSON when it parses, else taken as a string. The keys are not
    checked here: the method's config takes its own field names and Hugging Face PEFT's (``lora_alpha=16``) and
    refuses others with a "did you mean"."""
    out: dict[str, Any] = {}
    for item in opts:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PeftkitError(f"--opt expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
        if not all_finite(out[key]):  # JSON reads NaN / Infinity; no config field means them
            raise PeftkitError(f"--opt {key}: must be finite, got {raw!r}")
    return out
