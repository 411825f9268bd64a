"""LN tuning / GenD: the spec's sanity lines (trainable count, ‖z‖ = 1, L_unif of two orthogonal unit vectors = −4,
L_align of identical same-label vectors = 0), the norm host kind on real Hugging Face norms, merge, the GenD
procedure, and the Hugging Face PEFT LN_TUNING format in both directions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy
from peftkit.core.host import host_kind
from peftkit.methods.lntuning import (
    GenDLoss,
    LinearNorm,
    LnTuningConfig,
    alignment_loss,
    uniformity_loss,
    use_linear_norm_head,
)
from peftkit.train.trainer import train
from tolerance import assert_near

torch.set_num_threads(1)


def _bert(num_layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg).eval()


def _llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16)
    cfg._attn_implementation = "eager"
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape))
    return m


def _ids(b: int = 3, t: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 40, (b, t), generator=torch.Generator().manual_seed(seed))


def _norm_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if host_kind(m) == "norm"]


# -- the norm host kind and targeting ------------------------------------------------------------------------------
def test_norm_hosts_are_found_generically() -> None:
    bert, llama = _bert(), _llama()
    assert _norm_names(bert) == ["bert.embeddings.LayerNorm"] + [
        f"bert.encoder.layer.{i}.{p}.LayerNorm" for i in range(2) for p in ("attention.output", "output")]
    assert _norm_names(llama) == [f"model.layers.{i}.{p}" for i in range(2)
                                  for p in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]
    assert host_kind(nn.LayerNorm(4, elementwise_affine=False)) is None  # no learned scale: nothing to tune
    assert host_kind(nn.RMSNorm(4)) == "norm" and host_kind(nn.GroupNorm(2, 4)) is None


def test_all_linear_stays_linear_and_lora_refuses_norms() -> None:
    model = _bert()
    peftkit.adapt(model, peftkit.config("lora", target_modules="all-linear", r=2))
    adapted = [p for p, _ in peftkit.adapted_layers(model)]
    assert adapted and all(type(layer.base_layer) is nn.Linear for _, layer in peftkit.adapted_layers(model))
    assert not any("LayerNorm" in p for p in adapted)
    other = _bert()
    before = state_copy(other)
    with pytest.raises(peftkit.PeftkitError, match="does not support LayerNorm layers"):
        peftkit.adapt(other, peftkit.config("lora", target_modules=["LayerNorm"], r=2))
    assert same_state(before, state_copy(other)) and not peftkit.adapter_names(other)


def test_lntuning_of_other_layers_shifts_their_weight_and_bias() -> None:
    """As PEFT's LN_TUNING: a targeted Linear / Embedding trains Δ on its own weight (and bias); merge adds it."""
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4))
    peftkit.adapt(model, LnTuningConfig(target_modules=["0", "1"]))
    emb, lin = model[0].adapters["default"], model[1].adapters["default"]
    assert emb.d_beta is None and lin.d_gamma.shape == (4, 6) and lin.d_beta.shape == (4,)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (emb.d_gamma, lin.d_gamma, lin.d_beta):
            p.copy_(torch.randn(p.shape, generator=g))
        ids = torch.tensor([[1, 4, 9]])
        e = F.embedding(ids, model[0].base_layer.weight + emb.d_gamma)
        expected = F.linear(e, model[1].base_layer.weight + lin.d_gamma, model[1].base_layer.bias + lin.d_beta)
        y = model(ids)
        assert_near(y, expected, 6)
        peftkit.merge(model)
        assert_near(model(ids), expected, 6)


def test_lntuning_refuses_bad_fields() -> None:
    with pytest.raises(peftkit.PeftkitError, match="dropout must be 0"):
        LnTuningConfig(dropout=0.1)
    with pytest.raises(peftkit.PeftkitError, match="unif_weight must be >= 0"):
        LnTuningConfig(unif_weight=-1.0)


