"""Run methods on one task with the same budget and seed, each in a fresh process, and collect one row per method.

Every method runs ``peftkit train`` in its own process (same model, data, held-out split, seed, steps, batch, max
length and threads; the method's extras from :data:`~peftkit.bench.options.OPTIONS`) and its row is that run's
``train_info.json``. With timing on, a second fresh process per method (:mod:`peftkit.bench.timing`) measures the
step time and peak memory of one training step on a fixed batch, which the table prefers to the training run's own
numbers. A method that fails, in either process, leaves a row whose ``error`` says why in one line; the others run
on. Children run with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (see :data:`OMP_DEFAULT`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from ..core.registry import MethodInfo, all_methods
from .options import OPTIONS, base_method, config_options, train_options

REFERENCE = "lora"
TASK = "classification"
#: glibc: return freed blocks to the OS at once, so that the peak-RSS rise of a step measures that step
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
#: OpenMP threads of every child wait passively instead of spinning, unless the caller's environment says otherwise.
#: On a machine shared with other jobs, the spinning threads of a 2-thread run steal each other's core; measured on
#: this project's 2-core machine under load ~7: 12 LoRA training steps took 31-36 s spinning, 7 s passive (same
#: losses); under load ~4 the fixed-batch step took 5.8 s spinning, 1.0-1.1 s passive. On an idle machine passive
#: waiting costs ~15-20 % (20 steps: 5.2 s vs 6.2 s) — set OMP_WAIT_POLICY=ACTIVE there for a plain run's speed.
OMP_DEFAULT = {"OMP_WAIT_POLICY": "PASSIVE"}


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: ours, OpenMP's wait policy defaulted (see OMP_DEFAULT), ``extra``."""
    return {**OMP_DEFAULT, **os.environ, **extra}


@dataclass
class BenchSettings:
    """The budget every method gets. ``eval_size=None``: ``peftkit train``'s default (1,000, at most a fifth of a
    ``data`` file). ``model``/``data`` None: the packaged all-MiniLM-L6-v2 / Rotten Tomatoes."""

    steps: int = 300
    eval_size: int | None = None
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    threads: int | None = 2
    model: str | None = None
    data: str | None = None
    lr: float | None = None  # None: the task's rate × the method's lr_scale (as peftkit train), unless OPTIONS sets one
    timing: bool = True
    timing_steps: int = 8

    def check(self) -> None:
        for key in ("steps", "batch_size", "timing_steps", "seed"):
            low = 0 if key == "seed" else 1
            if getattr(self, key) < low:
                raise PeftkitError(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(self, key)}")
        if self.max_length < 2:
            raise PeftkitError(f"--max-length must be >= 2, got {self.max_length}")
        if self.threads is not None and self.threads < 1:
            raise PeftkitError(f"--threads must be >= 1, got {self.threads}")
        if self.eval_size is not None and self.eval_size < 1:
            raise PeftkitError(f"--eval-size must be >= 1, got {self.eval_size}")
        if self.lr is not None and not self.lr > 0:
            raise PeftkitError(f"--lr must be > 0, got {self.lr}")


def supports(info: MethodInfo, task: str = TASK) -> bool:
    """Whether ``info`` can adapt the task's model: a sequence classifier is Linear layers and norms, so a method
    that adapts Linear or norm hosts, or the model's inputs (model-level), can."""
    if task != TASK:
        raise PeftkitError(f"the bench runs the {TASK} task, not {task!r}")
    return info.model_level or bool({"linear", "norm"} & set(info.hosts))


def resolve_methods(names: Sequence[str] | None, *, variants: bool = False, reference: bool = True) -> list[str]:
    """The methods to run, the reference (LoRA) first — added when missing (unless ``reference`` is False), since
    the table is relative to it. ``names`` None: every registered method that supports the task (plus the
    ``name/variant`` entries of OPTIONS when ``variants``). An unknown name is a :class:`PeftkitError` listing the
    registered methods."""
    registered = {m.name: m for m in all_methods()}
    if names is None:
        methods = [n for n, m in registered.items() if supports(m)]
        if variants:
            methods += [k for k in OPTIONS if "/" in k and base_method(k) in registered]
    else:
        methods = list(dict.fromkeys(n.strip() for n in names if n.strip()))
        if not methods:
            raise PeftkitError("--methods is empty; registered methods: " + ", ".join(registered))
        bad = [n for n in methods if base_method(n) not in registered or ("/" in n and n not in OPTIONS)]
        if bad:
            known = [k for k in OPTIONS if "/" in k]
            raise PeftkitError(f"unknown method{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; registered "
                               f"methods: {', '.join(registered)}"
                               + (f"; variants: {', '.join(known)}" if known else ""))
    if REFERENCE in methods:
        methods.remove(REFERENCE)
    elif not reference:
        return methods
    return [REFERENCE, *methods]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def failure(proc: subprocess.CompletedProcess) -> str:
    """Why a child process failed, in one line: its ``peftkit: error:`` line, else the last line of its stderr (the
    exception of a traceback), else its exit status."""
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("peftkit: error:"):
            return _one_line(ln.removeprefix("peftkit: error:"))
    if lines:
        return _one_line(lines[-1])
    return f"exit status {proc.returncode}" + (" (killed by a signal)" if proc.returncode < 0 else "")


