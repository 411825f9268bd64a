"""LoCA's alternating coefficient / location schedule (:mod:`peftkit.methods.loca` is the method):
:class:`LocaSchedule`, the procedure the trainer attaches, and :func:`location_steps`, the length of the location
search in optimiser steps. It depends on the core alone (the adapter class is looked up on use: the method module
imports this one to register its procedure)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.core.errors import PeftkitError
from peftkit.core.procedure import Procedure, find_adapters

if TYPE_CHECKING:
    from peftkit.methods.loca import Loca, LocaConfig

T_LOC_UNKNOWN_RUN = 100  # location-search steps when t_loc is a share and the run's length is unknown


def location_steps(config: LocaConfig, run_steps: int | None) -> int:
    """``t_loc`` in optimiser steps: an int as given; a share (float) of ``run_steps``."""
    if isinstance(config.t_loc, float):
        return T_LOC_UNKNOWN_RUN if run_steps is None else round(config.t_loc * run_steps)
    return int(config.t_loc)


class LocaSchedule(Procedure):
    """LoCA's alternating coefficient / location schedule (per adapter layer, from that layer's config).

    Before optimiser step t (counted by the procedure, from 0): ``locations(t) = 0 < t < t_loc and t mod (b_a + b_l)
    >= b_a``; in a location step only ℓ requires grad, otherwise only a (so the other tensor gets no gradient and
    AdamW leaves it untouched). The locations' learning rate: the optimiser keeps one group (a param group added
    after the LR scheduler breaks the scheduler), so after each location step the procedure scales ℓ's update by
    ``location_lr / base lr`` of its group (``initial_lr`` when a scheduler set one) — exactly the step the optimiser
    would have taken with lr = ``location_lr`` × the schedule's current multiplier, for any optimiser whose step is
    proportional to lr (SGD with or without momentum, Adam, AdamW including its decoupled weight decay).
    After training a trains and ℓ stays trainable only if the search is not over. Only LoCA adapters with a
    trainable tensor when training starts take part (``config``: only those built from it).
    """

    def __init__(self, model: nn.Module | None = None, config: LocaConfig | None = None) -> None:
        self.config = config
        self.t = 0  # optimiser steps scheduled so far
        self._layers: list[Loca] | None = None
        self._ratio: dict[int, float] = {}  # id(ℓ) -> location_lr / base lr of its optimiser group
        self._before: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (ℓ, ℓ before the step, ratio)

    def _collect(self, model: nn.Module) -> list[Loca]:
        from peftkit.methods.loca import Loca

        found = find_adapters(model, Loca, self.config)
        layers = [a for v in found.values() for _, a in v if a.loca_a.requires_grad or a.loca_l.requires_grad]
        if not layers:
            which = " built from this config" if self.config is not None else ""
            raise PeftkitError(f"LocaSchedule: the model has no trainable LoCA adapter{which}")
        return layers

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._layers = self._collect(model)
        self._ratio = {}
        if optimizer is None:
            return
        want = {id(a.loca_l): a.config.location_lr for a in self._layers if a.config.location_lr is not None}
        for group in optimizer.param_groups:
            base = float(group.get("initial_lr", group["lr"]))
            for p in group["params"]:
                if id(p) in want and base > 0:
                    self._ratio[id(p)] = want[id(p)] / base

    def on_step_start(self, model: nn.Module, step: int) -> None:
        if self._layers is None:
            self._layers = self._collect(model)
        self._before = []
        for a in self._layers:
            loc = a.location_phase(self.t, location_steps(a.config, self.run_steps))
            a.loca_a.requires_grad_(not loc)
            a.loca_l.requires_grad_(loc)
            ratio = self._ratio.get(id(a.loca_l), 1.0)
            if loc and ratio != 1.0:
                self._before.append((a.loca_l, a.loca_l.detach().clone(), ratio))
        self.t += 1

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        with torch.no_grad():
            for p, old, ratio in self._before:  # ℓ ← ℓ_old + ratio·(ℓ − ℓ_old)
                p.sub_(old).mul_(ratio).add_(old)
        self._before = []

    def on_train_end(self, model: nn.Module) -> None:
        for a in self._layers or []:
            a.loca_a.requires_grad_(True)
            a.loca_l.requires_grad_(self.t < location_steps(a.config, self.run_steps))

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
