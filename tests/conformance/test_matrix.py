"""The conformance matrix: every registered method x every tiny host model it supports x every shared check.

A method is covered by registering: the cases come from ``peftkit.core.registry.all_methods()`` and a method runs
on a model when the model's host kinds are in ``MethodInfo.hosts``. Each method gets the generic config
``{"target_modules": [...]}`` (plus the model's generic extras and any ``METHOD_OVERRIDES`` entry), and its
adapter tensors are perturbed with noise so that the checks do not pass merely because an update is zero.
Where a method declares it cannot satisfy a check (``mergeable=False``, ``init_is_identity=False``) the matrix
asserts the declared behaviour instead. Model-level methods (``model_level=True``: virtual tokens, key/value prefixes)
run on the Hugging Face tiny models (``TinyModel.hf``), adapt no layers, refuse mixed batches, and where they put
positions in front of the output (``ModelAdapter.added_positions``) the matrix compares the original positions.
"""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch

import peftkit
from conformance.models import MODELS, TinyModel, matrix_config_fields, perturb, same_state, state_copy
from peftkit.core.layer import AdaptedLayer, SavedModule
from peftkit.core.model_level import model_adapters
from peftkit.core.registry import MethodInfo, all_methods
from tolerance import assert_near

METHODS = all_methods()  # what is registered when the matrix is collected
CASES = [
    pytest.param(info.name, spec.name, id=f"{info.name}-{spec.name}")
    for info in METHODS
    for spec in MODELS.values()
    if (spec.hf if info.model_level else set(spec.hosts) <= set(info.hosts))
]


def _info(method: str) -> MethodInfo:
    return peftkit.get_method(method)


