"""MTLoRA's multi-scale task features (issue 21 item 5): task streams restart from the shared stream at every stage,
each stage's per-task features go through the task's Downsampler (1×1 conv per scale), the scales fuse; one forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import PeftkitError
from peftkit.heads.mtlora_fusion import MultiScaleTaskFeatures, fuse
from tolerance import assert_near


class TwoStage(nn.Module):
    """Two conv stages (stride 2 each): 3 → 8 channels at 8×8, then 16 channels at 4×4."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(x))


def _model() -> TwoStage:
    torch.manual_seed(0)
    model = TwoStage()
    peftkit.adapt(model, peftkit.config("mtlora", target_modules=["stage1.2", "stage2.0", "stage2.2"], r=2,
                                        tasks=["seg", "depth"], task_modules=["stage1.2", "stage2.2"], task_r=2,
                                        dropout=0.0))
    return model


def _set_task_b(model: TwoStage, layer: str, task: str, value: float | None) -> None:
    ad = model.get_submodule(layer).adapters["default"]
    with torch.no_grad():
        if value is None:
            ad.task_B[task].normal_(0, 0.5, generator=torch.Generator().manual_seed(len(layer) + len(task)))
        else:
            ad.task_B[task].fill_(value)


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _stage_features(fusion: MultiScaleTaskFeatures) -> dict[str, list[torch.Tensor]]:
    """Undo the 1×1 convs: identity Downsamplers give the raw stage features."""
    with torch.no_grad():
        for convs in fusion.downsampler.values():
            for c in convs:
                c.weight.copy_(torch.eye(c.weight.shape[0])[:, :, None, None])
        return fusion(X)


def test_task_streams_restart_from_the_shared_stream_at_every_stage() -> None:
    model = _model()
    for layer in ("stage1.2", "stage2.2"):
        _set_task_b(model, layer, "seg", None)  # seg differs from the shared stream in both stages
    ad = model.stage2.get_submodule("2").adapters["default"]
    with torch.no_grad():
        shared1 = model.stage1(X)
        h = model.stage2[1](model.stage2[0](shared1))  # stage 2's MT layer input on the shared stream
        shared2 = model.stage2[2](h)
        # official: at stage 2 the seg stream restarts from the shared one, y_seg = W·h + b + s_t·B_t·A_t·h
        want = shared2 + ad.s_task * torch.einsum("oc,bchw->bohw", ad.task_B["seg"] @ ad.task_A["seg"], h)
    f = _stage_features(MultiScaleTaskFeatures(model, ["stage1", "stage2"], [8, 16]))
    assert float((f["seg"][0] - shared1).abs().max()) > 1e-3
    assert float((want - shared2).abs().max()) > 1e-3
    assert_near(f["seg"][1], want, 64, layers=8)
    assert_near(f["depth"][0], shared1, 32, layers=6) and assert_near(f["depth"][1], shared2, 32, layers=6)
    # without the restart the split seg stream runs on into stage 2 (the old reading) and reads its own input
    g = _stage_features(MultiScaleTaskFeatures(model, ["stage1", "stage2"], [8, 16], restart=[]))
    assert float((g["seg"][1] - want).abs().max()) > 1e-3


def test_downsampler_and_fusion_against_a_hand_computation_and_training() -> None:
    model = _model()
    for layer in ("stage1.2", "stage2.2"):
        for task in ("seg", "depth"):
            _set_task_b(model, layer, task, None)
    fusion = MultiScaleTaskFeatures(model, ["stage1", "stage2"], [8, 16], channels=[4, 4])
    raw = _stage_features(MultiScaleTaskFeatures(model, ["stage1", "stage2"], [8, 16]))
    out = fusion(X)
    assert set(out) == {"seg", "depth"} and [m.shape for m in out["seg"]] == [(2, 4, 8, 8), (2, 4, 4, 4)]
    for task in ("seg", "depth"):
        for i in range(2):
            want = F.conv2d(raw[task][i], fusion.downsampler[task][i].weight)
            assert_near(out[task][i], want, 64, layers=8)
    fused = fuse(out["seg"])
    assert fused.shape == (2, 8, 8, 8)
    assert_near(fused[:, 4:], F.interpolate(out["seg"][1], (8, 8), mode="bilinear", align_corners=False), 16,
                layers=2)
    loss = sum(fuse(out[t]).pow(2).mean() for t in out)
    loss.backward()
    assert all(c.weight.grad.abs().sum() > 0 for convs in fusion.downsampler.values() for c in convs)
    ad = model.stage2.get_submodule("2").adapters["default"]
    assert ad.task_A["seg"].grad.abs().sum() > 0  # the task-specific LoRA of stage 2
    assert model.stage2[0].adapters["default"].lora_B.grad.abs().sum() > 0  # and the shared one feeding it
    assert set(fusion.last_outputs) == {"shared", "seg", "depth"}


def test_bad_input() -> None:
    model = _model()
    with pytest.raises(PeftkitError, match="one width per stage"):
        MultiScaleTaskFeatures(model, ["stage1", "stage2"], [8])
    with pytest.raises(PeftkitError, match="no module 'stage3'"):
        MultiScaleTaskFeatures(model, ["stage1", "stage3"], [8, 16])
    plain = TwoStage()
    peftkit.adapt(plain, peftkit.config("mtlora", target_modules=["stage1.2"], r=2))
    with pytest.raises(PeftkitError, match="no tasks"):
        MultiScaleTaskFeatures(plain, ["stage1"], [8])
