"""The evaluation protocol (GEM/CL²GEC-style) and the learner that runs a task sequence.

:class:`ContinualResult`: R[i][j] = accuracy on task j after training tasks 0..i. For j ≤ i the prediction ranges
over every class seen so far; for a future task (j > i) over task j's own classes (the zero-shot reading needed for
forward transfer), and b_j is that accuracy of the untrained model. ACC = mean_j R[T−1][j];
BWT = mean_{j<T−1} (R[T−1][j] − R[j][j]); FWT = mean_{j≥1} (R[j−1][j] − b_j); average incremental accuracy =
mean_i mean_{j≤i} R[i][j]. ``setting="task"`` (task-incremental) evaluates each task among its own classes (the task
id is given)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import PeftkitError
from ..core.model import adapter_names
from ..train.trainer import model_device, to_device
from .base import ContinualMethod, _inputs_labels, forward_logits
from .tasks import Collate, Task, check_tasks, default_collate


@dataclass
class ContinualResult:
    """R[i][j]: accuracy on task j after training tasks 0..i; ``baseline[j]``: the untrained model's (zero-shot)."""

    method: str
    tasks: list[str]
    matrix: list[list[float]]
    baseline: list[float]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = len(self.tasks)
        if len(self.matrix) != t or any(len(r) != t for r in self.matrix) or len(self.baseline) != t:
            raise PeftkitError(f"a continual result over {t} tasks needs a {t}×{t} accuracy matrix and {t} "
                               "baseline accuracies")

    @property
    def average_accuracy(self) -> float:
        """ACC: mean accuracy over all tasks after the last one."""
        return sum(self.matrix[-1]) / len(self.tasks)

    @property
    def average_incremental_accuracy(self) -> float:
        """Mean over stages i of the mean accuracy on tasks 0..i."""
        t = len(self.tasks)
        return sum(sum(self.matrix[i][: i + 1]) / (i + 1) for i in range(t)) / t

    @property
    def backward_transfer(self) -> float:
        """BWT: mean over j < T−1 of R[T−1][j] − R[j][j] (negative = forgetting); 0 for one task."""
        t = len(self.tasks)
        if t < 2:
            return 0.0
        return sum(self.matrix[-1][j] - self.matrix[j][j] for j in range(t - 1)) / (t - 1)

    @property
    def forward_transfer(self) -> float:
        """FWT: mean over j ≥ 1 of R[j−1][j] − b_j; 0 for one task."""
        t = len(self.tasks)
        if t < 2:
            return 0.0
        return sum(self.matrix[j - 1][j] - self.baseline[j] for j in range(1, t)) / (t - 1)

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "acc": self.average_accuracy, "avg_inc_acc": self.average_incremental_accuracy,
                "bwt": self.backward_transfer, "fwt": self.forward_transfer, "seconds": self.seconds,
                "tasks": self.tasks, "matrix": self.matrix, "baseline": self.baseline, **self.extra}

    def matrix_markdown(self) -> str:
        head = "| after \\ on | " + " | ".join(self.tasks) + " |"
        rows = [head, "|" + "---|" * (len(self.tasks) + 1)]
        rows.append("| (untrained) | " + " | ".join(f"{a:.3f}" for a in self.baseline) + " |")
        for name, r in zip(self.tasks, self.matrix):
            rows.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in r) + " |")
        return "\n".join(rows)


def results_markdown(results: Sequence[ContinualResult]) -> str:
    """One row per method: ACC, average incremental accuracy, BWT, FWT, seconds."""
    rows = ["| method | ACC | avg. incremental ACC | BWT | FWT | seconds |", "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.method} | {r.average_accuracy:.3f} | {r.average_incremental_accuracy:.3f} | "
                    f"{r.backward_transfer:+.3f} | {r.forward_transfer:+.3f} | {r.seconds:.0f} |")
    return "\n".join(rows)


