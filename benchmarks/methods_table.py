"""Every registered method on the default task, same budget: the README's method table.

Each method runs ``peftkit train`` in a fresh process (all-MiniLM-L6-v2, Rotten Tomatoes, 1,000 held-out examples,
split seed 0, seed 0, batch 32, max length 64, 2 threads, the same number of steps) with the method's own defaults
and the options below, and the table reports trainable parameters, step time and peak memory of a training step
relative to LoRA, and held-out accuracy. Step time and memory come from a separate pass (``--timing``): every
method in a fresh process (glibc mmap threshold fixed so that freed tensors leave the resident set), the same
fixed batch of 32 × 64 tokens, median of 8 steps, peak-RSS rise of one step — run it on an otherwise idle machine.

    python benchmarks/methods_table.py [--steps 300] [--methods lora,dora,...] [--out benchmarks/results]
    python benchmarks/methods_table.py --timing

Per-method settings (``OPTIONS``) are the method's paper-style defaults where the method trains very few values per
layer (a larger learning rate); everything else is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# method (or a variant "method/label") -> extra ``peftkit train`` arguments (learning rate and config options)
OPTIONS: dict[str, list[str]] = {
    "dylora/full": ["--opt", "mode=full"],
    "randlora/lr2e-4": ["--lr", "2e-4"],
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


def _cli_options(method: str) -> dict[str, Any]:
    """The config fields ``--opt`` sets for ``method`` in OPTIONS (values parsed as JSON, else strings)."""
    args, out = OPTIONS.get(method, []), {}
    for flag, value in zip(args[::2], args[1::2]):
        if flag == "--opt":
            k, _, v = value.partition("=")
            try:
                out[k] = json.loads(v)
            except json.JSONDecodeError:
                out[k] = v
    return out


def timing_child(method: str, steps: int) -> dict[str, Any]:
    """Median training-step time and the step's peak-RSS rise for ``method`` on the default model, batch 32 of
    64 tokens (fixed random ids), in this fresh process."""
    import statistics

    import peftkit
    from peftkit.models import default_model_dir, load_classifier
    from peftkit.train.trainer import peak_memory_since, reset_peak_memory

    torch.set_num_threads(2)
    model, _ = load_classifier(default_model_dir(), 2, seed=0)
    cfg = peftkit.config(method.split("/")[0], target_modules="all-linear", modules_to_save=["classifier"],
                         **_cli_options(method))
    peftkit.adapt(model, cfg)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (32, 64), generator=g),
             "attention_mask": torch.ones(32, 64, dtype=torch.long), "labels": torch.randint(0, 2, (32,), generator=g)}
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-4)
    model.train()
    info = peftkit.get_method(method.split("/")[0])
    procs = [info.procedure()] if info.procedure is not None else []

    def step(i: int) -> None:
        for p in procs:
            p.on_step_start(model, i)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p in procs:
            p.on_step_end(model, i, opt)

    step(0)
    step(1)
    rss = reset_peak_memory()
    step(2)
    peak = peak_memory_since(rss)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(3 + i)
        times.append(time.perf_counter() - t0)
    return {"method": method, "step_seconds": statistics.median(times), "step_peak_mib": peak}


def timing(methods: list[str], steps: int) -> dict[str, dict[str, Any]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = {}
    for m in methods:
        proc = subprocess.run([sys.executable, __file__, "--timing-child", m, "--steps", str(steps)],
                              capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            out[m] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"timing {m}: {out[m]['step_seconds'] * 1e3:.0f} ms/step, step peak +{out[m]['step_peak_mib']:.0f} "
                  "MiB", flush=True)
        else:
            print(f"timing {m}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    ref = next((r for r in rows if r["method"] == "lora" and "error" not in r), None)
    lines = ["| method | options | trainable params | step time (× LoRA) | step peak memory (× LoRA) | "
             "held-out accuracy |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | | | | | failed: {r['error']} |")
            continue
        # the dedicated timing pass (quiet machine, same batch) when present, else the training run's own numbers
        key_t, key_m = ("timing_step_seconds", "timing_peak_mib") if "timing_step_seconds" in r else \
            ("step_seconds", "train_peak_mib")
        t = r[key_t] / ref[key_t] if ref and ref.get(key_t) else float("nan")
        m = r[key_m] / ref[key_m] if ref and r.get(key_m) and ref.get(key_m) else float("nan")
        lines.append(f"| {r['method']} | {r['options'] or '—'} | {r['trainable_params']:,} | {t:.2f} | {m:.2f} | "
                     f"{r['accuracy_after']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--methods", help="comma list (default: every registered method, then the variants in OPTIONS)")
    ap.add_argument("--merge", action="store_true", help="add to the rows already in OUT/methods.json")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--timing", action="store_true",
                    help="only re-measure step time and step peak memory (fresh process per method, fixed batch) "
                         "for the rows in OUT/methods.json")
    ap.add_argument("--timing-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.timing_child:
        print(json.dumps(timing_child(args.timing_child, args.steps)))
        return
    if args.timing:
        out = Path(args.out)
        rows = json.loads((out / "methods.json").read_text())
        t = timing([r["method"] for r in rows if "error" not in r], min(args.steps, 8))
        for r in rows:
            if r["method"] in t:
                r["timing_step_seconds"] = t[r["method"]]["step_seconds"]
                r["timing_peak_mib"] = t[r["method"]]["step_peak_mib"]
        (out / "methods.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        md = table(rows)
        (out / "methods.md").write_text(md + "\n")
        print(md)
        return
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