# -- the spec's sanity lines ---------------------------------------------------------------------------------------
def test_trainable_count_is_norm_dims_plus_head() -> None:
    # GenD: 2·Σ(LN dims) + d·2 + 2 (every LayerNorm weight and bias, plus the linear head)
    model = _bert(num_layers=3)
    peftkit.adapt(model, LnTuningConfig(modules_to_save=["classifier"]))
    norms = [m for n, m in model.named_modules() if host_kind(m) == "norm"]
    assert len(norms) == 7
    d = 16
    assert peftkit.summary(model).trainable == 2 * sum(m.weight.numel() for m in norms) + d * 2 + 2 == 2 * 7 * d + 34
    assert [p for p, _ in peftkit.adapted_layers(model)] == _norm_names(_bert(num_layers=3))  # all-norm


def test_unit_norm_features_and_linear_norm_head() -> None:
    model = _bert()
    w, b = model.classifier.weight, model.classifier.bias
    use_linear_norm_head(model, "classifier")
    assert isinstance(model.classifier, LinearNorm) and model.classifier.weight is w and model.classifier.bias is b
    f = torch.randn(5, 16) * 7
    torch.testing.assert_close(model.classifier(f), (f / f.norm(dim=-1, keepdim=True)) @ w.t() + b)
    with pytest.raises(peftkit.PeftkitError, match="not an nn.Linear"):
        use_linear_norm_head(model, "bert.embeddings.LayerNorm")
    # the features GenD's losses read are unit vectors
    peftkit.adapt(model, LnTuningConfig(modules_to_save=["classifier"], unif_weight=0.5, align_weight=0.1))
    proc = GenDLoss(model, peftkit.get_config(model, "default"))
    proc.on_train_start(model)
    model(input_ids=_ids())
    z = F.normalize(proc.features, dim=-1)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    proc.on_train_end(model)


def test_uniformity_and_alignment_values() -> None:
    e = torch.eye(2)
    assert float(uniformity_loss(e)) == pytest.approx(-4.0, abs=1e-6)  # exp(−2·2) for the single pair
    same = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.6, 0.8]])
    assert float(alignment_loss(same, torch.tensor([1, 1, 1]))) == 0.0
    # against a brute-force reference on random unit vectors
    z = F.normalize(torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    y = torch.tensor([0, 1, 0, 0, 1, 2, 1])
    pairs = [(i, j) for i in range(7) for j in range(i + 1, 7)]
    d2 = {(i, j): float((z[i] - z[j]).pow(2).sum()) for i, j in pairs}
    unif = math.log(sum(math.exp(-2 * d2[p]) for p in pairs) / len(pairs))
    align = [d2[(i, j)] for i, j in pairs if y[i] == y[j]]
    assert float(uniformity_loss(z)) == pytest.approx(unif, abs=1e-5)
    assert float(alignment_loss(z, y)) == pytest.approx(sum(align) / len(align), abs=1e-5)
    assert float(alignment_loss(z[:3], torch.tensor([0, 1, 2]))) == 0.0  # no same-label pair
    # clamp at 1e-6 before the log: far-apart points
    assert float(uniformity_loss(torch.tensor([[10.0, 0.0], [-10.0, 0.0]]))) == pytest.approx(math.log(1e-6))
    # smooth where two features coincide (pdist's sqrt would give NaN gradients there)
    zz = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    (uniformity_loss(zz) + alignment_loss(zz, torch.tensor([0, 0, 1]))).backward()
    assert torch.isfinite(zz.grad).all()


# -- the adapter's math ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["bert", "llama"])
def test_exact_base_at_init_and_reference_forward(which: str) -> None:
    base = _bert() if which == "bert" else _llama()
    model = copy.deepcopy(base)
    x = _ids()

    def out(m: nn.Module) -> torch.Tensor:
        return m(input_ids=x).logits

    with torch.no_grad():
        y0 = out(base)
        peftkit.adapt(model, LnTuningConfig())
        assert torch.equal(out(model), y0)  # Δγ = Δβ = 0: bit-identical
        perturb(model, seed=1, std=0.2)
        y = out(model)
        # reference: the base model with γ + Δγ, β + Δβ written into its norms
        ref = copy.deepcopy(base)
        for path, layer in peftkit.adapted_layers(model):
            a = layer.adapters["default"]
            norm = ref.get_submodule(path)
            norm.weight.add_(a.d_gamma)
            if a.d_beta is not None:
                norm.bias.add_(a.d_beta)
        torch.testing.assert_close(y, out(ref), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y, y0, atol=1e-3)


def test_merge_writes_gamma_plus_delta_and_unmerge_restores() -> None:
    spec = MODELS["norm"]
    model = spec.build()
    peftkit.adapt(model, LnTuningConfig(target_modules=spec.targets))
    perturb(model, seed=2)
    x = spec.input()
    with torch.no_grad():
        y = model(x)
        layers = dict(peftkit.adapted_layers(model))
        before = {p: (lay.host.weight.clone(), None if lay.host.bias is None else lay.host.bias.clone())
                  for p, lay in layers.items()}
        peftkit.merge(model)
        for p, lay in layers.items():
            a = lay.adapters["default"]
            assert torch.equal(lay.host.weight, before[p][0] + a.d_gamma)
            if a.d_beta is not None:
                assert torch.equal(lay.host.bias, before[p][1] + a.d_beta)
            else:
                assert lay.host.bias is None  # RMSNorm: no shift appears
        assert_near(model(x), y, 64, layers=6)
        peftkit.unmerge(model)
        for p, lay in layers.items():
            assert_near(lay.host.weight, before[p][0], 1, layers=2)  # (γ + Δγ) − Δγ: two roundings


def test_two_adapters_add_up_exactly() -> None:
    # norm(x; γ+Δa+Δb) = base + (norm(γ+Δa) − base) + (norm(γ+Δb) − base): the norm is affine in (γ, β)
    spec = MODELS["norm"]
    model = spec.build()
    cfg = LnTuningConfig(target_modules=spec.targets)
    peftkit.adapt(model, cfg, name="a")
    perturb(model, seed=1)
    peftkit.adapt(model, cfg, name="b")
    perturb(model, seed=2)
    peftkit.set_active(model, ["a", "b"])
    x = spec.input()
    with torch.no_grad():
        y = model(x)
        ref = spec.build()
        for path, layer in peftkit.adapted_layers(model):
            norm = ref.get_submodule(path)
            for n in ("a", "b"):
                norm.weight.add_(layer.adapters[n].d_gamma)
                if layer.adapters[n].d_beta is not None:
                    norm.bias.add_(layer.adapters[n].d_beta)
        torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-5)


