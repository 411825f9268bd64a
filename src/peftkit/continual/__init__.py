"""Continual learning over a sequence of classification tasks with disjoint label spaces: replay, per-task modules
with a selector (ConPET), an EMA'd offline PET (LAE), and the evaluation protocol (accuracy matrix, ACC/BWT/FWT).

Methods (DESIGN principle 4: each is a :class:`~peftkit.core.procedure.Procedure` the trainer calls, plus the task
hooks :class:`ContinualLearner` calls; the PET module itself is any registered adapter, e.g. LoRA):

* :class:`Sequential` — one PET module (+ the task head, ``modules_to_save``) fine-tuned task after task; the lower
  bound (catastrophic forgetting).
* :class:`StaticConPET` — Song et al. 2023, "ConPET: Continual Parameter-Efficient Tuning for Large Language Models"
  (arXiv 2309.14763; github.com/Raincleared-Song/ConPET). One PET module + a linear head over all classes seen so far,
  trained with *dynamic replay*: a fixed number N of batches per task; each batch of size B holds
  ``n_new = int(B·ρ/(ρ+1))`` new-task examples (drawn without replacement) and ``B − n_new`` replayed ones, each from
  a past task picked uniformly at random, then one of its stored examples (:func:`replay_batches`). The memory keeps
  an equal share of ``memory_size`` per past task (:class:`ReplayMemory`, EMR-style random exemplars).
* :class:`DynamicConPET` — one PET module + head per task (the head's task-``k`` columns are task ``k``'s classes;
  old modules frozen) and a PET module selector (its own PET + head; its first T outputs are task logits) trained
  with cross-entropy on task ids over replay batches. Inference: the selector's top-k tasks run (one mixed-batch
  forward per rank, :func:`peftkit.mixed_batch`), their class logits are written into a full-label vector filled
  with ``NEG``; predict argmax. Training task k uses teacher forcing (the true task replaces the last pick when
  missing) and NLL over log_softmax of the assembled logits; only module k gets gradients. Old modules' logits are
  recomputed (frozen, so equal to the reference's per-sample cache). The schedule "selector first, then the expert"
  (``train_expert_selector=2``) is unconfirmed; it is what is done here.
* :class:`LAE` — Gao et al., ICCV 2023, "A Unified Continual Learning Framework with General Parameter-Efficient
  Tuning" (arXiv 2303.10070; github.com/gqk/LAE). Online PET trained with CE over the *new* classes only
  (``logits[:, task classes]``); after tasks > 0 the PET is frozen for the first ``freeze_steps`` steps (head only);
  the offline PET starts as a copy of the online one and after every step θ_off ← d·θ_off + (1−d)·θ_on (:class:`EMA`,
  d = 0.9999); the head is shared (the offline head copy mirrors the online one). Inference:
  p = max(softmax(f_on(x)), softmax(f_off(x))) elementwise, prediction argmax p (:func:`max_prob_ensemble`).
  LAE's adaptation-speed calibration (a learnable scalar per PET, prefix compensation) belongs to the PET module and
  is not part of this procedure.

Setting: *class-incremental* by default — one head over all classes; while training task k the logits of classes
not yet seen are masked, and evaluation predicts among all classes seen so far (no task id at test time).
``setting="task"`` (task-incremental) evaluates each task among its own classes (the task id is given).

Protocol (GEM/CL²GEC-style, :class:`ContinualResult`): R[i][j] = accuracy on task j after training tasks 0..i.
For j ≤ i the prediction ranges over every class seen so far; for a future task (j > i) over task j's own classes
(the zero-shot reading needed for forward transfer), and b_j is that accuracy of the untrained model.
ACC = mean_j R[T−1][j]; BWT = mean_{j<T−1} (R[T−1][j] − R[j][j]); FWT = mean_{j≥1} (R[j−1][j] − b_j);
average incremental accuracy = mean_i mean_{j≤i} R[i][j].
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import PeftkitError
from ..core.model import adapt, adapter_names, mixed_batch, set_active
from ..core.procedure import Procedure
from ..train.trainer import _device, _logits, _to, train

NEG = -1e4  # ConPET's "very negative constant" for the logits of unselected tasks
Example = tuple[Any, int]  # (model input, global class id)
Collate = Callable[[Sequence[Example]], Any]


# -- tasks ----------------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """One task of a sequence: its name, its classes (global class ids) and its (input, label) examples."""

    name: str
    classes: tuple[int, ...]
    train: Sequence[Example]
    eval: Sequence[Example]


def check_tasks(tasks: Sequence[Task], num_classes: int) -> None:
    """Clear errors for a sequence the protocol forbids: no tasks, duplicate names, a task without classes or
    examples, overlapping label spaces, a class id outside [0, num_classes), an example labelled outside its task."""
    if not tasks:
        raise PeftkitError("a continual sequence needs at least one task")
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PeftkitError(f"task names must be unique; repeated: {dup}")
    owner: dict[int, str] = {}
    for t in tasks:
        if not t.classes:
            raise PeftkitError(f"task {t.name!r} has no classes")
        if not t.train or not t.eval:
            raise PeftkitError(f"task {t.name!r} needs training and evaluation examples "
                               f"(got {len(t.train)} and {len(t.eval)})")
        for c in t.classes:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise PeftkitError(f"task {t.name!r}: class {c!r} is outside the head's 0..{num_classes - 1}")
            if c in owner:
                raise PeftkitError(f"tasks {owner[c]!r} and {t.name!r} share class {c}: the label spaces of a "
                                   "class-incremental sequence must be disjoint")
            owner[c] = t.name
        own = set(t.classes)
        for split, data in (("train", t.train), ("eval", t.eval)):
            bad = sorted({int(y) for _, y in data if int(y) not in own})
            if bad:
                raise PeftkitError(f"task {t.name!r}: {split} examples labelled {bad}, not among its classes "
                                   f"{list(t.classes)}")


def default_collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensor inputs: an ``(inputs, labels)`` pair batch."""
    return torch.stack([x for x, _ in examples]), torch.tensor([int(y) for _, y in examples], dtype=torch.long)


