"""Hugging Face PEFT file format, both directions: adapters saved by ``peft`` load into peftkit with the same outputs,
adapters exported by peftkit load into ``peft`` with the same outputs; unsupported options and wrong
architectures fail cleanly and leave the model unchanged."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from conformance.models import same_state, state_copy
from tolerance import assert_near

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HF_PREFIX = "base_model.model."


# -- tiny base models, built in-test ---------------------------------------------------------------------------
def _bert(hidden: int = 32) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    return transformers.BertForSequenceClassification(cfg).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    """Embedding, Conv1d, Conv2d and Linear hosts in one model (the layouts that differ in Hugging Face files)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(1, 4, 3, padding=1)
        self.lin = nn.Linear(6 * 4 * 5, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.c1(self.emb(input_ids).transpose(1, 2))  # (B, 6, 5)
        h = self.c2(h.unsqueeze(1))  # (B, 4, 6, 5)
        return self.lin(torch.tanh(h).flatten(1))


BUILD: dict[str, Callable[[], nn.Module]] = {"bert": _bert, "gpt2": _gpt2, "convnet": lambda: ConvNet().eval()}


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    vocab, seq = (10, 5) if kind == "convnet" else (100, 7)
    return {"input_ids": torch.randint(0, vocab, (3, seq), generator=g)}


def _out(model: nn.Module, kind: str) -> torch.Tensor:
    """The logits and, for transformers models, the last hidden state (O(1) values: a sensitive comparison)."""
    with torch.no_grad():
        if kind == "convnet":
            return model(**_inputs(kind))
        y = model(**_inputs(kind), output_hidden_states=True)
    return torch.cat([y.logits.flatten(), y.hidden_states[-1].flatten()])


def _randomize(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Perturb every trainable tensor (LoRA A *and* B — B starts at zero —, DoRA magnitudes, saved copies, biases)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
                n += 1
    assert n > 0


# -- the cases: (model, peft LoraConfig kwargs, the same adapter as a peftkit config) ---------------------------
BERT_REGEX = r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key)|output\.dense)"
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, dict[str, Any]]]] = {
    "lora": ("bert", {"target_modules": ["query", "value"], "r": 4, "lora_alpha": 8},
             ("lora", {"target_modules": ["query", "value"], "r": 4, "alpha": 8})),
    "rslora": ("bert", {"target_modules": ["query", "key", "value"], "r": 4, "lora_alpha": 6, "use_rslora": True},
               ("lora", {"target_modules": ["query", "key", "value"], "r": 4, "alpha": 6, "rslora": True})),
    "dora": ("bert", {"target_modules": ["query", "value", "dense"], "r": 4, "lora_alpha": 8, "use_dora": True},
             ("dora", {"target_modules": ["query", "value", "dense"], "r": 4, "alpha": 8})),
    "regex": ("bert", {"target_modules": BERT_REGEX, "r": 2, "lora_alpha": 4},
              ("lora", {"target_modules": BERT_REGEX, "r": 2, "alpha": 4})),
    # two rank patterns match layer 1's query: Hugging Face takes the first, peftkit's overrides the last
    "patterns": ("bert", {"target_modules": ["query", "value", "dense"], "r": 4, "lora_alpha": 8,
                          "rank_pattern": {"layer.1.attention.self.query": 6, "query": 2, "value": 3},
                          "alpha_pattern": {"query": 3, "output.dense": 5}},
                 ("lora", {"target_modules": ["query", "value", "dense"], "r": 4, "alpha": 8,
                           "overrides": {"query": {"r": 2, "alpha": 3}, "layer.1.attention.self.query": {"r": 6},
                                         "value": {"r": 3}, "output.dense": {"alpha": 5}}})),
    "modules_to_save": ("bert", {"target_modules": ["query", "value"], "r": 4, "lora_alpha": 8,
                                 "modules_to_save": ["classifier"], "bias": "lora_only"},
                        ("lora", {"target_modules": ["query", "value"], "r": 4, "alpha": 8,
                                  "modules_to_save": ["classifier"], "bias": "adapter_only"})),
    "dora_bias_all": ("bert", {"target_modules": ["query", "value"], "r": 4, "lora_alpha": 8, "use_dora": True,
                               "modules_to_save": ["classifier"], "bias": "all"},
                      ("dora", {"target_modules": ["query", "value"], "r": 4, "alpha": 8,
                                "modules_to_save": ["classifier"], "bias": "all"})),
    "gpt2_fan_in_fan_out": ("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "r": 4, "lora_alpha": 8,
                                     "fan_in_fan_out": True},
                            ("lora", {"target_modules": ["c_attn", "c_proj", "c_fc"], "r": 4, "alpha": 8})),
    "gpt2_dora": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "r": 4, "lora_alpha": 8, "use_dora": True,
                           "fan_in_fan_out": True},
                  ("dora", {"target_modules": ["c_attn", "c_proj"], "r": 4, "alpha": 8})),
    "conv_embedding_lora": ("convnet", {"target_modules": ["emb", "c1", "c2", "lin"], "r": 2, "lora_alpha": 4},
                            ("lora", {"target_modules": ["emb", "c1", "c2", "lin"], "r": 2, "alpha": 4})),
    "conv_dora": ("convnet", {"target_modules": ["c1", "c2", "lin"], "r": 2, "lora_alpha": 4, "use_dora": True},
                  ("dora", {"target_modules": ["c1", "c2", "lin"], "r": 2, "alpha": 4})),
}


