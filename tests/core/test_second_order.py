"""Second-order gradients (``create_graph=True``): the fused kernels refuse them with a clear error that names the
way out, and inside ``peftkit.unfused()`` every method on the fused path gives the same second-order gradients as
plain autograd through the layer's own math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from conformance.models import NormFeedForward
from peftkit.core.adapter import fused_allowed

FUSED = {  # methods with a hand-written fused backward, and a config that puts them on it
    "lora": {},
    "dora": {},
    "kron": {},
    "svd": {},
    "tlora": {},
    "ia3": {"feedforward_modules": ["down"]},
    "paca": {"r": 4},
}


def _model(method: str) -> nn.Module:
    model = NormFeedForward().double()
    peftkit.adapt(model, peftkit.config(method, target_modules=["up", "down"], **FUSED[method]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model.train()


def _penalty_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor | None]:
    """∂/∂θ of ‖∂L/∂θ‖² — a gradient penalty, which needs the backward's own graph."""
    params = peftkit.trainable_parameters(model)
    loss = model(x).pow(2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return list(torch.autograd.grad(sum(g.pow(2).sum() for g in grads), params, allow_unused=True))


@pytest.mark.parametrize("method", list(FUSED))
def test_fused_kernels_refuse_second_order_gradients_with_the_way_out(method: str) -> None:
    model = _model(method)
    x = torch.randn(64, 16, dtype=torch.float64)  # ≥ d_out rows: the fused paths that need them run
    with pytest.raises(peftkit.PeftkitError, match="peftkit.unfused"):
        _penalty_grads(model, x)
    model.zero_grad()
    model(x).pow(2).mean().backward()  # first-order training is unaffected
    assert all(p.grad is not None for p in peftkit.trainable_parameters(model))


@pytest.mark.parametrize("method", list(FUSED))
def test_unfused_gives_second_order_gradients_of_the_generic_path(method: str) -> None:
    model = _model(method)
    x = torch.randn(64, 16, dtype=torch.float64)
    assert fused_allowed()
    with peftkit.unfused():
        assert not fused_allowed()
        got = _penalty_grads(model, x)
        y_unfused = model(x).detach()
    assert fused_allowed()
    torch.testing.assert_close(y_unfused, model(x).detach(), rtol=1e-10, atol=1e-12)  # same outputs as fused
    # reference: the generic path reached another way (a mixed batch naming the adapter for every row runs
    # base + delta with no fused kernel), so the comparison is between two runs of plain autograd
    with peftkit.mixed_batch(model, ["default"] * 64):
        ref = _penalty_grads(model, x)
    assert any(g is not None and g.abs().sum() > 0 for g in got)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_unfused_second_order_matches_a_hand_written_lora() -> None:
    """LoRA's second-order gradients inside ``unfused`` equal those of y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ written out."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 6).double()
    model = nn.Sequential(lin)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["0"], r=2, alpha=4))
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.lora_B.normal_()
    x = torch.randn(16, 8, dtype=torch.float64)
    a, b = ad.lora_A, ad.lora_B

    def manual() -> torch.Tensor:
        return F.linear(x, lin.weight, lin.bias) + 2.0 * (x @ a.t()) @ b.t()

    with peftkit.unfused():
        got = _penalty_grads(model, x)
    loss = manual().pow(2).mean()
    grads = torch.autograd.grad(loss, [a, b], create_graph=True)
    ref = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), [a, b])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
