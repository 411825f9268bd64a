"""``peftkit methods``: every method and head in one family of the survey's taxonomy, the grouped table within 120
columns, ``peftkit methods NAME`` in full, did-you-mean for a misspelt name."""

from __future__ import annotations

import json

import pytest

import peftkit
from peftkit import catalog
from peftkit.cli import main
from peftkit.core.registry import FAMILIES
from peftkit.heads import all_heads


def test_every_method_and_head_has_a_family() -> None:
    for m in peftkit.all_methods():
        assert m.family in FAMILIES, m.name
    assert {h.name for h in all_heads()} == {"calibration", "cqd", "crema", "crosstune", "pyra"}
    assert all(h.family == "head" for h in all_heads())
    families = {m.name: m.family for m in peftkit.all_methods()}
    assert families["lora"] == "reparameterized" and families["prompt_tuning"] == "soft-prompt"
    assert families["lntuning"] == "selective" and families["dylora"] == "procedure"
    assert families["parallel_adapter"] == "adapter" and families["qwha"] == "quantization"


def test_unknown_family_is_refused_at_registration() -> None:
    from peftkit.core import registry

    lora = registry.get("lora")
    with pytest.raises(ValueError, match="unknown family 'lowrank'"):
        registry.register("_bad_family", config=lora.config, paper="-", description="-", params="-",
                          family="lowrank")(type("X", (lora.adapter,), {}))
    assert "_bad_family" not in {m.name for m in peftkit.all_methods()}


def test_table_is_grouped_and_fits_120_columns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 120
    headings = [line for line in lines[1:] if line and not line.startswith(" ")]
    assert headings == [t for f, t in FAMILIES.items() if any(r["family"] == f for r in catalog.rows())]
    # each row sits under its own family's heading
    current = None
    for line in lines[1:]:
        if line and not line.startswith(" "):
            current = next(f for f, t in FAMILIES.items() if t == line)
        elif line:
            name = line.split()[0]
            assert next(r["family"] for r in catalog.rows() if r["name"] == name) == current, name
    listed = {line.split()[0] for line in lines[1:] if line.startswith("  ")}
    assert listed == {m.name for m in peftkit.all_methods()} | {h.name for h in all_heads()}


def test_json_has_families_and_heads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["kind"] for r in rows} == {"method", "head"}
    pyra = next(r for r in rows if r["name"] == "pyra")
    assert pyra["family"] == "head" and pyra["entry"] == "peftkit.heads.pyra.PyraReactivation"


def test_one_method_in_full(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "lora"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lora — " + FAMILIES["reparameterized"])
    assert "2106.09685" in out and "PEFT type:   LORA" in out and "lr factor:   × 1 " in out
    assert "forward:  y = x·W0ᵀ" in out and "merge:" in out  # the formula, from the module's docstring
    assert "  r = 8 " in out and "rank" in out.split("  r = 8 ", 1)[1].splitlines()[0]
    assert max(len(line) for line in out.splitlines()) <= 120
    assert main(["methods", "dylora"]) == 0
    assert "procedure:   DyLoRASampler" in capsys.readouterr().out
    assert main(["methods", "crosstune"]) == 0
    assert "peftkit.heads.crosstune.CrossAttentionLabelHead" in capsys.readouterr().out


def test_unknown_name_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "lroa"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error: unknown method 'lroa' (did you mean 'lora'?)") and err.count("\n") == 1


def test_field_meanings_come_from_the_config_docstrings() -> None:
    lora = peftkit.get_method("lora").config
    assert catalog.field_meaning(lora, "rslora") == "use α/√r instead of α/r"
    assert catalog.field_meaning(lora, "alpha") == "scale numerator"
    assert catalog.field_meaning(lora, "no_such_field") == ""
