"""Bad invocations of the CLI, run in-process on a tiny BERT folder (issue 18: bounded inputs, one-line errors).

``CASES`` is a table of bad ``peftkit`` invocations — non-finite / negative / out-of-range options, ranks above a
layer's width, unreadable / empty / malformed data, damaged model folders, damaged ``train_info.json`` files, bad
``--targets`` / ``--method`` / ``--opt`` — and for every row :func:`test_bad_invocation_is_one_line_and_writes_nothing`
asserts: a non-zero exit status, stderr exactly one line ``peftkit: error: ...`` naming the problem (no traceback),
and nothing written (no output folder; an adapter folder that ``eval`` read is unchanged). The tests after the table
assert the corrected behaviour of what used to succeed silently and wrongly (``1`` and ``1.0`` two classes, a BOM in
a column name, an ``eval`` that did not reproduce exiting 0, ...). :func:`test_fault_table_counts` counts the table.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import pytest

import peftkit
from peftkit import PeftkitError
from peftkit import data as D
from peftkit.cli import main
from test_cli import _examples, _make_tiny_bert

HIDDEN = 32  # the tiny BERT's width: every adapted Linear has min(d_in, d_out) = 32
POSITIONS = 64  # its max_position_embeddings


@dataclass
class Env:
    """Paths the cases use: the tiny model, good and bad data files, bad model folders, adapters to evaluate."""

    root: Path
    model: Path
    csv: Path
    files: dict[str, Path]
    adapter: Path  # a real adapter trained by the CLI (read-only for the cases: each case gets its own copy)

    @property
    def out(self) -> Path:
        return self.root / "out"


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _model_copy(src: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dest)
    for name in drop:
        (dest / name).unlink()
    return dest


class _NotAWeight:  # a pickled object torch's weights_only loading refuses
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("faults")
    (root / "tiny-bert").mkdir()
    model = _make_tiny_bert(root / "tiny-bert")
    rows = _examples(120)
    good = "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows)
    csv = _write(root / "data" / "good.csv", good)
    f: dict[str, Path] = {}
    d = root / "data"
    f["empty"] = _write(d / "empty.csv", "")
    f["header_only"] = _write(d / "header.csv", "text,label\n")
    f["wrong_columns"] = _write(d / "cols.csv", "sentence,class\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    f["not_utf8"] = _write(d / "latin1.csv", ("text,label\n" + "caf\xe9 bad,neg\n" * 40).encode("latin-1"))
    f["suffix"] = _write(d / "data.txt", good)
    f["huge_field"] = _write(d / "huge.csv", "text,label\n\"" + "a" * 200_000 + "\",pos\n" + good.split("\n", 1)[1])
    f["one_class"] = _write(d / "one.csv", "text,label\n" + "".join(f"{t},1\n" for t, _ in rows))
    f["label_200000"] = _write(d / "big.csv", "text,label\n" + "".join(
        f"{t},{200000 if i == 0 else i % 2}\n" for i, (t, _) in enumerate(rows)))
    f["empty_label"] = _write(d / "nolabel.csv", good + "some text,\n")
    f["jsonl_bad_line"] = _write(d / "bad.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n')
    f["jsonl_not_object"] = _write(d / "list.jsonl", "[1, 2]\n")
    f["jsonl_nan_label"] = _write(d / "nan.jsonl", '{"text": "good", "label": NaN}\n')
    f["jsonl_text_number"] = _write(d / "num.jsonl", '{"text": 5, "label": 1}\n{"text": "x", "label": 0}\n')
    f["jsonl_label_list"] = _write(d / "ll.jsonl", '{"text": "good", "label": [1]}\n')
    f["long_texts"] = _write(d / "long.csv", "text,label\n" + "".join(
        f"{' '.join([t] * 60)},{lab}\n" for t, lab in rows))
    (d / "folder.csv").mkdir()
    f["folder"] = d / "folder.csv"
    # damaged model folders (tokenizer and config intact, the weights not)
    f["no_config"] = _model_copy(model, root / "m-noconfig", drop=("config.json",))
    f["bad_config"] = _model_copy(model, root / "m-badconfig")
    _write(f["bad_config"] / "config.json", "{not json")
    f["truncated"] = _model_copy(model, root / "m-truncated")
    w = f["truncated"] / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    f["no_weights"] = _model_copy(model, root / "m-noweights", drop=("model.safetensors",))
    f["unsafe_bin"] = _model_copy(model, root / "m-unsafe", drop=("model.safetensors",))
    (f["unsafe_bin"] / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _NotAWeight()}))
    f["a_file"] = _write(root / "a-file", "x")
    f["kg_bad_line"] = d / "kg-bad"  # a KG folder whose train file has a two-field line 2
    _write(f["kg_bad_line"] / "train.txt", "a\tr\tb\nb\tr\n")
    _write(f["kg_bad_line"] / "valid.txt", "a\tr\tb\n")
    _write(f["kg_bad_line"] / "test.txt", "b\tr\ta\n")
    f["kg_no_test"] = d / "kg-no-test"
    _write(f["kg_no_test"] / "train.txt", "a\tr\tb\n")
    _write(f["kg_no_test"] / "valid.txt", "a\tr\tb\n")
    # a trained adapter: eval's inputs
    adapter = root / "adapter"
    with redirect_stdout(StringIO()):
        rc = main(["train", "--model", str(model), "--data", str(csv), "--output", str(adapter), "--steps", "3",
                   "--eval-size", "20", "--batch-size", "16", "--no-progress", "--save-every", "0"])
    assert rc == 0
    return Env(root, model, csv, f, adapter)


def _train(e: Env, *extra: str, data: Path | None = None, model: Path | None = None) -> list[str]:
    return ["train", "--model", str(model or e.model), "--data", str(data or e.csv), "--output", str(e.out),
            "--eval-size", "20", "--batch-size", "16", "--no-progress", "--save-every", "0", *extra]


def _kg(e: Env, *extra: str) -> list[str]:
    return ["train", "--task", "kg-queries", "--output", str(e.out), "--no-progress", *extra]


def _tampered(e: Env, change: Callable[[dict], object]) -> Path:
    """A copy of the trained adapter whose train_info.json is rewritten by ``change`` (edits in place, or returns the
    new content)."""
    dest = e.root / "tampered"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(e.adapter, dest)
    info = json.loads((dest / "train_info.json").read_text())
    new = change(info)
    text = new if isinstance(new, str) else json.dumps(info if new is None else new)
    (dest / "train_info.json").write_text(text)
    return dest


def _fewshot_tampered(e: Env, change: Callable[[dict], object]) -> Path:
    """A copy of a CrossTune head trained by ``--task fewshot`` (trained once) with ``change`` applied to its
    train_info.json."""
    src = e.root / "fewshot-head"
    if not src.exists():
        with redirect_stdout(StringIO()):
            assert main(["train", "--task", "fewshot", "--model", str(e.model), "--data", str(e.csv), "--output",
                         str(src), "--examples", "4", "--epochs", "1", "--eval-size", "20"]) == 0
    dest = e.root / "fewshot-tampered"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    info = json.loads((dest / "train_info.json").read_text())
    change(info)
    (dest / "train_info.json").write_text(json.dumps(info))
    return dest


def _eval(adapter: Path, *extra: str) -> list[str]:
    return ["eval", "--adapter", str(adapter), *extra]


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda info: info.__setitem__(key, value)


Case = tuple[str, Callable[[Env], list[str]], str]

#: (flag, value, what argparse says after "argument FLAG: ") — numbers refused at argument parsing
PARSE_ERRORS: list[tuple[str, str, str]] = [
    ("--lr", "nan", "must be a finite number"), ("--lr", "inf", "must be a finite number"),
    ("--lr", "-1e-3", "must be > 0"), ("--lr", "0", "must be > 0"), ("--lr", "fast", "expected a number"),
    ("--warmup", "nan", "must be a finite number"), ("--warmup", "-2", "must be >= 0"),
    ("--warmup", "inf", "must be a finite number"),
    ("--alpha", "nan", "must be a finite number"), ("--alpha", "-inf", "must be a finite number"),
    ("--head-lr", "nan", "must be a finite number"), ("--head-lr", "0", "must be > 0"),
    ("--epochs", "nan", "must be a finite number"), ("--epochs", "0", "must be > 0"),
    ("--steps", "0", "must be >= 1"), ("--steps", "2.5", "expected an integer"),
    ("--batch-size", "0", "must be >= 1"), ("--batch-size", "nan", "expected an integer"),
    ("--eval-size", "0", "must be >= 1"), ("--eval-size", "-5", "must be >= 1"),
    ("--save-every", "-1", "must be >= 0"),
    ("--density-loss", "nan", "must be a finite number"), ("--density-loss", "0", "must be > 0"),
    ("--threads", "0", "must be >= 1"),
    ("--max-length", "1", "must be >= 2"), ("--max-length", "nan", "expected an integer"),
    ("--rank", "0", "must be >= 1"), ("--rank", "-8", "must be >= 1"),
    ("--seed", "-1", "must be in [0,"), ("--seed", str(2**70), "must be in [0,"),
    ("--max-classes", "0", "must be >= 1"), ("--examples", "-1", "must be >= 0"), ("--image-size", "0", "must be >= 1"),
]
#: (method, --rank) above the tiny BERT's width: refused naming the method's config field
RANK_ABOVE_WIDTH: list[tuple[str, int]] = [("lora", HIDDEN + 1), ("lora", 100000), ("dora", HIDDEN + 1),
                                           ("dylora", HIDDEN + 1), ("randlora", 1000)]
#: (train_info.json field, bad value, what eval says)
TRAIN_INFO_ERRORS: list[tuple[str, object, str]] = [
    ("label_names", 5, "label_names must be a list"), ("label_names", ["x"], "label_names must be"),
    ("max_length", "long", "max_length must be an"), ("max_length", 5000, "5000 exceeds the model's 64 positions"),
    ("seed", None, "seed must be an integer"), ("eval_size", 0, "eval_size must be an integer >= 1"),
]
#: (generate option, value, what argparse says after "argument OPTION: ")
GENERATE_ERRORS: list[tuple[str, str, str]] = [
    ("--top-p", "0", "must be in (0, 1]"), ("--top-p", "1.5", "must be in (0, 1]"),
    ("--temperature", "nan", "must be a finite number"), ("--max-new-tokens", "0", "must be >= 1"),
]


def _name(flag: str, value: object) -> str:
    return f"{flag.lstrip('-')}={value}"


CASES: list[Case] = [
    *[(_name(flag, v), lambda e, f=flag, v=v: _train(e, f"{f}={v}"), f"argument {flag}: {msg}")
      for flag, v, msg in PARSE_ERRORS],
    ("steps-and-epochs", lambda e: _train(e, "--steps", "2", "--epochs", "1"), "not allowed with"),
    *[(f"rank-above-width-{m}-{r}", lambda e, m=m, r=r: _train(e, "--method", m, "--rank", str(r)),
       f"rank {r} exceeds this layer's limit of {HIDDEN} ({peftkit.get_method(m).config.__name__}.r")
      for m, r in RANK_ABOVE_WIDTH],
    *[(f"eval-{_name(k, v)}", lambda e, k=k, v=v: _eval(_tampered(e, _set(k, v))), msg)
      for k, v, msg in TRAIN_INFO_ERRORS],
    *[(f"generate-{_name(o, v)}", lambda e, o=o, v=v: ["generate", "q", "--adapter", str(e.adapter), f"{o}={v}"],
       f"argument {o}: {msg}") for o, v, msg in GENERATE_ERRORS],
    # -- bounds that need the model ----------------------------------------------------------------------------
    ("max-length-above-positions", lambda e: _train(e, "--max-length", "5000", data=e.files["long_texts"]),
     f"--max-length 5000 exceeds the model's {POSITIONS} positions"),
    ("rank-opt-above-width", lambda e: _train(e, "--method", "loldu", "--opt", f"r={HIDDEN * 2}"),
     f"rank {HIDDEN * 2} exceeds"),
    # -- method, targets, --opt --------------------------------------------------------------------------------
    ("method-unknown", lambda e: _train(e, "--method", "nope"), "unknown method 'nope'"),
    ("targets-bad-regex", lambda e: _train(e, "--targets", "(["), "neither a comma list of module names nor a valid"),
    ("targets-no-match", lambda e: _train(e, "--targets", "nosuchlayer"), "matched no module"),
    ("rank-on-rankless-method", lambda e: _train(e, "--method", "ia3", "--rank", "4"), "has no field 'r'"),
    ("opt-unknown-key", lambda e: _train(e, "--opt", "rnk=4"),
     "LoraConfig has no field(s) ['rnk']; valid fields: alpha"),
    ("opt-peft-name-misspelled", lambda e: _train(e, "--opt", "lora_alph=16"), "did you mean 'lora_alpha'"),
    ("opt-peft-names-disagree", lambda e: _train(e, "--alpha", "8", "--opt", "lora_alpha=16"),
     "both set alpha, to different values"),
    ("opt-use-dora-on-lora", lambda e: _train(e, "--opt", "use_dora=true"), "use --method dora"),
    ("compacter-phm-dim-not-dividing", lambda e: _train(e, "--method", "compacter", "--opt", "phm_dim=5"),
     "output channels are not a multiple of phm_dim = 5"),
    ("unipelt-every-component-off", lambda e: _train(e, "--method", "unipelt", "--opt", "prefix_tuning=false",
                                                     "--opt", "adapter=false", "--opt", "lora=false"),
     "prefix_tuning, adapter and lora are all off"),
    ("mam-bottleneck-zero", lambda e: _train(e, "--method", "mam", "--opt", f"reduction_factor={HIDDEN * 2}"),
     f"⌊{HIDDEN} / reduction_factor {HIDDEN * 2}⌋ = 0"),
    ("opt-init-misspelled", lambda e: _train(e, "--opt", "init=evaa"), "did you mean 'eva'"),
    ("opt-loftq-on-embedding", lambda e: _train(e, "--targets", "word_embeddings", "--opt", "init=loftq"),
     "init='loftq' needs a float Linear or GPT-2 Conv1D layer, got a layer of kind 'embedding'"),
    ("opt-eva-rank-above-width", lambda e: _train(e, "--opt", "init=eva", "--rank", str(HIDDEN + 1)),
     f"rank {HIDDEN + 1} exceeds"),
    ("opt-bad-type", lambda e: _train(e, "--opt", "r=\"eight\""), "LoraConfig.r must be"),
    ("opt-no-equals", lambda e: _train(e, "--opt", "r"), "--opt expects key=value"),
    ("opt-nan", lambda e: _train(e, "--opt", "alpha=NaN"), "--opt alpha: must be finite"),
    ("opt-infinity", lambda e: _train(e, "--opt", "dropout=Infinity"), "--opt dropout: must be finite"),
    ("opt-out-of-range", lambda e: _train(e, "--opt", "dropout=2"), "dropout must be in [0, 1)"),
    ("opt-loreft-no-positions", lambda e: _train(e, "--method", "loreft", "--opt", "prefix_positions=0"),
     "prefix_positions, suffix_positions must be >= 0, not both 0"),
    ("opt-loreft-layer-out-of-range", lambda e: _train(e, "--method", "loreft", "--opt", "layers=[99]"),
     "layers=[99] but"),
    ("examples-for-classification", lambda e: _train(e, "--examples", "2"), "--examples applies only to"),
    # -- fewshot (CrossTune head) and multitask-digits (MTLoRA) ----------------------------------------------------
    ("fewshot-examples-0", lambda e: _train(e, "--task", "fewshot", "--examples", "0"), "--examples must be >= 1"),
    ("fewshot-examples-above-smallest-class", lambda e: _train(e, "--task", "fewshot", "--examples", "500"),
     "--examples 500 exceeds the"),
    ("fewshot-rank", lambda e: _train(e, "--task", "fewshot", "--rank", "4"), "--rank does not apply to --task few"),
    ("fewshot-method", lambda e: _train(e, "--task", "fewshot", "--method", "dora"), "--method does not apply"),
    ("fewshot-descriptions-unknown-label", lambda e: _train(e, "--task", "fewshot", "--label-descriptions", str(
        _write(e.root / "desc.json", '{"pos": "good", "neg": "bad", "meh": "so-so"}'))), "unknown label(s) ['meh']"),
    ("fewshot-descriptions-missing", lambda e: _train(e, "--task", "fewshot", "--label-descriptions",
                                                      str(e.root / "none.json")), "file not found"),
    ("label-descriptions-for-classification", lambda e: _train(e, "--label-descriptions", "d.json"),
     "--label-descriptions applies only to --task fewshot"),
    ("eval-fewshot-unknown-head", lambda e: _eval(_fewshot_tampered(e, _set("head", {"kind": "mlp"}))),
     "head must be a CrossTune head config"),
    ("eval-fewshot-head-bad-heads", lambda e: _eval(_fewshot_tampered(
        e, lambda i: i["head"].__setitem__("n_heads", 5))), "must be a positive multiple of n_heads (5)"),
    ("eval-fewshot-head-wider", lambda e: _eval(_fewshot_tampered(
        e, lambda i: i["head"].__setitem__("d_model", 64))), "does not fit the head"),
    ("multitask-not-mtlora", lambda e: ["train", "--task", "multitask-digits", "--output", str(e.out)],
     "use --method mtlora"),
    ("max-classes-for-causal-lm", lambda e: _train(e, "--task", "causal-lm", "--max-classes", "5"),
     "--max-classes applies only to --task classification"),
    # -- --task continual ---------------------------------------------------------------------------------------
    ("continual-overlapping-labels", lambda e: _train(e, "--task", "continual", "--tasks", "neg,pos;pos"),
     "label 'pos' is in tasks 1 and 2; continual tasks need disjoint label sets"),
    ("continual-unknown-label-column", lambda e: _train(e, "--task", "continual", "--label-column", "category"),
     "missing column(s) ['category']"),
    ("continual-unknown-text-column", lambda e: _train(e, "--task", "continual", "--text-column", "body"),
     "missing column(s) ['body']"),
    ("continual-tasks-count", lambda e: _train(e, "--task", "continual", "--tasks", "3"),
     "--tasks 3: the 2 labels make between 1 and 2 tasks"),
    ("continual-tasks-empty-task", lambda e: _train(e, "--task", "continual", "--tasks", "neg;;pos"),
     "an empty task or label"),
    ("continual-tasks-unknown-label", lambda e: _train(e, "--task", "continual", "--tasks", "neg;happy"),
     "--tasks: unknown label 'happy'; the labels are ['neg', 'pos']"),
    ("continual-epochs", lambda e: _train(e, "--task", "continual", "--epochs", "1"),
     "--epochs does not apply to --task continual"),
    ("continual-flag-on-classification", lambda e: _train(e, "--continual", "lae"),
     "--continual applies only to --task continual"),
    ("continual-unknown-method", lambda e: _train(e, "--task", "continual", "--continual", "ewc"),
     "argument --continual: invalid choice: 'ewc'"),
    ("continual-method-with-a-procedure", lambda e: _train(e, "--task", "continual", "--method", "adalora"),
     "--method adalora needs a training procedure of its own, which --task continual does not run"),
    ("continual-data-aware-init", lambda e: _train(e, "--task", "continual", "--opt", "init=eva"),
     "--method lora with these options needs a data-aware calibration, which --task continual does not run"),
    ("continual-ema-decay-above-1", lambda e: _train(e, "--task", "continual", "--ema-decay", "2"),
     "argument --ema-decay: must be in [0, 1]"),
    ("continual-eval-per-class-zero", lambda e: _train(e, "--task", "continual", "--eval-per-class", "0"),
     "argument --eval-per-class: expected a whole number >= 1 or 'all', got '0'"),
    ("continual-eval-per-class-and-eval-size-on-r8",
     lambda e: _train(e, "--task", "continual", "--eval-per-class", "5", data=Path("reuters-r8")),
     "--eval-size and --eval-per-class both choose R8's held-out documents; give one"),
    # -- data --------------------------------------------------------------------------------------------------
    ("data-missing", lambda e: _train(e, data=e.root / "nowhere.csv"), "data file not found"),
    ("data-folder", lambda e: _train(e, data=e.files["folder"]), "is a directory, not a file"),
    ("data-empty-file", lambda e: _train(e, data=e.files["empty"]), "missing column(s) ['text', 'label']"),
    ("data-header-only", lambda e: _train(e, data=e.files["header_only"]), "no examples"),
    ("data-wrong-columns", lambda e: _train(e, data=e.files["wrong_columns"]), "found columns ['sentence', 'class']"),
    ("data-not-utf8", lambda e: _train(e, data=e.files["not_utf8"]), "not UTF-8 text"),
    ("data-unknown-suffix", lambda e: _train(e, data=e.files["suffix"]), "unknown data format '.txt'"),
    ("data-malformed-csv", lambda e: _train(e, data=e.files["huge_field"]), "malformed CSV"),
    ("data-one-class", lambda e: _train(e, data=e.files["one_class"]), "found only ['1']"),
    ("data-label-200000", lambda e: _train(e, data=e.files["label_200000"]),
     "integer label 200000 would make a 200,001-class head"),
    ("data-more-classes-than-max", lambda e: _train(e, "--max-classes", "1"), "more than the limit of 1 classes"),
    ("data-empty-label", lambda e: _train(e, data=e.files["empty_label"]), "empty label"),
    ("data-jsonl-bad-line", lambda e: _train(e, data=e.files["jsonl_bad_line"]), "bad.jsonl:2: not valid JSON"),
    ("data-jsonl-not-object", lambda e: _train(e, data=e.files["jsonl_not_object"]), "expected a JSON object"),
    ("data-jsonl-nan-label", lambda e: _train(e, data=e.files["jsonl_nan_label"]),
     "label must be a string or an integer, got nan"),
    ("data-jsonl-text-number", lambda e: _train(e, data=e.files["jsonl_text_number"]), "text must be a string"),
    ("data-jsonl-label-list", lambda e: _train(e, data=e.files["jsonl_label_list"]),
     "label must be a string or an integer"),
    ("data-eval-size-too-big", lambda e: _train(e, "--eval-size", "500"), "eval size must be between 1 and 119"),
    # -- model folders -----------------------------------------------------------------------------------------
    ("model-missing", lambda e: _train(e, model=e.root / "no-model"), "model folder not found"),
    ("model-no-config", lambda e: _train(e, model=e.files["no_config"]), "not a Hugging Face model folder"),
    ("model-config-not-json", lambda e: _train(e, model=e.files["bad_config"]), "cannot load a sequence-class"),
    ("model-truncated-safetensors", lambda e: _train(e, model=e.files["truncated"]), "SafetensorError"),
    ("model-no-weights", lambda e: _train(e, model=e.files["no_weights"]), "cannot load a sequence-classification"),
    ("model-unsafe-pytorch-bin", lambda e: _train(e, model=e.files["unsafe_bin"]),
     "holds objects that torch's safe (weights_only) loading refuses"),
    # -- output / resume / usage -------------------------------------------------------------------------------
    ("output-under-a-file", lambda e: _train(e, "--output", str(e.files["a_file"] / "run")), "is a file, not a"),
    ("resume-missing", lambda e: ["train", "--resume", str(e.root / "no-run")], "is not a folder"),
    ("unknown-flag", lambda e: _train(e, "--rnak", "3"), "unrecognized arguments: --rnak"),
    ("unknown-task", lambda e: _train(e, "--task", "poetry"), "argument --task: invalid choice"),
    ("no-command", lambda e: [], "required"),
    ("methods-two-formats", lambda e: ["methods", "--json", "--markdown"], "not allowed with"),
    # -- kg-queries (CQD / CQD^A) ---------------------------------------------------------------------------
    ("kg-malformed-line", lambda e: _kg(e, "--kg", str(e.files["kg_bad_line"])),
     "train.txt:2: expected head<TAB>relation<TAB>tail"),
    ("kg-no-test-file", lambda e: _kg(e, "--kg", str(e.files["kg_no_test"])), "no test file"),
    ("kg-missing", lambda e: _kg(e, "--kg", str(e.root / "no-kg")), "knowledge graph"),
    ("kg-opt-unknown", lambda e: _kg(e, "--opt", "beam=3"), "--opt beam: not a kg-queries setting"),
    ("kg-opt-bad-t-norm", lambda e: _kg(e, "--opt", "t_norms=prod,luk"), "--opt t_norms must list prod"),
    ("kg-opt-k-zero", lambda e: _kg(e, "--opt", "k=0"), "--opt k must be a positive integer"),
    ("kg-opt-adapt-bad", lambda e: _kg(e, "--opt", "adapt=sx"), "adapt must be a non-empty subset of 'spo'"),
    ("kg-data-flag", lambda e: _kg(e, "--data", str(e.csv)), "--data (use --kg) does not apply"),
    ("kg-flag-on-classification", lambda e: _train(e, "--kg", "nations"), "--kg applies only to --task kg-queries"),
    # -- eval --------------------------------------------------------------------------------------------------
    ("eval-adapter-missing", lambda e: _eval(e.root / "none"), "adapter folder not found"),
    ("eval-no-train-info", lambda e: _eval(e.files["folder"]), "has no train_info.json"),
    ("eval-train-info-not-json", lambda e: _eval(_tampered(e, lambda i: "{oops")), "is not valid JSON"),
    ("eval-train-info-a-list", lambda e: _eval(_tampered(e, lambda i: [1, 2])), "must hold a JSON object"),
    ("eval-missing-field", lambda e: _eval(_tampered(e, lambda i: i.__delitem__("split_seed"))),
     "lacks ['split_seed']"),
    ("eval-rank-zero", lambda e: _eval(e.adapter, "--rank", "0"), "argument --rank: must be >= 1"),
    ("eval-threads-zero", lambda e: _eval(e.adapter, "--threads", "0"), "argument --threads: must be >= 1"),
    ("eval-data-missing", lambda e: _eval(e.adapter, "--data", str(e.root / "none.csv")), "data file not found"),
    ("eval-data-unknown-label", lambda e: _eval(e.adapter, "--data", str(e.files["one_class"])),
     "unknown label '1'"),
    # -- generate ----------------------------------------------------------------------------------------------
    ("generate-classification-adapter", lambda e: ["generate", "q", "--adapter", str(e.adapter)],
     "holds a classification adapter"),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit status, stdout, stderr of ``peftkit ARGV`` in-process; Python warnings (which pytest would hide) are
    added to stderr, where a real process prints them."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(argv)
    cap = capsys.readouterr()
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return rc, cap.out, shown + cap.err


@pytest.mark.parametrize("name, make, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_invocation_is_one_line_and_writes_nothing(name: str, make: Callable[[Env], list[str]], needle: str,
                                                       env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(env.out, ignore_errors=True)
    argv = make(env)
    adapter_before = _snapshot(env.adapter)
    rc, _, err = _run(argv, capsys)
    lines = err.splitlines()
    assert rc != 0, f"{name}: exit status 0 (a silent success); stderr {err!r}"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: "), err
    assert needle in lines[0], lines[0]
    assert not env.out.exists(), f"{name}: wrote {env.out}"
    assert _snapshot(env.adapter) == adapter_before


def test_fault_table_counts(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """Every row once more, counted: tried = clean one-line errors; silent successes = tracebacks = 0."""
    tried = clean = silent = tracebacks = 0
    for _, make, _ in CASES:
        shutil.rmtree(env.out, ignore_errors=True)
        rc, _, err = _run(make(env), capsys)
        tried += 1
        lines = err.splitlines()
        silent += rc == 0
        tracebacks += "Traceback" in err
        clean += rc != 0 and len(lines) == 1 and lines[0].startswith("peftkit: error: ")
    assert (tried, clean, silent, tracebacks) == (len(CASES), len(CASES), 0, 0)
    assert len({c[0] for c in CASES}) == len(CASES)


# -- what used to succeed silently and wrongly ------------------------------------------------------------------
def test_integral_numeric_labels_are_one_class(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``1``, ``1.0``, ``01`` and ``1e0`` are one class (they were four); ``0.5`` stays a label of its own."""
    rows = _examples(120)
    spell = ["1", "1.0", "01", "1e0"]
    f = _write(tmp_path / "mixed.csv", "text,label\n" + "".join(
        f"{t},{spell[i % 8 // 2] if lab == 'pos' else '0.0'}\n" for i, (t, lab) in enumerate(rows)))
    data = D.load_table(f)
    assert data.label_names == ["0", "1"]
    assert sorted(set(data.labels)) == [0, 1] and data.labels.count(1) == 60
    assert D.load_table(_write(tmp_path / "half.csv", "text,label\na,0.5\nb,1.0\n")).label_names == ["0.5", "1"]
    out = tmp_path / "run"
    argv = _train(env, data=f)
    argv[argv.index("--output") + 1] = str(out)
    rc, stdout, _ = _run([*argv, "--steps", "2"], capsys)
    assert rc == 0
    assert json.loads((out / "train_info.json").read_text())["label_names"] == ["0", "1"]
    assert "2 labels" in stdout
    # an adapter trained on "1" reads "1.0" in another file as the same class
    rc, stdout, err = _run(["eval", "--adapter", str(out), "--data", str(f)], capsys)
    assert rc == 0, err


