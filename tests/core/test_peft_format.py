"""``save``'s default format is Hugging Face PEFT's (for every method PEFT has), with a real ``task_type``;
``peftkit train``'s output loads in PEFT (``PeftModel`` and ``AutoPeftModelFor…``) with the same outputs, and back;
methods PEFT lacks keep peftkit's format, which PEFT's loader refuses naming peftkit; older peftkit folders load."""

from __future__ import annotations

import copy
import json
import warnings
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.cli import main
from peftkit.core import io
from peftkit.core.model import _adapter_id, get_layer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "a", "plot", "film"]
ATOL = 1e-5  # fp32, two implementations (peftkit vs PEFT)


def make_bert_folder(d: Path) -> Path:
    """A MiniLM-shaped (BERT encoder, WordPiece) 2-layer classifier and its tokenizer, saved as a model folder."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_folder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(48):
        words = [WORDS[int(j)] for j in torch.randint(6, len(WORDS), (3,), generator=g)]
        rows.append(f"{' '.join(words)} {WORDS[i % 3] if i % 2 else WORDS[3 + i % 3]},{'pos' if i % 2 else 'neg'}\n")
    p = tmp_path_factory.mktemp("data") / "reviews.csv"
    p.write_text("text,label\n" + "".join(rows))
    return p


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _ids() -> torch.Tensor:
    return torch.randint(5, 5 + len(WORDS), (3, 9), generator=torch.Generator().manual_seed(4))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(), attention_mask=torch.ones(3, 9, dtype=torch.long)).logits


def _bert(d: Path) -> nn.Module:
    return _quiet(transformers.BertForSequenceClassification.from_pretrained, str(d)).eval()


# -- every shared method: trained by `peftkit train`, loaded by PEFT, and back ------------------------------------
TRAIN_CASES: dict[str, tuple[list[str], str]] = {
    "lora": (["--method", "lora", "--rank", "4"], "LORA"),
    "rslora": (["--method", "lora", "--rank", "4", "--opt", "rslora=true"], "LORA"),
    "dora": (["--method", "dora", "--rank", "4"], "LORA"),
    "pissa": (["--method", "lora", "--rank", "4", "--opt", "init=pissa"], "LORA"),
    "ia3": (["--method", "ia3"], "IA3"),
    "lntuning": (["--method", "lntuning"], "LN_TUNING"),
    "prompt_tuning": (["--method", "prompt_tuning"], "PROMPT_TUNING"),
    "randlora": (["--method", "randlora", "--rank", "8"], "RANDLORA"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_output_loads_in_peft_and_back(case: str, bert_dir: Path, csv_file: Path, tmp_path: Path) -> None:
    args, peft_type = TRAIN_CASES[case]
    out = tmp_path / "adapter"
    with redirect_stdout(StringIO()):
        rc = main(["train", "--model", str(bert_dir), "--data", str(csv_file), "--output", str(out), "--steps", "4",
                   "--eval-size", "8", "--batch-size", "8", "--lr", "5e-2", "--no-progress", *args])
    assert rc == 0
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == peft_type and meta["task_type"] == "SEQ_CLS"
    assert meta["base_model_name_or_path"] == str(bert_dir.resolve())
    assert (out / "train_info.json").is_file()  # peftkit's run record rides along; PEFT ignores it

    ours = _bert(bert_dir)
    peftkit.load(ours, out)
    expected = _logits(ours)
    base = _logits(_bert(bert_dir))
    assert (expected - base).abs().max() > 1e-3  # the trained adapter (and head) changed the outputs

    via_peft = _quiet(peft.PeftModel.from_pretrained, _bert(bert_dir), str(out)).eval()
    torch.testing.assert_close(_logits(via_peft), expected, rtol=0, atol=ATOL)
    via_auto = _quiet(peft.AutoPeftModelForSequenceClassification.from_pretrained, str(out)).eval()
    torch.testing.assert_close(_logits(via_auto), expected, rtol=0, atol=ATOL)

    # and back: PEFT's adapter changed (as training would; it loads frozen, so by hand), saved by PEFT, read by peftkit
    trained = ("lora_", "ia3_", "randlora_", "prompt_encoder", "ln_tuning_layers", "classifier.modules_to_save")
    names = [n for n, _ in via_peft.named_parameters() if any(t in n for t in trained)]
    assert names
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in via_peft.named_parameters():
            if n in names:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    changed = _logits(via_peft)
    assert (changed - expected).abs().max() > 1e-4
    _quiet(via_peft.save_pretrained, str(tmp_path / "from_peft"))
    back = _bert(bert_dir)
    peftkit.load(back, tmp_path / "from_peft")
    torch.testing.assert_close(_logits(back), changed, rtol=0, atol=ATOL)


def test_prefix_tuning_on_a_causal_lm_loads_in_peft_and_back(tmp_path: Path) -> None:
    """Prefix tuning (PEFT's runs on models that take past_key_values: a causal LM here, as transformers' BERT no
    longer does), through the Python API the CLI uses: saved by default, loaded by PeftModel and
    AutoPeftModelForCausalLM (base from the local folder the adapter names), and back."""
    torch.manual_seed(0)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(folder)

    def llama() -> nn.Module:
        return _quiet(transformers.LlamaForCausalLM.from_pretrained, str(folder)).eval()

    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))

    def out(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    model = llama()
    peftkit.adapt(model, peftkit.config("prefix_tuning", num_virtual_tokens=3, encoder_hidden_size=8))
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.3 * torch.randn_like(p))
    expected = out(model)
    peftkit.save(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (meta["peft_type"], meta["task_type"]) == ("PREFIX_TUNING", "CAUSAL_LM")
    via_peft = _quiet(peft.PeftModel.from_pretrained, llama(), str(tmp_path / "a")).eval()
    torch.testing.assert_close(out(via_peft), expected, rtol=0, atol=ATOL)
    via_auto = _quiet(peft.AutoPeftModelForCausalLM.from_pretrained, str(tmp_path / "a")).eval()
    torch.testing.assert_close(out(via_auto), expected, rtol=0, atol=ATOL)
    with torch.no_grad():
        for n, p in via_peft.named_parameters():
            if "prompt_encoder" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    changed = out(via_peft)
    assert (changed - expected).abs().max() > 1e-4
    _quiet(via_peft.save_pretrained, str(tmp_path / "b"))
    back = llama()
    peftkit.load(back, tmp_path / "b")
    torch.testing.assert_close(out(back), changed, rtol=0, atol=ATOL)


def test_pissa_is_written_as_peft_converts_it_and_read_back_as_pissa(bert_dir: Path, tmp_path: Path) -> None:
    """PiSSA: PEFT's converted LoRA (rank 2r, [A; A0], [B, −B0], α doubled) on the untouched base; peftkit's own
    config in the file's metadata splits it back into PiSSA's trained and initial factors."""
    model = _bert(bert_dir)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["query", "value"], r=2, alpha=4, init="pissa"))
    layer = get_layer(model, "bert.encoder.layer.0.attention.self.query")
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    expected = _logits(model)
    peftkit.save(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (meta["r"], meta["lora_alpha"], meta["init_lora_weights"]) == (4, 8, True)
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    ad = layer.adapters["default"]
    assert torch.equal(tensors[key], torch.cat([ad.lora_A, ad.pissa_A0]).detach())
    loaded = _quiet(peft.PeftModel.from_pretrained, _bert(bert_dir), str(tmp_path / "a")).eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=ATOL)
    back = _bert(bert_dir)
    peftkit.load(back, tmp_path / "a")
    cfg = peftkit.get_config(back, "default")
    assert (cfg.init, cfg.r) == ("pissa", 2)
    ad2 = get_layer(back, "bert.encoder.layer.0.attention.self.query").adapters["default"]
    assert torch.equal(ad2.pissa_B0, ad.pissa_B0) and torch.equal(ad2.lora_B, ad.lora_B.detach())
    assert torch.equal(_logits(back), expected)


# -- task_type ---------------------------------------------------------------------------------------------------
def _tiny(cls_name: str) -> nn.Module:
    torch.manual_seed(0)
    if "Llama" in cls_name:
        cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1)
    elif "GPT2" in cls_name:
        cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40)
    else:
        cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)
    return getattr(transformers, cls_name)(cfg).eval()


@pytest.mark.parametrize(("cls_name", "task"), [
    ("BertForSequenceClassification", "SEQ_CLS"), ("LlamaForCausalLM", "CAUSAL_LM"), ("GPT2LMHeadModel", "CAUSAL_LM"),
    ("BertForTokenClassification", "TOKEN_CLS"), ("BertForQuestionAnswering", "QUESTION_ANS"),
    ("BertModel", "FEATURE_EXTRACTION"), ("LlamaModel", "FEATURE_EXTRACTION"), ("BertForMaskedLM", None),
])
def test_task_type_is_inferred_from_the_model_class(cls_name: str, task: str | None, tmp_path: Path) -> None:
    model = _tiny(cls_name)
    targets = ["c_attn"] if "GPT2" in cls_name else ["q_proj"] if "Llama" in cls_name else ["query"]
    peftkit.adapt(model, peftkit.config("lora", target_modules=targets, r=2))
    peftkit.save(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["task_type"] == task
    heads = {"SEQ_CLS": "classifier", "TOKEN_CLS": "classifier", "QUESTION_ANS": "qa_outputs"}
    if task in heads:  # PEFT's PeftModelFor… requires its head in the file: the model's own weights are written
        assert meta["modules_to_save"] == [heads[task]]
        ref = _tiny(cls_name)
        pm = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(ref), str(tmp_path / "a")).eval()
        assert type(pm).__name__ == {"SEQ_CLS": "PeftModelForSequenceClassification",
                                     "TOKEN_CLS": "PeftModelForTokenClassification",
                                     "QUESTION_ANS": "PeftModelForQuestionAnswering"}[task]


def test_plain_module_has_null_task_type_and_a_given_one_wins(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    peftkit.adapt(model, peftkit.config("lora", target_modules=["0"], r=2))
    peftkit.save(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] is None
    llama = _tiny("LlamaModel")
    peftkit.adapt(llama, peftkit.config("lora", target_modules=["q_proj"], r=2, task_type="CAUSAL_LM"))
    peftkit.save(llama, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


# -- methods PEFT lacks, older folders, PEFT types peftkit does not read --------------------------------------
def test_method_peft_lacks_keeps_peftkit_format_and_peft_refuses_it_by_name(bert_dir: Path, tmp_path: Path) -> None:
    model = _bert(bert_dir)
    peftkit.adapt(model, peftkit.config("kron", target_modules=["query", "value"]))
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    expected = _logits(model)
    peftkit.save(model, tmp_path / "k")
    meta = json.loads((tmp_path / "k" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "PEFTKIT_KRON" and meta["format"] == "peftkit" and meta["config"]["method"] == "kron"
    assert "peftkit.load" in meta["not_hf_peft"]
    # PEFT looks the type up in its table: the error it raises (a KeyError) carries the name PEFTKIT_KRON
    with pytest.raises(KeyError, match="PEFTKIT_KRON"):
        _quiet(peft.PeftModel.from_pretrained, _bert(bert_dir), str(tmp_path / "k"))
    with pytest.raises(KeyError, match="PEFTKIT_KRON"):
        _quiet(peft.AutoPeftModelForSequenceClassification.from_pretrained, str(tmp_path / "k"))
    back = _bert(bert_dir)
    peftkit.load(back, tmp_path / "k")
    assert torch.equal(_logits(back), expected)


def test_option_peft_cannot_hold_falls_back_to_peftkit_format(bert_dir: Path, tmp_path: Path) -> None:
    model = _bert(bert_dir)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["query"], r=2, overrides={"query": {"dropout": 0.1}}))
    peftkit.save(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "PEFTKIT_LORA" and "overrides['query'] sets ['dropout']" in meta["not_hf_peft"]
    with pytest.raises(peftkit.PeftkitError, match="cannot save in Hugging Face PEFT format"):
        peftkit.save(model, tmp_path / "b", format="hf")
    back = _bert(bert_dir)
    peftkit.load(back, tmp_path / "a")
    assert peftkit.get_config(back, "default").overrides == {"query": {"dropout": 0.1}}


def _save_like_main_before(model: nn.Module, d: Path, name: str = "default") -> None:
    """An adapter folder exactly as ``peftkit.save`` wrote it before PEFT's format became the default."""
    cfg = peftkit.get_config(model, name)
    meta = {"format": "peftkit", "format_version": 2, "name": name, "base_model_class": type(model).__name__,
            "config": cfg.to_dict()}
    ident = _adapter_id(model, name)
    io.write_adapter(d, json.loads(io.dumps(meta)), peftkit.adapter_state_dict(model, name),
                     metadata={"format": "pt", "peftkit_method": cfg.method, io.ID_KEY: ident})


