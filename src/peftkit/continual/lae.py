"""LAE — Gao et al., ICCV 2023, "A Unified Continual Learning Framework with General Parameter-Efficient Tuning"
(arXiv 2303.10070; github.com/gqk/LAE, ``main.py``).

* Learning: the online PET (any registered adapter, with the task head in ``modules_to_save``) is trained with CE
  over the *new* classes only (``logits[:, task classes]``, targets shifted into that slice).
* Adaptation-speed calibration: for every task after the first the PET is frozen for the first part of the task's
  run while the new head rows train alone (official: ``num_freeze_epochs=3`` of ``num_epochs=5``, so 60 % of the
  run; here ``freeze`` = 0.6 of each later task's steps by default, or an integer number of steps). A learnable
  scalar on every PET output (official ``Scaler(None)``, init 1; ``KVLoRA`` gives ΔW_k and ΔW_v one each): for a
  LoRA-family PET (an adapter with ``lora_A`` / ``lora_B`` factors) each adapted layer's update becomes
  ΔW = (α/r)·s·B·A with its own s (``scaler=True``, the default; :class:`PetScale`, a parametrisation of B, so the
  fused kernel and mixed batches run unchanged); the offline PET's scalars are EMA'd with the rest; saving folds
  s into B (:meth:`LAE.exported`), so a saved PET is a plain adapter with the same function. peftkit's parallel
  ``bottleneck`` adapter with ``scaling="learned"`` is the official adapter PET with its scaler. A key/value-prefix
  PET (``prefix_tuning``, ``ptuning_v2``: :class:`~peftkit.core.kvprefix.KVPrefix`) gets a learnable scalar per
  layer on its keys and another on its values (``scaler=True``) and the *prefix compensation*
  (``compensation=True``, the default): the prefix columns of the post-softmax attention divided by their sum λ
  (:mod:`peftkit.continual.prefix`). Saving folds the key/value scalars into the table; the compensation is part
  of LAE's model, not of the saved adapter (``peftkit eval`` of a continual stage turns it on again).
* Accumulation: the offline PET is created when task 1 starts, as a copy of the PET trained on task 0 (official
  ``setup_model``: ``ModelEmaV2(self.pets)`` once a task has been learnt), then after every step
  θ_off ← d·θ_off + (1−d)·θ_on (:class:`~peftkit.continual.ema.EMA`, d = 0.9999); the head is shared (the offline
  head copy mirrors the online one).
* Ensemble: p = max(softmax(f_on(x)), softmax(f_off(x))) elementwise, prediction argmax p
  (:func:`~peftkit.continual.ema.max_prob_ensemble`); during task 0 there is no offline PET and f_on alone predicts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..core import model_level as ml
from ..core.errors import PeftkitError
from ..core.model import adapter_names, mixed_batch, set_active
from ..core.procedure import Procedure
from ..core.state import adapted_layers
from .base import ContinualMethod, _batch_len, _inputs_labels, forward_logits
from .ema import EMA, _named_adapter_params, max_prob_ensemble
from .prefix import add_kv_scales, compensate, prefix_adapters, scaled_tensors

FREEZE = 0.6  # official num_freeze_epochs / num_epochs = 3 / 5


class PetScale(nn.Module):
    """LAE's learnable PET output scalar (official ``Scaler(None)``): a parametrisation B ↦ s·B, s init 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b * self.scale.to(b.dtype)


def lora_pets(model: nn.Module, name: str) -> list[nn.Module]:
    """The per-layer modules of adapter ``name`` that hold LoRA factors ``lora_A`` / ``lora_B``."""
    out = []
    for _, layer in adapted_layers(model):
        a = layer.adapters[name] if name in layer.adapters else None
        if a is not None and isinstance(getattr(a, "lora_A", None), torch.Tensor) and \
                isinstance(getattr(a, "lora_B", None), torch.Tensor):
            out.append(a)
    return out


