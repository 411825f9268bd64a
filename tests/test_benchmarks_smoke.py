"""Smoke tests of the speed/memory benchmarks (``benchmarks/lora_vs_peft.py``, ``benchmarks/accelerator.py``): each
configuration runs in its ``--tiny`` mode (tiny shapes, one round) through the script's own ``main`` and must write a
JSON record with the keys the README's tables are built from, every ratio finite and positive, and a Markdown table.
No timing is asserted: a tiny run on a shared machine measures nothing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import accelerator  # noqa: E402
import lora_vs_peft  # noqa: E402

from peftkit import get_method  # noqa: E402


def _ratios(res: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in res.items() if "ratio" in k and v is not None}


def _check_finite_positive(values: dict[str, float]) -> None:
    assert values
    for k, v in values.items():
        assert isinstance(v, float) and math.isfinite(v) and v > 0, f"{k} = {v!r}"


def _run(tmp_path: Path, *args: str, memory: bool = True) -> dict[str, Any]:
    assert lora_vs_peft.main(["--tiny", "--threads", "1", "--out", str(tmp_path), *args]) == 0
    (js,) = tmp_path.glob("*.json")
    res = json.loads(js.read_text())
    md = js.with_suffix(".md").read_text()
    assert "| training step |" in md and "not a measurement" in md
    assert res["trainable_params"] > 0
    assert set(res["train_step_s"]) == {"frozen", "peftkit", "peft"}
    assert all(t > 0 for t in res["train_step_s"].values())
    for k in ("train_ratio", "train_ratio_frozen", "train_ratio_vs_floor", "peft_ratio_vs_floor"):
        assert k in res, k
    if memory:
        assert {"peftkit", "peft"} <= set(res["memory"]) and "step_peak_ratio" in res
        assert all(m["step_peak_mib"] > 0 for m in res["memory"].values())
    else:
        assert res["memory"] is None and "step_peak_ratio" not in res
    _check_finite_positive(_ratios(res))
    for tg in res["targets"]:
        assert set(tg) == {"what", "key", "value", "bound", "met"} and tg["value"] == res[tg["key"]]
    return res


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_vs_peft_minilm(tmp_path: Path, precision: str) -> None:
    res = _run(tmp_path, "--precision", precision)
    assert res["config"] == f"minilm-lora-{precision}-tiny"
    assert {"inference_ratio_peftkit", "inference_ratio_peftkit-merged", "inference_ratio_peft"} <= set(res)
    assert res["saved_tensor_ratio"] is not None
    # the issue's bf16 targets (step ≤ 0.90 × PEFT, memory ≤ 0.85 ×) are attached to the bf16 record only
    assert [t["key"] for t in res["targets"]] == (["train_ratio", "step_peak_ratio"] if precision == "bf16" else [])


def test_lora_vs_peft_compiled(tmp_path: Path) -> None:
    # aot_eager: dynamo and AOTAutograd trace forward and backward as inductor's would, without the slow C++ codegen;
    # no memory pass (its child compiles again, doubling this test's time; the pass itself is tested above)
    res = _run(tmp_path, "--compile", "--backend", "aot_eager", "--no-memory", memory=False)
    assert res["config"] == "minilm-lora-fp32-compile-tiny"
    assert set(res["compile_s"]) == {"frozen", "peftkit", "peft"}
    assert res["compile_warmup"]["warmup_rounds"] >= 3 and res["compile_warmup"]["compiles_while_timed"] >= 0
    assert not any(k.startswith("inference") for k in res)  # compiled: the training step only
    assert [t["key"] for t in res["targets"]] == ["train_ratio"]


def test_lora_vs_peft_smollm2(tmp_path: Path) -> None:
    res = _run(tmp_path, "--model", "smollm2")
    assert res["config"] == "smollm2-lora-fp32-tiny"
    assert res["shape"]["kv_heads"] < res["shape"]["heads"]  # grouped-query attention, as SmolLM2's
    assert set(res["decode_s"]) == {"base", "peftkit", "peftkit-merged", "peft"}
    assert {"decode_ratio_peftkit", "decode_ratio_peftkit-merged", "decode_ratio_peft"} <= set(res)
    assert set(res["memory"]) == {"frozen", "peftkit", "peft"}  # the no-adapter floor's memory too
    assert [t["key"] for t in res["targets"]] == ["train_ratio", "train_ratio_vs_floor", "step_peak_ratio",
                                                  "decode_ratio_peftkit"]


def test_lora_vs_peft_shapes_are_the_issues() -> None:
    s = lora_vs_peft.SHAPES["smollm2"]
    assert (s.vocab, s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate) == (49152, 576, 30, 9, 3, 1536)
    assert (s.batch, s.seq, s.rank) == (4, 256, 16)
    assert lora_vs_peft.LLAMA_TARGETS == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    m = lora_vs_peft.SHAPES["minilm"]
    assert (m.batch, m.seq, m.rank, m.alpha) == (16, 128, 8, 16)


def test_accelerator_runs_every_registered_method_by_default() -> None:
    from peftkit.core.registry import all_methods

    assert accelerator.method_names(None) == [m.name for m in all_methods()]
    assert accelerator.method_names(" lora, ia3 ") == ["lora", "ia3"]
    with pytest.raises(ValueError, match="unknown method.*nope"):
        accelerator.method_names("lora,nope")


# one method of each family here (every method's bf16 paths: tests/conformance/test_precision.py; every method on a
# BERT classifier: `accelerator.py --device cpu --tiny` with no --methods, ~20 s)
DRY_RUN_METHODS = ["lora", "dora", "ia3", "lntuning", "series_adapter", "prompt_tuning", "mos", "sketchtune"]


def test_accelerator_dry_run_on_cpu(tmp_path: Path) -> None:
    assert accelerator.main(["--device", "cpu", "--tiny", "--threads", "1", "--out", str(tmp_path),
                             "--methods", ",".join(DRY_RUN_METHODS)]) == 0
    res = json.loads((tmp_path / "accelerator-cpu-tiny.json").read_text())
    rows = res["methods"]
    assert {(r["method"], r["setting"]) for r in rows} == {
        (m, s) for m in DRY_RUN_METHODS for s in accelerator.SETTINGS}
    assert all(r["ok"] and r["step_s"] > 0 and math.isfinite(r["loss"]) for r in rows), [
        (r["method"], r["setting"], r.get("error")) for r in rows if not r["ok"]]
    # bf16 weights: the adapters keep float32 parameters (peftkit's default; the head trained in full is the model's
    # bf16), except a method registered with float32_params=False (SketchTune's tables are the weights)
    for r in rows:
        if r["setting"] == "bf16 weights":
            assert ("float32" in r["adapter_dtypes"]) == get_method(r["method"]).float32_params, r
    assert set(res["lora_vs_peft"]) == {f"{m}-lora-{p}-tiny" for m in ("minilm", "smollm2") for p in ("fp32", "bf16")}
    for r in res["lora_vs_peft"].values():
        assert r["memory"] is None  # not measured on the CPU dry run
        _check_finite_positive(_ratios(r))
    md = (tmp_path / "accelerator-cpu-tiny.md").read_text()
    assert "Dry run" in md and f"{len(rows)} of {len(rows)} method × setting runs passed" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_accelerator_without_cuda_says_so_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert accelerator.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--device cpu" in err
    assert not out.exists()


@pytest.mark.parametrize("method", lora_vs_peft.CONVERTED)
def test_every_shared_method_is_configured_alike_in_both_libraries(method: str) -> None:
    """``--method NAME`` for the PEFT types both libraries have: peftkit's config is converted from PEFT's, so the
    two models train the same number of parameters, and one training step of each runs (tiny shapes)."""
    setup = lora_vs_peft.Setup(model="smollm2" if method == "llama_adapter" else "minilm", method=method, tiny=True,
                               threads=1, rounds=1, steps=1)
    models = {k: lora_vs_peft.build(k, setup) for k in ("peftkit", "peft")}
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    assert counts["peftkit"] == counts["peft"] > 0, counts
    for m in models.values():
        before = [p.detach().clone() for p in m.parameters() if p.requires_grad]
        lora_vs_peft.trainer(m, setup)()
        after = [p for p in m.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), "the step changed nothing"