def _peft_model(base: nn.Module, peft_kwargs: dict[str, Any]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**peft_kwargs))  # it mutates its model


def _save_with_peft(base: nn.Module, peft_kwargs: dict[str, Any], d: Path, seed: int = 1) -> torch.Tensor:
    pm = _peft_model(base, peft_kwargs)
    _randomize(pm, seed)
    pm.eval()
    pm.save_pretrained(str(d))
    return _out(pm, "convnet" if isinstance(base, ConvNet) else "hf")


def _load_with_peft(base: nn.Module, d: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT correcting a wrong fan_in_fan_out
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside PEFT
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()


def _lora_layers(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_into_peftkit_with_same_outputs(case: str, tmp_path: Path) -> None:
    kind, peft_kwargs, (method, _) = CASES[case]
    base = BUILD[kind]()
    pm = _peft_model(base, peft_kwargs)
    _randomize(pm)
    pm.eval()
    ref = _out(pm, kind)
    pm.save_pretrained(str(tmp_path))
    assert (ref - _out(base, kind)).abs().max() > 0.1  # the adapter really changes the function

    model = copy.deepcopy(base)
    assert peftkit.load(model, tmp_path) == "default"
    assert_near(_out(model, kind), ref, 64, layers=6)  # peftkit vs PEFT
    cfg = peftkit.get_config(model, "default")
    assert cfg.method == method
    assert sorted(p for p, _ in peftkit.adapted_layers(model)) == _lora_layers(pm)
    for path, layer in peftkit.adapted_layers(model):  # rank_pattern / alpha_pattern honoured per module
        hf_layer = pm.base_model.model.get_submodule(path)
        a = layer.adapters["default"]
        assert (a.r, a.s) == (hf_layer.r["default"], hf_layer.scaling["default"]), path


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_exports_to_peft_with_same_outputs(case: str, tmp_path: Path) -> None:
    kind, _, (method, fields) = CASES[case]
    base = BUILD[kind]()
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config(method, **fields))
    _randomize(model)
    model.eval()
    ref = _out(model, kind)
    assert (ref - _out(base, kind)).abs().max() > 0.1
    peftkit.save(model, tmp_path, format="hf")

    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["use_dora"] == (method == "dora")
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith(HF_PREFIX) for k in keys)
    pm = _load_with_peft(base, tmp_path)
    assert_near(_out(pm, kind), ref, 64, layers=6)  # peftkit vs PEFT
    assert _lora_layers(pm) == sorted(p for p, _ in peftkit.adapted_layers(model))

    back = copy.deepcopy(base)  # and peftkit reads its own export
    peftkit.load(back, tmp_path)
    assert_near(_out(back, kind), ref, 64, layers=6)  # peftkit vs PEFT