class LAE(ContinualMethod):
    """Online PET trained on the new classes, offline PET (from task 1 on) EMA'd from it, max-probability ensemble.

    ``freeze``: how much of each later task's run trains the head alone — a fraction in [0, 1) of its steps
    (default 0.6, the official 3 of 5 epochs) or a whole number of steps (``freeze_steps``, kept for old callers,
    overrides it)."""

    name = "lae"

    def __init__(self, decay: float = 0.9999, freeze: float = FREEZE, seed: int = 0, *,
                 freeze_steps: int | None = None, scaler: bool = True, compensation: bool = True) -> None:
        super().__init__(0, seed=seed)
        if isinstance(freeze, bool) or not isinstance(freeze, int | float) or not 0.0 <= freeze < 1.0:
            raise PeftkitError(f"LAE freeze is the share of a later task's steps that trains the head alone, in "
                               f"[0, 1); got {freeze!r}")
        if freeze_steps is not None and (isinstance(freeze_steps, bool) or not isinstance(freeze_steps, int)
                                         or freeze_steps < 0):
            raise PeftkitError(f"LAE freeze_steps must be a whole number >= 0, got {freeze_steps!r}")
        self.ema = EMA("online", "offline", decay)
        self.freeze, self.freeze_steps, self.scaler = float(freeze), freeze_steps, bool(scaler)
        self.compensation = bool(compensation)
        self._frozen_for = 0

    def _add_scalers(self, name: str) -> None:
        if self.scaler:
            for pet in lora_pets(self.model, name):
                if not parametrize.is_parametrized(pet, "lora_B"):
                    parametrize.register_parametrization(pet, "lora_B", PetScale())
            for adapter in prefix_adapters(self.model, [name]).values():
                add_kv_scales(adapter)
        self._compensate()

    def _compensate(self) -> None:
        """Prefix compensation on, once the model has a key/value-prefix PET."""
        if self.compensation and prefix_adapters(self.model):
            compensate(self.model)

    def scales(self, name: str) -> list[nn.Parameter]:
        """The learnable output scalars of adapter ``name``'s LoRA PETs, one per adapted layer (empty without)."""
        return [pet.parametrizations.lora_B[0].scale for pet in lora_pets(self.model, name)
                if parametrize.is_parametrized(pet, "lora_B")]

    @contextmanager
    def exported(self) -> Iterator[None]:
        """While inside: every scaled PET holds plain factors with s folded in (B ← s·B: the same ΔW), as
        :func:`peftkit.save` writes them; on exit B and s are restored."""
        held: list[tuple[nn.Module, str]] = []
        for name in adapter_names(self.model):
            held += [(pet, "lora_B") for pet in lora_pets(self.model, name)
                     if parametrize.is_parametrized(pet, "lora_B")]
            held += [pair for a in prefix_adapters(self.model, [name]).values() for pair in scaled_tensors(a)]
        kept = []
        for module, t in held:
            plist = getattr(module.parametrizations, t)
            kept.append((module, t, plist[0], plist.original.detach().clone(), plist.original.requires_grad))
        for module, t in held:
            parametrize.remove_parametrizations(module, t, leave_parametrized=True)
        try:
            yield
        finally:
            for module, t, scale, original, grad in kept:
                parametrize.register_parametrization(module, t, scale)
                plist = getattr(module.parametrizations, t)
                with torch.no_grad():
                    plist.original.copy_(original)
                plist.original.requires_grad_(grad)

    def begin_task(self, k: int) -> None:
        super().begin_task(k)
        if k == 0:
            self._new_adapter("online")
            self._add_scalers("online")
        elif "offline" not in adapter_names(self.model):  # task 1: the PET learnt on task 0 starts the offline one
            self._new_adapter("offline", activate=False)
            self._add_scalers("offline")
            self.ema.copy(self.model)
        set_active(self.model, "online")

    def has_offline(self) -> bool:
        return "offline" in adapter_names(self.model)

    def procedures(self) -> list[Procedure]:
        return [self, self.ema] if self.has_offline() else [self]

    def frozen_steps(self, steps: int) -> int:
        """Steps at the start of task ``self.task`` (> 0) during which the PET is frozen."""
        if self.task <= 0:
            return 0
        return self.freeze_steps if self.freeze_steps is not None else int(self.freeze * steps)

    def train_task(self, k: int, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = False,
                   weight_decay: float = 0.01) -> Any:
        self._frozen_for = self.frozen_steps(steps)
        return super().train_task(k, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                                  weight_decay=weight_decay)

    def _online_pet(self) -> list[nn.Parameter]:
        """The online PET's trained parameters (not its head copy, not those its method keeps frozen, e.g. MiCA's B)."""
        frozen = {id(p) for _, layer in adapted_layers(self.model) if "online" in layer.adapters
                  for n, p in layer.adapters["online"].named_parameters() if layer.adapters["online"].is_frozen(n)}
        return [p for k, (p, saved) in _named_adapter_params(self.model, "online").items()
                if not saved and id(p) not in frozen]

    def on_step_start(self, model: nn.Module, step: int) -> None:
        if self._frozen_for:  # the PET waits while the new head rows catch up
            for p in self._online_pet():
                p.requires_grad_(step >= self._frozen_for)

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

    def _logits_of(self, model: nn.Module, name: str, inputs: Any) -> torch.Tensor:
        if name in ml.model_adapters(model):  # a model-level PET (a prefix) changes the whole call: switch to it
            before = list(model.__dict__.get("peftkit_active") or [])
            set_active(model, name)
            try:
                return forward_logits(model, inputs)
            finally:
                set_active(model, before or name)
        with mixed_batch(model, [name] * _batch_len(inputs)):
            return forward_logits(model, inputs)

    def scores(self, model: nn.Module, inputs: Any, allowed: torch.Tensor) -> torch.Tensor:
        self._compensate()
        logits: Sequence[torch.Tensor] = [self._logits_of(model, n, inputs)
                                          for n in (("online", "offline") if self.has_offline() else ("online",))]
        return max_prob_ensemble(*logits, mask=allowed)
