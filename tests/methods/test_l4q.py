"""L4Q's own properties (shared/methods/weight-space.md §17 "Sanity"): at init the layer is exactly the asymmetric
RTN of W0; every weight it computes with lies on its group's grid; the fused autograd function's gradients (x, A, B,
Δ, β, bias) equal autograd of a straight-through reference to 1e-6 and the generic path's; the fused backward saves
no weight-sized tensor of its own; exported integer codes + (Δ, β) dequantise to the trained weight bit for bit and
reproduce the layer's forward exactly; only A, B, Δ, β train, with the formula's count (short last group included);
merge writes W_q exactly and unmerge restores W0 exactly; save/load; training lowers a loss; clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
import peftkit.methods.l4q as l4q
from conformance.models import MODELS, perturb, same_state, state_copy
from peftkit.quant import lsq, rtn
from tolerance import assert_near


def _x(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _adapted(perturbed: bool = True, **kw) -> nn.Module:
    """MLP fc1 16 -> 32, fc2 32 -> 16 with groups of 12 (fc1: 12 + 4, fc2: 12 + 12 + 8)."""
    model = MODELS["mlp"].build()
    peftkit.adapt(model, peftkit.config("l4q", target_modules=["fc1", "fc2"], **{"r": 4, "group_size": 12, **kw}))
    if perturbed:
        perturb(model, seed=3, std=0.02)
    return model


# -- init and the grid ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["mlp", "gpt2"])
def test_init_is_rtn_of_w0(model_name: str) -> None:
    spec = MODELS[model_name]
    base = spec.build()
    model = spec.build()
    peftkit.adapt(model, peftkit.config("l4q", target_modules=spec.targets, r=4, bits=3, group_size=12))
    for path, layer in peftkit.adapted_layers(model):
        w0 = layer.host.weight_2d().detach()
        q = rtn.rtn(w0, 3, 12)
        ad = layer.adapters["default"]
        assert torch.equal(ad.l4q_step, q.step) and torch.equal(ad.l4q_offset, q.offset)
        assert torch.equal(ad.new_weight(), q.dequantize()), path
        x = _x(2, 3, layer.host.d_in)
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, q.dequantize(), layer.host.bias))  # fused path, bit-exact
    x = spec.input()
    with torch.no_grad():
        assert not torch.allclose(spec.run(model, x), spec.run(base, x), atol=1e-6)


def test_weights_lie_on_the_group_grid() -> None:
    model = _adapted()
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        wq = ad.new_weight().detach()
        d_in = layer.host.d_in
        st = ad.l4q_step.detach().repeat_interleave(12, 1)[:, :d_in]
        of = ad.l4q_offset.detach().repeat_interleave(12, 1)[:, :d_in]
        k = (wq - of) / st
        assert (k - k.round()).abs().max() < 1e-3
        assert k.round().min() >= 0 and k.round().max() <= 15
        assert not torch.equal(wq, rtn.rtn(layer.host.weight_2d().detach(), 4, 12).dequantize())  # A, B matter


# -- gradients ------------------------------------------------------------------------------------------------------
def _reference_output(x, w0, bias, a, b, step, offset, s, bits, gs, g):
    """Autograd reference: W_c by autograd, straight-through round, g-scaled Δ and β."""
    qp = 2**bits - 1
    w_c = w0 + s * b @ a
    st = step * g + (step - step * g).detach()
    of = offset * g + (offset - offset * g).detach()
    d_in = w0.shape[1]
    st_e, of_e = st.repeat_interleave(gs, 1)[:, :d_in], of.repeat_interleave(gs, 1)[:, :d_in]
    v = ((w_c - of_e) / st_e).clamp(0, qp)
    v = v + (v.round() - v).detach()
    return F.linear(x, v * st_e + of_e, bias)


def test_fused_function_matches_straight_through_reference() -> None:
    g64 = torch.Generator().manual_seed(0)
    d_out, d_in, r, gs, bits, s = 6, 20, 3, 8, 3, 0.7

    def rnd(*shape):
        return torch.randn(*shape, generator=g64, dtype=torch.float64)

    w0, bias, a, b = rnd(d_out, d_in), rnd(d_out), rnd(r, d_in) * 0.3, rnd(d_out, r) * 0.3
    step, offset = rtn.minmax_params(w0, bits, gs)
    step, offset = (step * 0.9).double(), offset.double() + 0.1
    g = lsq.grad_scale(d_in, gs, bits)
    x, up = rnd(4, 5, d_in), rnd(4, 5, d_out)
    mine = [t.clone().requires_grad_(True) for t in (x, bias, a, b, step, offset)]
    y = l4q._L4QLinear.apply(mine[0], w0, mine[1], mine[2], mine[3], mine[4], mine[5], s, bits, gs, g)
    (y * up).sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (x, bias, a, b, step, offset)]
    y_ref = _reference_output(ref[0], w0, ref[1], ref[2], ref[3], ref[4], ref[5], s, bits, gs, g)
    (y_ref * up).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0.0, atol=1e-12)
    for name, m, t in zip(["x", "bias", "A", "B", "step", "offset"], mine, ref, strict=True):
        assert_near(m.grad, t.grad, 64, layers=6, msg=name)
        assert m.grad.abs().sum() > 0, name


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_adapter_gradients_match_reference(path: str) -> None:
    model = _adapted()
    layer = model.fc2
    ad = layer.adapters["default"]
    x = _x(3, 4, 32).requires_grad_(True)
    y = layer(x) if path == "fused" else layer.base_layer(x) + ad.delta(x, layer.base_layer(x))
    up = _x(3, 4, 16, seed=9)
    (y * up).sum().backward()
    params = [ad.lora_A, ad.lora_B, ad.l4q_step, ad.l4q_offset]
    mine = [x.grad] + [p.grad for p in params]
    x2 = x.detach().clone().requires_grad_(True)
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    w0, bias = layer.host.weight_2d().detach(), layer.host.bias.detach()
    y_ref = _reference_output(x2, w0, bias, ref[0], ref[1], ref[2], ref[3], ad.s, 4, 12, ad.g)
    (y_ref * up).sum().backward()
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=0.0, atol=1e-5)
    for m, t in zip(mine, [x2.grad] + [p.grad for p in ref], strict=True):
        torch.testing.assert_close(m, t, rtol=1e-4, atol=1e-5 * float(t.abs().max()))


def test_fused_backward_saves_no_weight_sized_tensor() -> None:
    model = _adapted()
    layer = model.fc1  # (32, 16)
    w = layer.host.weight_2d()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(_x(8, 16))
    assert saved
    big = [t for t in saved if t.numel() >= w.numel()]
    assert len(big) == 1 and big[0].data_ptr() == w.data_ptr()  # only the frozen host weight itself
    y.sum().backward()


# -- export, merge, persistence --------------------------------------------------------------------------------------
def test_export_reproduces_the_trained_layer_bit_for_bit() -> None:
    model = _adapted()
    opt = torch.optim.Adam(peftkit.trainable_parameters(model), lr=1e-2)
    for i in range(3):
        opt.zero_grad()
        model(_x(8, 16, seed=i)).pow(2).mean().backward()
        opt.step()
    exported = l4q.export(model)
    assert set(exported) == {"fc1", "fc2"}
    x = _x(5, 16, seed=7)
    for path, q in exported.items():
        layer = model.get_submodule(path)
        ad = layer.adapters["default"]
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15 and q.step.shape == ad.l4q_step.shape
        assert torch.equal(q.dequantize(), ad.new_weight().detach())
        xi = x if path == "fc1" else torch.tanh(model.fc1(x))
        with torch.no_grad():
            assert torch.equal(F.linear(xi, q.dequantize(), layer.host.bias), layer(xi))


def test_merge_writes_the_quantised_weight_and_unmerge_restores_w0() -> None:
    model = _adapted()
    w0 = model.fc1.base_layer.weight.detach().clone()
    wq = model.fc1.adapters["default"].new_weight().detach()
    x = _x(4, 16)
    with torch.no_grad():
        y = model(x)
        peftkit.merge(model)
        assert torch.equal(model.fc1.base_layer.weight, wq)
        assert_near(model(x), y, 64, layers=6)
        peftkit.unmerge(model)
        assert torch.equal(model.fc1.base_layer.weight, w0)


def test_only_lora_and_quantiser_parameters_train_with_the_formula_count() -> None:
    model = _adapted(perturbed=False)
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B", "l4q_step", "l4q_offset"}
    fc1 = model.fc1.adapters["default"]
    fc2 = model.fc2.adapters["default"]
    assert fc1.l4q_step.shape == (32, 2) and fc2.l4q_step.shape == (16, 3)  # ⌈16/12⌉, ⌈32/12⌉
    expected = 4 * (16 + 32) + 2 * 32 * 2 + 4 * (32 + 16) + 2 * 16 * 3
    assert peftkit.summary(model).trainable == expected
    assert sum(p.numel() for p in peftkit.trainable_parameters(model)) == expected


def test_save_load_and_export_after_training(tmp_path) -> None:
    model = _adapted()
    peftkit.save(model, tmp_path / "ad")
    fresh = MODELS["mlp"].build()
    peftkit.load(fresh, tmp_path / "ad")
    x = _x(6, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    for path, q in l4q.export(fresh).items():
        assert torch.equal(q.codes, l4q.export(model)[path].codes)


def test_training_lowers_the_loss_and_keeps_the_grid() -> None:
    torch.manual_seed(0)
    teacher = MODELS["mlp"].build(seed=5)
    model = _adapted(perturbed=False, r=4, alpha=8.0)
    opt = torch.optim.Adam(peftkit.trainable_parameters(model), lr=1e-2)
    x = _x(64, 16, seed=11)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    ad = model.fc1.adapters["default"]
    wq = ad.new_weight().detach()
    k = (wq - ad.l4q_offset.detach().repeat_interleave(12, 1)[:, :16]) / ad.l4q_step.detach().repeat_interleave(
        12, 1)[:, :16]
    assert (k - k.round()).abs().max() < 1e-3


# -- errors -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    ({"bits": 9}, "L4qConfig: bits must be an integer in 1..8"),
    ({"group_size": 0}, "L4qConfig: group_size must be a positive integer"),
    ({"dropout": 0.1}, "L4qConfig.dropout must be 0"),
    ({"r": 0}, "r .rank. must be a positive integer"),
])
def test_bad_config(kw: dict, msg: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match=msg):
        peftkit.config("l4q", target_modules=["fc1"], **kw)


def test_zero_step_in_a_file_is_refused_and_nothing_changes(tmp_path) -> None:
    model = _adapted()
    peftkit.save(model, tmp_path / "ad")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if k.endswith("fc2.l4q_step"))
    tensors[key][0, 1] = 0.0
    save_file(tensors, f)
    fresh = MODELS["mlp"].build()
    before = state_copy(fresh)
    with pytest.raises(peftkit.PeftkitError, match="module 'fc2': the saved L4Q steps must be finite and nonzero"):
        peftkit.load(fresh, tmp_path / "ad")
    assert same_state(before, state_copy(fresh)) and peftkit.adapter_names(fresh) == []


def test_export_errors() -> None:
    model = _adapted()
    peftkit.adapt(model, peftkit.config("l4q", target_modules=["fc1"], r=2), name="second")
    with pytest.raises(peftkit.PeftkitError, match=r"l4q.export: several adapters loaded \(\['default', 'second'\]\)"):
        l4q.export(model)
    assert set(l4q.export(model, "second")) == {"fc1"}
    peftkit.set_active(model, "default")
    peftkit.merge(model)
    with pytest.raises(peftkit.PeftkitError, match="merged into 'fc1'; unmerge before exporting"):
        l4q.export(model, "default")
    lora = MODELS["mlp"].build()
    peftkit.adapt(lora, peftkit.config("lora", target_modules=["fc1"]))
    with pytest.raises(peftkit.PeftkitError, match="adapter 'default' has no L4Q layers"):
        l4q.export(lora)
