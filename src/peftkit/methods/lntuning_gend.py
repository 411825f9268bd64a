"""GenD's option of LN tuning (:mod:`peftkit.methods.lntuning` is the method): the uniformity and alignment losses
on L2-normalised features (Wang & Isola 2020), the "LinearNorm" head, and :class:`GenDLoss`, the procedure that adds
the two losses on the input of the head. It depends on the core alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.errors import PeftkitError
from peftkit.core.procedure import Procedure

if TYPE_CHECKING:
    from peftkit.methods.lntuning import LnTuningConfig


def _pair_sq_dists(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """‖z_i − z_j‖² for all pairs i < j (Gram form: no B×B×d tensor, smooth at z_i = z_j) and the (2, P) indices."""
    sq = z.pow(2).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.t()).clamp_min(0)
    iu = torch.triu_indices(z.shape[0], z.shape[0], 1, device=z.device)
    return d2[iu[0], iu[1]], iu


def uniformity_loss(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean_{i<j} exp(−t‖z_i − z_j‖²), the mean clamped at 1e-6 (Wang & Isola 2020; GenD's L_unif)."""
    if z.shape[0] < 2:
        return z.sum() * 0
    d2, _ = _pair_sq_dists(z)
    return d2.mul(-t).exp().mean().clamp(min=1e-6).log()


def alignment_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean ‖z_i − z_j‖² over pairs i < j with the same label (α = 2); 0 when there is no such pair."""
    if z.shape[0] < 2:
        return z.sum() * 0
    d2, iu = _pair_sq_dists(z)
    same = labels[iu[0]] == labels[iu[1]]
    return d2[same].mean() if bool(same.any()) else z.sum() * 0


class LinearNorm(nn.Linear):
    """GenD's "LinearNorm" head: logits = W·(f/‖f‖₂) + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=-1), self.weight, self.bias)


def use_linear_norm_head(model: nn.Module, name: str) -> nn.Module:
    """Replace the ``nn.Linear`` module ``name`` of ``model`` by a :class:`LinearNorm` holding the very same
    parameters (in place, before :func:`peftkit.adapt`); returns the model."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise PeftkitError(f"use_linear_norm_head: the model has no module {name!r}") from None
    if type(old) is not nn.Linear:
        raise PeftkitError(f"use_linear_norm_head: {name!r} is a {type(old).__name__}, not an nn.Linear (adapt after)")
    new = LinearNorm(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    new.weight, new.bias = old.weight, old.bias
    new.train(old.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


class GenDLoss(Procedure):
    """Adds ``unif_weight·L_unif(z) + align_weight·L_align(z, y)`` with z = f/‖f‖₂, f the (B, d) input of
    ``feature_module``, y the batch labels (``batch["labels"]`` or the second item of a pair)."""

    def __init__(self, model: nn.Module, config: LnTuningConfig) -> None:
        self.unif_weight, self.align_weight = config.unif_weight, config.align_weight
        self.module_name = config.feature_module or (config.modules_to_save or [None])[0]
        self.module: nn.Module | None = None
        self.features: torch.Tensor | None = None
        self._handle: Any = None
        if self.unif_weight == 0 and self.align_weight == 0:
            return
        if self.module_name is None:
            raise PeftkitError("LnTuningConfig.unif_weight / align_weight need feature_module (the head whose input "
                               "features they read) or a modules_to_save entry")
        try:
            self.module = model.get_submodule(self.module_name)
        except AttributeError:
            raise PeftkitError(f"LnTuningConfig.feature_module: the model has no module {self.module_name!r}") from None

    def _grab(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self.features = args[0] if args else None

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        if self.module is not None and self._handle is None:
            self._handle = self.module.register_forward_pre_hook(self._grab)

    def on_step_start(self, model: nn.Module, step: int) -> None:
        self.features = None

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        if self.module is None:
            return None
        f = self.features
        self.features = None
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            raise PeftkitError(
                f"GenD losses: the input of {self.module_name!r} must be a (batch, features) tensor, got "
                f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}; set feature_module to a "
                f"module that receives pooled features"
            )
        z = F.normalize(f.float(), dim=-1)
        loss = self.unif_weight * uniformity_loss(z) if self.unif_weight else z.sum() * 0
        if self.align_weight:
            labels = batch.get("labels") if isinstance(batch, Mapping) else batch[1]
            if labels is None:
                raise PeftkitError("GenD alignment loss: the batch has no labels")
            loss = loss + self.align_weight * alignment_loss(z, labels.to(z.device))
        return loss

    def on_train_end(self, model: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
