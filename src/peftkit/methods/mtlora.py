"""MTLoRA — Agiza, Neseem & Reda 2024, "MTLoRA: Low-Rank Adaptation Approach for Efficient Multi-Task Learning"
(CVPR 2024, arXiv 2403.20320): task-agnostic LoRA everywhere, task-specific LoRA at chosen layers, and one forward
that computes every task's stream.

    forward:  TA-LoRA (every target, every row):  y = W·x + b + s_sh·B_sh·A_sh·drop(x)
              MT-LoRA (``task_modules``):  shared row  y = W·x + b + s_sh·B_sh·A_sh·drop(x)
                                           task-t row  y_t = W·x + b + s_t·B_t·A_t·drop(x_t)
              (x: the shared stream's input of the same sample, x_t: task t's; shared part not in y_t — 'matrix' mode)
    init:     A ~ kaiming_uniform(a=√5), B = 0 (shared and per task) ⇒ y = y_t = W·x + b;  s_sh, s_t plain multipliers
    merge:    the task-agnostic part only: W ← W + s_sh·B_sh·A_sh (the shared stream then costs exactly the base)

Trainable: r·(d_in + d_out) per target plus T·r_t·(d_in + d_out) on each task module (official defaults: r = 64,
r_t = 4, s_sh = s_t = 4, dropout 0.05); decoders / heads train as ``modules_to_save``.

Streams. The official Swin code passes a dict of task tensors next to the shared one through its blocks. Here the
streams are rows of one batch: :func:`forward_tasks` (:mod:`.mtlora_streams`) stacks the input T + 1 times
(stream-major: the shared stream, then one copy per task), runs the model ONCE under ``peftkit.condition(model,
stream ids)`` (0 = shared, k = the k-th entry of ``tasks``) and splits every output back per stream —
``{"shared": out, task: out, ...}``; a model with one head per task reads task t's prediction from its head in
stream t. What this reading gives, layer by layer:
- before the first MT layer every row is computed alike, so a task row equals its shared row — the official
  ``x_t = x`` at the first MT layer;
- an MT layer returns the shared row's own output for shared rows and y_t for task rows, whose frozen part W·x is
  taken from the paired shared row (the k-th row of each stream is the same sample), as in the official code;
- between and after MT layers the task rows go through the model's own ops (residual, norm, GELU, downsampling,
  heads) like the shared ones, and a TA-only layer applies the shared LoRA to them (the official patch merging);
- the official model restarts the task streams from the shared stream at every stage and sends each stage's task
  features through a per-task Downsampler to the decoders: :class:`peftkit.heads.mtlora_fusion.MultiScaleTaskFeatures`
  does both; plain ``forward_tasks`` lets a split task stream run on to the model's output. The part before the first
  MT layer is computed T + 1 times (its rows are equal).
A forward outside a ``condition`` block computes the shared stream alone (TA-LoRA on every row). Merged, the shared
LoRA is part of W, so the task streams are refused until ``unmerge`` (``merge_and_unload`` keeps the shared stream
only; the task-specific parts are discarded — in general they are not one linear map per layer, since y_t reads two
streams). With ``tasks`` empty (the default) MTLoRA is TA-LoRA alone — the official ``lora_only`` mode; that is also
what ``peftkit train`` (one classification task) trains. Not included: the official 'matrixv2' / 'addition' shared
modes, trainable scales and per-task ranks; dropout here acts on every low-rank input (officially the task input
after the first MT layer is not dropped).

torch.compile: inside a ``condition`` block a task-specific layer picks each stream's rows with ``nonzero()`` — row
counts that depend on the ids, a graph break per such layer (``compile_breaks``); the shared stream alone compiles
without a break.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.core.adapter import Adapter, make_dropout
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.host import Host
from peftkit.core.lowrank import fused_lowrank_forward, init_down_, lowrank_delta, new_factors
from peftkit.core.registry import HOST_KINDS, register
from peftkit.core.targeting import find_targets, matches
from peftkit.methods.mtlora_streams import SHARED, forward_tasks, stream_ids, task_names  # their own module

__all__ = ["SHARED", "Mtlora", "MtloraConfig", "forward_tasks", "stream_ids", "task_names"]



@dataclass
class MtloraConfig(AdapterConfig):
    """``r`` / ``scale``: rank and plain multiplier of the task-agnostic LoRA (every target); ``tasks``: task names
    (stream k is ``tasks[k-1]``); ``task_modules``: the targets that also get a task-specific LoRA per task (names /
    suffixes, or a regex, as ``target_modules``); ``task_r`` / ``task_scale``: their rank and multiplier."""

    r: int = 64
    scale: float = 4.0
    tasks: list[str] = field(default_factory=list)
    task_modules: list[str] | str | None = None
    task_r: int = 4
    task_scale: float = 4.0
    dropout: float = 0.05

    def validate(self) -> None:
        super().validate()
        for f in ("r", "task_r"):
            if getattr(self, f) <= 0:
                raise PeftkitError(f"MtloraConfig.{f} (rank) must be a positive integer, got {getattr(self, f)}")
        for t in self.tasks:
            if not re.fullmatch(r"[A-Za-z_]\w*", t) or t == SHARED:
                raise PeftkitError(
                    f"MtloraConfig.tasks: {t!r} is not a valid task name (letters, digits, '_'; not {SHARED!r})"
                )
        if len(set(self.tasks)) != len(self.tasks):
            raise PeftkitError(f"MtloraConfig.tasks has duplicate names: {self.tasks}")
        if bool(self.tasks) != bool(self.task_modules):
            raise PeftkitError(
                "MtloraConfig.tasks and task_modules go together: give both (task-specific LoRA on those modules) "
                f"or neither (task-agnostic LoRA alone); got tasks={self.tasks}, task_modules={self.task_modules!r}"
            )

    def resolve(self, model: Any) -> MtloraConfig:
        """Checks that every ``task_modules`` entry names a targeted module (the config itself is unchanged)."""
        if not self.task_modules:
            return self
        targets = [n for n, _ in find_targets(model, self)]
        entries = [self.task_modules] if isinstance(self.task_modules, str) else self.task_modules
        for e in entries:
            if not any(matches(n, [e] if isinstance(self.task_modules, list) else e) for n in targets):
                raise PeftkitError(
                    f"MtloraConfig.task_modules entry {e!r} matches none of the targeted modules: {targets}"
                )
        return self


def _is_task_module(name: str, config: MtloraConfig) -> bool:
    return bool(config.task_modules) and matches(name, config.task_modules)


@register(
    "mtlora",
    config=MtloraConfig,
    family="hybrid",
    paper="Agiza, Neseem & Reda 2024, MTLoRA (CVPR 2024, arXiv 2403.20320)",
    description="multi-task: task-agnostic LoRA everywhere + task-specific LoRA on chosen layers; forward_tasks runs "
                "every task's stream in one forward (stream ids through peftkit.condition)",
    params="r·(d_in + d_out) + T·r_t·(d_in + d_out) on task modules",
    hosts=HOST_KINDS,
    lr_scale=0.1,  # r = 64 and scale 4: 2e-3 collapsed in 300-step runs
    compile_breaks=(
        "inside a `peftkit.condition` block, a task-specific layer selects each stream's rows with nonzero(): "
        "the row counts depend on the stream ids, a graph break per such layer; the shared stream alone (no "
        "block, or tasks empty) compiles without a break"
    ),
)
class Mtlora(Adapter):
    uses_condition = True

    def __init__(self, host: Host, config: MtloraConfig) -> None:
        super().__init__(host, config)
        self.s, self.s_task = config.scale, config.task_scale
        self.streams = 1 + len(config.tasks)
        self.lora_A, self.lora_B = new_factors(host, config.r)
        init_down_(self.lora_A, "kaiming", config.r)
        self.tasks = list(config.tasks) if _is_task_module(host.name, config) else []
        self.task_A, self.task_B = nn.ParameterDict(), nn.ParameterDict()
        for t in self.tasks:
            self.task_A[t], self.task_B[t] = new_factors(host, config.task_r)
            init_down_(self.task_A[t], "kaiming", config.task_r)
        # an Embedding's input is token ids: no dropout there (as Hugging Face PEFT's LoRA Embedding)
        self.dropout = make_dropout(0.0 if host.kind == "embedding" else config.dropout)

    def check_condition(self, ids: torch.Tensor) -> None:
        if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise PeftkitError(
                f"mtlora stream ids must be a 1-D sequence of integers (one per row), got {ids.dtype} of shape "
                f"{tuple(ids.shape)}"
            )
        bad = (ids < 0) | (ids >= self.streams)
        if bool(bad.any()):
            raise PeftkitError(
                f"mtlora stream ids {sorted(set(ids[bad].tolist()))} are out of range: 0 = {SHARED}, "
                f"1..{self.streams - 1} = tasks {list(self.config.tasks)}"
            )

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        h, xd = self.host, self.dropout(x)
        if condition is None or not self.tasks:  # the shared stream, or a TA-only layer: shared LoRA on every row
            return lowrank_delta(h, xd, self.lora_A, self.lora_B, self.s)
        shared = (condition == 0).nonzero().flatten()
        d = lowrank_delta(h, xd.index_select(0, shared), self.lora_A, self.lora_B, self.s)
        out = base_out.new_zeros(base_out.shape, dtype=d.dtype).index_copy(0, shared, d)
        base_shared = base_out.index_select(0, shared)
        for k, t in enumerate(self.tasks, start=1):
            rows = (condition == k).nonzero().flatten()
            if rows.numel() == 0:
                continue
            if rows.numel() != shared.numel():
                raise PeftkitError(
                    f"mtlora on {h.name!r}: task {t!r} has {rows.numel()} rows but the shared stream {shared.numel()}; "
                    f"each task row reads the shared row of its sample (run the streams with forward_tasks)"
                )
            dt = lowrank_delta(h, xd.index_select(0, rows), self.task_A[t], self.task_B[t], self.s_task)
            dt = dt + (base_shared - base_out.index_select(0, rows)).to(dt.dtype)  # y_t's frozen part: W·x (shared)
            out = out.index_copy(0, rows, dt)
        return out

    def reads_condition(self) -> bool:
        return bool(self.tasks)  # shared layers run the same LoRA for every stream

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.tasks or (self.config.dropout > 0 and self.training):  # task layers read the stream ids
            return None
        return fused_lowrank_forward(self.host, x, self.lora_A, self.lora_B, self.s)

    def is_additive(self) -> bool:  # task rows read the shared rows' frozen output
        return not self.tasks

    def delta_weight(self) -> torch.Tensor:
        return self.s * (self.lora_B @ self.lora_A)

    @classmethod
    def expected_params(cls, host: Host, config: MtloraConfig) -> int:
        per_task = len(config.tasks) * config.task_r if _is_task_module(host.name, config) else 0
        return (config.r + per_task) * (host.d_in + host.d_out)
