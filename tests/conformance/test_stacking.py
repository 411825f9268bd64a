"""Two methods active on one layer: merge equals forward, for every pair of registered methods that share a host kind.

The forward adds every active adapter's contribution, each computed against the unmerged host, whatever the methods'
kinds (additive like LoRA, multiplicative like IA3, normalising like DoRA, replacing like L4Q). For every unordered
pair (a method with itself included: two IA3s multiply, two DoRAs renormalise) both adapters are put on the same
layers of the first tiny model whose host kinds both support, their tensors randomised, and both made active; then,
in both activation orders:

- the output does not depend on the order;
- ``merge()`` (both) gives the unmerged output, ``unmerge()`` restores the base weights and the output — or, where a
  method is declared not mergeable, ``merge`` refuses and changes nothing;
- merging one of the two and then the other (in each order) gives the unmerged output after each step, or the step
  is refused with an error that names the adapter left unmerged and changes nothing; unmerging one of two merged
  adapters likewise.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import peftkit
from conformance.models import MODELS, TinyModel, matrix_config_fields, perturb, same_state, state_copy
from peftkit.core.registry import MethodInfo, all_methods
from tolerance import assert_near

LAYER_METHODS = [i for i in all_methods() if not i.model_level]


def _model_for(a: MethodInfo, b: MethodInfo) -> TinyModel | None:
    shared = set(a.hosts) & set(b.hosts)
    return next((spec for spec in MODELS.values() if set(spec.hosts) <= shared), None)


PAIRS = [
    pytest.param(a.name, b.name, spec.name, id=f"{a.name}+{b.name}-{spec.name}")
    for a, b in itertools.combinations_with_replacement(LAYER_METHODS, 2)
    if (spec := _model_for(a, b)) is not None
]


def _fields(method: str, spec: TinyModel) -> dict:
    fields = matrix_config_fields(method, spec)
    fields.pop("modules_to_save", None)  # one copy per adapter: which runs would depend on the activation order
    return fields


def _host_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in peftkit.adapted_layers(model):
        out[f"{path}.weight"] = layer.host.weight.detach().clone()
        if layer.host.bias is not None:
            out[f"{path}.bias"] = layer.host.bias.detach().clone()
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> None:
    # a merged rotation (OFT/BOFT: W·Rᵀ, R from a solve) under a merged update adds rounding layers of its own
    assert_near(actual, expected, 64, layers=6, scale=scale)


def _refused_cleanly(model: torch.nn.Module, action, which: list[str] | None, *names: str) -> bool:
    """Run ``action(model, which)``; True when it refused with a PeftkitError naming one of ``names`` and changed
    nothing."""
    state = state_copy(model)
    merged = {p: list(layer.merged) for p, layer in peftkit.adapted_layers(model)}
    try:
        action(model, which)
    except peftkit.PeftkitError as e:
        assert any(repr(n) in str(e) for n in names), f"the refusal names none of {names}: {e}"
        assert same_state(state, state_copy(model)), "a refused merge / unmerge changed the model"
        assert merged == {p: list(layer.merged) for p, layer in peftkit.adapted_layers(model)}
        return True
    return False


@pytest.mark.parametrize("first,second,model_name", PAIRS)
def test_two_methods_on_one_layer_merge_equals_forward(first: str, second: str, model_name: str) -> None:
    spec = MODELS[model_name]
    info = {first: peftkit.get_method(first), second: peftkit.get_method(second)}
    model = spec.build()
    peftkit.adapt(model, info[first].config.from_dict(_fields(first, spec)), name="a")
    peftkit.adapt(model, info[second].config.from_dict(_fields(second, spec)), name="b")
    peftkit.set_active(model, ["a", "b"])
    perturb(model, seed=3)  # both adapters' tensors (active, so trainable) randomised
    mergeable = {"a": info[first].mergeable, "b": info[second].mergeable}
    x = spec.input()
    base = _host_weights(model)
    with torch.no_grad():
        y = spec.run(model, x)
        with peftkit.disable(model):
            y_base = spec.run(model, x)
        peftkit.set_active(model, ["a"])
        y_a = spec.run(model, x)
    assert not torch.allclose(y, y_a, atol=1e-6), "the second adapter changes nothing: the check would be vacuous"
    assert not torch.allclose(y_a, y_base, atol=1e-6), "the first adapter changes nothing: the check would be vacuous"

    def out() -> torch.Tensor:
        with torch.no_grad():
            return spec.run(model, x)

    peak: dict[str, float] = {}  # the largest |weight| while merged: unmerging rounds at that size, not the base's

    def merged_sizes() -> None:
        for k, w in _host_weights(model).items():
            peak[k] = max(peak.get(k, 0.0), float(w.abs().max()), float(base[k].abs().max()))

    def restored() -> None:
        assert all(not layer.merged for _, layer in peftkit.adapted_layers(model))
        after = _host_weights(model)
        assert after.keys() == base.keys()
        for k in base:
            _close(after[k], base[k], scale=peak.get(k))
        _close(out(), y)

    for order in (["a", "b"], ["b", "a"]):
        peftkit.set_active(model, order)
        _close(out(), y)
        # both at once
        if all(mergeable.values()):
            peftkit.merge(model)
            merged_sizes()
            _close(out(), y)
            peftkit.unmerge(model)
            restored()
        else:
            assert _refused_cleanly(model, peftkit.merge, None, *[n for n in order if not mergeable[n]])
        # one, then the other
        one, other = order
        if not mergeable[one]:
            continue
        if _refused_cleanly(model, peftkit.merge, [one], other):
            continue
        merged_sizes()
        _close(out(), y)
        if mergeable[other]:
            peftkit.merge(model, [other])
            merged_sizes()
            _close(out(), y)
            if not _refused_cleanly(model, peftkit.unmerge, [one], one, other):
                _close(out(), y)
        peftkit.unmerge(model)
        restored()
