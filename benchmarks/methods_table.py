"""Every registered method on the default task, same budget: the README's method table.

A thin wrapper over :mod:`peftkit.bench` (the same harness as ``peftkit bench``): each method runs ``peftkit train``
in a fresh process (all-MiniLM-L6-v2, Rotten Tomatoes, 1,000 held-out examples, split seed 0, seed 0, batch 32, max
length 64, 2 threads, the same number of steps) with the method's own defaults and its entry in
``peftkit.bench.options.OPTIONS``, and the table reports trainable parameters, their share of the model, step time
and peak memory of a training step relative to LoRA, and held-out accuracy. Step time and memory come from a
separate pass (``--timing``): every method in a fresh process (glibc mmap threshold fixed so that freed tensors leave
the resident set), the same fixed batch of 32 × 64 tokens, median of 8 steps, peak-RSS rise of one step; LoRA runs
again between methods and each method's time is taken relative to the LoRA runs just before and after it (the
machine's speed drifts) — still, run it on an otherwise idle machine.

    python benchmarks/methods_table.py [--steps 300] [--methods lora,dora,...] [--out benchmarks/results]
    python benchmarks/methods_table.py --timing

Writes OUT/methods.json, OUT/methods.md and OUT/methods.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from peftkit.bench import report
from peftkit.bench.options import OPTIONS  # noqa: F401 — re-exported: the per-method settings live in the package
from peftkit.bench.runner import BenchSettings, child_env, resolve_methods, run_bench, time_one
from peftkit.bench.timing import measure
from peftkit.core.errors import PeftkitError
from peftkit.models import default_model_dir


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of OUT/methods.json: ``{"settings", "rows"}``, or a bare list (the file's earlier format)."""
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


def _retime(rows: list[dict[str, Any]], s: BenchSettings, model_dir: str, only: set[str] | None = None) -> None:
    """Re-measure step time and step peak memory of every row (or of the rows of ``only``), each in a fresh process.
    The machine's speed drifts (tens of per cent within minutes), so LoRA runs again between methods: a method's
    time is taken relative to the mean of the LoRA runs just before and after it and stored as that ratio × the
    median LoRA time (the table divides by the LoRA row). With ``only``, the LoRA row keeps its figures and the
    re-timed rows are stored against them (their peak memory as the ratio to this pass's LoRA peak × the row's)."""
    def lora_time() -> float:
        t = time_one("lora", s, 2, model_dir)
        if "error" in t:
            raise SystemExit(f"methods_table: the LoRA reference failed: {t['error']}")
        return float(t["step_seconds"])

    refs = [lora_time()]
    ratios: dict[str, tuple[float, float]] = {}
    for r in rows:
        if "error" in r or r["method"] == "lora" or (only is not None and r["method"] not in only):
            continue
        t = time_one(r["method"], s, 2, model_dir)
        refs.append(lora_time())
        if "error" in t:
            print(f"timing {r['method']}: failed: {t['error']}", flush=True)
            continue
        ratios[r["method"]] = (t["step_seconds"] / ((refs[-2] + refs[-1]) / 2), t["step_peak_mib"])
        print(f"timing {r['method']}: {t['step_seconds'] * 1e3:.0f} ms/step ({ratios[r['method']][0]:.2f} × the "
              f"LoRA runs beside it), step peak +{t['step_peak_mib']:.0f} MiB", flush=True)
    lora_s = statistics.median(refs)
    lora_peak = time_one("lora", s, 2, model_dir)["step_peak_mib"]
    print(f"timing lora: {len(refs)} reference runs, median {lora_s * 1e3:.0f} ms/step (range "
          f"{min(refs) * 1e3:.0f}–{max(refs) * 1e3:.0f}), step peak +{lora_peak:.0f} MiB", flush=True)
    lora_row = next(r for r in rows if r["method"] == "lora")
    peak_scale = 1.0
    if only is not None:  # keep the table's LoRA figures; store the re-timed rows against them
        lora_s, peak_scale = lora_row["timing_step_seconds"], lora_row["timing_peak_mib"] / lora_peak
    else:
        lora_row["timing_step_seconds"], lora_row["timing_peak_mib"] = lora_s, lora_peak
    for r in rows:
        if r["method"] in ratios:
            r["timing_step_seconds"] = ratios[r["method"]][0] * lora_s
            r["timing_peak_mib"] = ratios[r["method"]][1] * peak_scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--methods", help="comma list (default: every registered method, then the variants in OPTIONS)")
    ap.add_argument("--merge", action="store_true", help="add to the rows already in OUT/methods.json")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--timing", action="store_true",
                    help="only re-measure step time and step peak memory (fresh process per method, fixed batch) "
                         "for the rows in OUT/methods.json (those of --methods only, if given)")
    ap.add_argument("--timing-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model_dir = str(default_model_dir())
    s = BenchSettings(steps=args.steps, threads=2, timing=False)
    if args.timing_child:  # kept for callers of the old script: one fixed-batch measurement, as JSON
        print(json.dumps(measure(args.timing_child, model_dir, steps=min(args.steps, 8))))
        return
    out = Path(args.out)
    settings = {"task": "classification", **vars(s), "model": model_dir, "data": "rotten_tomatoes",
                "omp_wait_policy": child_env()["OMP_WAIT_POLICY"]}
    if args.timing:
        rows = _read_rows(out / "methods.json")
        s.timing_steps = min(args.steps, 8)
        _retime(rows, s, model_dir, set(args.methods.split(",")) if args.methods else None)
        report.write(out, rows, settings, stem="methods")
        print(report.table(rows))
        return
    try:
        methods = resolve_methods(args.methods.split(",") if args.methods else None, variants=True,
                                  reference=not args.merge)  # merging: the table's LoRA row stays the reference
    except PeftkitError as e:
        sys.exit(f"methods_table: error: {e}")
    rows: list[dict[str, Any]] = []
    if args.merge and (out / "methods.json").is_file():
        rows = [r for r in _read_rows(out / "methods.json") if r["method"] not in methods]
    kept = list(rows)
    rows = kept + run_bench(methods, s, progress=False,
                            on_row=lambda new: report.write(out, kept + new, settings, stem="methods", final=False))
    report.write(out, rows, settings, stem="methods")
    print(report.table(rows))


if __name__ == "__main__":
    main()