def test_torch_compile_matches_eager() -> None:
    spec = MODELS["norm"]
    model = spec.build()
    peftkit.adapt(model, LnTuningConfig(target_modules=spec.targets))
    perturb(model, seed=1)
    x = spec.input()
    y = model(x)
    y.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    yc = torch.compile(model, backend="aot_eager")(x)
    assert_near(yc, y.detach(), 64, layers=6)
    yc.sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_near(p.grad, grads[n], 64, layers=6)


# -- the GenD procedure ----------------------------------------------------------------------------------------------
def test_gend_loss_in_training() -> None:
    model = _bert()
    use_linear_norm_head(model, "classifier")
    cfg = LnTuningConfig(modules_to_save=["classifier"], unif_weight=0.5, align_weight=0.1)
    peftkit.adapt(model, cfg)
    proc = GenDLoss(model, peftkit.get_config(model, "default"))
    assert peftkit.get_method("lntuning").procedure is GenDLoss
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 40, (8, 6), generator=g), "labels": torch.randint(0, 2, (8,),
                                                                                                generator=g)}
               for _ in range(4)]
    # the extra term equals 0.5·L_unif + 0.1·L_align on the normalised classifier input
    model.train()
    proc.on_train_start(model)
    proc.on_step_start(model, 0)
    out = model(**batches[0])
    captured = []
    h = model.classifier.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model(**batches[0])
    h.remove()
    z = F.normalize(captured[0], dim=-1)
    extra = proc.extra_loss(model, batches[0], out)
    torch.testing.assert_close(extra, 0.5 * uniformity_loss(z) + 0.1 * alignment_loss(z, batches[0]["labels"]))
    extra.backward()  # reaches the norms
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "d_gamma" in n)
    proc.on_train_end(model)
    model.zero_grad()
    # and in the trainer, the hook is removed afterwards
    res = train(model, batches, steps=4, lr=1e-2, procedures=[proc], progress=False)
    assert res.steps == 4 and proc._handle is None and not model.classifier._forward_pre_hooks


