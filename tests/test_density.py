"""DEFT's density loss (``peftkit.train.density``): the spec's sanity lines (D(0) = 0, D(±1) ≈ 1 − 1e-7, zero gradient
at 0, the density of a ReLU-zeroed tensor is its fraction of positive entries), generic discovery of the MLP
activations, the reported density against a direct count, the loss pushing density down, and ``--density-loss``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit.train.density import DensityLoss, activation_density, find_mlp_activations, smooth_l0
from peftkit.train.trainer import train
from test_cli import _examples, _make_tiny_bert, _train_args

torch.set_num_threads(1)


def _bert(act: str = "relu", seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=2, hidden_act=act, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def _batches(n: int = 3, b: int = 6, t: int = 7, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 40, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        for i in range(b):  # ragged lengths: padding at the end
            mask[i, int(torch.randint(2, t + 1, (1,), generator=g)):] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (b,), generator=g)})
    return out


def test_smooth_l0_values_and_gradient() -> None:
    a = torch.tensor([0.0, 1.0, -1.0, 1e-2], requires_grad=True)
    d = smooth_l0(a)
    v = d.detach()
    assert float(v[0]) == 0.0
    for i in (1, 2):  # 1 − 1e-7 to float32 resolution (the spacing below 1 is 6e-8), and below 1
        assert float(v[i]) == pytest.approx(1 - 1e-7, abs=6e-8) and float(v[i]) < 1.0
    d.sum().backward()
    assert float(a.grad[0]) == 0.0  # 2aε/(a²+ε)² vanishes at 0
    assert float(a.grad[3]) == pytest.approx(2 * 1e-2 * 1e-7 / (1e-4 + 1e-7) ** 2, rel=1e-4)


def test_mlp_activations_are_found_generically() -> None:
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    bert = _bert()
    assert [n for n, _ in find_mlp_activations(bert)] == [
        f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]  # not bert.pooler.activation
    llama = LlamaModel(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2))
    assert [n for n, _ in find_mlp_activations(llama)] == [f"layers.{i}.mlp.act_fn" for i in range(2)]
    gpt2 = GPT2Model(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    assert [n for n, _ in find_mlp_activations(gpt2)] == [f"h.{i}.mlp.act" for i in range(2)]
    assert [n for n, _ in find_mlp_activations(bert, r".*layer\.1\.intermediate\.intermediate_act_fn")] == [
        "bert.encoder.layer.1.intermediate.intermediate_act_fn"]
    with pytest.raises(peftkit.PeftkitError, match="found no MLP activation module"):
        find_mlp_activations(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(peftkit.PeftkitError, match="matched no module"):
        find_mlp_activations(bert, "nosuch")


def _direct(model: nn.Module, batches: list[dict[str, torch.Tensor]], masked: bool = True) -> tuple[float, float]:
    """(density, smooth D) by a plain count over captured activations."""
    acts: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: acts.append(out))
             for n, m in model.named_modules() if n.endswith("intermediate_act_fn")]
    dens, smooth = [], []
    with torch.no_grad():
        for b in batches:
            acts.clear()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            for a in acts:
                for i in range(a.shape[0]):
                    t = int(b["attention_mask"][i].sum()) if masked else a.shape[1]
                    ai = a[i, :t]
                    dens.append(torch.count_nonzero(ai).item() / ai.numel())
                    smooth.append(float((ai.pow(2) / (ai.pow(2) + 1e-7)).mean()))
    for h in hooks:
        h.remove()
    return sum(dens) / len(dens), sum(smooth) / len(smooth)


@pytest.mark.parametrize("masked", [True, False])
def test_reported_density_matches_a_direct_count(masked: bool) -> None:
    model = _bert("relu")
    batches = _batches()
    d = activation_density(model, batches, mask_padding=masked)
    ref_dens, ref_smooth = _direct(model, batches, masked)
    assert d.density == pytest.approx(ref_dens, abs=1e-6) and d.smooth == pytest.approx(ref_smooth, abs=1e-5)
    assert d.layers == 2 and d.samples == 18
    assert 0.2 < d.density < 0.8  # ReLU: about half of the entries are zero
    # the density of a ReLU-zeroed tensor is its fraction of positive entries
    relu = nn.Sequential()
    relu.add_module("mlp", nn.Sequential(nn.Identity(), nn.ReLU()))
    x = torch.randn(4, 5, 9, generator=torch.Generator().manual_seed(1))
    got = activation_density(relu, [(x, torch.zeros(4))], pattern="mlp.1")
    assert got.density == pytest.approx(float((x > 0).float().mean()), abs=1e-6)
    # a GELU model is dense by the spec's count (exact zeros only after underflow)
    assert activation_density(_bert("gelu"), batches).density > 0.99


def test_loss_equals_direct_value_and_pushes_density_down() -> None:
    model = _bert("relu")
    peftkit.adapt(model, peftkit.config("lora", target_modules="all-linear", r=4, modules_to_save=["classifier"]))
    batches = _batches(n=4, seed=2)
    proc = DensityLoss(model, weight=2.0)
    # the extra term is weight · mean over layers of the per-sample mean smooth L0 over real tokens
    model.train()
    proc.on_train_start(model)
    proc.on_step_start(model, 0)
    out = model(**batches[0])
    loss = proc.extra_loss(model, batches[0], out)
    assert loss.requires_grad
    model.eval()
    _, ref_smooth = _direct(model, batches[:1])
    assert float(loss.detach()) == pytest.approx(2.0 * ref_smooth, abs=1e-5)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n and "intermediate" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    proc.on_train_end(model)
    assert not proc._handles
    model.zero_grad()

    before = activation_density(model, batches)
    res = train(model, batches, steps=40, lr=2e-2, procedures=[DensityLoss(model, weight=5.0)], progress=False)
    after = activation_density(model, batches)
    assert res.steps == 40
    assert after.density < before.density - 0.1 and after.smooth < before.smooth - 0.1
    # no hook is left behind: a forward outside training records nothing
    assert all(not m._forward_hooks for _, m in find_mlp_activations(model))


def test_extra_loss_without_a_recorded_forward_is_an_error() -> None:
    model = _bert()
    proc = DensityLoss(model)
    with pytest.raises(peftkit.PeftkitError, match="no MLP activation was recorded"):
        proc.extra_loss(model, {}, None)
    with pytest.raises(peftkit.PeftkitError, match="must be > 0"):
        DensityLoss(model, weight=0.0)


def test_cli_density_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.cli import main

    (tmp_path / "bert").mkdir()
    model_dir = _make_tiny_bert(tmp_path / "bert")
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in _examples(120)))
    out = tmp_path / "out"
    assert main(_train_args(model_dir, data, out, "--steps", "10", "--density-loss", "0.5")) == 0
    text = capsys.readouterr().out
    assert "held-out MLP activation density before:" in text and "held-out MLP activation density after:" in text
    info = json.loads((out / "train_info.json").read_text())
    assert info["density_loss"] == 0.5
    assert 0 < info["activation_density_after"] <= 1 and 0 < info["activation_density_smooth_before"] <= 1
    bad = tmp_path / "bad"
    assert main(_train_args(model_dir, data, bad, "--density-loss", "-1")) == 2  # refused by argparse: usage
    assert "argument --density-loss: must be > 0" in capsys.readouterr().err and not bad.exists()