def test_peft_adapter_loads_next_to_a_peftkit_adapter(tmp_path: Path) -> None:
    """Layers (and the classifier) already wrapped by another adapter: the file still maps onto them."""
    base = _bert()
    # bias="none": trained biases would be written into the base layers both adapters share
    ref = _save_with_peft(base, {**CASES["dora_bias_all"][1], "bias": "none"}, tmp_path / "hf")
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["query", "key"], r=2, modules_to_save=["classifier"]),
                  name="mine")
    _randomize(model, seed=9)
    mine = _out(model, "hf")
    assert peftkit.load(model, tmp_path / "hf", name="theirs") == "theirs"
    peftkit.set_active(model, "theirs")
    assert_near(_out(model, "hf"), ref, 64, layers=6)  # peftkit vs PEFT
    peftkit.set_active(model, "mine")
    torch.testing.assert_close(_out(model, "hf"), mine, atol=0, rtol=0)
    peftkit.save(model, tmp_path / "again", name="theirs", format="hf")
    pm = _load_with_peft(base, tmp_path / "again")
    assert_near(_out(pm, "hf"), ref, 64, layers=6)  # peftkit vs PEFT


def test_export_is_atomic_and_leaves_old_files_on_failure(tmp_path: Path, monkeypatch) -> None:

    base = _bert()
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["query"], r=2))
    _randomize(model)
    peftkit.save(model, tmp_path, format="hf")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _randomize(model, seed=5)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    from peftkit.core import io

    monkeypatch.setattr(io, "_exchange", boom)  # the folder swap that puts the new unit in place fails
    with pytest.raises(peftkit.PeftkitError, match="No space left"):
        peftkit.save(model, tmp_path, format="hf")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert [p.name for p in tmp_path.parent.iterdir() if ".peftkit-" in p.name] == [], "temp folder left behind"


# -- bad input -------------------------------------------------------------------------------------------------
def _fails_cleanly(model: nn.Module, d: Path, pattern: str) -> None:
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match=pattern):
        peftkit.load(model, d)
    assert same_state(before, state_copy(model))
    assert peftkit.adapter_names(model) == [] and not list(peftkit.adapted_layers(model))


def test_adapter_for_other_architecture_fails_cleanly(tmp_path: Path) -> None:
    _save_with_peft(_bert(), CASES["dora_bias_all"][1], tmp_path)
    # other module names: the error names a tensor of the file, as the file spells it
    _fails_cleanly(_gpt2(), tmp_path, r"tensor 'base_model\.model\.bert\.encoder\.layer\.\d\..*' has no place")
    # same names, other widths: the error names the tensor and both shapes
    key = r"base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.query\.lora_A\.weight"
    _fails_cleanly(_bert(hidden=48), tmp_path, rf"tensor '{key}' has shape \(4, 32\) in the file but \(4, 48\)")


