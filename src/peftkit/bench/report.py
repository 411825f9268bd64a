"""The bench's outputs: ``results.json`` (settings and every row), a Markdown table and a PNG plot.

Table columns: method, its extra options, trainable parameters, their share of the adapted model, step time and
peak memory of a training step relative to LoRA (from the fixed-batch timing pass when both rows have it, else from
the training runs), and the held-out accuracy. A failed method's row says why. The plot (:mod:`.chart`) is held-out
accuracy against trainable parameters (log scale): each method's default-rate run, coloured by family, the Pareto
front, labels that do not overlap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.io import write_json
from .chart import plot  # re-exported: the plot has its own module

REFERENCE = "lora"
TIME_KEYS = (("timing_step_seconds", "timing_peak_mib"), ("step_seconds", "train_peak_mib"))


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "error" not in r]


def _ratio(r: dict[str, Any], ref: dict[str, Any] | None, key: str) -> float | None:
    a, b = r.get(key), None if ref is None else ref.get(key)
    return a / b if a is not None and b else None


def relative(r: dict[str, Any], ref: dict[str, Any] | None) -> tuple[float | None, float | None, str]:
    """(step time, peak memory) of row ``r`` relative to ``ref``, and which measurement they come from: the timing
    pass when both rows have it, else the training runs."""
    for (kt, km), source in zip(TIME_KEYS, ("timing pass", "training run")):
        if ref is not None and kt in r and kt in ref:
            return _ratio(r, ref, kt), _ratio(r, ref, km), source
    return None, None, ""


def _fmt(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table(rows: Sequence[dict[str, Any]], reference: str = REFERENCE, majority: float | None = None) -> str:
    """The Markdown table, one row per method in ``rows`` order, then notes: the reference's absolute numbers and
    where the relative ones come from, and (``majority``) the accuracy of always answering the held-out split's most
    frequent label."""
    ref = next((r for r in _ok(rows) if r["method"] == reference), None)
    lines = ["| method | options | trainable params | % of model | step time (× LoRA) | peak memory (× LoRA) | "
             "held-out accuracy |", "|---|---|---:|---:|---:|---:|---:|"]
    sources = set()
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {_cell(r.get('options') or '—')} | | | | | failed: {_cell(r['error'])} |")
            continue
        t, m, source = relative(r, ref)
        if source:
            sources.add(source)
        share = 100 * r["trainable_params"] / r["total_params"] if r.get("total_params") else None
        lines.append(f"| {r['method']} | {_cell(r.get('options') or '—')} | {r['trainable_params']:,} | "
                     f"{'—' if share is None else f'{share:.3f}'} | {_fmt(t)} | {_fmt(m)} | "
                     f"{r['accuracy_after']:.3f} |")
    notes = []
    if ref is None:
        notes.append(f"No {reference} row ran: step time and memory have no reference.")
    else:
        kt, km = next((k for k in TIME_KEYS if k[0] in ref), TIME_KEYS[1])
        t_ref, m_ref = ref.get(kt), ref.get(km)
        what = "fixed-batch timing pass" if kt.startswith("timing") else "training run"
        notes.append(f"{reference}: " + (f"{t_ref * 1e3:.0f} ms/step" if t_ref else "no step time")
                     + (f", step peak +{m_ref:.0f} MiB" if m_ref is not None else "") + f" ({what}).")
        if len(sources) > 1:
            notes.append("Rows whose timing pass failed are compared on the training runs' numbers.")
    if majority is not None:
        notes.append(f"Always answering the most frequent label scores {majority:.3f} on the held-out split.")
    timing_errors = [f"{r['method']} ({_cell(r['timing_error'])})" for r in rows if "timing_error" in r]
    if timing_errors:
        notes.append("Timing pass failed: " + "; ".join(timing_errors) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def write(out: str | Path, rows: Sequence[dict[str, Any]], settings: dict[str, Any], *, stem: str = "results",
          title: str = "", final: bool = True) -> dict[str, Path]:
    """``<out>/<stem>.json`` ({"settings", "rows"}); when ``final`` also ``<stem>.md`` (a heading line, the table)
    and ``<stem>.png``. ``settings["majority_accuracy"]``, when there, is drawn and noted. Returns the paths
    written."""
    majority = settings.get("majority_accuracy")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json"}
    write_json(paths["json"], {"settings": settings, "rows": list(rows)})
    if final:
        paths["md"] = out / f"{stem}.md"
        tmp = paths["md"].with_name(paths["md"].name + ".tmp")
        tmp.write_text((f"{title}\n\n" if title else "") + table(rows, majority=majority) + "\n")
        tmp.replace(paths["md"])
        paths["png"] = plot(rows, out / f"{stem}.png", title, majority=majority, lr=settings.get("lr"),
                            steps=int(settings.get("steps") or 1))
    return paths
