"""MTLoRA's multi-scale task-specific features — the official path from the backbone's stages to each task's decoder
(Agiza et al., CVPR 2024; github.com/scale-lab/MTLoRA ``models/swin_transformer_mtlora.py``, ``models/swin_mtl.py``).

In the official Swin model the task streams live inside each stage: the stage's last block (the one with task-specific
LoRA) starts every task stream from the shared stream, the stage's downsampling runs on them, and the stage hands one
feature map per task to the decoders, while only the shared stream goes on to the next stage. Each task then has a
``Downsampler`` — a 1×1 convolution per stage from that stage's width ``dims[i]`` to ``channels[i]`` — and its decoder
fuses the scales (HRNet head: every scale upsampled to the finest, concatenated, convolved).

:class:`MultiScaleTaskFeatures` does that around a model adapted with ``mtlora`` (tasks set, task-specific LoRA on
modules inside the stages). One call runs every stream in one forward (:func:`~peftkit.methods.mtlora.forward_tasks`)
with hooks on the model: at the input of each ``restart`` module (default: the ``stages`` modules) the task rows are
replaced by their samples' shared rows — the official restart — and the output of each ``stages`` module is taken,
per stream, as that stage's features. It returns ``{task: [Downsampler_task,i(features_i)]}``; :func:`fuse` upsamples
a task's scales to the finest and concatenates them (what the HRNet head does before its convolutions). Features are
(B, C, H, W) maps or (B, L, C) token grids with L a square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from peftkit.core.errors import PeftkitError
from peftkit.methods.mtlora import SHARED, forward_tasks, task_names


def _as_map(t: torch.Tensor, where: str) -> torch.Tensor:
    if t.dim() == 4:
        return t
    if t.dim() == 3 and math.isqrt(t.shape[1]) ** 2 == t.shape[1]:
        side = math.isqrt(t.shape[1])
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
    raise PeftkitError(f"MTLoRA stage {where!r}: features must be (B, C, H, W) or (B, L, C) with L a square, got "
                       f"{tuple(t.shape)}")


def fuse(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """One task's scales upsampled (bilinear) to the first (finest) one's size and concatenated along channels."""
    size = maps[0].shape[-2:]
    return torch.cat([m if m.shape[-2:] == size else F.interpolate(m, size, mode="bilinear", align_corners=False)
                      for m in maps], dim=1)


class MultiScaleTaskFeatures(nn.Module):
    """Per-stage task features of an MTLoRA model and each task's ``Downsampler`` (module docstring). ``stages``: the
    module names whose outputs are the stage features; ``dims``: their channel widths; ``channels``: the Downsampler's
    output widths (default ``dims``); ``restart``: where task streams restart from the shared stream (default
    ``stages``; ``[]``: never, a task stream runs on once split). The backbone stays the caller's (not a submodule)."""

    def __init__(self, model: nn.Module, stages: Sequence[str], dims: Sequence[int],
                 channels: Sequence[int] | None = None, restart: Sequence[str] | None = None) -> None:
        super().__init__()
        self.tasks = task_names(model)
        if not self.tasks:
            raise PeftkitError("MultiScaleTaskFeatures: the mtlora adapter has no tasks (MtloraConfig.tasks)")
        channels = list(dims) if channels is None else list(channels)
        if not stages or len(dims) != len(stages) or len(channels) != len(stages):
            raise PeftkitError(f"MultiScaleTaskFeatures: one width per stage: {len(stages)} stages, {len(dims)} dims, "
                               f"{len(channels)} channels")
        self.stages, self.restart = list(stages), list(stages if restart is None else restart)
        for name in {*self.stages, *self.restart}:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise PeftkitError(f"MultiScaleTaskFeatures: the model has no module {name!r}") from None
        object.__setattr__(self, "model", model)
        self.downsampler = nn.ModuleDict({t: nn.ModuleList(nn.Conv2d(d, c, 1, bias=False)
                                                           for d, c in zip(dims, channels)) for t in self.tasks})

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, list[torch.Tensor]]:
        batch = next((int(t.shape[0]) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()),
                     None)
        if batch is None:
            raise PeftkitError("MultiScaleTaskFeatures: no tensor argument with a batch dimension")
        copies = len(self.tasks) + 1
        feats: dict[str, torch.Tensor] = {}

        def restart(mod: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor) or x.shape[0] != batch * copies:
                return None
            shared = x[:batch]  # stream-major rows: every task row becomes its sample's shared row
            return (shared.repeat(copies, *([1] * (x.dim() - 1))), *inputs[1:])

        def capture(name: str) -> Any:
            def hook(mod: nn.Module, inputs: Any, out: Any) -> None:
                feats[name] = out
            return hook

        hooks = [self.model.get_submodule(n).register_forward_pre_hook(restart) for n in self.restart]
        hooks += [self.model.get_submodule(n).register_forward_hook(capture(n)) for n in self.stages]
        try:
            self.last_outputs = forward_tasks(self.model, *args, **kwargs)  # the model's own outputs, per stream
        finally:
            for h in hooks:
                h.remove()
        missing = [s for s in self.stages if s not in feats]
        if missing:
            raise PeftkitError(f"MultiScaleTaskFeatures: stage modules {missing} did not run in the model's forward")
        out: dict[str, list[torch.Tensor]] = {}
        for k, task in enumerate([SHARED, *self.tasks]):
            if task == SHARED:
                continue
            maps = [_as_map(feats[s][k * batch:(k + 1) * batch], s) for s in self.stages]
            out[task] = [conv(m) for conv, m in zip(self.downsampler[task], maps)]
        return out


class MultiTaskClassifier(nn.Module):
    """One classifier per task over an MTLoRA backbone's fused multi-scale task features: for task t,
    ``logits_t = Linear(pool(ReLU(Conv1×1(fuse(Downsampler_t(stage features of stream t))))))`` — the HRNet-style
    fusion head of the official decoders, pooled for a label per image. ``classes``: {task: number of classes}, in
    the adapter's task order; ``hidden``: the fused map's 1×1 conv width. ``forward(images, labels=None)`` returns
    ``{"logits": {task: [B, C_t]}, "loss": Σ_t cross-entropy}`` (loss with ``labels`` [B, T], column t = task t).
    The backbone is a submodule (its adapters train with the heads); its own output is not used."""

    def __init__(self, model: nn.Module, stages: Sequence[str], dims: Sequence[int], classes: dict[str, int], *,
                 channels: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.features = MultiScaleTaskFeatures(model, stages, dims, channels=[channels] * len(stages))
        if list(classes) != self.features.tasks or any(int(c) < 2 for c in classes.values()):
            raise PeftkitError(f"MultiTaskClassifier: one class count >= 2 per task of the adapter, in its order "
                               f"{self.features.tasks}; got {classes}")
        self.backbone = model
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Conv2d(channels * len(stages), hidden, 1), nn.ReLU(),
                                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, c))
                                    for t, c in classes.items()})

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        feats = self.features(images)
        logits = {t: self.heads[t](fuse(feats[t])) for t in self.heads}
        out: dict[str, Any] = {"logits": logits}
        if labels is not None:
            if labels.dim() != 2 or labels.shape[1] != len(logits):
                raise PeftkitError(f"MultiTaskClassifier: labels must be [B, {len(logits)}] (one column per task), "
                                   f"got {tuple(labels.shape)}")
            out["loss"] = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits.values()))
        return out


__all__ = ["MultiScaleTaskFeatures", "MultiTaskClassifier", "fuse"]
