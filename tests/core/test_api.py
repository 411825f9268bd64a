"""The model-level API on bad input (one clear PeftkitError, model unchanged) and its bookkeeping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy
from peftkit.core.layer import AdaptedLayer
from tolerance import assert_near


def _lora(spec_name: str = "mlp", **fields) -> peftkit.AdapterConfig:
    spec = MODELS[spec_name]
    return peftkit.config("lora", **{"target_modules": spec.targets, "r": 4, **fields})


def _snapshot(model: nn.Module) -> tuple:
    return (state_copy(model), [type(m) for m in model.modules()], peftkit.adapter_names(model),
            peftkit.active_adapters(model), [n for n, p in model.named_parameters() if p.requires_grad])


def _unchanged(model: nn.Module, snap: tuple) -> bool:
    now = _snapshot(model)
    return same_state(snap[0], now[0]) and snap[1:] == now[1:]


def test_unknown_method_lists_registered_ones() -> None:
    with pytest.raises(peftkit.PeftkitError,
                       match=r"unknown method 'loraa' \(did you mean 'lora'\?\); registered methods: .*dora.*lora"):
        peftkit.config("loraa", target_modules=["fc1"])


def test_existing_adapter_name_is_rejected(mlp: nn.Module) -> None:
    peftkit.adapt(mlp, _lora(), name="a")
    perturb(mlp, seed=1)
    snap = _snapshot(mlp)
    with pytest.raises(peftkit.PeftkitError, match=r"an adapter named 'a' already exists; loaded adapters: \['a'\]"):
        peftkit.adapt(mlp, _lora(r=2), name="a")
    assert _unchanged(mlp, snap)


@pytest.mark.parametrize("name", ["", "a.b", "__base__", 3])
def test_bad_adapter_names(mlp: nn.Module, name: object) -> None:
    snap = _snapshot(mlp)
    with pytest.raises(peftkit.PeftkitError, match="adapter name must be"):
        peftkit.adapt(mlp, _lora(), name=name)  # type: ignore[arg-type]
    assert _unchanged(mlp, snap)


def test_not_a_config(mlp: nn.Module) -> None:
    with pytest.raises(peftkit.PeftkitError, match="expected an adapter config, got dict"):
        peftkit.adapt(mlp, {"target_modules": ["fc1"]})  # type: ignore[arg-type]


def test_unsupported_host_type_names_the_module() -> None:
    spec = MODELS["embedding"]
    model = spec.build()
    snap = _snapshot(model)
    with pytest.raises(peftkit.PeftkitError) as e:
        peftkit.adapt(model, peftkit.config("loha", target_modules=["emb", "proj"]))
    msg = str(e.value)
    assert "'loha' does not support Embedding layers (module 'emb')" in msg and "linear" in msg
    assert _unchanged(model, snap)


def test_error_on_a_late_target_installs_nothing(block: nn.Module) -> None:
    # the first targets plan fine, the last one fails: nothing at all may be installed
    snap = _snapshot(block)
    with pytest.raises(peftkit.PeftkitError, match=r"does not support LayerNorm layers \(module 'ln2'\)"):
        peftkit.adapt(block, peftkit.config("lora", target_modules=["q", "k", "ln2"], r=2))
    assert _unchanged(block, snap)


def test_mixed_batch_unknown_name_lists_loaded_ones(mlp: nn.Module) -> None:
    peftkit.adapt(mlp, _lora(), name="a")
    peftkit.adapt(mlp, _lora(), name="b")
    with pytest.raises(peftkit.PeftkitError, match=r"unknown adapter\(s\) \['c', 'd'\]; loaded adapters: \['a', 'b'\]"):
        with peftkit.mixed_batch(mlp, ["a", "c", None, "d"]):
            pass


def test_mixed_batch_with_merged_adapters_is_rejected(mlp: nn.Module) -> None:
    spec = MODELS["mlp"]
    peftkit.adapt(mlp, _lora(), name="a")
    peftkit.adapt(mlp, _lora(), name="b")
    perturb(mlp, seed=1)
    x = spec.input(batch=2)
    peftkit.merge(mlp)
    with torch.no_grad():
        y = mlp(x)
        with pytest.raises(peftkit.PeftkitError, match="merged adapters .*unmerge before a mixed batch"):
            with peftkit.mixed_batch(mlp, ["a", "b"]):
                mlp(x)
        assert torch.equal(mlp(x), y)  # routing was cleared on the way out
    assert all(layer.route is None for _, layer in peftkit.adapted_layers(mlp))


def test_mixed_batch_size_mismatch(mlp: nn.Module) -> None:
    peftkit.adapt(mlp, _lora(), name="a")
    with pytest.raises(peftkit.PeftkitError, match="2 adapter names given but .* batch of 4"):
        with peftkit.mixed_batch(mlp, ["a", None]):
            mlp(MODELS["mlp"].input(batch=4))


def test_set_active_and_delete_unknown_names(mlp: nn.Module) -> None:
    peftkit.adapt(mlp, _lora(), name="a")
    snap = _snapshot(mlp)
    with pytest.raises(peftkit.PeftkitError, match=r"no adapter named 'b'; loaded adapters: \['a'\]"):
        peftkit.set_active(mlp, ["a", "b"])
    with pytest.raises(peftkit.PeftkitError, match="no adapter named 'b'"):
        peftkit.delete(mlp, "b")
    with pytest.raises(peftkit.PeftkitError, match="no adapter named 'b'"):
        peftkit.save(mlp, "/nonexistent-peftkit-dir", name="b")
    assert _unchanged(mlp, snap)


def test_merge_of_non_finite_weights_changes_nothing(mlp: nn.Module) -> None:
    peftkit.adapt(mlp, _lora())
    perturb(mlp, seed=1)
    with torch.no_grad():
        mlp.fc2.adapters["default"].lora_B[0, 0] = float("inf")
    before = state_copy(mlp)
    with pytest.raises(peftkit.PeftkitError, match="non-finite weights; nothing was changed"):
        peftkit.merge(mlp)
    assert all(not layer.merged for _, layer in peftkit.adapted_layers(mlp))
    after = state_copy(mlp)
    # fc1 was merged first and then rolled back by subtraction: equal up to float rounding
    for k in before:  # W + s·B·A − s·B·A (rank ≤ 8), the inf entry of B itself unchanged
        assert_near(after[k], before[k], 8, layers=2, equal_nan=True)
    assert torch.equal(after["fc2.base_layer.weight"], before["fc2.base_layer.weight"])


def test_active_adapters_add_up() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        y0 = model(x)
    cfg = peftkit.config("lora", target_modules=["0"], r=2)
    peftkit.adapt(model, cfg, name="a")
    perturb(model, seed=1)
    peftkit.adapt(model, cfg, name="b")
    perturb(model, seed=2)
    with torch.no_grad():
        peftkit.set_active(model, "a")
        ya = model(x)
        peftkit.set_active(model, "b")
        yb = model(x)
        peftkit.set_active(model, ["a", "b"])
        torch.testing.assert_close(model(x), ya + yb - y0)
    assert {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad} == {"a", "b"}


def test_adapt_without_activating_keeps_the_active_set(mlp: nn.Module) -> None:
    peftkit.adapt(mlp, _lora(), name="a")
    peftkit.adapt(mlp, _lora(), name="b", activate=False)
    assert peftkit.active_adapters(mlp) == ["a"]
    trainable = {n for n, p in mlp.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)


def test_new_adapters_follow_the_models_train_eval_mode() -> None:
    # regression: adapting (or loading into) an eval model must not leave fresh adapter dropout active
    spec = MODELS["mlp"]
    model = spec.build()  # eval mode
    peftkit.adapt(model, _lora(dropout=0.5))
    perturb(model, seed=1)
    assert not any(m.training for m in model.modules())
    x = spec.input()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    trained = spec.build().train()
    peftkit.adapt(trained, _lora(dropout=0.5))
    assert all(m.training for m in trained.modules())


def test_delete_and_unload_restore_the_plain_model(block: nn.Module) -> None:
    spec = MODELS["block"]
    x = spec.input()
    before = state_copy(block)
    with torch.no_grad():
        y0 = block(x)
    peftkit.adapt(block, _lora("block"), name="a")
    peftkit.adapt(block, _lora("block", target_modules=["q"]), name="b")
    perturb(block, seed=1)
    peftkit.delete(block, "b")
    assert peftkit.adapter_names(block) == ["a"] and peftkit.active_adapters(block) == []
    assert list(block.attn.q.adapters) == ["a"]
    peftkit.merge(block, ["a"])
    peftkit.unload(block)
    assert not any(isinstance(m, AdaptedLayer) for m in block.modules())
    assert isinstance(block.attn.q, nn.Linear) and peftkit.adapter_names(block) == []
    now = state_copy(block)
    assert now.keys() == before.keys()
    for k in before:
        assert_near(now[k], before[k], 32, layers=3)
    with torch.no_grad():
        assert_near(block(x), y0, 32, layers=3)


def test_summary_counts(mlp: nn.Module) -> None:
    total = sum(p.numel() for p in mlp.parameters())
    peftkit.adapt(mlp, _lora(modules_to_save=["head"]), name="a")
    s = peftkit.summary(mlp)
    lora = 4 * (16 + 32) + 4 * (32 + 16)
    head = 16 * 4 + 4
    assert s.adapters == {"a": lora + head} and s.trainable == lora + head
    assert s.total == total + lora + head  # the head copy is a new module
    assert "a" in str(s) and "lora" in str(s)
