"""ExPLoRA: the spec's sanity lines (trainable count = Σ params(U) + LoRA params + norm params; merged = unmerged;
blocks outside U change only through their LoRA), block resolution by index / name, persistence of the unfrozen
blocks, and the Hugging Face PEFT export (LORA + modules_to_save)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from conformance.models import perturb, same_state, state_copy
from peftkit.core.host import host_kind
from peftkit.core.layer import AdaptedLayer, SavedModule
from peftkit.methods.explora import ExploraConfig
from tolerance import assert_near

torch.set_num_threads(1)
LAYERS = 3


def _bert(seed: int = 0, layers: int = LAYERS, hidden: int = 16) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg).eval()


def _ids(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 40, (b, 6), generator=torch.Generator().manual_seed(seed))


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def _cfg(**kw) -> ExploraConfig:
    return ExploraConfig(**{"target_modules": ["query", "value"], "r": 2, "modules_to_save": ["classifier"], **kw})


def test_resolution_of_blocks_targets_and_norms() -> None:
    model = _bert()
    peftkit.adapt(model, _cfg())
    cfg = peftkit.get_config(model, "default")
    last = f"bert.encoder.layer.{LAYERS - 1}"
    norms = ["bert.embeddings.LayerNorm"] + [f"bert.encoder.layer.{i}.{p}.LayerNorm" for i in range(LAYERS - 1)
                                             for p in ("attention.output", "output")]
    assert cfg.modules_to_save == ["classifier", last, *norms]
    assert cfg.target_modules == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(LAYERS - 1)
                                  for p in ("query", "value")]
    assert sorted(p for p, _ in peftkit.adapted_layers(model)) == sorted(cfg.target_modules)
    assert isinstance(model.get_submodule(last), SavedModule)
    # resolving the resolved config again changes nothing (what load does)
    assert cfg.resolve(_bert()) == cfg
    # by name, several indices, and without norms
    other = _bert()
    peftkit.adapt(other, _cfg(unfreeze_layers=[0], unfreeze_modules=["encoder.layer.1"], unfreeze_norms=False))
    c = peftkit.get_config(other, "default")
    assert c.modules_to_save == ["classifier", "bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert c.target_modules == [f"bert.encoder.layer.2.attention.self.{p}" for p in ("query", "value")]


def test_trainable_count_is_blocks_plus_lora_plus_norms() -> None:
    model = _bert()
    base = _bert()
    peftkit.adapt(model, _cfg())
    block = sum(p.numel() for p in base.bert.encoder.layer[LAYERS - 1].parameters())
    lora = 2 * (LAYERS - 1) * 2 * (16 + 16)  # r·(d_in + d_out) on query and value of the other blocks
    norms = sum(p.numel() for n, m in base.named_modules() if host_kind(m) == "norm"
                and not n.startswith(f"bert.encoder.layer.{LAYERS - 1}.") for p in m.parameters())
    head = sum(p.numel() for p in base.classifier.parameters())
    assert norms == 2 * 16 * (1 + 2 * (LAYERS - 1))
    assert peftkit.summary(model).trainable == block + lora + norms + head
    assert sum(p.numel() for p in peftkit.trainable_parameters(model)) == block + lora + norms + head


def test_blocks_outside_u_change_only_through_lora() -> None:
    for unfreeze_norms in (False, True):
        model = _bert()
        peftkit.adapt(model, _cfg(unfreeze_norms=unfreeze_norms))
        base_state = {k: v.clone() for k, v in model.state_dict().items()
                      if ".copies." not in k and ".adapters." not in k}
        x = _ids()
        loss = model(input_ids=x).logits.pow(2).sum()
        loss.backward()
        opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=0.5)
        opt.step()
        # the frozen base (originals of the unfrozen blocks included) is untouched
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in base_state.items())
        # inside the other blocks, every trainable tensor is a LoRA factor (or a norm copy when norms train)
        for n, p in model.named_parameters():
            if p.requires_grad and n.startswith("bert.encoder.layer.") and not n.startswith(
                    f"bert.encoder.layer.{LAYERS - 1}."):
                assert ".lora_" in n or (unfreeze_norms and "LayerNorm.copies.default." in n), n
        # the unfrozen block's copy did train (all of its tensors received gradients)
        copy_params = dict(model.get_submodule(f"bert.encoder.layer.{LAYERS - 1}").copies["default"]
                           .named_parameters())
        assert copy_params and all(p.grad is not None for p in copy_params.values())


def test_init_merge_save_load(tmp_path) -> None:
    base = _bert()
    x = _ids()
    y0 = _out(base, x)
    model = _bert()
    peftkit.adapt(model, _cfg(r=4))
    assert torch.equal(_out(model, x), y0)  # B = 0 and exact copies: the base model
    perturb(model, seed=1, std=0.2)
    y = _out(model, x)
    assert not torch.allclose(y, y0, atol=1e-3)
    peftkit.save(model, tmp_path / "a", format="peftkit")  # its blocks under peftkit names
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    blk = f"saved.bert.encoder.layer.{LAYERS - 1}."
    assert {k[len(blk):] for k in keys if k.startswith(blk)} == set(base.bert.encoder.layer[LAYERS - 1].state_dict())
    fresh = _bert()
    peftkit.load(fresh, tmp_path / "a")
    assert torch.equal(_out(fresh, x), y)
    assert not any(p.requires_grad for p in fresh.parameters())
    peftkit.merge(model)
    torch.testing.assert_close(_out(model, x), y, rtol=0, atol=1e-5)
    peftkit.unmerge(model)
    plain = peftkit.merge_and_unload(model)
    assert not any(isinstance(m, AdaptedLayer | SavedModule) for m in plain.modules())
    torch.testing.assert_close(_out(plain, x), y, rtol=0, atol=1e-5)
    with peftkit.disable(fresh):
        assert torch.equal(_out(fresh, x), y0)


def test_negative_indices_count_per_stack() -> None:
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    t5 = T5Model(T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_decoder_layers=2,
                          num_heads=2)).eval()
    cfg = ExploraConfig(target_modules=["q", "v"], r=2, unfreeze_layers=[-1], layers_pattern="block",
                        unfreeze_norms=False).resolve(t5)
    assert cfg.modules_to_save == ["encoder.block.2", "decoder.block.1"]
    assert not any(t.startswith(("encoder.block.2.", "decoder.block.1.")) for t in cfg.target_modules)


def test_bad_input_changes_nothing() -> None:
    model = _bert()
    before = state_copy(model)
    mods = [type(m) for m in model.modules()]
    for cfg, msg in [
        (_cfg(unfreeze_layers=[LAYERS]), "no block has index 3; numbered blocks: bert.encoder.layer.0..2"),
        (_cfg(unfreeze_modules=["nosuch"]), "unfreeze_modules entry 'nosuch' matched no module"),
        (_cfg(unfreeze_layers=[0, 1, 2]), "every match lies inside the unfrozen blocks"),
    ]:
        with pytest.raises(peftkit.PeftkitError, match=msg):
            peftkit.adapt(model, cfg)
        assert same_state(before, state_copy(model)) and [type(m) for m in model.modules()] == mods
    with pytest.raises(peftkit.PeftkitError, match="numbered blocks: \\(none"):
        ExploraConfig(target_modules=["fc1"]).resolve(nn.Sequential(nn.Linear(2, 2)))


def test_hf_export_is_lora_with_modules_to_save(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    base = _bert()
    model = copy.deepcopy(base)
    peftkit.adapt(model, _cfg())
    perturb(model, seed=3)
    x = _ids()
    y = _out(model, x)
    peftkit.save(model, tmp_path / "hf", format="hf")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hf")).eval()
    assert_near(_out(pm, x), y, 64, layers=6)
    back = copy.deepcopy(base)
    peftkit.load(back, tmp_path / "hf")  # read back as plain LoRA with the same saved modules: the same function
    assert peftkit.get_config(back, "default").method == "lora"
    assert_near(_out(back, x), y, 64, layers=6)


def test_cli_train_and_eval(tmp_path, capsys) -> None:
    import json

    from peftkit.cli import main
    from test_cli import _examples, _make_tiny_bert, _train_args

    (tmp_path / "bert").mkdir()
    model_dir = _make_tiny_bert(tmp_path / "bert")
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in _examples(120)))
    out = tmp_path / "out"
    assert main(_train_args(model_dir, data, out, "--method", "explora", "--steps", "10", "--rank", "2")) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["config"]["unfreeze_layers"] == [-1]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert "reproduced" in capsys.readouterr().out
