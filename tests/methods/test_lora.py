"""LoRA's own properties (shared/methods/weight-space.md §1 "Sanity"): exact identity at init, ΔW = s·B·A,
PiSSA's residual / principal split, rsLoRA scaling, init distributions, dropout, and the fused autograd kernel."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from conformance.models import MODELS, TinyModel, perturb, same_state, state_copy
from peftkit.core import lowrank
from peftkit.core.lowrank import _FusedLowRankLinear


class One(nn.Module):
    def __init__(self, d_in: int = 24, d_out: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _one(d_in: int = 24, d_out: int = 16, seed: int = 0) -> One:
    torch.manual_seed(seed)
    return One(d_in, d_out).eval()


def _x(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * float(expected.abs().max()))


# -- default init and merging -----------------------------------------------------------------------------
def test_default_init_is_exactly_the_base(tiny: TinyModel) -> None:
    model = tiny.build()
    x = tiny.input()
    with torch.no_grad():
        y0 = tiny.run(model, x)
        peftkit.adapt(model, peftkit.config("lora", target_modules=tiny.targets, r=4, alpha=8))
        assert torch.equal(tiny.run(model, x), y0)
    for _, layer in peftkit.adapted_layers(model):
        assert torch.count_nonzero(layer.adapters["default"].lora_B) == 0


def test_kaiming_init_bound() -> None:
    model = _one(d_in=400)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc"], r=8))
    a = model.fc.adapters["default"].lora_A.detach()
    bound = 1 / math.sqrt(400)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_gaussian_init_std_is_one_over_r() -> None:
    model = _one(d_in=512)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc"], r=8, init="gaussian"))
    a = model.fc.adapters["default"].lora_A.detach()
    assert a.shape == (8, 512)
    assert abs(a.std().item() - 1 / 8) < 0.05 / 8
    assert abs(a.mean().item()) < 0.01


def test_merge_adds_s_b_a_and_matches_unmerged() -> None:
    model = _one()
    w0 = model.fc.weight.detach().clone()
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc"], r=4, alpha=6))
    perturb(model, seed=2)
    ad = model.fc.adapters["default"]
    assert ad.s == 1.5
    x = _x(5, 24)
    with torch.no_grad():
        y = model(x)
        peftkit.merge(model)
        _rel_close(model.fc.base_layer.weight, w0 + 1.5 * ad.lora_B @ ad.lora_A)
        _rel_close(model(x), y)
        peftkit.unmerge(model)
        _rel_close(model.fc.base_layer.weight, w0)


def test_linear_hosts_use_the_fused_kernel() -> None:
    model = _one()
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc"], r=4))
    y = model(_x(3, 24))
    assert "FusedLowRankLinear" in type(y.grad_fn).__name__


# -- rsLoRA -----------------------------------------------------------------------------------------------
def test_rslora_doubling_r_scales_s_by_inverse_sqrt2() -> None:
    scales = {}
    for r in (4, 8):
        model = _one()
        peftkit.adapt(model, peftkit.config("lora", target_modules=["fc"], r=r, alpha=16, rslora=True))
        ad = model.fc.adapters["default"]
        scales[r] = ad.s
        assert ad.s == pytest.approx(16 / math.sqrt(r))
        perturb(model, seed=3)
        x = _x(4, 24)
        with torch.no_grad():  # the scale really is what multiplies the low-rank path
            _rel_close(model(x) - model.fc.base_layer(x), ad.s * (x @ ad.lora_A.t()) @ ad.lora_B.t(), 1e-5)
    assert scales[8] / scales[4] == pytest.approx(1 / math.sqrt(2))
    plain = peftkit.config("lora", target_modules=["fc"], r=8, alpha=16)
    assert plain.scaling == 2.0


# -- dropout ----------------------------------------------------------------------------------------------
def test_dropout_is_identity_in_eval_and_masks_the_input_in_train() -> None:
    x = _x(6, 24)
    models = {}
    for p in (0.0, 0.5):
        m = _one()
        peftkit.adapt(m, peftkit.config("lora", target_modules=["fc"], r=4, alpha=8, dropout=p))
        models[p] = m
    perturb(models[0.0], seed=4)
    models[0.5].load_state_dict(models[0.0].state_dict())
    with torch.no_grad():
        y_fused = models[0.0](x)
        assert torch.equal(models[0.5](x), y_fused)  # eval mode: dropout > 0 takes the same fused path
        layer = models[0.5].fc
        ad = layer.adapters["default"]
        base = layer.base_layer(x)
        _rel_close(base + ad.delta(x, base), y_fused)  # the generic (unfused) path agrees with the fused one
        models[0.5].train()
        assert ad.fused_forward(x) is None
        torch.manual_seed(11)
        y_train = models[0.5](x)
        torch.manual_seed(11)
        xd = F.dropout(x, 0.5, training=True)
        _rel_close(y_train, base + ad.s * (xd @ ad.lora_A.t()) @ ad.lora_B.t())
        assert not torch.allclose(y_train, y_fused)


# -- the fused autograd kernel ----------------------------------------------------------------------------
def _plain(x, w, bias, a, b, s):
    return F.linear(x, w, bias) + s * (x @ a.t()) @ b.t()


# (rows N, d_in, d_out): the forward folds W_eff = W + s·B·A when N ≥ d_in and h is not needed (B frozen),
# the backward when N ≥ d_out; the activation-side path runs otherwise
KERNEL_SHAPES = [(15, 12, 10), (15, 24, 10), (15, 12, 20), (6, 24, 20)]


@pytest.mark.parametrize("n,d_in,d_out", KERNEL_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("trains", ["x,bias,A,B", "x,A", "B"])
def test_fused_kernel_matches_plain_autograd(n: int, d_in: int, d_out: int, with_bias: bool, trains: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n // 3, 3, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g)
    bias = torch.randn(d_out, generator=g) if with_bias else None
    a = torch.randn(4, d_in, generator=g)
    b = torch.randn(d_out, 4, generator=g)
    gy = torch.randn(n // 3, 3, d_out, generator=g)
    folds: list[tuple[int, ...]] = []
    real_folded = lowrank.folded_weight
    monkeypatch.setattr(lowrank, "folded_weight",
                        lambda *args: folds.append(tuple(args[0].shape)) or real_folded(*args))
    results = []
    for fn in (_FusedLowRankLinear.apply, _plain):
        leaves = {k: t.clone().requires_grad_(k in trains.split(",")) if t is not None else None
                  for k, t in (("x", x), ("bias", bias), ("A", a), ("B", b))}
        y = fn(leaves["x"], w, leaves["bias"], leaves["A"], leaves["B"], 0.75)
        y.backward(gy)
        results.append((y.detach(), {k: t.grad for k, t in leaves.items() if t is not None and t.requires_grad}))
    (y1, g1), (y2, g2) = results
    _rel_close(y1, y2)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        assert g1[name] is not None, name
        _rel_close(g1[name], g2[name])
    need_h = "B" in trains
    fold_fwd = n >= d_in and not need_h
    fold_bwd = n >= d_out and "x" in trains
    assert len(folds) == fold_fwd + fold_bwd


@pytest.mark.parametrize("layout", ["linear", "gpt2_conv1d"])
def test_fused_kernel_zero_b_gives_the_base_output_bit_for_bit_on_both_paths(layout: str) -> None:
    torch.manual_seed(0)
    native = torch.randn(10, 12) if layout == "linear" else torch.randn(12, 10)  # Conv1D stores (d_in, d_out)
    w = native if layout == "linear" else native.t()
    bias = torch.randn(10)
    a = torch.randn(4, 12)
    assert lowrank.folded_weight(w, a, torch.zeros(10, 4), 1.0).stride() == w.stride()
    for n in (150, 6):  # folded (N ≥ d_in) and activation-side forward, grad on and off
        x = torch.randn(n, 12)
        base = F.linear(x, native, bias) if layout == "linear" else torch.addmm(bias, x, native)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                b = torch.zeros(10, 4, requires_grad=grad)
                y = _FusedLowRankLinear.apply(x, w, bias, a, b, 2.0) if grad else \
                    lowrank._lowrank_linear(x, w, bias, a, b, 2.0, need_h=False)[0]
                assert torch.equal(y, base)


def test_half_precision_never_folds_the_update_into_the_weight() -> None:
    # W = 1 everywhere, |s·B·A| ≤ 1.5e-3 < half a bfloat16 ulp either side of 1: W + s·B·A rounds back to W, so a folded
    # product would lose the update entirely; rows x = e₀ − e₁ cancel the base exactly and leave s·(B·A)[:, 0 − 1]
    g = torch.Generator().manual_seed(3)
    w = torch.ones(16, 16, dtype=torch.bfloat16)
    a, b = torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g)
    k = (0.0015 / float((b @ a).abs().max())) ** 0.5
    a, b = (a * k).bfloat16(), (b * k).bfloat16()
    x = torch.zeros(64, 16, dtype=torch.bfloat16)
    x[:, 0], x[:, 1] = 1, -1
    assert torch.equal(torch.addmm(w, b, a), w)  # what folding would multiply by
    exact = (b.float() @ a.float())[:, 0] - (b.float() @ a.float())[:, 1]
    y, _ = lowrank._lowrank_linear(x, w, None, a, b, 1.0, need_h=False)
    torch.testing.assert_close(y.float(), exact.expand(64, 16), rtol=0.05, atol=1e-5)
    assert not lowrank.fold_pays(10**6, 16, w) and lowrank.fold_pays(16, 16, w.float())


def test_fused_kernel_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(1)

    def t(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, w, bias, a, b = t(2, 3, 5), t(4, 5, grad=False), t(4), t(2, 5), t(4, 2)
    assert torch.autograd.gradcheck(lambda x, bias, a, b: _FusedLowRankLinear.apply(x, w, bias, a, b, 1.5),
                                    (x, bias, a, b))
    assert torch.autograd.gradcheck(lambda x, a, b: _FusedLowRankLinear.apply(x, w, None, a, b, 0.5), (x, a, b))


# -- PiSSA ------------------------------------------------------------------------------------------------
def _principal(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def test_pissa_splits_w0_into_residual_plus_principal() -> None:
    model = _one()
    w0 = model.fc.weight.detach().clone()
    x = _x(4, 24)
    with torch.no_grad():
        y0 = model(x)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc"], r=4, alpha=8, init="pissa"))
    ad = model.fc.adapters["default"]
    # the host weight stays W0; the residual W_res = W0 − s·B0·A0 is implicit in the adapter
    assert torch.equal(model.fc.base_layer.weight.detach(), w0)
    with torch.no_grad():
        w_res = w0 - ad.s * ad.pissa_B0 @ ad.pissa_A0
        sba = ad.s * ad.lora_B @ ad.lora_A
        _rel_close(w_res + sba, w0)
        assert torch.linalg.matrix_rank(sba).item() == 4
        _rel_close(sba, _principal(w0, 4))
        _rel_close(model(x), y0)
        # the effective weight is W_res + s·B·A: after training B, A it differs from W0 only through them
        assert not torch.allclose(w_res, w0)
        with peftkit.disable(model):
            assert torch.equal(model(x), y0)


def test_pissa_with_dropout_matches_peft_in_train_mode() -> None:
    """The paper and PEFT: y = W_res·x + s·B·A·dropout(x) — the frozen residual sees x itself. peftkit keeps W0 and
    subtracts s·B0·A0, which must then see the undropped x too; with the same dropout mask the outputs agree."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = One(24, 16)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["fc"], r=4, lora_alpha=8, lora_dropout=0.5,
                                                          init_lora_weights="pissa")).train()
    ours = copy.deepcopy(base)
    peftkit.adapt(ours, peftkit.config("lora", target_modules=["fc"], r=4, alpha=8, dropout=0.5, init="pissa"))
    ours.train()
    x = _x(6, 24)
    with torch.no_grad():
        torch.manual_seed(5)
        want = ref(x)
        torch.manual_seed(5)
        got = ours(x)
        y0 = base(x)
    assert float((want - y0).abs().max()) > 1e-2  # PEFT's output at init in train mode is not the base output
    _rel_close(got, want, rel=1e-4)  # two SVDs of the same W0 and different summation orders
    ours.eval()
    with torch.no_grad():
        _rel_close(ours(x), y0, rel=1e-5)