class ContinualLearner:
    """Runs a task sequence: for each task k, train ``method`` on it, then evaluate on every task (seen ones over all
    seen classes, future ones over their own classes), filling :class:`ContinualResult`'s accuracy matrix.

    ``config`` is the PET module's adapter config; it must list the classifier head in ``modules_to_save`` (each PET
    module owns its head copy). ``num_classes`` is the head's width."""

    def __init__(self, model: nn.Module, config: AdapterConfig, method: ContinualMethod, tasks: Sequence[Task], *,
                 num_classes: int, collate: Collate = default_collate, steps: int = 100, batch_size: int = 16,
                 lr: float = 1e-3, eval_batch_size: int = 64, seed: int = 0, progress: bool = False,
                 setting: str = "class") -> None:
        check_tasks(tasks, num_classes)
        if setting not in ("class", "task"):
            raise PeftkitError(f"setting must be 'class' (class-incremental) or 'task' (task-incremental), got "
                               f"{setting!r}")
        if not config.modules_to_save:
            raise PeftkitError("continual learning trains a head per PET module: list the classifier head in the "
                               "config's modules_to_save")
        if adapter_names(model):
            raise PeftkitError(f"the model already carries adapters {adapter_names(model)}; start from a base model")
        if method.task != -1:
            raise PeftkitError(f"method {method.name!r} has already run; use a fresh one")
        self.model, self.method, self.tasks = model, method, list(tasks)
        self.num_classes, self.collate = num_classes, collate
        self.steps, self.batch_size, self.lr, self.eval_batch_size = steps, batch_size, lr, eval_batch_size
        self.seed, self.progress, self.setting = seed, progress, setting
        method.bind(model, config, self.tasks, num_classes, collate)

    def task_index(self, task: int | str) -> int:
        names = [t.name for t in self.tasks]
        if isinstance(task, str):
            if task not in names:
                raise PeftkitError(f"unknown task {task!r}; the sequence has {names}")
            return names.index(task)
        self.method._check_task(task)
        return task

    @torch.inference_mode()
    def evaluate(self, task: int | str, *, untrained: bool = False, within_task: bool | None = None) -> float:
        """Accuracy on task ``task``'s evaluation examples now: predicted among every class seen so far
        (class-incremental), or among the task's own classes (``within_task``; the default in the task-incremental
        setting, and always for a task not yet trained or with ``untrained``)."""
        j = self.task_index(task)
        seen = self.method.task
        within = (self.setting == "task") if within_task is None else within_task
        own = within or untrained or not 0 <= j <= seen
        allowed = self.method.class_mask(self.tasks[j].classes if own else self.method.seen_classes())
        data = self.tasks[j].eval
        device = model_device(self.model)
        was_training = self.model.training
        self.model.eval()
        correct = 0
        try:
            for s in range(0, len(data), self.eval_batch_size):
                inputs, labels = _inputs_labels(to_device(self.collate(data[s: s + self.eval_batch_size]), device))
                if untrained or seen < 0:
                    scores = forward_logits(self.model, inputs)
                else:
                    scores = self.method.scores(self.model, inputs, allowed.to(device))
                pred = scores.float().masked_fill(~allowed.to(scores.device), -math.inf).argmax(-1)
                correct += int((pred == labels).sum())
        finally:
            self.model.train(was_training)
        return correct / len(data)

    def run(self, *, baseline: Sequence[float] | None = None,
            on_task: Callable[[int, ContinualResult], None] | None = None,
            done: Sequence[Sequence[float]] = ()) -> ContinualResult:
        """Train and evaluate every task in turn. ``baseline``: the untrained model's accuracies when already
        measured (they depend only on the base model and the tasks, so runs of several methods on one base model
        can share them); ``on_task(k, partial)`` is called after task k with the result over tasks 0..k (its
        ``extra["rows"]``: the matrix rows so far over *all* tasks). ``done``: the full rows of tasks already trained
        (a resumed run: the method and model already hold their state after task ``len(done) - 1``); training
        continues with the next task."""
        start = time.perf_counter()
        if len(done) >= len(self.tasks) or any(len(r) != len(self.tasks) for r in done) or \
                self.method.task != len(done) - 1:
            raise PeftkitError(f"cannot continue after {len(done)} tasks: the sequence has {len(self.tasks)} tasks "
                               f"and the method has seen {self.method.task + 1}")
        if baseline is None:
            baseline = [self.evaluate(j, untrained=True) for j in range(len(self.tasks))]
        elif len(baseline) != len(self.tasks):
            raise PeftkitError(f"{len(baseline)} baseline accuracies for {len(self.tasks)} tasks")
        baseline = [float(b) for b in baseline]
        names = [t.name for t in self.tasks]
        matrix: list[list[float]] = [[float(a) for a in r] for r in done]
        for k in range(len(done), len(self.tasks)):
            self.method.begin_task(k)
            self.method.train_task(k, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                                   seed=self.seed + k, progress=self.progress)
            self.method.end_task(k)
            matrix.append([self.evaluate(j) for j in range(len(self.tasks))])
            if on_task is not None:
                on_task(k, ContinualResult(self.method.name, names[: k + 1], [r[: k + 1] for r in matrix],
                                           baseline[: k + 1], seconds=time.perf_counter() - start,
                                           extra={"rows": [list(r) for r in matrix], "baseline": list(baseline)}))
        return ContinualResult(self.method.name, [t.name for t in self.tasks], matrix, baseline,
                               seconds=time.perf_counter() - start)
