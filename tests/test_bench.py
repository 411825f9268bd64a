"""``peftkit bench`` on a tiny BERT folder and a CSV: results.json, the Markdown table, the plot; failures become rows;
bad input is one line and writes nothing. Plus the pieces: options, table, timing pass, the methods_table wrapper."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import data as D
from peftkit.bench import options as O
from peftkit.bench import report, runner
from peftkit.bench.timing import measure
from peftkit.cli import main

POS = ["good", "great", "fine", "nice", "love", "superb"]
NEG = ["bad", "awful", "poor", "hate", "dull", "boring"]
FILL = ["the", "movie", "was", "a", "plot", "acting", "film", "really"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT classifier and its WordPiece tokenizer, saved like a Hugging Face model folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILL
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    lines = []
    for i in range(200):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILL, 3) + [rng.choice(POS if label == "pos" else NEG)]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{label}\n")
    p = tmp_path_factory.mktemp("data") / "reviews.csv"
    p.write_text("text,label\n" + "".join(lines))
    return p


def _bench(tiny_dir: Path, csv_file: Path, out: Path, methods: str, *extra: str) -> int:
    return main(["bench", "--methods", methods, "--model", str(tiny_dir), "--data", str(csv_file), "--steps", "2",
                 "--eval-size", "40", "--threads", "1", "--out", str(out), "--no-progress", *extra])


def _trainable(tiny_dir: Path, method: str) -> tuple[int, int]:
    """(trainable, total) parameters of ``method`` adapted in this process the way ``peftkit train`` adapts it."""
    from peftkit.models import load_classifier

    model, _ = load_classifier(tiny_dir, 2, seed=0)
    cfg = peftkit.config(method, target_modules="all-linear", modules_to_save=["classifier"])
    peftkit.adapt(model, cfg)
    s = peftkit.summary(model)
    return s.trainable, s.total


# -- the whole command ----------------------------------------------------------------------------------------
def test_bench_three_methods_writes_json_table_and_plot(tiny_dir: Path, csv_file: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    assert _bench(tiny_dir, csv_file, out, "ia3,lora,dora") == 0  # timing pass on (the default without --quick)
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert [r["method"] for r in rows] == ["lora", "ia3", "dora"]  # the reference first
    assert all("error" not in r for r in rows), rows
    s = data["settings"]
    assert (s["steps"], s["eval_size"], s["seed"], s["threads"], s["timing"]) == (2, 40, 0, 1, True)
    assert s["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    for r in rows:  # same budget and split for all, and every number the table needs
        assert (r["steps"], r["eval_size"], r["seed"], r["split_seed"]) == (2, 40, 0, 0)
        assert r["timing_step_seconds"] > 0 and r["step_seconds"] > 0
        assert 0.0 <= r["accuracy_after"] <= 1.0
    by = {r["method"]: r for r in rows}
    for m in ("lora", "dora"):  # the counts are those of the method adapted in this process
        assert (by[m]["trainable_params"], by[m]["total_params"]) == _trainable(tiny_dir, m)
    md = (out / "results.md").read_text()
    lora_line = next(ln for ln in md.splitlines() if ln.startswith("| lora |"))
    cells = [c.strip() for c in lora_line.strip("|").split("|")]
    assert cells[2] == f"{by['lora']['trainable_params']:,}"
    assert cells[3] == f"{100 * by['lora']['trainable_params'] / by['lora']['total_params']:.3f}"
    assert cells[4:6] == ["1.00", "1.00"]  # LoRA is the reference of both relative columns
    assert cells[6] == f"{by['lora']['accuracy_after']:.3f}"
    dora = [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| dora |")).strip("|").split("|")]
    assert float(dora[4]) == pytest.approx(by["dora"]["timing_step_seconds"] / by["lora"]["timing_step_seconds"],
                                           abs=0.006)
    assert "fixed-batch timing pass" in md
    labels = [ln.rsplit(",", 1)[1] for ln in csv_file.read_text().splitlines()[1:]]
    held_out = [labels[i] for i in D.split_indices(len(labels), 40, 0)[1]]
    majority = max(held_out.count("pos"), held_out.count("neg")) / 40
    assert s["majority_accuracy"] == majority and f"most frequent label scores {majority:.3f}" in md
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "logs" / "dora.log").read_text().startswith("$ peftkit train --method dora")
    assert "3/3 methods completed" in printed and lora_line in printed


def test_a_failing_method_leaves_a_row_and_the_others_complete(tiny_dir: Path, csv_file: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(O.OPTIONS, "lora/broken", ["--opt", "r=-3"])  # an impossible option: the child process fails
    real = runner.train_one

    def train_one(method: str, *args: object, **kw: object) -> dict:
        if method == "ia3":
            raise RuntimeError("the ia3 run crashed\non two lines")
        return real(method, *args, **kw)

    monkeypatch.setattr(runner, "train_one", train_one)  # an exception in the bench itself
    out = tmp_path / "b"
    assert _bench(tiny_dir, csv_file, out, "lora/broken,ia3,lora", "--no-timing") == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == ["lora", "lora/broken", "ia3"]
    assert "error" not in rows["lora"] and rows["lora"]["steps"] == 2
    assert "r" in rows["lora/broken"]["error"] and "-3" in rows["lora/broken"]["error"]
    assert rows["ia3"]["error"] == "RuntimeError: the ia3 run crashed on two lines"
    md = (out / "results.md").read_text().splitlines()
    broken = next(ln for ln in md if ln.startswith("| lora/broken |"))
    assert "--opt r=-3" in broken and f"failed: {rows['lora/broken']['error']}" in broken
    assert next(ln for ln in md if ln.startswith("| ia3 |")).endswith("failed: RuntimeError: the ia3 run crashed on "
                                                                      "two lines |")
    assert next(ln for ln in md if ln.startswith("| lora |")).count("1.00") == 2  # training-run numbers, no timing
    assert (out / "results.png").stat().st_size > 0


@pytest.mark.parametrize("args, needle", [
    (["--methods", "lora,nosuch"], "unknown method 'nosuch'; registered methods: "),
    (["--methods", "lora/nosuch"], "unknown method 'lora/nosuch'"),
    (["--methods", ","], "--methods is empty"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--eval-size", "5000"], "eval size must be between 1 and 199"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(args: list[str], needle: str, tiny_dir: Path, csv_file: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    rc = main(["bench", "--model", str(tiny_dir), "--data", str(csv_file), "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("peftkit: error: ") and needle in err[0], err
    if "registered methods" in needle:
        assert all(m.name in err[0] for m in peftkit.all_methods())
    assert not out.exists()


# -- the pieces -----------------------------------------------------------------------------------------------
def test_resolve_methods_defaults_and_reference() -> None:
    every = runner.resolve_methods(None)
    assert every[0] == "lora" and sorted(every) == sorted(m.name for m in peftkit.all_methods() if runner.supports(m))
    assert runner.resolve_methods(None, variants=True)[len(every):] == [k for k in O.OPTIONS if "/" in k]
    assert runner.resolve_methods(["dora", "ia3", "dora"]) == ["lora", "dora", "ia3"]
    assert runner.resolve_methods(["dora"], reference=False) == ["dora"]
    assert set(O.QUICK_METHODS) <= {m.name for m in peftkit.all_methods()}


def test_options_placeholders_follow_the_steps() -> None:
    assert O.train_options("triadaptlora", 40) == ["--opt", "total_steps=40"]
    assert O.train_options("randlora/lr2e-3", 40) == ["--lr", "2e-3"]
    assert O.config_options("diffora", 300) == {"search_steps": "100"}
    assert O.config_options("diffora", 2) == {"search_steps": "1"}
    assert O.train_options("not-listed", 10) == []
    for method, args in O.OPTIONS.items():  # every entry is flag/value pairs naming a registered method's fields
        info = peftkit.get_method(O.base_method(method))
        assert len(args) % 2 == 0 and set(args[::2]) <= {"--lr", "--head-lr", "--opt"}, method
        assert set(O.config_options(method, 300)) <= set(info.config.field_names()), method


def test_table_relative_columns_and_sources() -> None:
    ok = {"options": "", "total_params": 1000, "accuracy_after": 0.8}
    rows = [
        {"method": "lora", "trainable_params": 100, "step_seconds": 0.5, "train_peak_mib": 40.0,
         "timing_step_seconds": 0.2, "timing_peak_mib": 10.0, **ok},
        {"method": "dora", "trainable_params": 120, "step_seconds": 1.0, "train_peak_mib": 50.0,
         "timing_step_seconds": 0.3, "timing_peak_mib": 25.0, **ok},
        {"method": "ia3", "trainable_params": 5, "step_seconds": 0.25, "train_peak_mib": 60.0,
         "timing_error": "boom", **ok},
        {"method": "mos", "options": "--lr 1e-2", "error": "MoS needs | more ranks"},
    ]
    lines = report.table(rows).splitlines()
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:6]}
    assert cells["lora"][2:7] == ["100", "10.000", "1.00", "1.00", "0.800"]
    assert cells["dora"][4:6] == ["1.50", "2.50"]  # timing pass vs timing pass
    assert cells["ia3"][3:6] == ["0.500", "0.50", "1.50"]  # no timing: training run vs training run
    assert lines[5] == "| mos | --lr 1e-2 | | | | | failed: MoS needs \\| more ranks |"  # a "|" is escaped
    text = "\n".join(lines)
    assert "lora: 200 ms/step, step peak +10 MiB (fixed-batch timing pass)" in text
    assert "Timing pass failed: ia3 (boom)" in text
    assert "No lora row ran" in report.table(rows[1:])


def test_failure_line_of_a_child_process() -> None:
    def cp(rc: int, err: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], rc, "", err)

    assert runner.failure(cp(1, "noise\npeftkit: error: bad   thing\n")) == "bad thing"
    assert runner.failure(cp(1, "Traceback (most recent call last):\n  ...\nValueError: x\n")) == "ValueError: x"
    assert runner.failure(cp(-9, "")) == "exit status -9 (killed by a signal)"


def test_timing_pass_measures_a_step_with_the_methods_procedure(tiny_dir: Path) -> None:
    torch_threads = torch.get_num_threads()
    try:
        r = measure("lora", str(tiny_dir), batch_size=4, max_length=16, threads=1, steps=3)
        assert r["method"] == "lora" and r["step_seconds"] > 0
        if sys.platform == "linux":
            assert r["step_peak_mib"] is not None and r["step_peak_mib"] >= 0
        # a procedure that needs the run length gets it from the options, as in `peftkit train`
        g = measure("triadaptlora", str(tiny_dir), batch_size=4, max_length=16, threads=1, steps=2,
                    opts=O.config_options("triadaptlora", 5))
        assert g["step_seconds"] > 0
    finally:
        torch.set_num_threads(torch_threads)


def test_methods_table_wrapper_keeps_its_cli(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "methods_table.py"), "--methods", "nosuch",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 1 and "unknown method 'nosuch'; registered methods:" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_children_wait_passively_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert runner.child_env(X="1")["OMP_WAIT_POLICY"] == "PASSIVE" and runner.child_env(X="1")["X"] == "1"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert runner.child_env()["OMP_WAIT_POLICY"] == "ACTIVE"