def test_pissa_niter_uses_randomised_svd() -> None:
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(24, 16, generator=g))
    spectrum = torch.tensor([10.0, 8.0, 6.0, 5.0] + [0.01] * 12)
    model = _one()
    with torch.no_grad():
        model.fc.weight.copy_(q1 @ torch.diag(spectrum) @ q2.t())
    w0 = model.fc.weight.detach().clone()
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc"], r=4, alpha=4, init="pissa_niter_4"))
    ad = model.fc.adapters["default"]
    with torch.no_grad():
        sba = ad.s * ad.lora_B @ ad.lora_A
        w_res = model.fc.base_layer.weight - ad.s * ad.pissa_B0 @ ad.pissa_A0
        _rel_close(w_res + sba, w0)
        _rel_close(sba, _principal(w0, 4), 1e-3)
    assert torch.linalg.matrix_rank(sba).item() == 4


def test_pissa_save_load_into_fresh_base_and_delete_restores_w0(tmp_path) -> None:
    model = _one()
    w0 = model.fc.weight.detach().clone()
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc"], r=4, alpha=8, init="pissa"))
    perturb(model, seed=5)
    x = _x(4, 24)
    with torch.no_grad():
        y = model(x)
    peftkit.save(model, tmp_path / "p")
    fresh = _one()
    peftkit.load(fresh, tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    peftkit.delete(fresh, "default")
    assert isinstance(fresh.fc, nn.Linear)
    assert torch.equal(fresh.fc.weight.detach(), w0)
    peftkit.delete(model, "default")
    assert torch.equal(model.fc.weight.detach(), w0)


def test_pissa_on_transposed_gpt2_host_keeps_output() -> None:
    spec = MODELS["gpt2"]
    model = spec.build()
    x = spec.input()
    with torch.no_grad():
        y0 = spec.run(model, x)
        peftkit.adapt(model, peftkit.config("lora", target_modules=["c_attn", "c_fc"], r=4, init="pissa"))
        _rel_close(spec.run(model, x), y0, 1e-5)
        perturb(model, seed=6)
        y = spec.run(model, x)
        peftkit.merge(model)
        _rel_close(spec.run(model, x), y)


def test_pissa_rank_above_min_dim_is_rejected_and_changes_nothing() -> None:
    model = _one(d_in=24, d_out=6)
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="rank 8 exceeds"):
        peftkit.adapt(model, peftkit.config("lora", target_modules=["fc"], r=8, init="pissa"))
    assert same_state(before, state_copy(model))
    assert isinstance(model.fc, nn.Linear)


@pytest.mark.parametrize("init", ["svd", "pissa_niter_", "PISSA", ""])
def test_bad_init_name(init: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match="init"):
        peftkit.config("lora", target_modules=["fc"], init=init)