def test_class_count_is_capped(tmp_path: Path) -> None:
    with pytest.raises(PeftkitError, match=r"200,001-class head .* limit of 10,000 classes \(--max-classes\)"):
        D.infer_label_names(["0", "1", "200000"])
    assert len(D.infer_label_names(["0", "1", "200000"], max_classes=300_000)) == 200_001
    with pytest.raises(PeftkitError, match="3 distinct labels, more than the limit of 2"):
        D.infer_label_names(["a", "b", "c"], max_classes=2)
    assert D.MAX_CLASSES == 10_000


def test_single_class_error_lists_the_labels_present(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(_train(env, data=env.files["one_class"]), capsys)
    assert rc == 1 and "found only ['1']" in err and "'0'" not in err


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    rows = "".join(f"{t},{lab}\n" for t, lab in _examples(10))
    for suffix, head in ((".csv", "text,label\n"), (".tsv", "text\tlabel\n")):
        body = rows if suffix == ".csv" else rows.replace(",", "\t")
        f = tmp_path / f"bom{suffix}"
        f.write_bytes(b"\xef\xbb\xbf" + (head + body).encode())
        data = D.load_table(f)
        assert len(data) == 10 and data.label_names == ["neg", "pos"] and not data.texts[0].startswith("\ufeff")
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    assert D.load_table(f).label_names == ["0", "1"]


def test_eval_exits_1_when_the_metric_is_not_reproduced(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, err = _run(_eval(env.adapter), capsys)
    assert rc == 0 and "— reproduced" in stdout and err == ""
    info = json.loads((env.adapter / "train_info.json").read_text())
    changed = info["correct_after"] - 1 if info["correct_after"] > 0 else 1

    def recorded_other(i: dict) -> None:
        i["correct_after"], i["accuracy_after"] = changed, changed / i["eval_size"]

    # the run info is part of the checksummed unit: a hand edit is refused, so write the changed record as a real save
    from safetensors import safe_open

    from peftkit.core import io

    dest = _tampered(env, recorded_other)
    with safe_open(str(dest / "adapter_model.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    io.write_adapter(dest, io.read_json(dest / "adapter_config.json"), tensors, meta, overwrite=True,
                     extra={"train_info.json": (dest / "train_info.json").read_bytes()})
    rc, stdout, err = _run(_eval(dest), capsys)
    assert rc == 1 and "DIFFERENT" in stdout
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: not reproduced:"), err


def test_rank_bound_names_the_layer_and_changes_nothing() -> None:
    """Every method with a rank field refuses r > min(d_in, d_out) at adapt time, before building anything."""
    import peftkit
    from conformance.models import MODELS, same_state, state_copy
    from peftkit.core.host import Host
    from peftkit.core.registry import all_methods

    model = MODELS["mlp"].build()  # fc1 16 -> 32, fc2 32 -> 16
    ranked = [m for m in all_methods() if "r" in m.config.field_names() and not m.model_level]
    assert {"lora", "dora", "dylora", "randlora", "mtlora", "loldu", "paca"} <= {m.name for m in ranked}
    tested = set()
    for m in ranked:
        if m.name == "explora":  # needs numbered blocks to unfreeze, which the MLP has not (its LoRA part is lora's)
            continue
        before = state_copy(model)
        limit = 32 if m.name == "paca" else 16  # PaCA's r counts input columns: r <= d_in (fc2's d_in = 32)
        try:
            cfg = peftkit.config(m.name, target_modules=["fc2"], r=limit + 1)
        except PeftkitError:
            continue  # the config refuses this r by itself (e.g. a rank that must divide something)
        if "r" not in m.adapter.rank_limits(Host(model.fc2, "fc2"), cfg):
            continue  # an r the layer does not bound (VeRA's shared pair, LoHa's r² Hadamard rank, LoKr's factors)
        with pytest.raises(PeftkitError, match=rf"module 'fc2': rank {limit + 1} exceeds this layer's limit of "
                                               rf"{limit}"):
            peftkit.adapt(model, cfg)
        assert same_state(before, state_copy(model)) and peftkit.adapter_names(model) == [], m.name
        tested.add(m.name)
    assert {"lora", "dora", "dylora", "randlora", "loldu", "paca", "qwha", "petalface"} <= tested


def test_preflight_refuses_what_would_not_fit_in_memory(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The trainable-parameter estimate equals what adapt creates; × 16 bytes above the available memory is an error
    naming both numbers, before anything is allocated."""
    import peftkit
    from peftkit.core.registry import get
    from peftkit.models import load_classifier
    from peftkit.tasks import run as cli_run

    for method, fields in (("lora", {"r": 8}), ("dora", {"r": 4}), ("ia3", {}), ("prompt_tuning", {})):
        model, _ = load_classifier(env.model, 2)
        info = get(method)
        extra = {} if info.model_level else {"target_modules": "all-linear"}
        cfg = info.config.from_dict({**fields, **extra, "modules_to_save": ["classifier"]})
        n = cli_run.trainable_estimate(model, info, cfg)
        peftkit.adapt(model, cfg)
        assert n == sum(p.numel() for p in model.parameters() if p.requires_grad), method
    real = cli_run.available_memory()  # /proc/meminfo's MemAvailable
    assert real is None or real > 2**20
    model, _ = load_classifier(env.model, 2)
    cfg = get("lora").config.from_dict({"r": 8, "target_modules": "all-linear", "modules_to_save": ["classifier"]})
    n = cli_run.trainable_estimate(model, get("lora"), cfg)
    monkeypatch.setattr(cli_run, "available_memory", lambda: 16 * n - 1)  # one byte short
    rc, _, err = _run(_train(env, "--rank", "8"), capsys)
    assert rc == 1 and "Traceback" not in err and len(err.splitlines()) == 1
    assert f"the adapter would train {n:,} parameters: {16 * n / 2**20:.2f} MiB" in err
    assert f"more than the {(16 * n - 1) / 2**20:.2f} MiB of memory available" in err
    assert not env.out.exists()
    monkeypatch.setattr(cli_run, "available_memory", lambda: 16 * n)  # just enough
    rc, _, err = _run([*_train(env, "--rank", "8"), "--steps", "1"], capsys)
    assert rc == 0, err
    shutil.rmtree(env.out)
    assert not env.out.exists()


def test_a_head_too_large_for_memory_is_refused_before_loading(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Past the class cap (--max-classes raised), a 200,001-class head is still checked against the memory
    available before the model is loaded."""
    from peftkit.tasks import run as cli_run

    n = 200_001 * (HIDDEN + 1)
    monkeypatch.setattr(cli_run, "available_memory", lambda: 20 * n - 1)
    monkeypatch.setattr("peftkit.models.load_classifier", lambda *a, **k: pytest.fail("the model was loaded"))
    rc, _, err = _run(_train(env, "--max-classes", "300000", data=env.files["label_200000"]), capsys)
    assert rc == 1 and len(err.splitlines()) == 1
    assert f"a 200,001-class head on {HIDDEN}-wide features has {n:,} parameters: {20 * n / 2**20:.2f} MiB" in err
    assert not env.out.exists()


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import peftkit.cli as cli

    def broken(args: object) -> int:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(cli, "cmd_methods", broken)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    rc, _, err = _run(["methods"], capsys)
    assert rc == 3 and len(err.splitlines()) == 1
    assert err.startswith("peftkit: error: internal error TypeError: unsupported operand") and "PEFTKIT_DEBUG=1" in err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["methods"])
    # expected errors from libraries (files, parsing) are one line with their type, exit status 1
    monkeypatch.delenv(cli.DEBUG_ENV)

    def missing(args: object) -> int:
        raise FileNotFoundError(2, "No such file or directory", "/x/tokenizer.json")

    monkeypatch.setattr(cli, "cmd_methods", missing)
    rc, _, err = _run(["methods"], capsys)
    assert rc == 1 and err == "peftkit: error: No such file or directory: /x/tokenizer.json\n"


def test_default_max_length_is_lowered_to_the_models_positions(capsys: pytest.CaptureFixture[str]) -> None:
    """A task's default max length above a small model's position table is lowered to it (with a notice); the same
    value given with --max-length is an error."""
    from argparse import Namespace
    from types import SimpleNamespace

    from torch import nn

    from peftkit.tasks.run import TrainRun

    model = nn.Module()
    model.config = SimpleNamespace(max_position_embeddings=16)
    run = object.__new__(TrainRun)
    run.args, run.max_length_given = Namespace(max_length=64), False
    run.fit_max_length(model)
    assert run.args.max_length == 16
    assert "default 64 exceeds the model's 16 positions; using 16" in capsys.readouterr().out
    run.args, run.max_length_given = Namespace(max_length=64), True
    with pytest.raises(PeftkitError, match="--max-length 64 exceeds the model's 16 positions"):
        run.fit_max_length(model)
    run.args = Namespace(max_length=16)
    run.fit_max_length(model)  # at the limit: fine
    assert run.args.max_length == 16


def test_max_positions_of_roberta_style_models() -> None:
    """RoBERTa numbers positions from padding_idx + 1: 514 embeddings hold 512 tokens."""
    from types import SimpleNamespace

    from torch import nn

    from peftkit.tasks.run import max_positions

    model = nn.Module()
    model.config = SimpleNamespace(model_type="roberta", max_position_embeddings=514, pad_token_id=1)
    assert max_positions(model) == 512
    model.config = SimpleNamespace(model_type="bert", max_position_embeddings=512, pad_token_id=0)
    assert max_positions(model) == 512
    model.config = SimpleNamespace(model_type="gpt2", n_positions=1024)
    assert max_positions(model) == 1024
    assert max_positions(nn.Linear(2, 2)) is None
