"""AdaLoRA's budget procedure (:mod:`peftkit.methods.adalora` is the method): :class:`AdaLoraAllocator`, the
cubic budget schedule, the importance-based pruning of triplets and the orthogonality penalty. It depends on the
core alone (the adapter class is looked up on use: the method module imports this one to register it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.core.errors import PeftkitError
from peftkit.core.model import get_config
from peftkit.core.procedure import Procedure, find_adapters

if TYPE_CHECKING:
    from peftkit.methods.adalora import AdaLora, AdaLoraConfig


def _adalora() -> type:
    """The adapter class (imported on use: the method module imports this one to register its procedure)."""
    from peftkit.methods.adalora import AdaLora

    return AdaLora


class AdaLoraAllocator(Procedure):
    """AdaLoRA's budget schedule and importance-based pruning (PEFT's ``RankAllocator`` + ``update_and_allocate``),
    and the orthogonality penalty as an extra loss. T is ``total_steps``, else the config's ``total_step``, else the
    run's length (``run_steps``, set by the trainer).

    The importance of every trained tensor is read after the optimiser step from the parameter and the gradient of
    that step (captured as it is accumulated, since the trainer clears gradients before ``on_step_end``)."""

    def __init__(self, model: nn.Module | None = None, config: AdaLoraConfig | None = None,
                 total_steps: int | None = None) -> None:
        self.config, self.total_steps = config, total_steps
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.masks: dict[str, dict[str, list[bool]]] = {}  # adapter name -> path -> kept triplets (last allocation)
        self._grads: dict[int, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def _total(self, cfg: AdaLoraConfig, name: str) -> int:
        total = self.total_steps or cfg.total_step or self.run_steps
        if total is None:
            raise PeftkitError(f"AdaLoraAllocator: adapter {name!r} needs AdaLoraConfig.total_step (the run's length "
                               f"T of the budget schedule; --opt total_step=N) or total_steps=")
        if cfg.tinit >= total - cfg.tfinal:
            raise PeftkitError(f"AdaLoraAllocator: tinit ({cfg.tinit}) >= total_step − tfinal ({total} − "
                               f"{cfg.tfinal}) leaves no budgeting phase")
        return total

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        for name, mods in find_adapters(model, _adalora(), self.config).items():
            self._total(get_config(model, name), name)
            for _, a in mods:
                for p in (a.lora_A, a.lora_B, a.lora_E):
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._capture))

    def _capture(self, p: torch.Tensor) -> None:
        self._grads[id(p)] = p.grad.detach().clone()

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        loss = None
        for name, mods in find_adapters(model, _adalora(), self.config).items():
            w = get_config(model, name).orth_reg_weight
            if w > 0 and model.training:
                term = w * torch.stack([a.orth_penalty() for _, a in mods]).sum() / (2 * len(mods))
                loss = term if loss is None else loss + term
        return loss

    @torch.no_grad()
    def _update_ipt(self, name: str, mods: list[tuple[str, AdaLora]], cfg: AdaLoraConfig) -> None:
        for path, a in mods:
            for t, p in (("A", a.lora_A), ("B", a.lora_B), ("E", a.lora_E)):
                g = self._grads.get(id(p))
                if g is None:
                    continue
                key = f"{name}:{path}:{t}"
                ipt = (p * g).abs()
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                avg = cfg.beta1 * avg + (1 - cfg.beta1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = cfg.beta2 * unc + (1 - cfg.beta2) * (ipt - avg).abs()

    def _score(self, key: str) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def _mask_to_budget(self, name: str, mods: list[tuple[str, AdaLora]], budget: int, init_bgt: int) -> None:
        scores = {}
        for path, _ in mods:
            k = f"{name}:{path}:"
            if k + "E" not in self.exp_avg_ipt:
                return  # no gradient seen yet
            scores[path] = (self._score(k + "E").view(-1) + self._score(k + "A").mean(1)
                            + self._score(k + "B").mean(0))
        k = init_bgt - budget
        if k < 1:
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k).values.item()
        masks = {}
        for path, a in mods:
            keep = scores[path] > threshold
            a.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            masks[path] = keep.tolist()
        self.masks[name] = masks

    @torch.no_grad()
    def _apply_masks(self, name: str, mods: list[tuple[str, AdaLora]]) -> None:
        for path, a in mods:
            mask = torch.tensor(self.masks[name][path], device=a.lora_E.device)
            a.lora_E.masked_fill_(~mask.view(-1, 1), 0.0)

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        for name, mods in find_adapters(model, _adalora(), self.config).items():
            cfg = get_config(model, name)
            total = self._total(cfg, name)
            init_bgt = sum(a.lora_A.shape[0] for _, a in mods)
            target_bgt = cfg.target_r * len(mods)
            end = total - cfg.tfinal
            if step < end:
                self._update_ipt(name, mods, cfg)
            if step <= cfg.tinit:
                continue
            if step < end:
                if step % cfg.deltaT == 0:
                    coeff = 1 - (step - cfg.tinit) / (end - cfg.tinit)
                    self._mask_to_budget(name, mods, int((init_bgt - target_bgt) * coeff ** 3 + target_bgt),
                                         init_bgt)
            elif step == end:
                self._mask_to_budget(name, mods, target_bgt, init_bgt)
                self.exp_avg_ipt.clear()
                self.exp_avg_unc.clear()
            elif name in self.masks:
                self._apply_masks(name, mods)
        self._grads.clear()

    def on_train_end(self, model: nn.Module) -> None:
        """Cut the pruned triplets out and record the masks in the config's ``rank_pattern``."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for name, mods in find_adapters(model, _adalora(), self.config).items():
            masks = self.masks.get(name)
            if not masks:
                continue
            cfg = get_config(model, name)
            for path, a in mods:
                a.keep(torch.tensor(masks[path], device=a.lora_E.device))
            cfg.rank_pattern = {p: list(m) for p, m in masks.items()}
            for _, a in mods:  # per-module configs (overrides) are copies: keep their record in step
                a.config.rank_pattern = cfg.rank_pattern

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: dict(m) for n, m in self.masks.items()},
                "exp_avg_ipt": {k: v.tolist() for k, v in self.exp_avg_ipt.items()},
                "exp_avg_unc": {k: v.tolist() for k, v in self.exp_avg_unc.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {n: dict(m) for n, m in state["masks"].items()}
        self.exp_avg_ipt = {k: torch.tensor(v) for k, v in state["exp_avg_ipt"].items()}
        self.exp_avg_unc = {k: torch.tensor(v) for k, v in state["exp_avg_unc"].items()}
