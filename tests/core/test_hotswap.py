"""Hot-swapping into a compiled model: ``peftkit.hotswap`` copies another adapter's weights into the live tensors,
so the compiled model computes the new adapter with zero recompiles (counted by a backend that records each graph
it is given); ``peftkit.prepare_hotswap`` pads ranks beforehand so lower-rank adapters, and adapters with another α,
swap in as well."""

from __future__ import annotations

import pytest
import torch

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy, tiny_llama
from tolerance import assert_near

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it compiles (each compile or recompile is one call)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _llama(method: str, seed: int, **fields) -> torch.nn.Module:
    model = tiny_llama(hidden=16)
    peftkit.adapt(model, peftkit.config(method, target_modules=LLAMA_TARGETS, **fields), name="a")
    perturb(model, seed=seed, std=0.3)
    return model


def _logits(fn, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fn(input_ids=ids).logits


IDS = torch.randint(2, 50, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("as_state", [False, True])
def test_swap_into_compiled_llama_without_recompiling(tmp_path, as_state: bool) -> None:
    donors = [_llama("lora", seed=s, r=4, alpha=8.0) for s in (5, 6)]
    model = _llama("lora", seed=1, r=4, alpha=8.0)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    y0 = _logits(compiled, IDS)
    assert_near(y0, _logits(model, IDS), 32, layers=6)
    graphs = backend.graphs
    assert graphs >= 1
    for i, donor in enumerate(donors):
        if as_state:
            source = peftkit.adapter_state_dict(donor, "a")
        else:
            source = tmp_path / f"d{i}"
            peftkit.save(donor, source)
        peftkit.hotswap(model, source, name="a")
        y = _logits(compiled, IDS)
        assert_near(y, _logits(donor, IDS), 32, layers=6)
        assert not torch.allclose(y, y0)
    assert backend.graphs == graphs  # zero recompiles


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_prepared_model_takes_lower_ranks_and_other_alphas_without_recompiling(tmp_path, method: str) -> None:
    model = _llama(method, seed=1, r=4, alpha=8.0)
    y_before = _logits(model, IDS)
    assert peftkit.prepare_hotswap(model, 8) == "a"
    assert peftkit.get_config(model, "a").r == 8
    layer = dict(peftkit.adapted_layers(model))["model.layers.0.self_attn.q_proj"]
    assert layer.adapters["a"].lora_A.shape[0] == 8
    assert_near(_logits(model, IDS), y_before, 32, layers=6)  # padding keeps the update and the scale
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    _logits(compiled, IDS)
    graphs = backend.graphs
    donors = [
        _llama(method, seed=5, r=2, alpha=16.0),  # lower rank, other scale (s = 8 instead of 2)
        _llama(method, seed=6, r=8, alpha=4.0, rslora=True),  # the target rank, rsLoRA scale
        _llama(method, seed=7, r=4, alpha=8.0),
    ]
    for i, donor in enumerate(donors):
        peftkit.save(donor, tmp_path / f"d{i}")
        peftkit.hotswap(model, tmp_path / f"d{i}")
        assert_near(_logits(compiled, IDS), _logits(donor, IDS), 32, layers=6)
    assert backend.graphs == graphs


def test_prepare_hotswap_saves_an_equivalent_adapter(tmp_path) -> None:
    model = _llama("lora", seed=1, r=2, alpha=3.0, rslora=True)
    y = _logits(model, IDS)
    peftkit.prepare_hotswap(model, 6)
    peftkit.save(model, tmp_path / "p")
    fresh = tiny_llama(hidden=16)
    peftkit.load(fresh, tmp_path / "p")
    assert peftkit.get_config(fresh, "a").r == 6
    assert_near(_logits(fresh, IDS), y, 32, layers=6)


def test_hotswap_refuses_a_higher_rank_until_prepared(tmp_path) -> None:
    peftkit.save(_llama("lora", seed=5, r=8, alpha=8.0), tmp_path / "big")
    model = _llama("lora", seed=1, r=4, alpha=8.0)
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match=r"prepare_hotswap\(model, 8"):
        peftkit.hotswap(model, tmp_path / "big")
    assert same_state(before, state_copy(model))
    peftkit.prepare_hotswap(model, 8)
    peftkit.hotswap(model, tmp_path / "big")


@pytest.mark.parametrize("method, fields, match", [
    ("ia3", {}, "has no rank to pad"),
    ("lora", {"init": "pissa"}, "cannot change its rank"),
])
def test_prepare_hotswap_refuses_what_it_cannot_pad(method: str, fields: dict, match: str) -> None:
    spec = MODELS["mlp"]
    model = spec.build()
    peftkit.adapt(model, peftkit.config(method, target_modules=spec.targets, **fields))
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match=match):
        peftkit.prepare_hotswap(model, 8)
    assert same_state(before, state_copy(model))


def test_prepare_hotswap_refuses_a_lower_or_too_large_rank() -> None:
    spec = MODELS["mlp"]
    model = spec.build()
    peftkit.adapt(model, peftkit.config("lora", target_modules=spec.targets, r=4))
    with pytest.raises(peftkit.PeftkitError, match="below adapter 'default''s rank 4"):
        peftkit.prepare_hotswap(model, 2)
    with pytest.raises(peftkit.PeftkitError, match="exceeds this layer's limit of 16"):
        peftkit.prepare_hotswap(model, 17)
    assert peftkit.get_config(model, "default").r == 4
