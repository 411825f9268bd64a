"""MAM adapter: prefix tuning + a scaled parallel adapter on the FFN, assembled from peftkit's own prefix_tuning and
parallel_adapter — its output equals those two adapters active together with the same weights (at init: the prefix
alone), its count is their sum; save/load, learned scaling, errors."""

from __future__ import annotations

import pytest
import torch

import peftkit
from conformance.models import MODELS, perturb, tiny_llama
from peftkit.core.errors import PeftkitError
from peftkit.core.model_level import model_adapters
from tolerance import assert_near

SMALL = {"prefix_length": 4, "prefix_bottleneck_size": 8, "reduction_factor": 4.0}
IDS = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))


def _mam(factory=lambda: tiny_llama(hidden=32), perturbed: bool = True, **fields):
    model = factory()
    peftkit.adapt(model, peftkit.config("mam", **{**SMALL, **fields}))
    if perturbed:
        perturb(model, seed=1)
    return model, model_adapters(model)["default"]


def _pieces(mam, factory=lambda: tiny_llama(hidden=32), scaling: float | str = 4.0):
    """The same model with peftkit's prefix_tuning ("p") and parallel_adapter ("a") holding MAM's weights, both
    active (a plain list of adapters sums them)."""
    ref = factory()
    peftkit.adapt(ref, peftkit.config("prefix_tuning", num_virtual_tokens=4, encoder_hidden_size=8), name="p")
    peftkit.adapt(ref, peftkit.config("parallel_adapter", target_modules=["down_proj"], bottleneck_size=8,
                                      non_linearity="relu", scaling=scaling), name="a")
    model_adapters(ref)["p"].load_state_dict(mam.prefix.state_dict())
    for i, part in enumerate(mam.layer_parts["adapter"]):
        ref.model.layers[i].mlp.down_proj.adapters["a"].load_state_dict(part.adapter.state_dict())
    peftkit.set_active(ref, ["p", "a"])
    return ref


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


def test_mam_equals_prefix_tuning_plus_parallel_adapter() -> None:
    model, mam = _mam()
    assert [p.adapter.m for p in mam.layer_parts["adapter"]] == [8, 8]  # d = 32, reduction_factor 4
    assert_near(_logits(model), _logits(_pieces(mam)), 64, layers=6)


def test_at_init_mam_is_the_prefix_alone() -> None:
    model, mam = _mam(perturbed=False)
    ref = tiny_llama(hidden=32)
    peftkit.adapt(ref, peftkit.config("prefix_tuning", num_virtual_tokens=4, encoder_hidden_size=8))
    model_adapters(ref)["default"].load_state_dict(mam.prefix.state_dict())
    assert_near(_logits(model), _logits(ref), 64, layers=6)
    assert not torch.allclose(_logits(model), _logits(tiny_llama(hidden=32)), rtol=0, atol=1e-5)


def test_count_is_the_sum_of_the_pieces_and_learned_scaling() -> None:
    model, mam = _mam(scaling="learned")
    ref = _pieces(mam, scaling="learned")
    assert peftkit.summary(model).trainable == peftkit.summary(ref).trainable == (
        4 * 32 + 33 * 8 + 9 * 2 * 2 * 16 + 2 * (8 * (64 + 32) + 1))  # prefix (2 layers, d_kv = 2 heads · 8) + PA
    assert_near(_logits(model), _logits(ref), 64, layers=6)


def test_gpt2_and_save_load(tmp_path) -> None:
    build = MODELS["gpt2"].build
    model, mam = _mam(factory=build)
    assert len(mam.layer_parts["adapter"]) == 1  # h.0.mlp.c_proj
    peftkit.save(model, tmp_path / "m")
    fresh = build()
    peftkit.load(fresh, tmp_path / "m")
    ids = IDS % 40
    with torch.no_grad():
        assert torch.equal(fresh(ids).last_hidden_state, model(ids).last_hidden_state)
    with peftkit.disable(model), torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, build()(ids).last_hidden_state)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(PeftkitError, match="reduction_factor must be > 0"):
        peftkit.config("mam", reduction_factor=0.0)
    with pytest.raises(PeftkitError, match="reduction_factor"):
        _mam(reduction_factor=64.0)
    with pytest.raises(PeftkitError, match="matched no module|closest"):
        _mam(adapter_modules=["no_such_module"])
