"""DEFT's density loss — Runwal, Pedapati & Chen 2024, "From PEFT to DEFT: Parameter Efficient Finetuning for
Reducing Activation Density in Transformers" (arXiv 2402.01911; github.com/IBM/DEFT). Method-independent: it works
on top of any adapter (the backbone stays frozen; the adapter learns to make the MLP activations sparse).

    activations:  a ∈ R^{B×T×d_ff}, the output of the MLP's activation function in every block (forward hooks)
    loss:         D(a) = mean_{t,j} a²/(a² + ε), ε = 1e-7 (a smooth L0: 0 at a = 0, ≈ 1 for |a| ≫ √ε, zero gradient
                  at 0), averaged over samples and layers;  L = L_task + λ·D  (DEFT: λ = 1)
    density:      count_nonzero(a)/(T·d_ff) per sample and layer, averaged over samples and layers (evaluation)

Where: :func:`find_mlp_activations` finds the activation modules generically — parameter-free leaf modules that are
activation functions (torch's or transformers') inside an MLP block (a name part such as ``mlp``, ``intermediate``,
``ffn``, ``feed_forward``, ``DenseReluDense``): BERT/RoBERTa ``intermediate.intermediate_act_fn``, Llama/Mistral
``mlp.act_fn`` (the gate's activation; for gated MLPs DEFT hooks the same module), GPT-2 ``mlp.act``, T5
``DenseReluDense.act``; or every module whose full name matches a user regex. Padding: the reference pads to a fixed
length and counts padding tokens; batches here are padded to their longest sequence, so by default tokens where
the batch's ``attention_mask`` is 0 are left out of both the loss and the density (``mask_padding=False``: every
position counts, as in the reference). ADA-DEFT (learned per-layer weights, skipped MLPs) is not implemented: its
formula is unconfirmed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import PeftkitError
from ..core.procedure import Procedure
from .trainer import _device, _to

EPS = 1e-7
_MLP_PARTS = ("mlp", "intermediate", "ffn", "feed_forward", "feedforward", "densereludense", "ff")
_ACT_NAMES = ("act", "act_fn", "activation", "activation_fn", "intermediate_act_fn", "act_layer")
_ACT_MODULES = ("torch.nn.modules.activation", "transformers.activations")


def smooth_l0(a: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """a²/(a² + ε) elementwise (in float32)."""
    a2 = a.float().pow(2)
    return a2 / (a2 + eps)


def _is_activation(name: str, module: nn.Module) -> bool:
    if next(module.children(), None) is not None or next(module.parameters(), None) is not None:
        return False
    leaf = name.rsplit(".", 1)[-1]
    return type(module).__module__.startswith(_ACT_MODULES) or leaf in _ACT_NAMES


def _in_mlp(name: str) -> bool:
    parts = [p.lower() for p in name.split(".")[:-1]]
    return any(p in _MLP_PARTS or p.startswith("mlp") for p in parts)


def find_mlp_activations(model: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are the MLP intermediate activations: those whose full name matches ``pattern``
    (a regex, full match), else the activation-function modules inside MLP blocks. Raises when there is none."""
    if pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise PeftkitError(f"density pattern {pattern!r} is not a valid regex: {e}") from None
        found = [(n, m) for n, m in model.named_modules() if n and rx.fullmatch(n)]
        if not found:
            raise PeftkitError(f"density pattern {pattern!r} matched no module of {type(model).__name__}")
        return found
    found = [(n, m) for n, m in model.named_modules() if n and _is_activation(n, m) and _in_mlp(n)]
    if not found:
        raise PeftkitError(
            f"found no MLP activation module in {type(model).__name__} (parameter-free activation modules inside "
            f"mlp/intermediate/ffn/feed_forward blocks); give a module-name pattern instead"
        )
    return found


