"""Every registered method on the default task, same budget: the README's method table.

Each method runs ``peftkit train`` in a fresh process (all-MiniLM-L6-v2, Rotten Tomatoes, 1,000 held-out examples,
split seed 0, seed 0, batch 32, max length 64, 2 threads, the same number of steps) with the method's own defaults
and the options below, and the table reports trainable parameters, step time and training peak memory (rise of the
process's peak RSS during training) relative to LoRA, and held-out accuracy.

    python benchmarks/methods_table.py [--steps 300] [--methods lora,dora,...] [--out benchmarks/results]

Per-method settings (``OPTIONS``) are the method's paper-style defaults where the method trains very few values per
layer (a larger learning rate); everything else is identical.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# method (or a variant "method/label") -> extra ``peftkit train`` arguments (learning rate and config options)
OPTIONS: dict[str, list[str]] = {
    "dylora/full": ["--opt", "mode=full"],
    "lora": [],
    "dora": [],
    "dylora": [],
    "hydra": [],
    "kron": [],
    "loldu": ["--lr", "1e-2"],
    "mos": [],
    "paca": [],
    "randlora": [],
    "svd": ["--lr", "5e-3"],
    "tlora": [],
}


def run(method: str, steps: int, workdir: Path) -> dict[str, Any]:
    """One ``peftkit train`` process for ``method`` (a registered name, or ``name/variant`` from OPTIONS)."""
    out = workdir / method.replace("/", "-")
    cmd = [sys.executable, "-m", "peftkit", "train", "--method", method.split("/")[0], "--steps", str(steps),
           "--threads", "2", "--output", str(out), "--overwrite", "--no-progress", *OPTIONS.get(method, [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    info = json.loads((out / "train_info.json").read_text())
    info["process_seconds"] = time.perf_counter() - t0
    info["options"] = " ".join(OPTIONS.get(method, []))
    info["method"] = method
    return info


def table(rows: list[dict[str, Any]]) -> str:
    ref = next((r for r in rows if r["method"] == "lora" and "error" not in r), None)
    lines = ["| method | options | trainable params | step time (× LoRA) | train peak memory (× LoRA) | "
             "held-out accuracy |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | | | | | failed: {r['error']} |")
            continue
        t = r["step_seconds"] / ref["step_seconds"] if ref else float("nan")
        m = r["train_peak_mib"] / ref["train_peak_mib"] if ref and r.get("train_peak_mib") else float("nan")
        lines.append(f"| {r['method']} | {r['options'] or '—'} | {r['trainable_params']:,} | {t:.2f} | {m:.2f} | "
                     f"{r['accuracy_after']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--methods", help="comma list (default: every registered method, then the variants in OPTIONS)")
    ap.add_argument("--merge", action="store_true", help="add to the rows already in OUT/methods.json")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    import peftkit

    methods = (args.methods.split(",") if args.methods else
               [m.name for m in peftkit.all_methods()] + [k for k in OPTIONS if "/" in k])
    if "lora" in methods:  # the reference first
        methods.remove("lora")
        methods.insert(0, "lora")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if args.merge and (out / "methods.json").is_file():
        rows = [r for r in json.loads((out / "methods.json").read_text()) if r["method"] not in methods]
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            r = run(m, args.steps, Path(tmp))
            rows.append(r)
            print(f"{m}: " + (r["error"] if "error" in r else
                              f"acc {r['accuracy_after']:.4f}, {r['step_seconds'] * 1e3:.0f} ms/step, "
                              f"peak +{r['train_peak_mib']} MiB, {r['trainable_params']:,} params"), flush=True)
    (out / "methods.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    md = table(rows)
    (out / "methods.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
