"""Saving and loading: atomic writes, corrupted files, missing / extra tensors, modules_to_save and biases."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from conformance.models import MODELS, TinyModel, perturb, same_state, state_copy
from peftkit.core import io

CFG = io.CONFIG_NAME
WEIGHTS = io.WEIGHTS_NAME


@pytest.fixture
def spec() -> TinyModel:
    return MODELS["mlp"]


def _adapted(spec: TinyModel, seed: int = 1, **fields) -> nn.Module:
    model = spec.build()
    peftkit.adapt(model, peftkit.config("lora", **{"target_modules": spec.targets, "r": 4, **fields}))
    perturb(model, seed=seed)
    return model


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _load_fails_cleanly(spec: TinyModel, d: Path, pattern: str) -> None:
    fresh = spec.build()
    before = state_copy(fresh)
    with pytest.raises(peftkit.PeftkitError, match=pattern):
        peftkit.load(fresh, d)
    assert same_state(before, state_copy(fresh))
    assert peftkit.adapter_names(fresh) == [] and not list(peftkit.adapted_layers(fresh))


def test_save_writes_config_and_weights(spec: TinyModel, tmp_path: Path) -> None:
    model = _adapted(spec, modules_to_save=["head"])
    peftkit.save(model, tmp_path / "a", format="peftkit")  # (the default for LoRA is PEFT's format: test_peft_format)
    assert sorted(os.listdir(tmp_path / "a")) == [CFG, WEIGHTS]
    meta = json.loads((tmp_path / "a" / CFG).read_text())
    assert meta["peft_type"] == "PEFTKIT_LORA" and meta["format"] == "peftkit" and meta["name"] == "default"
    assert meta["base_model_class"] == "MLP"
    assert meta["config"] == peftkit.get_config(model, "default").to_dict()
    tensors = load_file(str(tmp_path / "a" / WEIGHTS))
    assert sorted(tensors) == sorted(peftkit.adapter_state_dict(model))
    assert "saved.head.weight" in tensors and "adapter.fc1.lora_A" in tensors
    for k, v in peftkit.adapter_state_dict(model).items():
        assert torch.equal(tensors[k], v)


@pytest.mark.parametrize("failing", ["serialise", "write_config", "write_weights", "swap", "rename"])
def test_failing_save_leaves_previous_files_intact(spec: TinyModel, tmp_path: Path, monkeypatch, failing: str) -> None:
    """The unit is swapped in as a whole: a failure at any step (serialising, writing either file, the folder swap)
    leaves the previous adapter exactly as it was, and no temp folder behind."""
    d = tmp_path / "a"
    model = _adapted(spec, seed=1)
    peftkit.save(model, d)
    old = _files(d)
    perturb(model, seed=2)
    calls = {"fdopen": 0}
    real_fdopen = os.fdopen

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    def fdopen(fd, *a, **k):
        calls["fdopen"] += 1
        if calls["fdopen"] == {"write_config": 1, "write_weights": 2}.get(failing):
            boom()
        return real_fdopen(fd, *a, **k)

    if failing == "serialise":
        monkeypatch.setattr(io, "save", boom)
    if failing == "swap":
        monkeypatch.setattr(io, "_exchange", boom)
    if failing == "rename":  # no atomic exchange on this filesystem, and the rename fails
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
        real_rename = os.rename
        monkeypatch.setattr(io.os, "rename", lambda a, b: boom() if Path(b) == d else real_rename(a, b))
    monkeypatch.setattr(io.os, "fdopen", fdopen)
    with pytest.raises(peftkit.PeftkitError, match="No space left"):
        peftkit.save(model, d)
    monkeypatch.undo()
    assert _files(d) == old, "a failed save changed the previous adapter files"
    assert sorted(os.listdir(d)) == [CFG, WEIGHTS], "temporary files were left behind"
    assert sorted(os.listdir(tmp_path)) == ["a"], "a temp folder was left behind"


def test_failing_save_raises_peftkit_error(spec: TinyModel, tmp_path: Path, monkeypatch) -> None:
    model = _adapted(spec)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "rename", boom)
    with pytest.raises(peftkit.PeftkitError, match="No space left on device"):
        peftkit.save(model, tmp_path / "a")
    assert os.listdir(tmp_path) == []


def test_save_onto_a_file_path(spec: TinyModel, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(peftkit.PeftkitError, match="not a directory"):
        peftkit.save(_adapted(spec), tmp_path / "f")


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_corrupted_weights_fail_cleanly(spec: TinyModel, tmp_path: Path, damage: str) -> None:
    d = tmp_path / "a"
    peftkit.save(_adapted(spec), d)
    w = d / WEIGHTS
    blob = w.read_bytes()
    if damage == "truncate":
        w.write_bytes(blob[: len(blob) // 2])
    elif damage == "header":
        w.write_bytes(b"\xff" * 8 + blob[8:])
    else:
        w.write_bytes(b"")
    _load_fails_cleanly(spec, d, "corrupted or truncated")


def test_bad_config_files(spec: TinyModel, tmp_path: Path) -> None:
    d = tmp_path / "a"
    _load_fails_cleanly(spec, d, "does not exist")
    peftkit.save(_adapted(spec), d)
    cfg = json.loads((d / CFG).read_text())
    (d / CFG).write_text(json.dumps({**cfg, "name": "edited"}))  # the weights carry the config's sha256
    _load_fails_cleanly(spec, d, "adapter_config.json does not belong with adapter_model.safetensors")
    save_file(load_file(str(d / WEIGHTS)), str(d / WEIGHTS))  # from here on: no checksums (another writer's file)
    (d / CFG).write_text("{not json")
    _load_fails_cleanly(spec, d, "not valid JSON")
    (d / CFG).write_text("[1, 2]")
    _load_fails_cleanly(spec, d, "must hold a JSON object")
    (d / CFG).write_text(json.dumps({"hello": 1}))
    _load_fails_cleanly(spec, d, "not a peftkit or Hugging Face PEFT adapter")
    (d / CFG).write_text(json.dumps({"format": "peftkit", "config": {"method": "nope"}}))
    _load_fails_cleanly(spec, d, "unknown method 'nope'")
    (d / CFG).write_text(json.dumps({"format": "peftkit", "config": {"method": "lora", "r": 0}}))
    _load_fails_cleanly(spec, d, "rank")
    (d / CFG).write_text(json.dumps({"format": "peftkit", "config": {"method": "lora", "target_modules": ["zz"]}}))
    _load_fails_cleanly(spec, d, "cannot load adapter .*matched no module")
    os.remove(d / WEIGHTS)
    (d / CFG).write_text(json.dumps({"format": "peftkit", "config": {"method": "lora", "target_modules": ["fc1"]}}))
    _load_fails_cleanly(spec, d, "weights missing")


def test_missing_and_extra_tensors_are_named(spec: TinyModel, tmp_path: Path) -> None:
    d = tmp_path / "a"
    peftkit.save(_adapted(spec), d, format="peftkit")
    full = load_file(str(d / WEIGHTS))
    cfg = json.loads((d / CFG).read_text())
    (d / CFG).write_text(json.dumps({**cfg, "format_version": 1}))  # files without checksums, as older peftkit wrote

    missing = {k: v for k, v in full.items() if k != "adapter.fc2.lora_B"}
    save_file(missing, str(d / WEIGHTS))
    _load_fails_cleanly(spec, d, r"tensor 'adapter\.fc2\.lora_B' is missing")

    extra = {**full, "adapter.fc3.lora_A": torch.zeros(4, 16)}
    save_file(extra, str(d / WEIGHTS))
    _load_fails_cleanly(spec, d, r"tensor 'adapter\.fc3\.lora_A' has no place in this model")

    reshaped = {**full, "adapter.fc1.lora_B": torch.zeros(32, 5)}
    save_file(reshaped, str(d / WEIGHTS))
    _load_fails_cleanly(spec, d, r"tensor 'adapter\.fc1\.lora_B' has shape \(32, 5\) in the file but \(32, 4\)")


def test_modules_to_save_are_saved_and_restored(spec: TinyModel, tmp_path: Path) -> None:
    model = _adapted(spec, modules_to_save=["head"])
    assert not torch.equal(model.head.copies["default"].weight, model.head.original_module.weight)
    x = spec.input()
    with torch.no_grad():
        y = model(x)
    peftkit.save(model, tmp_path / "a")
    fresh = spec.build()
    peftkit.load(fresh, tmp_path / "a", trainable=True)
    assert torch.equal(fresh.head.copies["default"].weight, model.head.copies["default"].weight)
    assert torch.equal(fresh.head.original_module.weight, spec.build().head.weight)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    assert fresh.head.copies["default"].weight.requires_grad
    assert not fresh.head.original_module.weight.requires_grad


@pytest.mark.parametrize("mode", ["all", "adapter_only"])
def test_bias_modes_train_and_save_biases(spec: TinyModel, tmp_path: Path, mode: str) -> None:
    model = spec.build()
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc1"], r=4, bias=mode))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    biases = {"all": ["fc1.base_layer.bias", "fc2.bias", "head.bias"], "adapter_only": ["fc1.base_layer.bias"]}[mode]
    assert trainable == sorted(["fc1.adapters.default.lora_A", "fc1.adapters.default.lora_B", *biases])
    x = spec.input()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in biases}
    opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=0.1)
    model(x).pow(2).sum().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in biases:
            assert not torch.equal(p, before[n]), f"{n} did not train"
    with torch.no_grad():
        y = model(x)
    peftkit.save(model, tmp_path / "a", format="peftkit")
    keys = set(load_file(str(tmp_path / "a" / WEIGHTS)))
    assert {k for k in keys if k.startswith("bias.")} == {"bias." + b.replace(".base_layer", "") for b in biases}
    fresh = spec.build()
    peftkit.load(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def test_load_under_another_name_and_twice(spec: TinyModel, tmp_path: Path) -> None:
    model = _adapted(spec)
    peftkit.save(model, tmp_path / "a")
    fresh = spec.build()
    assert peftkit.load(fresh, tmp_path / "a", name="x") == "x"
    assert peftkit.load(fresh, tmp_path / "a", activate=False) == "default"
    assert peftkit.active_adapters(fresh) == ["x"]
    snap = state_copy(fresh)
    with pytest.raises(peftkit.PeftkitError, match="cannot load adapter .*'x' already exists"):
        peftkit.load(fresh, tmp_path / "a", name="x")
    assert same_state(snap, state_copy(fresh))
    assert peftkit.get_config(fresh, "x") == peftkit.get_config(model, "default")


def test_save_refuses_merged_or_ambiguous_adapters(spec: TinyModel, tmp_path: Path) -> None:
    model = _adapted(spec)
    peftkit.merge(model)
    with pytest.raises(peftkit.PeftkitError, match="merged into 'fc1'; unmerge before saving"):
        peftkit.save(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    peftkit.unmerge(model)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc1"]), name="b", activate=False)
    peftkit.set_active(model, ["default", "b"])
    with pytest.raises(peftkit.PeftkitError, match="several adapters loaded"):
        peftkit.save(model, tmp_path / "a")
    peftkit.save(model, tmp_path / "b", name="b", format="peftkit")
    assert set(load_file(str(tmp_path / "b" / WEIGHTS))) == {"adapter.fc1.lora_A", "adapter.fc1.lora_B"}
