"""Per-method settings of the method comparison — data, kept in one place.

``OPTIONS`` maps a registered method, or a variant ``"method/label"``, to the extra ``peftkit train`` arguments it
runs with (a learning rate, ``--opt KEY=VALUE`` config fields). A method not listed runs with the method's own
defaults and the bench's learning rate. Methods that train very few values per layer get a larger learning rate
(their papers' practice); methods whose procedure needs the length of training get it from the placeholders
``{steps}`` (the run's optimiser steps) and ``{steps_third}`` (a third of them, at least 1), filled in per run.
"""

from __future__ import annotations

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
    "loca": ["--lr", "1e-2"],
    "l4q": ["--lr", "2e-4"],
    "qwha": [],
    "triadaptlora": ["--lr", "5e-3", "--opt", "total_steps={steps}"],  # T of the rank-growth schedule = the run
    "diffora": ["--opt", "search_steps={steps_third}"],  # relaxed search for the first third, then discretise
    # few values per layer (scales, shifts, norms, virtual tokens): the larger learning rates their papers use
    "ia3": ["--lr", "1e-2"],
    "conditional_ssf": ["--lr", "1e-2"],
    "lntuning": ["--lr", "1e-2"],
    "prompt_tuning": ["--lr", "3e-2"],
    # 2.6M values through the reparametrising MLP: lr 1e-2, 1e-3 and 1e-4 (head included) stayed at the majority
    # class; the fresh head needs a larger rate than the MLP tolerates
    "prefix_tuning": ["--lr", "3e-4", "--head-lr", "2e-3"],
    # the trained values are the weights themselves (SketchTune's tables) or sit next to learned quantiser steps
    # (L4Q): lr 2e-3 collapsed to the majority class
    "sketchtune": ["--lr", "5e-5"],
    # many values or a large built-in scale (MTLoRA: r = 64, scale 4; parallel adapter: bottleneck 256 on the MLPs):
    # lr 2e-3 collapsed to the majority class in 300-step runs
    "mtlora": ["--lr", "2e-4"],
    # adapter weights from a shared hypernetwork: 2e-3 and 5e-4 (head included) stayed at the majority class
    "polyhistor": ["--lr", "5e-4", "--head-lr", "2e-3"],
    "parallel_adapter": ["--lr", "2e-4"],
    "ptuning_v2": ["--lr", "1e-2"],
    "divcontrol": ["--lr", "1e-2"],  # 7,874 values (singular-value gates and the condition router)
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
