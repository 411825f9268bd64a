"""DiffoRA's search (:mod:`peftkit.methods.diffora` is the method): :class:`DifforaSearch`, the alternating
first-order DARTS procedure on the selection logits θ, and :func:`discretize` / :func:`apply_selection`, which keep
the top-⌈ρ·n⌉ candidate modules and switch the others off for good. It depends on the core alone: the task loss,
the batch size and the data-parallel gradient sync come from the procedure protocol (:mod:`peftkit.core.procedure`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from peftkit.core.errors import PeftkitError
from peftkit.core.model import adapted_layers, adapter_names, get_config
from peftkit.core.procedure import Procedure, batch_size, default_loss, find_adapters, sync_gradients, world_size

if TYPE_CHECKING:
    from peftkit.methods.diffora import Diffora, DifforaConfig

THETA_BETAS = (0.5, 0.999)
THETA_WEIGHT_DECAY = 1e-3


def _diffora() -> type:
    """The adapter class (imported on use: the method module imports this one to register its procedure)."""
    from peftkit.methods.diffora import Diffora

    return Diffora


def discretize(model: nn.Module, name: str | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> dict[str, list[str]]:
    """Keep the top-⌈ρ·n⌉ modules of every searching DiffoRA adapter (or of adapter ``name``) by γ with Γ = 1 (γ
    folded into their B: their ΔW is unchanged) and switch the others off for good (their tensors leave the model
    and ``optimizer``). Everything is checked before anything changes. Returns adapter name -> kept module paths."""
    if name is not None:
        get_config(model, name)
    found = {n: mods for n, mods in find_adapters(model, _diffora()).items()
             if (name is None or n == name) and mods[0][1].mode == "search"}
    if not found:
        which = f"adapter {name!r}" if name is not None else "the model"
        raise PeftkitError(f"discretize: {which} has no DiffoRA adapter in its search phase")
    for n in found:
        for path, layer in adapted_layers(model):
            if n in layer.merged:
                raise PeftkitError(f"discretize: DiffoRA adapter {n!r} is merged into {path!r}; unmerge first")
        cfg = get_config(model, n)
        shared = [o for o in adapter_names(model) if o != n and get_config(model, o) is cfg]
        if shared:
            raise PeftkitError(f"discretize: adapters {n!r} and {shared[0]!r} share one config object, which "
                               f"records the selection; give each adapter its own config (copy.deepcopy)")
    out = {}
    for n, mods in found.items():
        order = sorted(range(len(mods)), key=lambda i: (-float(mods[i][1].theta), i))
        keep = set(order[: get_config(model, n).kept(len(mods))])
        out[n] = apply_selection(model, n, mods, [path for i, (path, _) in enumerate(mods) if i in keep], optimizer,
                                 fold=True)
    return out


def apply_selection(model: nn.Module, name: str, mods: list[tuple[str, Diffora]], selected: list[str],
                    optimizer: torch.optim.Optimizer | None = None, fold: bool = False) -> list[str]:
    """Keep LoRA on the modules at ``selected`` (``fold``: with γ folded into B) and switch the others of adapter
    ``name`` off (their tensors leave the model and ``optimizer``); records the selection in the config. Returns
    ``selected`` in model order."""
    keep = set(selected)
    unknown = keep - {path for path, _ in mods}
    if unknown:
        raise PeftkitError(f"DiffoRA adapter {name!r} has no candidate module {sorted(unknown)[0]!r}")
    dropped: list[torch.Tensor] = []
    for path, a in mods:
        dropped.extend(a.switch(path in keep, fold=fold))
    selected = [path for path, _ in mods if path in keep]
    get_config(model, name).selected = selected
    for _, a in mods:  # per-module configs (overrides) are copies: keep their record in step
        a.config.selected = selected
    if optimizer is not None and dropped:
        gone = {id(p) for p in dropped}
        for g in optimizer.param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in gone]
        for p in dropped:
            optimizer.state.pop(p, None)
    return selected


class DifforaSearch(Procedure):
    """The alternating bi-level search and the discretisation (module docstring).

    ``held_out``: the held-out batches for the θ steps (cycled; moved to the model's device); without them the
    procedure asks its run for ``held_out_share`` of the training examples (:meth:`set_held_out`), and given none
    the step's own training batch is used (seen through ``extra_loss``). ``loss_fn(model, batch) -> (loss,
    outputs)`` computes the held-out loss (default: the model's ``loss`` / cross-entropy). ``config`` (as the
    trainer passes it) limits the search to the adapters built from that config."""

    def __init__(self, model: nn.Module | None = None, config: DifforaConfig | None = None,
                 held_out: Iterable[Any] | None = None,
                 loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, Any]] | None = None) -> None:
        self.config = config
        self.held_out = held_out
        self.held_out_share = 0.1 if held_out is None else 0.0
        self.loss_fn = default_loss if loss_fn is None else loss_fn  # the trainer's task loss, the same definition
        self.optimizers: dict[str, torch.optim.Adam] = {}  # adapter name -> optimiser of its θ's
        self.train_optimizer: torch.optim.Optimizer | None = None
        self.theta_steps = 0
        self.selected: dict[str, list[str]] = {}
        self._iter: Iterator[Any] | None = None
        self._batch: Any = None
        self._pending: dict[str, Any] = {}  # θ-optimiser states from load_state_dict, applied when rebuilt
        self.limit: dict[str, int | None] = {}  # adapter name -> steps of search in this run

    def _searching(self, model: nn.Module) -> dict[str, list[tuple[str, Diffora]]]:
        found = find_adapters(model, _diffora(), self.config)
        if not found:
            which = " built from this config" if self.config is not None else ""
            raise PeftkitError(f"DifforaSearch: the model has no DiffoRA adapter{which}")
        return {n: mods for n, mods in found.items() if mods[0][1].mode == "search"}

    def set_held_out(self, batches: Iterable[Any]) -> None:
        self.held_out, self._iter = batches, None

    def _held_out_batch(self) -> Any:
        if self.held_out is None:
            if self._batch is None:
                raise PeftkitError("DifforaSearch needs held-out batches (held_out=) or the training batches "
                                   "(through extra_loss: the peftkit trainer, or ProcedureLossMixin)")
            return self._batch
        for _ in range(2):
            if self._iter is None:
                self._iter = iter(self.held_out)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
        raise PeftkitError("DifforaSearch: the held_out batches are empty")

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.train_optimizer = optimizer
        searching = self._searching(model)
        self.limit = {n: get_config(model, n).search_limit(self.run_steps) for n in searching}
        for n, selected in self.selected.items():  # resuming after the discretisation: re-apply it
            if n in searching:
                apply_selection(model, n, searching[n], list(selected), optimizer)

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        if self.held_out is None:
            self._batch = batch
        return None

    def theta_step(self, model: nn.Module, batch: Any) -> None:
        """One Adam step on the selection logits alone, from the loss of ``batch`` (nothing else changes)."""
        found = self._searching(model)
        thetas = {n: [a.theta for _, a in mods] for n, mods in found.items()}
        flat = [t for ts in thetas.values() for t in ts]
        if not flat:
            return
        # only the θ's require grad during this pass: the backward follows their path alone (no weight gradients)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        for t in flat:
            t.requires_grad_(True)
        try:
            with torch.enable_grad():
                loss, _ = self.loss_fn(model, batch)
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
        finally:
            for t in flat:
                t.requires_grad_(False)
            for p in trainable:
                p.requires_grad_(True)
        for t, g in zip(flat, grads):
            t.grad = torch.zeros_like(t) if g is None else g.detach()
        if world_size() > 1:  # data-parallel (torchrun): every process takes the same θ step, from the global batch
            sync_gradients(flat, batch_size(batch))
        for n, ts in thetas.items():
            opt = self.optimizers.get(n)
            if opt is None or opt.param_groups[0]["params"][0] is not ts[0]:
                opt = torch.optim.Adam(ts, lr=get_config(model, n).theta_lr, betas=THETA_BETAS,
                                       weight_decay=THETA_WEIGHT_DECAY)
                if n in self._pending:
                    opt.load_state_dict(self._pending.pop(n))
                self.optimizers[n] = opt
            opt.step()
        for t in flat:
            t.grad = None
        self.theta_steps += 1

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        found = self._searching(model)
        if not found:
            return
        batch = self._held_out_batch()
        device = next(a.theta.device for mods in found.values() for _, a in mods)
        if any(isinstance(t, torch.Tensor) and t.device != device for t in tree_leaves(batch)):  # held-out data
            batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
        self.theta_step(model, batch)
        opt = optimizer if optimizer is not None else self.train_optimizer
        for n in found:
            limit = self.limit.get(n) if n in self.limit else get_config(model, n).search_limit(self.run_steps)
            if limit is not None and step + 1 >= limit:
                self.selected.update(discretize(model, n, opt))

    def on_train_end(self, model: nn.Module) -> None:
        for n in self._searching(model):
            self.selected.update(discretize(model, n, self.train_optimizer))
        self._batch = None

    def state_dict(self) -> dict[str, Any]:
        return {"theta_steps": self.theta_steps, "selected": dict(self.selected),
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta_steps = state["theta_steps"]
        self.selected = dict(state["selected"])
        self._pending = dict(state.get("optimizers", {}))
        self.optimizers = {}