def _edit_config(d: Path, **changes: Any) -> None:
    p = d / "adapter_config.json"
    meta = json.loads(p.read_text())
    meta.update(changes)
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize("option, value, pattern", [
    ("lora_bias", True, r"lora_B\.bias is missing from the file"),  # the option is read; its tensors are not there
    ("layer_replication", [[0, 1]], "layer_replication"),
    ("target_parameters", ["experts.weight"], "target_parameters"),
    ("trainable_token_indices", [1, 2], "trainable_tokens_delta' is missing from the file"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
    ("init_lora_weights", "olora", "init_lora_weights='olora'"),
    ("some_future_option", 3, "unknown Hugging Face PEFT LoRA option some_future_option"),
    ("peft_type", "HRA", "'HRA' is not supported; peftkit reads: .*LOKR"),
    # a LoRA file relabelled as a type peftkit reads: its LoRA fields are refused by name
    ("peft_type", "LOKR", "LoKrConfig has no field.*lora_alpha"),
])
def test_unsupported_options_raise_naming_the_option(tmp_path: Path, option: str, value: Any, pattern: str) -> None:
    _save_with_peft(_bert(), CASES["lora"][1], tmp_path)
    _edit_config(tmp_path, **{option: value})
    _fails_cleanly(_bert(), tmp_path, pattern)


def test_harmless_options_are_accepted(tmp_path: Path) -> None:
    base = _bert()
    ref = _save_with_peft(base, CASES["lora"][1], tmp_path)
    _edit_config(tmp_path, init_lora_weights="eva", eva_config={"rho": 2.0}, lora_dropout=0.1,
                 layers_to_transform=[0, 1], task_type="SEQ_CLS")
    model = copy.deepcopy(base)
    peftkit.load(model, tmp_path)
    assert_near(_out(model, "hf"), ref, 64, layers=6)  # peftkit vs PEFT


def test_dora_on_embedding_loads(tmp_path: Path) -> None:
    base = _bert()
    ref = _save_with_peft(base, {"target_modules": ["word_embeddings", "query"], "r": 2, "use_dora": True},
                          tmp_path)
    model = copy.deepcopy(base)
    peftkit.load(model, tmp_path)
    assert_near(_out(model, "hf"), ref, 64, layers=6)  # peftkit vs PEFT


def test_truncated_file_and_missing_tensor(tmp_path: Path) -> None:
    _save_with_peft(_bert(), CASES["lora"][1], tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = f"{HF_PREFIX}bert.encoder.layer.1.attention.self.value.lora_B.weight"
    del tensors[key]
    save_file(tensors, str(f))
    _fails_cleanly(_bert(), tmp_path, f"tensor {key} is missing")
    f.write_bytes(f.read_bytes()[:100])
    _fails_cleanly(_bert(), tmp_path, "corrupted or truncated")


def test_repeated_base_embedding_is_checked(tmp_path: Path) -> None:
    """PEFT saves the embedding weights with ``save_embedding_layers=True``: fine when they are the model's own."""
    base = _gpt2()
    pm = _peft_model(base, {"target_modules": ["c_attn", "wte"], "r": 2, "fan_in_fan_out": True})
    _randomize(pm)
    pm.eval()
    ref = _out(pm, "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path), save_embedding_layers=True)
    f = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    emb = [k for k in tensors if k.endswith("wte.base_layer.weight")]
    assert emb, sorted(tensors)
    model = copy.deepcopy(base)
    peftkit.load(model, tmp_path)
    assert_near(_out(model, "gpt2"), ref, 64, layers=6)  # peftkit vs PEFT

    tensors[emb[0]] = tensors[emb[0]] + 1.0  # a resized / retrained embedding: not an adapter tensor
    save_file(tensors, str(f))
    _fails_cleanly(copy.deepcopy(base), tmp_path, "base-model weight .*wte")


def test_export_refusals(tmp_path: Path) -> None:
    model = _bert()
    peftkit.adapt(model, peftkit.config("lora", target_modules=["query"], r=2, overrides={"query": {"dropout": 0.1}}))
    with pytest.raises(peftkit.PeftkitError, match=r"overrides\['query'\] sets \['dropout'\]"):
        peftkit.save(model, tmp_path / "a", format="hf")
    with pytest.raises(peftkit.PeftkitError, match="unknown adapter format 'onnx'"):
        peftkit.save(model, tmp_path / "a", format="onnx")
    kron = _bert()  # a method Hugging Face PEFT does not have
    peftkit.adapt(kron, peftkit.config("kron", target_modules=["query"]))
    with pytest.raises(peftkit.PeftkitError, match="Hugging Face PEFT format: method 'kron' has no Hugging Face PEFT"):
        peftkit.save(kron, tmp_path / "b", format="hf")
    peftkit.merge(model)
    with pytest.raises(peftkit.PeftkitError, match="merged"):
        peftkit.save(model, tmp_path / "c", format="hf")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
