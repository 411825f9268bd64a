"""Per-method settings of the method comparison — data, kept in one place.

``OPTIONS`` maps a registered method, or a variant ``"method/label"``, to the extra ``peftkit train`` arguments it
runs with (``--opt KEY=VALUE`` config fields, or a learning rate for a variant). A method not listed runs with its
own defaults — including its learning rate, the task's rate times the method's registered ``lr_scale`` (methods that
train very few values per layer take larger steps, their papers' practice; methods whose trained values are the
weights or carry a large built-in scale smaller ones; see each method's ``register`` call). Methods whose procedure
needs the length of training get it from the placeholders ``{steps}`` (the run's optimiser steps) and
``{steps_third}`` (a third of them, at least 1), filled in per run.
"""

from __future__ import annotations

# method (or a variant "method/label") -> extra ``peftkit train`` arguments (learning rate and config options)
OPTIONS: dict[str, list[str]] = {
    "dylora/full": ["--opt", "mode=full"],
    # RandLoRA's own rate is 2e-4 (registry lr_scale 0.1); at LoRA's 2e-3 its full-rank update with scale α/r = 20
    # collapsed to the majority class
    "randlora/lr2e-3": ["--lr", "2e-3"],
    "lora": [],
    "dora": [],
    "dylora": [],
    "hydra": [],
    "kron": [],
    "loldu": [],
    "mos": [],
    "paca": [],
    "randlora": [],
    "svd": [],
    "tlora": [],
    "loca": [],
    "l4q": [],
    "qwha": [],
    "triadaptlora": ["--opt", "total_steps={steps}"],  # T of the rank-growth schedule = the run
    "diffora": ["--opt", "search_steps={steps_third}"],  # relaxed search for the first third, then discretise
    # VB-LoRA's (and PEFT's) default vector length 256 does not divide MiniLM's width 384: its sub-vectors must tile
    # every targeted d_in and d_out
    "vblora": ["--opt", "vector_length=128"],
}

#: ``--quick``: one fast method per family (LoRA is the reference), each well under a second per step at 2 threads
QUICK_METHODS: tuple[str, ...] = ("lora", "dora", "ia3", "lntuning", "series_adapter", "prompt_tuning")
#: ``--quick``: a tiny budget — few short steps, a small held-out split, no separate timing pass
QUICK_SETTINGS: dict[str, int] = {"steps": 40, "eval_size": 200, "batch_size": 16, "max_length": 32}


def base_method(method: str) -> str:
    """``"randlora/lr2e-4"`` -> ``"randlora"``."""
    return method.split("/", 1)[0]


def train_options(method: str, steps: int) -> list[str]:
    """The extra ``peftkit train`` arguments of ``method`` with ``{steps}`` / ``{steps_third}`` filled in."""
    values = {"steps": steps, "steps_third": max(1, steps // 3)}
    return [a.format(**values) for a in OPTIONS.get(method, [])]


def config_options(method: str, steps: int) -> dict[str, str]:
    """The ``--opt KEY=VALUE`` pairs of ``method`` in OPTIONS as {key: raw value} (values still unparsed)."""
    args = train_options(method, steps)
    out: dict[str, str] = {}
    for flag, value in zip(args[::2], args[1::2]):
        if flag == "--opt":
            key, _, raw = value.partition("=")
            out[key.strip()] = raw
    return out