@pytest.mark.parametrize("method", ["lora", "kron", "ia3"])
def test_folders_written_by_the_old_default_still_load(method: str, bert_dir: Path, tmp_path: Path) -> None:
    model = _bert(bert_dir)
    peftkit.adapt(model, peftkit.config(method, target_modules=["query", "value"],
                                        modules_to_save=["classifier"]), name="mine")
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    expected = _logits(model)
    _save_like_main_before(model, tmp_path / "old", "mine")
    assert "peft_type" not in json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    back = _bert(bert_dir)
    assert peftkit.load(back, tmp_path / "old") == "mine"
    assert torch.equal(_logits(back), expected)
    peftkit.save(back, tmp_path / "old")  # re-saving the same adapter over it: the new default format
    assert json.loads((tmp_path / "old" / "adapter_config.json").read_text())["peft_type"] in ("LORA", "IA3",
                                                                                                "PEFTKIT_KRON")
    again = _bert(bert_dir)
    assert peftkit.load(again, tmp_path / "old") == "mine"
    assert torch.equal(_logits(again), expected)


def test_peft_type_peftkit_does_not_read_lists_the_ones_it_reads(bert_dir: Path, tmp_path: Path) -> None:
    pm = _quiet(peft.get_peft_model, _bert(bert_dir), peft.HRAConfig(r=4, target_modules=["query", "value"]))
    _quiet(pm.save_pretrained, str(tmp_path / "hra"))
    model = _bert(bert_dir)
    with pytest.raises(peftkit.PeftkitError) as err:
        peftkit.load(model, tmp_path / "hra")
    msg = str(err.value)
    assert "'HRA' is not supported" in msg
    for t in ("IA3", "LN_TUNING", "LORA", "PREFIX_TUNING", "PROMPT_TUNING", "RANDLORA", "VERA", "ADALORA"):
        assert t in msg.split("peftkit reads:")[1]
    assert peftkit.adapter_names(model) == []


def test_name_survives_the_peft_format(bert_dir: Path, tmp_path: Path) -> None:
    model = _bert(bert_dir)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["query"], r=2), name="sentiment")
    peftkit.save(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert peftkit.load(_bert(bert_dir), tmp_path / "a") == "sentiment"
