"""Which modules a config targets: suffix lists, regexes, all-linear, types, layer indices, exclusions, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from conformance.models import same_state, state_copy
from peftkit.core.targeting import find_targets, layer_index


class Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)


class Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = Attn(d)
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)


class Net(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, d)
        self.layers = nn.ModuleList([Layer(d) for _ in range(3)])
        self.proj = nn.Linear(d, d)
        self.classifier = nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer.fc2(torch.relu(layer.fc1(layer.norm(h)))) + layer.attn.out_proj(layer.attn.value(h))
        return self.classifier(self.proj(h))


def _names(**fields) -> list[str]:
    cfg = peftkit.config("lora", r=2, **fields)
    return [n for n, _ in find_targets(Net(), cfg)]


def _all(*leaves: str, layers: tuple[int, ...] = (0, 1, 2)) -> list[str]:
    return [f"layers.{i}.{leaf}" for i in layers for leaf in leaves]


def test_list_entries_match_full_names_or_dotted_suffixes() -> None:
    assert _names(target_modules=["query", "value"]) == _all("attn.query", "attn.value")
    assert _names(target_modules=["attn.key"]) == _all("attn.key")
    assert _names(target_modules=["layers.1.fc1", "proj"]) == ["layers.1.fc1", "proj"]  # "proj" != "out_proj"


def test_a_string_is_a_full_match_regex() -> None:
    assert _names(target_modules=r"layers\.[02]\.attn\.(query|value)") == [
        "layers.0.attn.query", "layers.0.attn.value", "layers.2.attn.query", "layers.2.attn.value"]
    assert _names(target_modules=r".*fc\d") == _all("fc1", "fc2")
    with pytest.raises(peftkit.PeftkitError, match="matched no module"):
        _names(target_modules=r"attn\.query")  # a regex must match the whole name


def test_all_linear_excludes_the_head_and_non_linear_modules() -> None:
    names = _names(target_modules="all-linear")
    assert names == _all("attn.query", "attn.key", "attn.value", "attn.out_proj", "fc1", "fc2") + ["proj"]
    assert "classifier" not in names
    saved = _names(target_modules="all-linear", modules_to_save=["proj"])
    assert "proj" not in saved and "classifier" not in saved


def test_all_linear_excludes_lm_head_of_a_gpt2_model() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=8, n_embd=8, n_layer=2, n_head=2))
    names = [n for n, _ in find_targets(model, peftkit.config("lora", r=2, target_modules="all-linear"))]
    assert "lm_head" not in names
    assert names == [f"transformer.h.{i}.{m}" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_target_types() -> None:
    assert _names(target_types=["Embedding"]) == ["embed"]
    assert _names(target_modules=r".*(query|norm)", target_types=["Linear"]) == _all("attn.query")
    with pytest.raises(peftkit.PeftkitError, match="of type"):
        _names(target_modules=["query"], target_types=["Conv2d"])


def test_layers_to_transform_and_layers_pattern() -> None:
    assert _names(target_modules=["query"], layers_to_transform=[0, 2]) == _all("attn.query", layers=(0, 2))
    assert _names(target_modules=["fc1"], layers_to_transform=[1], layers_pattern="layers") == ["layers.1.fc1"]
    assert layer_index("model.blocks.11.attn.q", None) == 11
    assert layer_index("model.blocks.11.attn.q", "layers") is None
    with pytest.raises(peftkit.PeftkitError, match=r"in layers \[7\]"):
        _names(target_modules=["query"], layers_to_transform=[7])


def test_exclude_modules() -> None:
    names = _names(target_modules="all-linear", exclude_modules=["fc2", "layers.0.attn.query"])
    assert "layers.0.attn.query" not in names and "layers.1.attn.query" in names
    assert not any(n.endswith("fc2") for n in names)
    assert _names(target_modules=["query"], exclude_modules=r"layers\.[01]\..*") == ["layers.2.attn.query"]


def test_no_match_lists_close_candidates_and_changes_nothing() -> None:
    model = Net()
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError) as e:
        peftkit.adapt(model, peftkit.config("lora", r=2, target_modules=["qurey", "vlaue"]))
    msg = str(e.value)
    assert "matched no module" in msg and "query" in msg and "value" in msg
    assert "Closest candidates" in msg
    assert same_state(before, state_copy(model)) and peftkit.adapter_names(model) == []


def test_missing_target_modules_lists_candidates() -> None:
    with pytest.raises(peftkit.PeftkitError, match=r"target_modules is not set.*layers\.0\.attn\.query"):
        _names()


def test_matching_a_container_is_an_error() -> None:
    with pytest.raises(peftkit.PeftkitError, match=r"'layers' is a container \(ModuleList\)"):
        _names(target_modules=["layers"])


def test_matching_an_unsupported_module_names_it() -> None:
    model = Net()
    with pytest.raises(peftkit.PeftkitError, match=r"does not support LayerNorm layers \(module 'layers\.0\.norm'\)"):
        peftkit.adapt(model, peftkit.config("lora", r=2, target_modules=["query", "norm"]))
    assert not peftkit.adapter_names(model) and isinstance(model.layers[0].attn.query, nn.Linear)


def test_second_adapter_targets_through_the_wrapper() -> None:
    model = Net()
    peftkit.adapt(model, peftkit.config("lora", r=2, target_modules=["query"]), name="a")
    peftkit.adapt(model, peftkit.config("lora", r=2, target_modules=["query", "key"]), name="b")
    layers = dict(peftkit.adapted_layers(model))
    assert sorted(layers) == sorted(_all("attn.query", "attn.key"))
    assert list(layers["layers.0.attn.query"].adapters) == ["a", "b"]
    assert list(layers["layers.0.attn.key"].adapters) == ["b"]
    assert not any("base_layer" in n for n in layers)
