"""Series and parallel bottleneck adapters (shared/methods/activation-space-and-procedures.md §1 "Sanity"): the mam
init (U = 0) gives the base model bit for bit; the parallel adapter is linear in s; parameters per layer are
m·(d_a + d_b); plus each placement against an explicit reference (Linear, Conv2d, GPT-2 Conv1D, Embedding), the bert
init, learned scaling, fp32 adapter math on a bf16 model, placements mixed in one batch, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
import peftkit.methods.bottleneck as bn
from conformance.models import MODELS, same_state, state_copy
from tolerance import assert_near


def _perturb(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * std)


def _linear(d_in: int = 6, d_out: int = 5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out)).eval()


def _ad(model: nn.Module, name: str = "default") -> bn._Bottleneck:
    return model[0].adapters[name]


ACT = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}


@pytest.mark.parametrize("act", sorted(ACT))
@pytest.mark.parametrize("method,placement", [("series_adapter", "output_adapter"), ("series_adapter", "mh_adapter"),
                                              ("parallel_adapter", None)])
def test_linear_matches_reference(method: str, placement: str | None, act: str) -> None:
    model = _linear()
    fields = {"target_modules": ["0"], "bottleneck_size": 3, "non_linearity": act, "scaling": 0.7}
    if placement:
        fields["placement"] = placement
    peftkit.adapt(model, peftkit.config(method, **fields))
    _perturb(model)
    a, lin = _ad(model), model[0].base_layer
    d, u, s, sig = a.adapter_down, a.adapter_up, 0.7, ACT[act]
    x = torch.randn(2, 4, 6)

    def f(z: torch.Tensor) -> torch.Tensor:
        return s * sig(z @ d.t()) @ u.t()

    h = lin(x)
    if placement == "output_adapter":
        ref = h + f(h)
    elif placement == "mh_adapter":
        ref = lin(x + f(x))
    else:
        ref = h + f(x)
    assert_near(model(x), ref, 64, layers=6)


def test_mam_init_is_the_base_bit_for_bit() -> None:
    spec = MODELS["block"]
    x = spec.input()
    y0 = spec.build()(x)
    for method, extra in [("series_adapter", {"placement": "mh_adapter"}), ("series_adapter", {}),
                          ("parallel_adapter", {}), ("parallel_adapter", {"non_linearity": "sigmoid"})]:
        model = spec.build()
        peftkit.adapt(model, peftkit.config(method, target_modules=spec.targets, init="mam", **extra))
        a = model.get_submodule("attn.q").adapters["default"]
        assert torch.equal(a.adapter_up, torch.zeros_like(a.adapter_up))
        bound = 1 / a.adapter_down.shape[1] ** 0.5  # kaiming_uniform(a=√5) = U(±1/√fan_in)
        assert a.adapter_down.abs().max() <= bound and a.adapter_down.abs().max() > 0.5 * bound
        assert torch.equal(model(x), y0)


def test_bert_init_is_gaussian_and_changes_the_output() -> None:
    spec = MODELS["block"]
    x = spec.input()
    y0 = spec.build()(x)
    model = spec.build()
    peftkit.adapt(model, peftkit.config("parallel_adapter", target_modules=spec.targets, init="bert"))
    a = model.get_submodule("mlp.fc1").adapters["default"]
    for t in (a.adapter_down.detach(), a.adapter_up.detach()):  # 256·16 and 32·256 draws from N(0, 0.02²)
        assert abs(float(t.mean())) < 2e-3 and abs(float(t.std()) - 0.02) < 2e-3
    assert not torch.allclose(model(x), y0, atol=1e-7)


def test_parallel_is_linear_in_s() -> None:
    spec = MODELS["block"]
    x = spec.input()
    outs = {}
    state = None
    for s in (0.0, 1.0, 2.5, -0.8):
        model = spec.build()
        peftkit.adapt(model, peftkit.config("parallel_adapter", target_modules=["fc1"], bottleneck_size=4, scaling=s))
        if state is None:
            _perturb(model)
            state = peftkit.adapter_state_dict(model)
        else:
            model.load_state_dict({k.replace("adapter.mlp.fc1.", "mlp.fc1.adapters.default."): v
                                   for k, v in state.items()}, strict=False)
        with torch.no_grad():
            outs[s] = model.get_submodule("mlp.fc1")(x)
    for s in (2.5, -0.8):
        # differences of outputs: the rounding is that of the outputs themselves (scale: max |output|)
        assert_near(outs[s] - outs[0.0], s * (outs[1.0] - outs[0.0]), 64, layers=6,
                    scale=max(abs(s), 1) * max(float(o.abs().max()) for o in outs.values()))


@pytest.mark.parametrize("method,placement", [("series_adapter", "output_adapter"), ("series_adapter", "mh_adapter"),
                                              ("parallel_adapter", None)])
@pytest.mark.parametrize("learned", [False, True])
def test_parameter_count(method: str, placement: str | None, learned: bool) -> None:
    spec = MODELS["block"]  # d = 16, ff = 32: attn.{q,k,v,o} 16→16, mlp.fc1 16→32, mlp.fc2 32→16
    m = 5
    model = spec.build()
    fields = {"target_modules": spec.targets, "bottleneck_size": m, "scaling": "learned" if learned else 1.0}
    if placement:
        fields["placement"] = placement
    peftkit.adapt(model, peftkit.config(method, **fields))
    shapes = [(16, 16)] * 4 + [(16, 32), (32, 16)]  # (d_in, d_out)
    if method == "parallel_adapter":
        want = sum(m * (i + o) for i, o in shapes)
    else:
        want = sum(2 * m * (o if placement == "output_adapter" else i) for i, o in shapes)
    want += 6 * learned
    assert peftkit.summary(model).trainable == want
    assert sum(p.numel() for p in peftkit.trainable_parameters(model)) == want


def test_conv2d_placements_match_reference() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 7, 7)
    for method, placement in [("series_adapter", "output_adapter"), ("series_adapter", "mh_adapter"),
                              ("parallel_adapter", None)]:
        model = nn.Sequential(conv).eval()
        fields = {"target_modules": ["0"], "bottleneck_size": 2}
        if placement:
            fields["placement"] = placement
        peftkit.adapt(model, peftkit.config(method, **fields))
        _perturb(model)
        a = _ad(model)
        d, u = a.adapter_down, a.adapter_up

        def chan(z: torch.Tensor, d: torch.Tensor = d, u: torch.Tensor = u) -> torch.Tensor:  # f on channels
            return torch.einsum("om,bmhw->bohw", u, torch.tanh(torch.einsum("mc,bchw->bmhw", d, z)))

        if method == "parallel_adapter":  # D is a 3×3 kernel like the host's, U a 1×1 kernel
            h = F.conv2d(x, d.view(2, 3, 3, 3), stride=2, padding=1)
            ref = conv(x) + torch.einsum("om,bmhw->bohw", u, torch.tanh(h))
            assert a.adapter_down.shape == (2, 27)
        elif placement == "mh_adapter":
            ref = conv(x + chan(x))
            assert a.adapter_down.shape == (2, 3)
        else:
            ref = conv(x) + chan(conv(x))
        assert_near(model(x), ref, 64, layers=6)
        model[0] = model[0].base_layer


def test_gpt2_conv1d_mh_and_embedding_parallel_match_reference() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 6)).eval()  # weight (d_in=6, d_out=5)
    peftkit.adapt(model, peftkit.config("series_adapter", target_modules=["0"], bottleneck_size=3,
                                        placement="mh_adapter"))
    _perturb(model)
    a, base = _ad(model), model[0].base_layer
    x = torch.randn(2, 4, 6)
    fx = torch.tanh(x @ a.adapter_down.t()) @ a.adapter_up.t()
    assert_near(model(x), (x + fx) @ base.weight + base.bias, 64, layers=6)

    emb = nn.Sequential(nn.Embedding(11, 4)).eval()
    peftkit.adapt(emb, peftkit.config("parallel_adapter", target_modules=["0"], bottleneck_size=3, dropout=0.5))
    _perturb(emb)
    emb.train()  # dropout is not applied to token ids
    a = _ad(emb)
    ids = torch.randint(0, 11, (2, 5))
    ref = emb[0].base_layer(ids) + torch.tanh(a.adapter_down.t()[ids]) @ a.adapter_up.t()
    assert_near(emb(ids), ref, 64, layers=6)


def test_learned_scaling_trains_and_round_trips(tmp_path) -> None:
    spec = MODELS["block"]
    model = spec.build()
    cfg = peftkit.config("series_adapter", target_modules=spec.targets, bottleneck_size=4, scaling="learned",
                         placement="mh_adapter")
    peftkit.adapt(model, cfg)
    scales = [layer.adapters["default"].adapter_scale for _, layer in peftkit.adapted_layers(model)]
    assert all(s.shape == () and float(s.detach()) == 1.0 and s.requires_grad for s in scales)
    _perturb(model)
    x = spec.input()
    model(x).square().sum().backward()
    assert all(s.grad is not None and s.grad.abs() > 0 for s in scales)
    a = model.get_submodule("attn.v").adapters["default"]
    with torch.no_grad():  # f scales with s: doubling s doubles the layer's delta
        d1 = a.delta(x, torch.zeros(1))
        a.adapter_scale.mul_(2)
        torch.testing.assert_close(a.delta(x, torch.zeros(1)), 2 * d1)
    y = model(x)
    peftkit.save(model, tmp_path / "ad")
    fresh = spec.build()
    peftkit.load(fresh, tmp_path / "ad")
    assert torch.equal(fresh(x), y)


def test_adapter_math_runs_in_fp32_on_a_bf16_model() -> None:
    ref = _linear(8, 8)
    peftkit.adapt(ref, peftkit.config("series_adapter", target_modules=["0"], bottleneck_size=4))
    _perturb(ref)
    low = _linear(8, 8).to(torch.bfloat16)
    peftkit.adapt(low, peftkit.config("series_adapter", target_modules=["0"], bottleneck_size=4))
    low.load_state_dict({k: v for k, v in ref.state_dict().items() if "adapters" in k}, strict=False)
    a = _ad(low)
    assert a.adapter_down.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    h = low[0].base_layer(x)
    d = a.delta(x, h)
    assert d.dtype == torch.float32
    expect = torch.tanh(h.float() @ a.adapter_down.t()) @ a.adapter_up.t()
    assert_near(d, expect, 64, layers=6)
    assert low(x).dtype == torch.bfloat16


def test_series_and_parallel_mixed_in_one_batch() -> None:
    spec = MODELS["block"]
    model = spec.build()
    peftkit.adapt(model, peftkit.config("series_adapter", target_modules=spec.targets, bottleneck_size=4,
                                        placement="mh_adapter"), name="s")
    peftkit.adapt(model, peftkit.config("parallel_adapter", target_modules=["fc1", "fc2"], bottleneck_size=4,
                                        scaling="learned"), name="p")
    peftkit.set_active(model, ["s", "p"])
    _perturb(model)
    x = spec.input(batch=4)
    names = ["p", "s", None, "p"]
    with torch.no_grad(), peftkit.mixed_batch(model, names):
        y = model(x)
    for i, n in enumerate(names):
        with torch.no_grad():
            if n is None:
                with peftkit.disable(model):
                    ref = model(x[i:i + 1])
            else:
                peftkit.set_active(model, n)
                ref = model(x[i:i + 1])
        assert_near(y[i:i + 1], ref, 64, layers=6)


def test_bad_input_is_refused_and_changes_nothing() -> None:
    spec = MODELS["embedding"]
    model = spec.build()
    before, modules = state_copy(model), [type(m) for m in model.modules()]
    with pytest.raises(peftkit.PeftkitError, match="mh_adapter.*Embedding"):
        peftkit.adapt(model, peftkit.config("series_adapter", target_modules=["proj", "emb"], placement="mh_adapter"))
    assert same_state(before, state_copy(model)) and [type(m) for m in model.modules()] == modules
    with pytest.raises(peftkit.PeftkitError, match="bottleneck_size"):
        peftkit.config("parallel_adapter", bottleneck_size=0)
    with pytest.raises(peftkit.PeftkitError, match="scaling"):
        peftkit.config("series_adapter", scaling="fixed")
    with pytest.raises(peftkit.PeftkitError, match="placement"):
        peftkit.config("series_adapter", placement="parallel")
    with pytest.raises(peftkit.PeftkitError, match="non_linearity"):
        peftkit.config("parallel_adapter", non_linearity="swish")
    with pytest.raises(peftkit.PeftkitError, match="not mergeable"):
        peftkit.adapt(model, peftkit.config("parallel_adapter", target_modules=["proj"]))
        peftkit.merge(model)


def test_default_targets_are_the_mlp_projections_on_bert_and_llama() -> None:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16))
    llama = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=16))
    down = {"bert": "encoder.layer.{}.output.dense", "llama": "layers.{}.mlp.down_proj"}
    up = {"bert": "encoder.layer.{}.intermediate.dense", "llama": "layers.{}.mlp.up_proj"}
    for fam, model in (("bert", bert), ("llama", llama)):
        peftkit.adapt(model, bn.SeriesAdapterConfig(bottleneck_size=4), name="s")
        peftkit.adapt(model, bn.ParallelAdapterConfig(bottleneck_size=4), name="p")
        got = {n: sorted(p for p, layer in peftkit.adapted_layers(model) if n in layer.adapters) for n in "sp"}
        assert got["s"] == [down[fam].format(i) for i in range(2)]
        assert got["p"] == sorted(t.format(i) for i in range(2) for t in (down[fam], up[fam]))