def _token_mask(batch: Any, a: torch.Tensor) -> torch.Tensor | None:
    """The batch's attention mask as (B, T) floats when it lines up with the activation ``a`` (B, T, d)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or a.dim() != 3 or tuple(mask.shape) != tuple(a.shape[:2]):
        return None
    return mask.to(device=a.device, dtype=torch.float32)


def _per_sample(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-token values (B, T, ...) → per-sample means (B,), over real tokens when ``mask`` is given."""
    if mask is None:
        return values.reshape(values.shape[0], -1).mean(1)
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1)


class DensityLoss(Procedure):
    """Adds ``weight · D`` (DEFT's density loss) over the MLP activations of every forward in training mode.

    ``pattern``: a module-name regex for the activation modules (default: found generically); ``eps``: the smooth
    L0's ε; ``mask_padding``: leave out padding tokens (see the module docstring)."""

    def __init__(self, model: nn.Module, weight: float = 1.0, *, pattern: str | None = None, eps: float = EPS,
                 mask_padding: bool = True) -> None:
        if not weight > 0:
            raise PeftkitError(f"density loss weight must be > 0, got {weight}")
        self.weight, self.eps, self.mask_padding = float(weight), float(eps), mask_padding
        self.modules = find_mlp_activations(model, pattern)
        self._records: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if module.training and isinstance(out, torch.Tensor):
            self._records.append(smooth_l0(out, self.eps).mean(-1))  # (B, T) or (B,): per-token mean over d_ff

    def attach(self) -> None:
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook) for _, m in self.modules]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._records = [], []

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.attach()

    def on_step_start(self, model: nn.Module, step: int) -> None:
        self._records = []

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor:
        records, self._records = self._records, []
        if not records:
            raise PeftkitError("density loss: no MLP activation was recorded in this forward (is the model in "
                               "training mode, and were the hooks attached by on_train_start?)")
        layers = []
        for d in records:
            mask = _token_mask(batch, d.unsqueeze(-1)) if self.mask_padding else None
            layers.append(_per_sample(d, mask).mean())
        return self.weight * torch.stack(layers).mean()

    def on_train_end(self, model: nn.Module) -> None:
        self.detach()


@dataclass(frozen=True)
class Density:
    """``density``: mean fraction of MLP activations with |a| > threshold (count_nonzero for threshold 0), over
    samples and layers; ``smooth``: the mean smooth-L0 value D that the loss minimises; ``layers``: activation
    modules seen per forward; ``samples``: examples measured."""

    density: float
    smooth: float
    layers: int
    samples: int


@torch.no_grad()
def activation_density(model: nn.Module, batches: Iterable[Any], *, pattern: str | None = None,
                       threshold: float = 0.0, eps: float = EPS, mask_padding: bool = True) -> Density:
    """Measure the MLP activation density of ``model`` (eval mode) over ``batches`` (mapping batches whose
    ``labels`` are ignored, or ``(inputs, targets)`` pairs)."""
    modules = find_mlp_activations(model, pattern)
    per_forward: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            per_forward.append(((out.abs() > threshold).float().mean(-1), smooth_l0(out, eps).mean(-1)))

    handles = [m.register_forward_hook(hook) for _, m in modules]
    was_training = model.training
    model.eval()
    device = _device(model)
    dens = smooth = 0.0
    count = samples = layers = 0
    try:
        for batch in batches:
            batch = _to(batch, device)
            per_forward.clear()
            if isinstance(batch, Mapping):
                model(**{k: v for k, v in batch.items() if k != "labels"})
            else:
                model(batch[0])
            layers = max(layers, len(per_forward))
            for nz, sm in per_forward:
                mask = _token_mask(batch, nz.unsqueeze(-1)) if mask_padding else None
                dens += float(_per_sample(nz, mask).sum())
                smooth += float(_per_sample(sm, mask).sum())
                count += nz.shape[0]
            samples += per_forward[0][0].shape[0] if per_forward else 0
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise PeftkitError("activation density: no MLP activation was computed (empty batches?)")
    return Density(dens / count, smooth / count, layers, samples)


__all__ = ["EPS", "Density", "DensityLoss", "activation_density", "find_mlp_activations", "smooth_l0"]
