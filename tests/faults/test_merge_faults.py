"""Fault injection on merging (issue 18): merge/unmerge is exact bookkeeping — a name given twice or an unknown name
is an error, a merged adapter cannot be trained or edited out of step with the base weight, and a refused merge
leaves every weight bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit


def _model(layers: int = 3, width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    peftkit.adapt(model, peftkit.config("lora", target_modules=[str(i) for i in range(layers)], r=4, alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in peftkit.adapter_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def _base(model: nn.Module) -> dict[str, torch.Tensor]:
    return {p: layer.base_layer.weight.detach().clone() for p, layer in peftkit.adapted_layers(model)}


def _bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


def test_a_name_given_twice_is_refused_and_nothing_merges() -> None:
    model = _model()
    before = _base(model)
    with pytest.raises(peftkit.PeftkitError, match="'default' named more than once"):
        peftkit.merge(model, ["default", "default"])
    assert _bit_identical(before, _base(model))
    assert all(not layer.merged for _, layer in peftkit.adapted_layers(model))
    peftkit.merge(model, ["default"])
    with pytest.raises(peftkit.PeftkitError, match="named more than once"):
        peftkit.unmerge(model, ["default", "default"])


def test_unmerge_of_an_unknown_name_is_an_error_like_merge() -> None:
    model = _model()
    with pytest.raises(peftkit.PeftkitError, match="nosuch"):
        peftkit.merge(model, ["nosuch"])
    peftkit.merge(model)
    with pytest.raises(peftkit.PeftkitError, match="nosuch"):
        peftkit.unmerge(model, ["nosuch"])
    assert all(layer.merged == ["default"] for _, layer in peftkit.adapted_layers(model))


def test_a_merged_adapter_is_frozen_and_unfrozen_by_unmerge() -> None:
    model = _model()
    params = [p for _, layer in peftkit.adapted_layers(model) for p in layer.adapters["default"].parameters()]
    assert all(p.requires_grad for p in params)
    opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=1.0)
    before = _base(model)
    peftkit.merge(model)
    assert not any(p.requires_grad for p in params)
    peftkit.set_active(model, "default")  # refreshing the trainable set keeps a merged adapter frozen
    assert not any(p.requires_grad for p in params)
    kept = [p.detach().clone() for p in params]
    assert not model(torch.randn(4, 32)).requires_grad  # nothing to train while merged: a step changes nothing
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(kept, params))
    peftkit.unmerge(model)
    assert all(p.requires_grad for p in params)
    assert all(torch.allclose(before[k], w, atol=1e-6) for k, w in _base(model).items())


def test_editing_a_merged_adapter_in_place_does_not_corrupt_the_base_weight() -> None:
    """The fault round's case: lora_B edited while merged, then unmerge — the base weight was off by 0.22."""
    model = _model()
    before = _base(model)
    x = torch.randn(4, 32)
    peftkit.merge(model)
    with torch.no_grad():
        model[0].adapters["default"].lora_B.add_(1.0)
    peftkit.unmerge(model)
    err = max((before[k] - w).abs().max().item() for k, w in _base(model).items())
    assert err < 1e-6, f"unmerge left the base weight off by {err}"
    # the edit itself stays in the adapter and now takes effect (unmerged forward = base + edited adapter)
    with torch.no_grad():
        y = model(x)
        peftkit.merge(model)
        assert torch.allclose(model(x), y, atol=1e-5)


@pytest.mark.parametrize("bad_layer", [0, 2])
def test_a_refused_merge_leaves_every_weight_bit_identical(bad_layer: int) -> None:
    """NaN in one layer's adapter: the model-level merge checks every layer before writing any (the fault round saw
    463 of 2,048 elements of an earlier layer changed by 1.5e-8: merged, then rolled back by subtraction)."""
    model = _model(layers=3, width=32)
    with torch.no_grad():
        model[bad_layer].adapters["default"].lora_B[0, 0] = float("nan")
    before = _base(model)
    biases = {i: m.base_layer.bias.detach().clone() for i, m in enumerate(model)}
    with pytest.raises(peftkit.PeftkitError, match="non-finite weights; nothing was changed"):
        peftkit.merge(model)
    assert _bit_identical(before, _base(model))
    assert all(torch.equal(biases[i], m.base_layer.bias) for i, m in enumerate(model))
    assert all(not layer.merged for _, layer in peftkit.adapted_layers(model))
    assert all(p.requires_grad for _, layer in peftkit.adapted_layers(model)
               for p in layer.adapters["default"].parameters())


def test_unmerge_restores_the_weights_and_merge_unmerge_cycles_do_not_drift() -> None:
    model = _model()
    before = _base(model)
    for _ in range(5):
        peftkit.merge(model)
        peftkit.unmerge(model)
    assert all(torch.allclose(before[k], w, atol=1e-6) for k, w in _base(model).items())