def train_command(method: str, s: BenchSettings, output: Path) -> list[str]:
    """The ``peftkit train`` command line of one bench run (the method's OPTIONS last, so they take precedence)."""
    cmd = [sys.executable, "-m", "peftkit", "train", "--method", base_method(method), "--steps", str(s.steps),
           "--batch-size", str(s.batch_size), "--max-length", str(s.max_length), "--seed", str(s.seed),
           "--output", str(output), "--overwrite", "--no-progress"]
    for flag, value in (("--threads", s.threads), ("--eval-size", s.eval_size), ("--model", s.model),
                        ("--data", s.data), ("--lr", s.lr)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + train_options(method, s.steps)


def train_one(method: str, s: BenchSettings, workdir: Path, log: Path | None = None) -> dict[str, Any]:
    """One ``peftkit train`` process for ``method``; its ``train_info.json`` as a row, or ``{"error": ...}``."""
    out = workdir / method.replace("/", "-")
    cmd = train_command(method, s, out)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(TQDM_DISABLE="1"))
    seconds = time.perf_counter() - t0
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("$ " + " ".join(["peftkit", *cmd[3:]]) + "\n" + proc.stdout + proc.stderr)
    row: dict[str, Any] = {"method": method, "options": " ".join(train_options(method, s.steps))}
    if proc.returncode != 0:
        return {**row, "error": failure(proc), "process_seconds": round(seconds, 2)}
    info = json.loads((out / "train_info.json").read_text())
    return {**info, **row, "process_seconds": round(seconds, 2)}


def run_lr(method: str, lr: float | None = None, steps: int = 1) -> float:
    """The learning rate a bench run of ``method`` trains at: its ``--lr`` in OPTIONS, else ``lr`` (the bench's
    ``--lr``), else the task's rate × the method's ``lr_scale`` — what ``peftkit train`` picks."""
    from ..core.registry import get as get_method
    from ..tasks import get_task  # the task's rate, which `peftkit train` scales the same way

    opts = train_options(method, steps)
    return next((float(v) for f, v in zip(opts[::2], opts[1::2]) if f == "--lr"),
                lr or get_task(TASK).defaults["lr"] * get_method(base_method(method)).lr_scale)


def time_one(method: str, s: BenchSettings, labels: int, model_dir: str) -> dict[str, Any]:
    """The fixed-batch timing pass of ``method`` in a fresh process: ``{"step_seconds", "step_peak_mib"}`` or
    ``{"error": ...}``."""
    lr = run_lr(method, s.lr, s.steps)
    spec = {"method": method, "model": model_dir, "labels": labels, "batch_size": s.batch_size,
            "max_length": s.max_length, "threads": s.threads, "steps": s.timing_steps, "seed": s.seed, "lr": lr,
            "opts": config_options(method, s.steps)}
    proc = subprocess.run([sys.executable, "-m", "peftkit.bench.timing", json.dumps(spec)], capture_output=True,
                          text=True, env=child_env(**MALLOC_ENV))
    if proc.returncode != 0:
        return {"error": failure(proc)}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": "the timing process printed no result"}


def _summary(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['method']}: failed: {r['error']}"
    t = r.get("timing_step_seconds", r.get("step_seconds"))
    m = r.get("timing_peak_mib", r.get("train_peak_mib"))
    return (f"{r['method']}: accuracy {r['accuracy_after']:.4f}, {r['trainable_params']:,} trainable"
            + (f", {t * 1e3:.0f} ms/step" if t is not None else "") + (f", peak +{m:.0f} MiB" if m is not None else "")
            + (f" (timing failed: {r['timing_error']})" if "timing_error" in r else ""))


def run_bench(methods: Sequence[str], s: BenchSettings, *, labels: int = 2, model_dir: str | None = None,
              logs: Path | None = None, progress: bool = True,
              on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Run every method of ``methods`` (training, then the timing pass when ``s.timing``) and return the rows in
    order. ``labels``/``model_dir``: the classifier's label count and folder, for the timing pass. ``logs``: a folder
    for each training process's output. ``on_row(rows)`` is called after each method (e.g. to save partial
    results). Nothing a method does stops the others."""
    from tqdm.auto import tqdm

    if s.timing and model_dir is None:
        raise PeftkitError("the timing pass needs the model folder")
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(methods), desc="bench", unit="method", disable=not progress, dynamic_ncols=True)
    try:
        with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
            for m in methods:
                bar.set_postfix_str(m)
                try:
                    row = train_one(m, s, Path(tmp), None if logs is None else logs / f"{m.replace('/', '-')}.log")
                    if s.timing and "error" not in row:
                        t = time_one(m, s, labels, str(model_dir))
                        if "error" in t:
                            row["timing_error"] = t["error"]
                        else:
                            row["timing_step_seconds"] = t["step_seconds"]
                            row["timing_peak_mib"] = t["step_peak_mib"]
                except Exception as e:  # one method's failure must not stop the bench
                    row = {"method": m, "options": " ".join(OPTIONS.get(m, [])),
                           "error": _one_line(f"{type(e).__name__}: {e}")}
                rows.append(row)
                tqdm.write(_summary(row)) if progress else print(_summary(row), flush=True)
                bar.update(1)
                if on_row is not None:
                    on_row(rows)
    finally:
        bar.close()
    return rows
