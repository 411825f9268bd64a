"""Polyhistor-Lite (shared/methods/activation-space-and-procedures.md §12 "Sanity"): Kronecker shapes are correct per
stage; the parameter count is independent of the stage widths apart from the S_l terms. Plus: identity at init, the
layer against a hand-written reference (torch.kron of the hypernetworks' templates), hypernetworks shared by every
layer and task, per-sample task ids equal per-task runs and touch only their own task embedding, save/load, and clear
errors that change nothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from conformance.models import same_state, state_copy
from tolerance import assert_near


class Stages(nn.Module):
    """Three 'stages' of doubling width (16 → 32 → 64), each a Linear + GELU, on (B, T, 8) input."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        dims = (8, *widths)
        self.stages = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = F.gelu(s(x))
        return x


def _model(widths: tuple[int, ...] = (16, 32, 64), perturb: bool = True, **fields) -> nn.Module:
    torch.manual_seed(0)
    model = Stages(widths).eval()
    cfg = dict(target_modules=["stages.0", "stages.1", "stages.2"][:len(widths)], num_tasks=3, template_bottleneck=4,
               hyper_rank=2, embed_dim=6)
    cfg.update(fields)
    peftkit.adapt(model, peftkit.config("polyhistor", **cfg))
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in peftkit.trainable_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _x(b: int = 4) -> torch.Tensor:
    return torch.randn(b, 3, 8, generator=torch.Generator().manual_seed(2))


def test_identity_at_init() -> None:
    model = _model(perturb=False)
    torch.manual_seed(0)
    base = Stages().eval()
    x = _x()
    assert torch.equal(model(x), base(x))
    with peftkit.condition(model, [2, 0, 1, 1]):
        assert torch.equal(model(x), base(x))


def test_kronecker_shapes_per_stage() -> None:
    model = _model()
    for layer, d, a in zip(model.stages, (16, 32, 64), (1, 2, 4)):
        ad = layer.adapters["default"]
        assert ad.d0 == 16 and ad.a == a
        assert ad.scale_down.shape == ad.scale_up.shape == (a, a)
        down, up = ad.weights(torch.tensor([0, 2]))
        assert down.shape == (2, 4 * a, d) and up.shape == (2, d, 4 * a)  # m_l = a·m₀, d_l = a·d₀


def test_layer_matches_a_hand_written_reference() -> None:
    model = _model()
    layer = model.stages[1]
    ad = layer.adapters["default"]
    store = ad.shared
    inp = torch.randn(2, 5, 16)
    task = 1

    def lin(key: str, c: torch.Tensor) -> torch.Tensor:
        return c @ store._parameters[f"{key}_weight"].t() + store._parameters[f"{key}_bias"]

    with torch.no_grad():
        c = torch.cat([store._parameters["task_embedding"][task], ad.layer_embedding])
        kd = lin("hd_a", c).view(4, 2) @ lin("hd_b", c).view(2, 16) / math.sqrt(2)
        ku = lin("hu_a", c).view(16, 2) @ lin("hu_b", c).view(2, 4) / math.sqrt(2)
        down = torch.kron(ad.scale_down, kd) / math.sqrt(32)
        up = torch.kron(ad.scale_up, ku) / math.sqrt(8)
        y_base = layer.base_layer(inp)
        ref = y_base + F.gelu(y_base @ down.t()) @ up.t()
        with peftkit.condition(model, [task, task]):
            torch.testing.assert_close(layer(inp), ref, rtol=1e-5, atol=1e-5)


def test_parameter_count_depends_on_widths_only_through_the_kernels() -> None:
    counts = {}
    for widths in ((16, 32, 64), (16, 48, 128)):
        model = _model(widths, perturb=False)
        counts[widths] = peftkit.summary(model).trainable
        c = 2 * 6
        shared = 3 * 6 + 2 * (c + 1) * 2 * (4 + 16)  # T·e + 2·(c + 1)·k·(m₀ + d₀)
        per_layer = sum(2 * (w // 16) ** 2 + 6 for w in widths)
        assert counts[widths] == shared + per_layer
    kernels = {w: sum(2 * (d // 16) ** 2 for d in w) for w in counts}
    assert counts[(16, 48, 128)] - counts[(16, 32, 64)] == kernels[(16, 48, 128)] - kernels[(16, 32, 64)]


def test_hypernetworks_are_shared_by_every_layer_and_task() -> None:
    model = _model()
    stores = {id(layer.adapters["default"].shared) for layer in model.stages}
    assert len(stores) == 1
    store = model.stages[0].adapters["default"].shared
    with peftkit.condition(model, [0, 0, 2, 2]):
        model(_x()).square().sum().backward()
    emb = store._parameters["task_embedding"].grad
    assert emb[[0, 2]].abs().sum(1).gt(0).all() and not emb[1].any()  # only the tasks in the batch
    for key in ("hd_a", "hd_b", "hu_a", "hu_b"):
        assert store._parameters[f"{key}_weight"].grad.abs().sum() > 0
    for layer in model.stages:
        ad = layer.adapters["default"]
        assert ad.scale_down.grad.abs().sum() > 0 and ad.layer_embedding.grad.abs().sum() > 0


def test_mixed_task_ids_equal_per_task_runs() -> None:
    model = _model()
    x = _x()
    ids = [2, 0, 1, 2]
    with torch.no_grad():
        with peftkit.condition(model, ids):
            y = model(x)
        for i, t in enumerate(ids):
            with peftkit.condition(model, [t]):
                assert_near(y[i:i + 1], model(x[i:i + 1]), 32, layers=3)
        outs = []
        for t in range(3):
            with peftkit.condition(model, [t] * 4):
                outs.append(model(x))
        assert all(not torch.allclose(outs[i], outs[j]) for i in range(3) for j in range(i))
        torch.testing.assert_close(model(x), outs[0], rtol=0, atol=0)  # default_task = 0


def test_save_load_under_task_ids(tmp_path) -> None:
    model = _model(default_task=None)
    x = _x()
    with torch.no_grad(), peftkit.condition(model, [1, 2, 0, 1]):
        y = model(x)
    peftkit.save(model, tmp_path / "ad")
    torch.manual_seed(0)
    fresh = Stages().eval()
    peftkit.load(fresh, tmp_path / "ad")
    with torch.no_grad(), peftkit.condition(fresh, [1, 2, 0, 1]):
        assert torch.equal(fresh(x), y)


def test_errors_change_nothing() -> None:
    model = _model(default_task=None)
    x = _x()
    before = state_copy(model)
    for ids, match in [([0, 3, 1, 1], r"task ids \[3\] are out of range 0..2"),
                       ([0.0, 1.0, 1.0, 1.0], "1-D sequence of integers")]:
        with pytest.raises(peftkit.PeftkitError, match=match), peftkit.condition(model, ids):
            pytest.fail("the block must not run")
    with pytest.raises(peftkit.PeftkitError, match="needs a task id per sample"):
        model(x)
    with pytest.raises(peftkit.PeftkitError, match="not mergeable"):
        peftkit.merge(model)
    assert same_state(before, state_copy(model))
    with pytest.raises(peftkit.PeftkitError, match=r"default_task must be in 0..1"):
        peftkit.config("polyhistor", num_tasks=2, default_task=2)
    with pytest.raises(peftkit.PeftkitError, match="hyper_rank must be > 0"):
        peftkit.config("polyhistor", hyper_rank=0)
