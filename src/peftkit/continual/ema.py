"""An exponential moving average of one adapter into its twin (:class:`EMA`, a trainer procedure) and the
max-probability ensemble of several models' logits (:func:`max_prob_ensemble`) — LAE's offline model and its
inference rule, usable by any method."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..core.errors import PeftkitError
from ..core.procedure import Procedure


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