def _adapted(method: str, model_name: str, *, perturbed: bool = True, name: str = "default", seed: int = 1):
    info, spec = _info(method), MODELS[model_name]
    model = spec.build()
    cfg = info.config.from_dict(matrix_config_fields(method, spec))
    peftkit.adapt(model, cfg, name=name)
    if perturbed:
        perturb(model, seed)
    return info, spec, model, cfg


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Two computations of one output (merged vs unmerged, fused vs generic, adapted at init vs the base): equal up
    to rounding, ``tolerance.tol(dtype, 64) · max|expected|`` per chained layer (the tiny models reduce over ≤ 64)."""
    assert_near(actual, expected, 64, layers=4)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, rtol=0.0, atol=1e-6 * float(b.abs().max().clamp_min(1e-12)))


def _host_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in peftkit.adapted_layers(model):
        out[f"{path}.weight"] = layer.host.weight.detach().clone()
        if layer.host.bias is not None:
            out[f"{path}.bias"] = layer.host.bias.detach().clone()
    return out


@torch.no_grad()
def _run(spec: TinyModel, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return spec.run(model, x)


def _original_positions(model: torch.nn.Module, y: torch.Tensor, y_base: torch.Tensor) -> torch.Tensor:
    """``y`` without the positions the active model-level adapter declares it puts in front (their number is
    checked against the base output's shape)."""
    active = set(peftkit.active_adapters(model))
    added = sum(a.added_positions for n, a in model_adapters(model).items() if n in active)
    if not added:
        return y
    assert y.shape[0] == y_base.shape[0] and y.shape[1] == y_base.shape[1] + added and y.shape[2:] == y_base.shape[2:]
    return y[:, added:]


def test_every_method_is_in_the_matrix() -> None:
    covered = {p.values[0] for p in CASES}
    assert covered == {info.name for info in METHODS}, "a registered method runs on none of the tiny models"


@pytest.mark.parametrize("method,model_name", CASES)
def test_init_output(method: str, model_name: str) -> None:
    info, spec = _info(method), MODELS[model_name]
    model = spec.build()
    x = spec.input()
    y_base = _run(spec, model, x)
    _, _, adapted, _ = _adapted(method, model_name, perturbed=False)
    assert {p for p, _ in peftkit.adapted_layers(adapted)} == (set() if info.model_level else set(spec.adapted))
    y = _original_positions(adapted, _run(spec, adapted, x), y_base)
    if info.init_is_identity:
        _close(y, y_base)
    else:  # declared: the adapter changes the output at init (e.g. quantised or sketched bases), but stays finite
        assert torch.isfinite(y).all()
        assert _differs(y, y_base)


@pytest.mark.parametrize("method,model_name", CASES)
def test_trainable_parameters_match_formula(method: str, model_name: str) -> None:
    info, spec, model, cfg = _adapted(method, model_name, perturbed=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for n in trainable:
        assert ".adapters.default." in n or ".copies.default." in n, f"{n} trains but is not adapter state"
    expected = sum(
        info.adapter.expected_params(layer.host, layer.adapters["default"].config)
        for _, layer in peftkit.adapted_layers(model)
    )
    if info.model_level:
        expected += info.adapter.expected_params(model, peftkit.get_config(model, "default"))
    else:  # what the adapter holds once for all its layers (e.g. shared hypernetworks)
        hosts = [layer.host for _, layer in peftkit.adapted_layers(model)]
        expected += info.adapter.shared_params(peftkit.get_config(model, "default"), hosts)
    for name in peftkit.get_config(model, "default").modules_to_save or []:  # the config as resolved for the model
        sm = model.get_submodule(name)
        assert isinstance(sm, SavedModule)
        expected += sum(p.numel() for p in sm.original_module.parameters())
    assert sum(p.numel() for p in trainable.values()) == expected
    s = peftkit.summary(model)
    assert s.trainable == expected and s.adapters["default"] == expected


@pytest.mark.parametrize("method,model_name", CASES)
def test_one_step_changes_output(method: str, model_name: str) -> None:
    _, spec, model, _ = _adapted(method, model_name, perturbed=False)
    x = spec.input()
    y0 = _run(spec, model, x)
    w = torch.randn(y0.shape, generator=torch.Generator().manual_seed(5))
    params = peftkit.trainable_parameters(model)
    (spec.run(model, x) * w).sum().backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in params)
    torch.optim.SGD(params, lr=0.1).step()
    assert _differs(_run(spec, model, x), y0)


@pytest.mark.parametrize("method,model_name", CASES)
def test_gradients_reach_every_trainable_tensor(method: str, model_name: str) -> None:
    # At init some factors get zero gradients legitimately (LoRA: B = 0 => dL/dA = 0); after a random
    # perturbation every trainable tensor must receive a nonzero, finite gradient.
    _, spec, model, _ = _adapted(method, model_name)
    x = spec.input()
    out = spec.run(model, x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            assert torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, f"{n} gets a zero gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


@pytest.mark.parametrize("method,model_name", [c for c in CASES if not _info(c.values[0]).model_level])
def test_output_can_change_in_place_before_backward(method: str, model_name: str) -> None:
    # A Linear / conv / Embedding output is not saved by autograd, so models may change it in place (``y.mul_``,
    # ``y += r``); an adapted layer must allow the same, with the same gradients (a fused path returning a view made
    # inside its autograd function, or saving its output without care, fails here). Model-level methods adapt no
    # layer.
    _, spec, model, _ = _adapted(method, model_name)
    x = spec.input()
    w = torch.randn(_run(spec, model, x).shape, generator=torch.Generator().manual_seed(5))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (spec.run(model, x) * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    hooks = [layer.register_forward_hook(lambda mod, args, out: out.mul_(1.0))
             for _, layer in peftkit.adapted_layers(model)]
    try:
        got = grads()
    finally:
        for h in hooks:
            h.remove()
    assert got.keys() == expected.keys() and got
    for n in got:
        _close(got[n], expected[n])


@pytest.mark.parametrize("method,model_name", CASES)
def test_merge_unmerge(method: str, model_name: str) -> None:
    info, spec, model, _ = _adapted(method, model_name)
    x = spec.input()
    y = _run(spec, model, x)
    before = _host_weights(model)
    if not info.mergeable:
        state = state_copy(model)
        with pytest.raises(peftkit.PeftkitError):
            peftkit.merge(model)
        assert same_state(state, state_copy(model))
        assert all(not layer.merged for _, layer in peftkit.adapted_layers(model))
        return
    peftkit.merge(model)
    assert all(layer.merged == ["default"] for _, layer in peftkit.adapted_layers(model))
    assert any(not torch.equal(before[k], v) for k, v in _host_weights(model).items()), "merge wrote nothing"
    _close(_run(spec, model, x), y)
    peftkit.unmerge(model)
    after = _host_weights(model)
    for k in before:
        _close(after[k], before[k])
    _close(_run(spec, model, x), y)
    # merge_and_unload leaves plain modules that compute the adapted function
    plain = peftkit.merge_and_unload(model)
    assert not any(isinstance(m, AdaptedLayer | SavedModule) for m in plain.modules())
    assert not any(p.requires_grad for p in plain.parameters())
    _close(_run(spec, plain, x), y)


@pytest.mark.parametrize("method,model_name", CASES)
def test_disable_gives_base_output(method: str, model_name: str) -> None:
    info, spec = _info(method), MODELS[model_name]
    x = spec.input()
    y_base = _run(spec, spec.build(), x)
    _, _, model, _ = _adapted(method, model_name)
    y = _run(spec, model, x)
    assert _differs(_original_positions(model, y, y_base), y_base)
    with peftkit.disable(model):
        _close(_run(spec, model, x), y_base)
    _close(_run(spec, model, x), y)
    if info.mergeable:  # disabling a merged model runs the base weights
        peftkit.merge(model)
        with peftkit.disable(model):
            _close(_run(spec, model, x), y_base)
        _close(_run(spec, model, x), y)


@pytest.mark.parametrize("method,model_name", CASES)
def test_switch_and_mix_two_adapters(method: str, model_name: str) -> None:
    info, spec, model, cfg = _adapted(method, model_name, name="a", seed=1)
    x = spec.input(batch=5)
    y_a = _run(spec, model, x)
    peftkit.adapt(model, cfg, name="b")
    assert peftkit.active_adapters(model) == ["b"]
    perturb(model, seed=2)
    y_b = _run(spec, model, x)
    assert _differs(y_a, y_b)
    peftkit.set_active(model, "a")
    _close(_run(spec, model, x), y_a)
    peftkit.set_active(model, "b")
    _close(_run(spec, model, x), y_b)

    names = ["a", None, "b", "a", "b"]
    if info.model_level:  # declared: a model-level adapter changes the whole call, it cannot be routed per sample
        with pytest.raises(peftkit.PeftkitError, match="mixed batch"), peftkit.mixed_batch(model, names):
            pass
        _close(_run(spec, model, x), y_b)
        return
    with peftkit.mixed_batch(model, names):
        y_mix = _run(spec, model, x)
    for i, n in enumerate(names):
        xi = x[i:i + 1]
        if n is None:
            with peftkit.disable(model):
                ref = _run(spec, model, xi)
        else:
            peftkit.set_active(model, n)
            ref = _run(spec, model, xi)
        _close(y_mix[i:i + 1], ref)


@pytest.mark.parametrize("method,model_name", CASES)
def test_save_load_bit_identical(method: str, model_name: str, tmp_path) -> None:
    _, spec, model, _ = _adapted(method, model_name)
    x = spec.input()
    y = _run(spec, model, x)
    peftkit.save(model, tmp_path / "ad")
    fresh = spec.build()
    assert peftkit.load(fresh, tmp_path / "ad") == "default"
    assert torch.equal(_run(spec, fresh, x), y)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference by default


@pytest.mark.parametrize("method,model_name", CASES)
def test_load_into_wrong_shaped_base_fails_cleanly(method: str, model_name: str, tmp_path) -> None:
    _, spec, model, _ = _adapted(method, model_name)
    peftkit.save(model, tmp_path / "ad")
    wrong = spec.build(wide=True)
    before = state_copy(wrong)
    modules_before = [type(m) for m in wrong.modules()]
    with pytest.raises(peftkit.PeftkitError) as e:
        peftkit.load(wrong, tmp_path / "ad")
    assert re.search(r"tensor '[^']+'", str(e.value)), str(e.value)
    assert same_state(before, state_copy(wrong))
    assert [type(m) for m in wrong.modules()] == modules_before
    assert peftkit.adapter_names(wrong) == []


@pytest.mark.parametrize("method,model_name", CASES)
def test_state_dict_round_trip(method: str, model_name: str) -> None:
    _, spec, model, _ = _adapted(method, model_name, seed=1)
    x = spec.input()
    y = _run(spec, model, x)
    _, _, other, _ = _adapted(method, model_name, seed=7)
    assert _differs(_run(spec, other, x), y)
    other.load_state_dict(model.state_dict())
    assert torch.equal(_run(spec, other, x), y)


@pytest.mark.parametrize("method,model_name", CASES)
def test_deepcopy_and_pickle(method: str, model_name: str) -> None:
    _, spec, model, _ = _adapted(method, model_name)
    x = spec.input()
    y = _run(spec, model, x)
    clone = copy.deepcopy(model)
    assert torch.equal(_run(spec, clone, x), y)
    assert peftkit.adapter_names(clone) == ["default"]
    perturb(clone, seed=3)  # the copy is independent of the original
    assert torch.equal(_run(spec, model, x), y)
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(_run(spec, restored, x), y)
    assert peftkit.active_adapters(restored) == ["default"]


@pytest.mark.parametrize("method", [p.values[0] for p in CASES if p.values[1] == "mlp"])
def test_torch_compile(method: str) -> None:
    # backend="aot_eager" runs Dynamo's graph capture and AOTAutograd (the parts that break on untraceable adapter
    # code or custom autograd functions) without paying for Inductor code generation, so the matrix stays cheap.
    _, spec, model, _ = _adapted(method, "mlp")
    x = spec.input()
    y = spec.run(model, x)
    y.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    yc = compiled(x)
    _close(yc, y.detach())
    yc.sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            _close(p.grad, grads[n])
