"""Conditional SSF (shared/methods/activation-space-and-procedures.md §4 "Sanity"): identity at γ = 1, β = 0;
different condition ids select different parameters and gradients reach only the rows of the ids in the batch; plus
y = γ[c] ⊙ h + β[c] against a reference (Linear on (B, T, d), Conv2d channel-wise), a mixed-id batch equal to
per-sample runs (also inside ``mixed_batch``), the base condition, the modality-mask helper, save/load, parameter
counts, and clear errors (ids out of range, wrong shape, missing ids) that change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
import peftkit.methods.conditional_ssf as cssf
from conformance.models import MODELS, same_state, state_copy
from tolerance import assert_near


def _perturb(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * std)


def _block(c: int = 4, **fields) -> tuple[nn.Module, torch.Tensor]:
    spec = MODELS["block"]
    model = spec.build()
    peftkit.adapt(model, peftkit.config("conditional_ssf", target_modules=spec.targets, num_conditions=c, **fields))
    return model, spec.input(batch=5)


def test_identity_init_is_the_base_bit_for_bit() -> None:
    model, x = _block()
    y0 = MODELS["block"].build()(x)
    assert torch.equal(model(x), y0)
    with peftkit.condition(model, [0, 3, 1, 2, 3]):
        assert torch.equal(model(x), y0)


def test_ssf_init_statistics() -> None:
    model = nn.Sequential(nn.Linear(8, 400))
    peftkit.adapt(model, peftkit.config("conditional_ssf", target_modules=["0"], num_conditions=5, init="ssf"))
    a = model[0].adapters["default"]
    assert a.ssf_scale.shape == a.ssf_shift.shape == (5, 400)
    g, b = a.ssf_scale.detach(), a.ssf_shift.detach()
    assert abs(float(g.mean()) - 1) < 2e-3 and abs(float(g.std()) - 0.02) < 2e-3
    assert abs(float(b.mean())) < 2e-3 and abs(float(b.std()) - 0.02) < 2e-3


def test_linear_and_conv_match_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Conv1d(3, 4, 2)).eval()
    peftkit.adapt(model, peftkit.config("conditional_ssf", target_modules=["0", "1"], num_conditions=3))
    _perturb(model)
    ids = torch.tensor([2, 0, 2, 1])
    a0, a1 = model[0].adapters["default"], model[1].adapters["default"]
    x = torch.randn(4, 7, 6)
    with torch.no_grad(), peftkit.condition(model, ids):
        y = model[0](x)
        ref = a0.ssf_scale[ids][:, None, :] * model[0].base_layer(x) + a0.ssf_shift[ids][:, None, :]
        assert_near(y, ref, 32, layers=3)
        z = torch.randn(4, 3, 9)
        ref = a1.ssf_scale[ids][:, :, None] * model[1].base_layer(z) + a1.ssf_shift[ids][:, :, None]
        assert_near(model[1](z), ref, 32, layers=3)  # per channel, over all positions


def test_norm_output_matches_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(6)).eval()
    peftkit.adapt(model, peftkit.config("conditional_ssf", target_modules=["0"], num_conditions=2))
    _perturb(model)
    a, ids, x = model[0].adapters["default"], torch.tensor([1, 0, 1]), torch.randn(3, 4, 6)
    with torch.no_grad(), peftkit.condition(model, ids):
        ref = a.ssf_scale[ids][:, None, :] * model[0].base_layer(x) + a.ssf_shift[ids][:, None, :]
        assert_near(model(x), ref, 32, layers=3)


def test_mixed_ids_equal_per_sample_runs_and_select_different_parameters() -> None:
    model, x = _block()
    _perturb(model)
    ids = [3, 0, 1, 3, 2]
    with torch.no_grad(), peftkit.condition(model, ids):
        y = model(x)
    for i, c in enumerate(ids):
        with torch.no_grad(), peftkit.condition(model, [c]):
            assert_near(y[i:i + 1], model(x[i:i + 1]), 32, layers=3)
    with torch.no_grad():
        outs = []
        for c in range(4):
            with peftkit.condition(model, [c] * 5):
                outs.append(model(x))
    assert all(not torch.allclose(outs[i], outs[j]) for i in range(4) for j in range(i))
    with torch.no_grad():  # outside a condition block: the default condition (0)
        torch.testing.assert_close(model(x), outs[0], rtol=0, atol=0)


def test_gradients_reach_only_the_rows_of_the_ids_in_the_batch() -> None:
    model, x = _block()
    _perturb(model)
    with peftkit.condition(model, [2, 0, 2, 2, 0]):
        model(x).square().sum().backward()
    for p in peftkit.trainable_parameters(model):
        assert p.grad[[0, 2]].abs().sum(dim=1).gt(0).all()
        assert torch.equal(p.grad[[1, 3]], torch.zeros_like(p.grad[[1, 3]]))


def test_inside_mixed_batch() -> None:
    model, x = _block()
    peftkit.adapt(model, peftkit.config("conditional_ssf", target_modules=["q", "fc2"], num_conditions=2), name="b")
    peftkit.set_active(model, ["default", "b"])
    _perturb(model)
    names, ids = ["b", "default", None, "default", "b"], [1, 3, 2, 0, 0]
    with torch.no_grad(), peftkit.mixed_batch(model, names), peftkit.condition(model, ids):
        y = model(x)
    for i, (n, c) in enumerate(zip(names, ids)):
        with torch.no_grad():
            if n is None:
                with peftkit.disable(model):
                    ref = model(x[i:i + 1])
            else:
                peftkit.set_active(model, n)
                with peftkit.condition(model, [c]):
                    ref = model(x[i:i + 1])
        assert_near(y[i:i + 1], ref, 32, layers=3)
    # "b" has 2 conditions: an id of 3 is fine for a sample routed to "default" but not for one routed to "b".
    # A condition block entered first checks the active adapters ("default" alone here), the mixed batch then
    # checks each routed adapter on its own samples
    peftkit.set_active(model, "default")
    with torch.no_grad(), peftkit.condition(model, ids), peftkit.mixed_batch(model, names):  # the other order
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    bad = [3, 1, 2, 0, 0]
    with pytest.raises(peftkit.PeftkitError, match=r"adapter 'b' on 'attn.q': condition ids \[3\] are out of range"):
        with peftkit.mixed_batch(model, names), peftkit.condition(model, bad):
            pass
    with pytest.raises(peftkit.PeftkitError, match=r"adapter 'b' on 'attn.q': condition ids \[3\] are out of range"):
        with peftkit.condition(model, bad), peftkit.mixed_batch(model, names):
            pass
    assert all(layer.condition is None and layer.route is None for _, layer in peftkit.adapted_layers(model))


def test_base_condition_and_modality_ids() -> None:
    present = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1]], dtype=torch.bool)
    ids = cssf.condition_ids(present)
    assert ids.tolist() == [3, 2, 1, 0, 3]
    # M = 2 modalities: the three incomplete patterns own parameters, the full one (id 3) is the unmodified network
    model, x = _block(c=3, base_condition=3)
    _perturb(model)
    y0 = MODELS["block"].build()(x)
    with torch.no_grad(), peftkit.condition(model, ids):
        y = model(x)
    torch.testing.assert_close(y[[0, 4]], y0[[0, 4]], rtol=0, atol=0)
    assert not torch.allclose(y[1:4], y0[1:4])
    assert peftkit.summary(model).trainable == sum(2 * 3 * d for d in (16, 16, 16, 16, 32, 16))


def test_save_load_under_conditions(tmp_path) -> None:
    model, x = _block(default_condition=None)
    _perturb(model)
    ids = [1, 2, 3, 0, 1]
    with torch.no_grad(), peftkit.condition(model, ids):
        y = model(x)
    peftkit.save(model, tmp_path / "ad")
    fresh = MODELS["block"].build()
    peftkit.load(fresh, tmp_path / "ad")
    with torch.no_grad(), peftkit.condition(fresh, ids):
        assert torch.equal(fresh(x), y)


def test_bad_ids_are_refused_and_change_nothing() -> None:
    model, x = _block(default_condition=None)
    _perturb(model)
    before = state_copy(model)
    layers = [layer for _, layer in peftkit.adapted_layers(model)]
    for bad, match in [([0, 4, 1, 1, 1], r"\[4\] are out of range; num_conditions=4 allows 0..3"),
                       ([0, -1, 1, 1, 1], r"\[-1\] are out of range"),
                       ([[0, 1]], "1-D sequence of integers"), ([0.0, 1.0], "1-D sequence of integers"),
                       ([True, False], "1-D sequence of integers")]:
        with pytest.raises(peftkit.PeftkitError, match=match):
            with peftkit.condition(model, bad):
                pytest.fail("the block must not run")
        assert all(layer.condition is None for layer in layers)
    with pytest.raises(peftkit.PeftkitError, match="3 condition ids given but layer 'attn.q' sees a batch of 5"):
        with peftkit.condition(model, [0, 1, 2]):
            model(x)
    with pytest.raises(peftkit.PeftkitError, match="needs a condition id per sample"):
        model(x)
    assert same_state(before, state_copy(model))
    plain = MODELS["mlp"].build()
    peftkit.adapt(plain, peftkit.config("lora", target_modules=["fc1"]))
    with pytest.raises(peftkit.PeftkitError, match="no adapter of this model reads condition ids"):
        with peftkit.condition(plain, [0]):
            pass
    with pytest.raises(peftkit.PeftkitError, match="base_condition must lie outside 0..3"):
        peftkit.config("conditional_ssf", num_conditions=4, base_condition=2)
    with pytest.raises(peftkit.PeftkitError, match="default_condition must be in 0..3"):
        peftkit.config("conditional_ssf", num_conditions=4, default_condition=4)


def test_nested_condition_blocks_restore_the_outer_ids() -> None:
    model, x = _block()
    _perturb(model)
    with torch.no_grad(), peftkit.condition(model, [1] * 5):
        y1 = model(x)
        with peftkit.condition(model, [2] * 5):
            y2 = model(x)
        torch.testing.assert_close(model(x), y1, rtol=0, atol=0)
    assert not torch.allclose(y1, y2)
    assert all(layer.condition is None for _, layer in peftkit.adapted_layers(model))