# -- replay -----------------------------------------------------------------------------------------------------------
class ReplayMemory:
    """Stored examples of past tasks, at most ``size`` in all, an equal share (``size // tasks``) per task: each task
    keeps a random subset (fixed at :meth:`add`), and older tasks shrink to their share when a task arrives."""

    def __init__(self, size: int, seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise PeftkitError(f"replay memory size must be a positive integer, got {size!r}")
        self.size = size
        self._rng = random.Random(seed)
        self._store: dict[int, list[Example]] = {}

    def add(self, task: int, examples: Sequence[Example]) -> None:
        if task in self._store:
            raise PeftkitError(f"task {task} is already in the replay memory")
        if len(self._store) + 1 > self.size:
            raise PeftkitError(f"a memory of {self.size} examples cannot hold {len(self._store) + 1} tasks")
        order = list(examples)
        self._rng.shuffle(order)
        self._store[task] = order
        share = self.size // len(self._store)
        for k in self._store:
            self._store[k] = self._store[k][:share]

    def tasks(self) -> list[int]:
        return list(self._store)

    def examples(self, task: int) -> list[Example]:
        if task not in self._store:
            raise PeftkitError(f"task {task!r} was never stored in the replay memory; stored: {self.tasks()}")
        return self._store[task]

    def __len__(self) -> int:
        return sum(len(v) for v in self._store.values())

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "store": {k: list(v) for k, v in self._store.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = int(state["size"])
        self._store = {int(k): list(v) for k, v in state["store"].items()}


def replay_batches(new: Sequence[Example], memory: ReplayMemory | None, *, batch_size: int, steps: int,
                   ratio: float = 1.0, seed: int = 0, collate: Collate = default_collate) -> Iterator[Any]:
    """ConPET's dynamic replay: exactly ``steps`` batches of ``batch_size``; each holds ``n_new = int(B·ρ/(ρ+1))``
    new examples (without replacement, reshuffled when used up) and ``B − n_new`` replayed ones, each from a past task
    picked uniformly at random, then one of its stored examples uniformly. With an empty memory all B are new."""
    if batch_size < 1 or steps < 1:
        raise PeftkitError(f"replay needs batch_size >= 1 and steps >= 1, got {batch_size} and {steps}")
    if not new:
        raise PeftkitError("replay needs at least one new-task example")
    if not ratio > 0:
        raise PeftkitError(f"the new/old ratio must be > 0, got {ratio}")
    rng = random.Random(seed)
    past = [k for k in (memory.tasks() if memory is not None else []) if memory.examples(k)]
    n_new = int(batch_size * ratio / (ratio + 1)) if past else batch_size
    order: list[int] = []
    for _ in range(steps):
        picked: list[Example] = []
        for _ in range(n_new):
            if not order:
                order = list(range(len(new)))
                rng.shuffle(order)
            picked.append(new[order.pop()])
        for _ in range(batch_size - n_new):
            stored = memory.examples(rng.choice(past))  # type: ignore[union-attr]
            picked.append(stored[rng.randrange(len(stored))])
        yield collate(picked)


# -- EMA and the ensemble ---------------------------------------------------------------------------------------
def _named_adapter_params(model: nn.Module, name: str) -> dict[str, tuple[nn.Parameter, bool]]:
    """Parameters of adapter ``name`` keyed by their path with the name replaced by ``*``; the flag is True for a
    ``modules_to_save`` copy (e.g. the task head)."""
    out: dict[str, tuple[nn.Parameter, bool]] = {}
    for key, p in model.named_parameters():
        for part, saved in ((f".adapters.{name}.", False), (f".copies.{name}.", True)):
            if part in key:
                out[key.replace(part, part.replace(name, "*"))] = (p, saved)
    return out


class EMA(Procedure):
    """θ_target ← d·θ_target + (1−d)·θ_source after every optimiser step, over every parameter of adapter ``target``
    and its twin in ``source`` (same method and shape). ``share_saved``: the ``modules_to_save`` copies (a task head)
    are copied instead of averaged — LAE's head shared by its online and offline models. Method-independent."""

    def __init__(self, source: str, target: str, decay: float = 0.9999, *, share_saved: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise PeftkitError(f"EMA decay must lie in [0, 1], got {decay}")
        self.source, self.target, self.decay, self.share_saved = source, target, decay, share_saved
        self._pairs: list[tuple[nn.Parameter, nn.Parameter, bool]] | None = None

    def pairs(self, model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter, bool]]:
        src, tgt = _named_adapter_params(model, self.source), _named_adapter_params(model, self.target)
        if not src or set(src) != set(tgt):
            missing = sorted(set(src) ^ set(tgt))[:3]
            raise PeftkitError(f"EMA: adapters {self.source!r} and {self.target!r} must be loaded with the same "
                               f"parameters; differing: {missing or 'no parameters'}")
        for k in src:
            if src[k][0].shape != tgt[k][0].shape:
                raise PeftkitError(f"EMA: {k} has shape {tuple(src[k][0].shape)} in {self.source!r} but "
                                   f"{tuple(tgt[k][0].shape)} in {self.target!r}")
        return [(tgt[k][0], src[k][0], src[k][1]) for k in sorted(src)]

    @torch.no_grad()
    def copy(self, model: nn.Module) -> None:
        """θ_target ← θ_source (the offline PET's start)."""
        for t, s, _ in self.pairs(model):
            t.copy_(s)

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._pairs = self.pairs(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay
        for t, s, saved in self._pairs if self._pairs is not None else self.pairs(model):
            if saved and self.share_saved:
                t.copy_(s)
            else:
                t.mul_(d).add_(s.detach().to(t.dtype), alpha=1.0 - d)

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.update(model)

    def on_train_end(self, model: nn.Module) -> None:
        self._pairs = None

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])


def max_prob_ensemble(*logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """p = elementwise max over models of softmax(logits) (classes outside ``mask`` get probability 0)."""
    probs = []
    for z in logits:
        z = z.float()
        if mask is not None:
            z = z.masked_fill(~mask.to(z.device), -math.inf)
        probs.append(z.softmax(-1))
    return torch.stack(probs).amax(0)


# -- methods ----------------------------------------------------------------------------------------------------
def _inputs_labels(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise PeftkitError(f"a continual batch is a mapping with 'labels' or an (inputs, labels) pair, got "
                       f"{type(batch).__name__}")


def forward_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    return _logits(model(**inputs) if isinstance(inputs, Mapping) else model(inputs))


class ContinualMethod(Procedure):
    """A continual-learning method: trainer hooks (:class:`Procedure`) plus the task hooks the learner calls.

    The learner sets ``model``, ``config``, ``tasks``, ``num_classes``, ``collate`` (:meth:`bind`), then per task k:
    :meth:`begin_task` → :meth:`train_task` (which calls :func:`peftkit.train.train` with ``procedures=[self, …]``)
    → :meth:`end_task`; :meth:`scores` gives per-class scores whose argmax over the allowed classes predicts."""

    name = "method"

    def __init__(self, memory_size: int = 0, ratio: float = 1.0, seed: int = 0) -> None:
        self.memory = ReplayMemory(memory_size, seed) if memory_size else None
        self.ratio, self.seed = ratio, seed
        self.task = -1
        self.tasks: Sequence[Task] = ()

    def bind(self, model: nn.Module, config: AdapterConfig, tasks: Sequence[Task], num_classes: int,
             collate: Collate) -> None:
        self.model, self.config, self.tasks, self.num_classes, self.collate = model, config, tasks, num_classes, collate

    def _check_task(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(self.tasks):
            raise PeftkitError(f"task id {k!r} is not one of this sequence's 0..{len(self.tasks) - 1}")

    def _new_adapter(self, name: str, activate: bool = True) -> None:
        if name in adapter_names(self.model):
            raise PeftkitError(f"the model already has an adapter named {name!r}")
        adapt(self.model, copy.deepcopy(self.config), name, activate=activate)

    def class_mask(self, classes: Sequence[int]) -> torch.Tensor:
        m = torch.zeros(self.num_classes, dtype=torch.bool)
        m[list(classes)] = True
        return m

    def seen_classes(self, upto: int | None = None) -> list[int]:
        upto = self.task if upto is None else upto
        return [c for t in self.tasks[: upto + 1] for c in t.classes]

    def begin_task(self, k: int) -> None:
        self._check_task(k)
        if k != self.task + 1:
            raise PeftkitError(f"tasks run in order: expected task {self.task + 1}, got {k}")
        self.task = k

    def batches(self, k: int, *, steps: int, batch_size: int, seed: int) -> Iterator[Any]:
        return replay_batches(self.tasks[k].train, self.memory, batch_size=batch_size, steps=steps, ratio=self.ratio,
                              seed=seed, collate=self.collate)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        """CE over the classes seen so far (the others masked)."""
        inputs, labels = _inputs_labels(batch)
        logits = forward_logits(model, inputs)
        mask = self.class_mask(self.seen_classes()).to(logits.device)
        return F.cross_entropy(logits.masked_fill(~mask, NEG), labels), logits

    def procedures(self) -> list[Procedure]:
        return [self]

    def train_task(self, k: int, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = False,
                   weight_decay: float = 0.01) -> Any:
        torch.manual_seed(seed)
        return train(self.model, self.batches(k, steps=steps, batch_size=batch_size, seed=seed), steps=steps, lr=lr,
                     weight_decay=weight_decay, procedures=self.procedures(), loss_fn=self.loss, progress=progress,
                     desc=f"{self.name} task {k}")

    def end_task(self, k: int) -> None:
        if self.memory is not None:
            self.memory.add(k, self.tasks[k].train)

    def scores(self, model: nn.Module, inputs: Any, allowed: torch.Tensor) -> torch.Tensor:
        """(B, C) scores; prediction = argmax over ``allowed`` classes."""
        return forward_logits(model, inputs)


class Sequential(ContinualMethod):
    """One PET module fine-tuned on each task in turn (no replay): the forgetting baseline."""

    name = "sequential"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(0, seed=seed)

    def begin_task(self, k: int) -> None:
        super().begin_task(k)
        if k == 0:
            self._new_adapter("pet")
        set_active(self.model, "pet")


class StaticConPET(Sequential):
    """One PET module + head over all seen classes, trained with dynamic replay from a task-balanced memory."""

    name = "conpet-static"

    def __init__(self, memory_size: int = 200, ratio: float = 1.0, seed: int = 0) -> None:
        ContinualMethod.__init__(self, memory_size, ratio, seed)


class DynamicConPET(ContinualMethod):
    """A PET module + head per task, a PET module selector over task ids, top-k routing at inference."""

    name = "conpet-dynamic"

    def __init__(self, memory_size: int = 200, ratio: float = 1.0, topk: int = 1, selector_steps: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(memory_size, ratio, seed)
        if topk < 1:
            raise PeftkitError(f"topk must be >= 1, got {topk}")
        self.topk, self.selector_steps = topk, selector_steps
        self._training_selector = False

    @staticmethod
    def expert(k: int) -> str:
        return f"task{k}"

    def _owner(self, device: torch.device) -> torch.Tensor:
        """class id -> task index."""
        owner = torch.full((self.num_classes,), -1, dtype=torch.long)
        for i, t in enumerate(self.tasks):
            owner[list(t.classes)] = i
        return owner.to(device)

    def begin_task(self, k: int) -> None:
        super().begin_task(k)
        if k == 0:
            self._new_adapter("selector", activate=False)
        self._new_adapter(self.expert(k), activate=False)

    def select(self, model: nn.Module, inputs: Any, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k') indices of the selected tasks among those seen (k' = min(topk, seen)); with ``labels`` the
        true task is forced in (it replaces the last pick when missing)."""
        n = self.task + 1
        batch = next(v for v in (inputs.values() if isinstance(inputs, Mapping) else [inputs]))
        with torch.no_grad(), mixed_batch(model, ["selector"] * batch.shape[0]):
            task_logits = forward_logits(model, inputs)[:, :n]
        picks = task_logits.topk(min(self.topk, n), dim=-1).indices
        if labels is not None:
            true = self._owner(labels.device)[labels]
            missing = ~(picks == true[:, None]).any(-1)
            picks[missing, -1] = true[missing]
        return picks

    def assemble(self, model: nn.Module, inputs: Any, picks: torch.Tensor) -> torch.Tensor:
        """Full-label logits: the class logits of each sample's selected task modules, ``NEG`` elsewhere."""
        owner = self._owner(picks.device)
        full: torch.Tensor | None = None
        for j in range(picks.shape[1]):
            with mixed_batch(model, [self.expert(int(t)) for t in picks[:, j]]):
                out = forward_logits(model, inputs)
            full = torch.full_like(out, NEG) if full is None else full
            full = torch.where(owner[None, :] == picks[:, j:j + 1], out, full)
        assert full is not None
        return full

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        inputs, labels = _inputs_labels(batch)
        if self._training_selector:
            logits = forward_logits(model, inputs)[:, : self.task + 1]
            return F.cross_entropy(logits, self._owner(labels.device)[labels]), logits
        full = self.assemble(model, inputs, self.select(model, inputs, labels))
        return F.nll_loss(full.log_softmax(-1), labels), full

    def train_task(self, k: int, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = False,
                   weight_decay: float = 0.01) -> Any:
        if k > 0:  # with one task the selector has nothing to choose
            set_active(self.model, "selector")
            self._training_selector = True
            try:
                super().train_task(k, steps=self.selector_steps or steps, batch_size=batch_size, lr=lr, seed=seed,
                                   progress=progress, weight_decay=weight_decay)
            finally:
                self._training_selector = False
        set_active(self.model, self.expert(k))  # old experts and the selector: frozen
        # the expert learns its own task; replayed samples would only pass through frozen modules under top-1
        new_only = self.memory
        if self.topk == 1:
            self.memory = None
        try:
            return super().train_task(k, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                                      weight_decay=weight_decay)
        finally:
            self.memory = new_only

    def scores(self, model: nn.Module, inputs: Any, allowed: torch.Tensor) -> torch.Tensor:
        seen = self.class_mask(self.seen_classes()).to(allowed.device)
        if not (allowed & seen).any():  # a future task: the newest module's zero-shot logits
            with mixed_batch(model, [self.expert(self.task)] * _batch_len(inputs)):
                return forward_logits(model, inputs)
        return self.assemble(model, inputs, self.select(model, inputs)).log_softmax(-1)


def _batch_len(inputs: Any) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    return int(first.shape[0])


class LAE(ContinualMethod):
    """Online PET trained on the new classes, offline PET EMA'd from it, max-probability ensemble at inference."""

    name = "lae"

    def __init__(self, decay: float = 0.9999, freeze_steps: int = 0, seed: int = 0) -> None:
        super().__init__(0, seed=seed)
        self.ema = EMA("online", "offline", decay)
        self.freeze_steps = freeze_steps

    def begin_task(self, k: int) -> None:
        super().begin_task(k)
        if k == 0:
            self._new_adapter("online")
            self._new_adapter("offline", activate=False)
            self.ema.copy(self.model)
        set_active(self.model, "online")

    def procedures(self) -> list[Procedure]:
        return [self, self.ema]

    def _online_pet(self) -> list[nn.Parameter]:
        return [p for k, (p, saved) in _named_adapter_params(self.model, "online").items() if not saved]

    def on_step_start(self, model: nn.Module, step: int) -> None:
        if self.task > 0 and self.freeze_steps:  # the PET waits while the new head rows catch up
            for p in self._online_pet():
                p.requires_grad_(step >= self.freeze_steps)

    def on_train_end(self, model: nn.Module) -> None:
        for p in self._online_pet():
            p.requires_grad_(True)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        """CE over the current task's classes only (targets shifted into that slice)."""
        inputs, labels = _inputs_labels(batch)
        logits = forward_logits(model, inputs)
        classes = torch.tensor(self.tasks[self.task].classes, device=logits.device)
        local = (labels[:, None] == classes[None, :]).float().argmax(-1)
        return F.cross_entropy(logits.index_select(1, classes), local), logits

    def scores(self, model: nn.Module, inputs: Any, allowed: torch.Tensor) -> torch.Tensor:
        n = _batch_len(inputs)
        with mixed_batch(model, ["online"] * n):
            on = forward_logits(model, inputs)
        with mixed_batch(model, ["offline"] * n):
            off = forward_logits(model, inputs)
        return max_prob_ensemble(on, off, mask=allowed)


# -- the learner and the protocol -----------------------------------------------------------------------------------
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
        device = _device(self.model)
        was_training = self.model.training
        self.model.eval()
        correct = 0
        try:
            for s in range(0, len(data), self.eval_batch_size):
                inputs, labels = _inputs_labels(_to(self.collate(data[s: s + self.eval_batch_size]), device))
                if untrained or seen < 0:
                    scores = forward_logits(self.model, inputs)
                else:
                    scores = self.method.scores(self.model, inputs, allowed.to(device))
                pred = scores.float().masked_fill(~allowed.to(scores.device), -math.inf).argmax(-1)
                correct += int((pred == labels).sum())
        finally:
            self.model.train(was_training)
        return correct / len(data)

    def run(self) -> ContinualResult:
        import time

        start = time.perf_counter()
        baseline = [self.evaluate(j, untrained=True) for j in range(len(self.tasks))]
        matrix: list[list[float]] = []
        for k in range(len(self.tasks)):
            self.method.begin_task(k)
            self.method.train_task(k, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                                   seed=self.seed + k, progress=self.progress)
            self.method.end_task(k)
            matrix.append([self.evaluate(j) for j in range(len(self.tasks))])
        return ContinualResult(self.method.name, [t.name for t in self.tasks], matrix, baseline,
                               seconds=time.perf_counter() - start)
