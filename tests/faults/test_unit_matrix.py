"""The persistence and merge guarantees of issue 18 for every registered method (one tiny model each): a save that
fails at the swap, or dies leaving its temp folder, never changes what loads; a flipped data bit is refused; a merged
adapter is frozen, and unmerge after an in-place edit restores the base weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import peftkit
from conformance.models import MODELS, matrix_config_fields, perturb
from peftkit.core import io
from peftkit.core.registry import all_methods

CASES = []
for _info in all_methods():
    _spec = next((s for s in MODELS.values()
                  if (s.hf if _info.model_level else set(s.hosts) <= set(_info.hosts))), None)
    if _spec is not None:
        CASES.append(pytest.param(_info.name, _spec.name, id=_info.name))


def _adapted(method: str, model_name: str, seed: int) -> torch.nn.Module:
    spec = MODELS[model_name]
    model = spec.build()
    peftkit.adapt(model, peftkit.get_method(method).config.from_dict(matrix_config_fields(method, spec)))
    perturb(model, seed)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peftkit.adapter_state_dict(model).items()}


@pytest.mark.parametrize("method,model_name", CASES)
def test_a_failed_or_killed_save_never_changes_what_loads(method: str, model_name: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ad"
    a, b = _adapted(method, model_name, 1), _adapted(method, model_name, 2)
    # peftkit's own format: the state comes back bit for bit. (PEFT's, the default for PEFT's methods, keeps LN
    # tuning's γ as γ0 + Δ and prefix tuning's table without its MLP: the same outputs, not the same state; its unit
    # write is the same io.write_adapter, see test_persistence_faults)
    peftkit.save(a, d, run_info={"run": "a"}, format="peftkit")
    saved = {p.name: p.read_bytes() for p in d.iterdir()}

    def boom(*args: object) -> bool:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(io, "_exchange", boom)
    with pytest.raises(peftkit.PeftkitError, match="Input/output error"):
        peftkit.save(b, d, overwrite=True, format="peftkit")
    monkeypatch.undo()
    (tmp_path / ".ad.peftkit-tmp-dead").mkdir()  # a save killed after writing half its unit
    (tmp_path / ".ad.peftkit-tmp-dead" / io.CONFIG_NAME).write_bytes(b"{}")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == saved
    fresh = MODELS[model_name].build()
    peftkit.load(fresh, d)
    want, got = _state(a), _state(fresh)
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    peftkit.save(b, d, overwrite=True, format="peftkit")  # replaces the unit, removes the dead folder
    assert sorted(os.listdir(tmp_path)) == ["ad"] and sorted(os.listdir(d)) == [io.CONFIG_NAME, io.WEIGHTS_NAME]
    blob = bytearray((d / io.WEIGHTS_NAME).read_bytes())
    blob[-1] ^= 0x01  # one bit of the last tensor's data
    (d / io.WEIGHTS_NAME).write_bytes(bytes(blob))
    with pytest.raises(peftkit.PeftkitError, match="corrupted or truncated"):
        peftkit.load(MODELS[model_name].build(), d)


MERGEABLE = [c for c in CASES if peftkit.get_method(c.values[0]).mergeable]


@pytest.mark.parametrize("method,model_name", MERGEABLE)
def test_a_merged_adapter_is_frozen_and_an_edit_does_not_reach_the_base(method: str, model_name: str) -> None:
    model = _adapted(method, model_name, 1)
    layers = [layer for _, layer in peftkit.adapted_layers(model)]
    params = [p for layer in layers for p in layer.adapters["default"].parameters() if p.requires_grad]
    before = {i: layer.host.weight_2d().detach().clone() for i, layer in enumerate(layers)}
    peftkit.merge(model)
    assert not any(p.requires_grad for p in params)
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.mul_(1.5).add_(0.25)
    peftkit.unmerge(model)
    assert all(p.requires_grad for p in params)
    for i, layer in enumerate(layers):
        torch.testing.assert_close(layer.host.weight_2d(), before[i], rtol=1e-5, atol=1e-5)