def test_gend_loss_errors_and_inert_default() -> None:
    model = _bert()
    peftkit.adapt(model, LnTuningConfig(unif_weight=0.5))
    with pytest.raises(peftkit.PeftkitError, match="feature_module"):
        GenDLoss(model, peftkit.get_config(model, "default"))
    with pytest.raises(peftkit.PeftkitError, match="no module 'nope'"):
        GenDLoss(model, LnTuningConfig(unif_weight=0.5, feature_module="nope"))
    plain = GenDLoss(model, LnTuningConfig())  # weights 0: plain LN tuning, no loss term
    assert plain.extra_loss(model, {}, None) is None
    # a feature module whose input is not (batch, features)
    proc = GenDLoss(model, LnTuningConfig(unif_weight=0.5, feature_module="bert.encoder"))
    proc.on_train_start(model)
    model(input_ids=_ids())
    with pytest.raises(peftkit.PeftkitError, match="must be a \\(batch, features\\) tensor"):
        proc.extra_loss(model, {}, None)
    proc.on_train_end(model)


# -- persistence and the Hugging Face PEFT LN_TUNING format ------------------------------------------------------------
def test_save_load_llama(tmp_path) -> None:
    model = _llama()
    peftkit.adapt(model, LnTuningConfig())
    perturb(model, seed=4)
    x = _ids()
    with torch.no_grad():
        y = model(input_ids=x).logits
    peftkit.save(model, tmp_path / "a")
    fresh = _llama()
    peftkit.load(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, y)


def test_hf_peft_ln_tuning_both_ways(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    base = _bert()
    x = _ids()
    # PEFT -> peftkit
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LNTuningConfig(target_modules=["LayerNorm"],
                                                                      modules_to_save=["classifier"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        y_peft = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path / "hf")
    model = copy.deepcopy(base)
    assert peftkit.load(model, tmp_path / "hf") == "default"
    assert peftkit.get_config(model, "default").method == "lntuning"
    assert sorted(p for p, _ in peftkit.adapted_layers(model)) == sorted(_norm_names(base))
    with torch.no_grad():
        assert_near(model(input_ids=x).logits, y_peft, 64, layers=6)
    # peftkit -> PEFT
    mine = copy.deepcopy(base)
    peftkit.adapt(mine, LnTuningConfig(modules_to_save=["classifier"]))
    perturb(mine, seed=5)
    with torch.no_grad():
        y = mine(input_ids=x).logits
    peftkit.save(mine, tmp_path / "out", format="hf")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert_near(back(input_ids=x).logits, y, 64, layers=6)
    again = copy.deepcopy(base)
    peftkit.load(again, tmp_path / "out")
    with torch.no_grad():
        assert_near(again(input_ids=x).logits, y, 64, layers=6)


def test_hf_unknown_option_is_refused() -> None:
    from peftkit.methods.lntuning import LnTuning

    with pytest.raises(peftkit.PeftkitError, match="unknown Hugging Face PEFT LN_TUNING option"):
        LnTuning.from_hf_config({"peft_type": "LN_TUNING", "some_new_option": 3})
    assert LnTuning.from_hf_config({"peft_type": "LN_TUNING", "modules_to_save": ["classifier"],
                                    "target_modules": ["LayerNorm"]}).modules_to_save == ["classifier"]


def test_cli_train_and_eval_default_targets_are_all_norm(tmp_path, capsys) -> None:
    import json

    from peftkit.cli import main
    from test_cli import _examples, _make_tiny_bert, _train_args

    (tmp_path / "bert").mkdir()
    model_dir = _make_tiny_bert(tmp_path / "bert")
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in _examples(120)))
    out = tmp_path / "out"
    assert main(_train_args(model_dir, data, out, "--method", "lntuning", "--steps", "10")) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["config"]["target_modules"] == "all-norm" and info["config"]["modules_to_save"] == ["classifier"]
    # 5 LayerNorms of width 32 (weight + bias) + the 32→2 head
    assert info["trainable_params"] == 5 * 2 * 32 + 32 * 2 + 2
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert "reproduced" in capsys.readouterr().out
