"""Config validation and (de)serialisation: every bad field fails loudly with one clear error."""

from __future__ import annotations

import json

import pytest

import peftkit
from conformance.models import MODELS
from peftkit.core.registry import config_from_dict


def test_unknown_field_lists_the_valid_fields() -> None:
    with pytest.raises(peftkit.PeftkitError) as e:
        peftkit.config("lora", target_modules=["q"], rank=4, lora_alpha=8, bogus=1)  # lora_alpha: PEFT's name
    msg = str(e.value)
    assert "LoraConfig has no field(s) ['bogus', 'rank']" in msg
    assert "valid fields:" in msg
    for name in ("alpha", "dropout", "r", "rslora", "target_modules", "init"):
        assert name in msg.split("valid fields:")[1]


@pytest.mark.parametrize(
    "field,value",
    [("r", "8"), ("r", 8.0), ("r", True), ("alpha", "x"), ("dropout", None), ("target_modules", 5),
     ("target_modules", ["q", 3]), ("bias", "some"), ("rslora", 1), ("layers_to_transform", [0, "1"]),
     ("overrides", {"q": 4})],
)
def test_wrong_type_names_the_field(field: str, value: object) -> None:
    with pytest.raises(peftkit.PeftkitError, match=rf"LoraConfig\.{field} must be"):
        peftkit.config("lora", **{"target_modules": ["q"], field: value})


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("r", [0, -3])
def test_rank_must_be_positive(method: str, r: int) -> None:
    with pytest.raises(peftkit.PeftkitError, match=r"\.r \(rank\) must be a positive integer"):
        peftkit.config(method, target_modules=["q"], r=r)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_must_be_in_unit_interval(p: float) -> None:
    with pytest.raises(peftkit.PeftkitError, match=r"dropout must be in \[0, 1\)"):
        peftkit.config("lora", target_modules=["q"], dropout=p)


def test_negative_layer_index() -> None:
    with pytest.raises(peftkit.PeftkitError, match="layers_to_transform"):
        peftkit.config("lora", target_modules=["q"], layers_to_transform=[0, -1])


def test_overrides_with_unknown_field() -> None:
    with pytest.raises(peftkit.PeftkitError, match=r"overrides\['q'\] names unknown field\(s\) \['rank'\]"):
        peftkit.config("lora", target_modules=["q"], overrides={"q": {"rank": 4}})


def test_overrides_apply_per_module() -> None:
    spec = MODELS["block"]
    model = spec.build()
    cfg = peftkit.config("lora", target_modules=spec.targets, r=4, alpha=8, overrides={"attn.v": {"r": 2},
                                                                                       "fc.": {"alpha": 2.0}})
    peftkit.adapt(model, cfg)
    layers = dict(peftkit.adapted_layers(model))
    ranks = {p: layer.adapters["default"].r for p, layer in layers.items()}
    assert ranks == {p: 2 if p == "attn.v" else 4 for p in spec.adapted}
    scales = {p: layer.adapters["default"].s for p, layer in layers.items()}
    assert scales == {p: 0.5 if p.startswith("mlp.fc") else (4.0 if p == "attn.v" else 2.0) for p in spec.adapted}
    assert peftkit.summary(model).trainable == sum(
        ranks[p] * (layer.host.d_in + layer.host.d_out) for p, layer in layers.items())


def test_json_round_trip_and_coercion() -> None:
    cfg = peftkit.config("lora", target_modules=["q", "v"], r=4, alpha=16, layers_to_transform=[1],
                         overrides={"q": {"r": 2}}, modules_to_save=["head"], bias="all")
    assert isinstance(cfg.alpha, float)  # JSON ints become floats where the field is a float
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["method"] == "lora"
    again = config_from_dict(data)
    assert again == cfg and type(again) is type(cfg)


def test_config_dicts_without_or_with_unknown_method() -> None:
    with pytest.raises(peftkit.PeftkitError, match="no 'method' field"):
        config_from_dict({"r": 4})
    with pytest.raises(peftkit.PeftkitError,
                       match=r"unknown method 'lorax' \(did you mean 'lora'\?\); registered methods: .*lora"):
        config_from_dict({"method": "lorax"})


def test_config_classes_are_reachable_by_name() -> None:
    assert peftkit.LoraConfig is peftkit.get_method("lora").config
    assert isinstance(peftkit.LoraConfig(target_modules=["q"]), peftkit.AdapterConfig)
    with pytest.raises(AttributeError):
        peftkit.NoSuchConfig  # noqa: B018
    with pytest.raises(peftkit.PeftkitError, match="LoraConfig.r"):
        peftkit.LoraConfig(target_modules=["q"], r="4")
