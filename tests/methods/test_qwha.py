"""QWHA's own properties (shared/methods/weight-space.md §9 "Sanity"): the fast Walsh–Hadamard transform equals the
dense Hadamard product (Sylvester, and H_{2^k} ⊗ H_m with Paley matrices for other sizes), is orthonormal, and
involutive where H is symmetric; the base is RTN(W0); AdaAlloc spends exactly p and matches a one-at-a-time
reference; the data-free init keeps each row's largest WHT coefficients; after calibration the quantisation error
on the calibration data is lower than without the adapter, refined ≤ unrefined, the refinement equals the spec's
lstsq form; with the full budget the quantised layer + adapter reproduces the float layer; the gradient of c, the
parameter count, merge (W_Q + α·F·Hᵀ, exact unmerge), save/load after calibration, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
import peftkit.methods.qwha as qwha
from conformance.models import MODELS, perturb, same_state, state_copy
from peftkit.quant import rtn
from tolerance import assert_near


def _x(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sylvester(n: int) -> torch.Tensor:
    """H_1 = [1]; H_N = H_2 ⊗ H_{N/2} (unnormalised)."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), _sylvester(n // 2))


def _dense_h(d: int) -> torch.Tensor:
    """The normalised H by the spec's definition: (H_{2^k} ⊗ H_m)/√d for d = 2^k·m."""
    n, m = qwha.hadamard_factor(d)
    h = _sylvester(n) if m == 1 else torch.kron(_sylvester(n), qwha.paley_hadamard(m))
    return h / math.sqrt(d)


def _hm(d: int) -> torch.Tensor | None:
    _, m = qwha.hadamard_factor(d)
    return None if m == 1 else qwha.paley_hadamard(m) / math.sqrt(m)


def _mlp(**kw) -> nn.Module:
    """MLP fc1 16 -> 32, fc2 32 -> 16 (d_in 32 = 2^5), 4-bit RTN in groups of 8."""
    model = MODELS["mlp"].build()
    peftkit.adapt(model, peftkit.config("qwha", target_modules=["fc1", "fc2"], **{"r": 2, "group_size": 8, **kw}))
    return model


def _dense_f(ad: qwha.Qwha) -> torch.Tensor:
    f = torch.zeros(ad.host.d_out, ad.host.d_in, dtype=torch.float64)
    f.view(-1)[ad.qwha_idx] = ad.qwha_c.detach().double()
    return f


def _dwq(ad: qwha.Qwha) -> torch.Tensor:
    return ad.host.weight_2d().detach().double() - ad.quantized_weight().double()


# -- the transform ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 4, 16, 128, 12, 24, 40, 48, 384])
def test_fast_wht_equals_the_dense_hadamard_product(d: int) -> None:
    h = _dense_h(d)
    assert torch.equal(qwha.hadamard_matrix(d), h)
    x = _x(3, 2, d, dtype=torch.float64)
    torch.testing.assert_close(qwha.wht(x, _hm(d)), x @ h, rtol=0.0, atol=1e-12)
    torch.testing.assert_close(qwha.wht(x, _hm(d), transpose=True), x @ h.t(), rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("d,symmetric", [(64, True), (24, True), (384, True), (40, False)])
def test_normalised_h_is_orthonormal_and_involutive_when_symmetric(d: int, symmetric: bool) -> None:
    h = _dense_h(d)
    torch.testing.assert_close(h @ h.t(), torch.eye(d, dtype=torch.float64), rtol=0.0, atol=1e-12)
    assert torch.equal(h, h.t()) == symmetric
    x = _x(5, d, dtype=torch.float64)
    torch.testing.assert_close(qwha.wht(qwha.wht(x, _hm(d)), _hm(d), transpose=True), x, rtol=0.0, atol=1e-12)
    if symmetric:  # H⁻¹ = H: the transform undoes itself
        torch.testing.assert_close(qwha.wht(qwha.wht(x, _hm(d)), _hm(d)), x, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("m,symmetric", [(12, True), (20, False), (28, True), (44, False), (60, True)])
def test_paley_matrices_are_hadamard(m: int, symmetric: bool) -> None:
    h = qwha.paley_hadamard(m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.float64))
    assert torch.equal(h, h.t()) == symmetric


def test_sizes_factor_into_the_smallest_hadamard_order() -> None:
    assert qwha.hadamard_factor(4096) == (4096, 1)
    assert qwha.hadamard_factor(384) == (32, 12) and qwha.hadamard_factor(1536) == (128, 12)
    for bad in (10, 27, 11008):  # 11008 = 2·5504: its only Paley factor is larger than MAX_M
        with pytest.raises(ValueError, match=f"size {bad} is not 2\\^k·m"):
            qwha.hadamard_factor(bad)


# -- init ------------------------------------------------------------------------------------------------------------
def test_base_is_rtn_of_w0_and_the_layer_computes_wq_plus_adapter() -> None:
    model = _mlp()
    x = _x(4, 16)
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        q = rtn.rtn(layer.host.weight_2d().detach(), 4, 8)
        assert torch.equal(ad.quantized_weight(), q.dequantize())
        dense = q.dequantize().double() + ad.alpha * _dense_f(ad) @ _dense_h(layer.host.d_in).t()
        torch.testing.assert_close(ad.new_weight().double(), dense, rtol=0.0, atol=1e-6)
    with torch.no_grad():
        ref = F.linear(torch.tanh(F.linear(x, model.fc1.adapters["default"].new_weight(), model.fc1.bias)),
                       model.fc2.adapters["default"].new_weight(), model.fc2.bias)
        assert_near(model.fc2(torch.tanh(model.fc1(x))), ref, 64, layers=6)


def _allocate_reference(p: int, e: list[float], cap: int) -> list[int]:
    total = sum(e)
    alloc = [min(math.floor(p * ei / total), cap) for ei in e]
    while sum(alloc) < p:  # one at a time to the smallest p_i below the cap (lowest index on ties)
        i = min((a, i) for i, a in enumerate(alloc) if a < cap)[1]
        alloc[i] += 1
    return alloc


def test_adaalloc_spends_exactly_p_like_the_one_at_a_time_reference() -> None:
    e = torch.tensor([5.0, 0.1, 0.0, 2.0, 9.0, 0.3, 0.3])
    for p, cap in [(20, 10), (40, 8), (7, 10), (56, 8)]:
        alloc = qwha.allocate(p, e, cap)
        assert int(alloc.sum()) == p and int(alloc.max()) <= cap
        assert alloc.tolist() == _allocate_reference(p, e.tolist(), cap)
    # in a layer: the per-row counts of E follow the rows' quantisation-error norms (data-free: G = I)
    model = _mlp()
    ad = model.fc1.adapters["default"]
    counts = torch.bincount(ad.qwha_idx // 16, minlength=32)
    assert int(counts.sum()) == ad.p == 2 * (16 + 32)
    assert torch.equal(counts, qwha.allocate(ad.p, _dwq(ad).norm(dim=1), 16))


def test_data_free_init_keeps_each_rows_largest_coefficients() -> None:
    ad = _mlp().fc2.adapters["default"]
    x0 = qwha.wht(_dwq(ad), None)  # ΔW_Q·H
    chosen = torch.zeros(16 * 32, dtype=torch.bool)
    chosen[ad.qwha_idx] = True
    chosen = chosen.view(16, 32)
    for i in range(16):
        sel, rest = x0[i][chosen[i]].abs(), x0[i][~chosen[i]].abs()
        if sel.numel() and rest.numel():
            assert sel.min() >= rest.max()
    torch.testing.assert_close(ad.qwha_c.detach().double(), x0.reshape(-1)[ad.qwha_idx] / ad.alpha,
                               rtol=0.0, atol=1e-6)


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad(), peftkit.disable(model):
        h = model.fc1(x)
        return {"fc1": x, "fc2": torch.tanh(h)}


def test_calibration_lowers_the_quantisation_error_on_the_calibration_data() -> None:
    model = _mlp(alpha=2.0)
    x = _x(64, 16, seed=3) * torch.linspace(0.2, 3.0, 16)  # anisotropic inputs: the Gram matters
    inputs = _layer_inputs(model, x)
    report = qwha.calibrate(model, [x[:32], x[32:]])
    assert set(report) == {"fc1", "fc2"}
    for path, xi in inputs.items():
        layer = model.get_submodule(path)
        ad = layer.adapters["default"]
        with torch.no_grad():
            y_fp = layer.base_layer(xi)
            err_adapted = (layer(xi) - y_fp).norm()
            err_quantised = (F.linear(xi, ad.quantized_weight(), layer.bias) - y_fp).norm()
        assert err_adapted < 0.9 * err_quantised, path
        before, after = report[path]  # the reported numbers are these errors
        assert abs(before - float(err_quantised)) < 1e-4 * before and abs(after - float(err_adapted)) < 1e-4 * before


def test_refined_is_not_worse_than_unrefined_and_equals_the_lstsq_form() -> None:
    x = _x(96, 16, seed=4) * torch.linspace(0.1, 2.5, 16)
    plain, refined = _mlp(alpha=2.0, refine=False), _mlp(alpha=2.0)
    rep_plain = qwha.calibrate(plain, [x])
    rep_ref = qwha.calibrate(refined, [x])
    for path in ("fc1", "fc2"):
        a, b = plain.get_submodule(path).adapters["default"], refined.get_submodule(path).adapters["default"]
        assert torch.equal(a.qwha_idx, b.qwha_idx)  # same positions E, different values
        assert rep_ref[path][1] < rep_plain[path][1] < rep_plain[path][0]
    # the spec's form per row: c_i = lstsq(B'ᵀ, vᵀ), B' = (H⁻¹·R)[E_i, :], v = ΔW_Q[i]·R, R = U·Σ^½ from G = X·Xᵀ
    ad = refined.fc1.adapters["default"]
    gram = x.double().t() @ x.double()
    s, u = torch.linalg.eigh(gram)
    r = u * s.clamp_min(0).sqrt()
    h = _dense_h(16)
    hinv_r = h.t() @ r
    dwq = _dwq(ad)
    c = torch.zeros_like(dwq)
    rows, cols = ad.qwha_idx // 16, ad.qwha_idx % 16
    for i in range(ad.host.d_out):
        e = cols[rows == i]
        if e.numel():
            sol = torch.linalg.lstsq(hinv_r[e].t(), (dwq[i] @ r)[:, None]).solution[:, 0]
            c[i, e] = sol
    torch.testing.assert_close(_dense_f(ad) * ad.alpha, c, rtol=0.0, atol=1e-6 * float(c.abs().max()))


def test_full_budget_reproduces_the_float_layer() -> None:
    spec = MODELS["block"]  # attn.q: 16 -> 16, r = 8 gives p = 256 = d_out·d_in
    model = spec.build()
    peftkit.adapt(model, peftkit.config("qwha", target_modules=["q"], r=8, bits=2, group_size=8))
    layer = model.attn.q
    x = _x(3, 5, 16)
    with torch.no_grad():
        y_fp = layer.base_layer(x)
        err_q = (F.linear(x, layer.adapters["default"].quantized_weight(), layer.bias) - y_fp).abs().max()
        assert err_q > 1e-2
        torch.testing.assert_close(layer(x), y_fp, rtol=0.0, atol=1e-5)
    qwha.calibrate(model, [spec.input(batch=8)])  # with calibration too
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_fp, rtol=0.0, atol=1e-5)


# -- training, merge, persistence ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_gradient_of_c_matches_the_dense_reference(path: str) -> None:
    model = _mlp(alpha=1.5)
    perturb(model, seed=2, std=0.05)
    layer = model.fc2
    ad = layer.adapters["default"]
    x = _x(3, 4, 32)
    y = layer(x) if path == "fused" else layer.base_layer(x) + ad.delta(x, layer.base_layer(x))
    up = _x(3, 4, 16, seed=5)
    (y * up).sum().backward()
    c = ad.qwha_c.detach().double().requires_grad_(True)
    f = torch.zeros(16 * 32, dtype=torch.float64).index_put((ad.qwha_idx,), c).view(16, 32)
    w = ad.quantized_weight().double() + ad.alpha * f @ _dense_h(32).t()
    (F.linear(x.double(), w, layer.bias.double()) * up).sum().backward()
    torch.testing.assert_close(ad.qwha_c.grad.double(), c.grad, rtol=0.0, atol=1e-5 * float(c.grad.abs().max()))


def test_only_c_trains_with_the_budget_count() -> None:
    model = _mlp(r=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.adapters.default.qwha_c", "fc2.adapters.default.qwha_c"}
    assert peftkit.summary(model).trainable == 3 * (16 + 32) * 2
    assert model.fc1.adapters["default"].qwha_idx.shape == (3 * 48,)


def test_merge_writes_the_dense_weight_and_unmerge_restores_w0() -> None:
    model = _mlp()
    perturb(model, seed=1, std=0.05)
    w0 = model.fc1.base_layer.weight.detach().clone()
    ad = model.fc1.adapters["default"]
    expected = ad.quantized_weight().double() + ad.alpha * _dense_f(ad) @ _dense_h(16).t()
    x = _x(4, 16)
    with torch.no_grad():
        y = model(x)
        peftkit.merge(model)
        torch.testing.assert_close(model.fc1.base_layer.weight.double(), expected, rtol=0.0, atol=1e-6)
        assert_near(model(x), y, 64, layers=6)
        peftkit.unmerge(model)
    assert torch.equal(model.fc1.base_layer.weight, w0)


def test_save_load_after_calibration_and_training(tmp_path) -> None:
    model = _mlp()
    qwha.calibrate(model, [_x(40, 16, seed=6)])
    opt = torch.optim.Adam(peftkit.trainable_parameters(model), lr=1e-2)
    model(_x(8, 16)).pow(2).mean().backward()
    opt.step()
    peftkit.save(model, tmp_path / "ad")
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"qwha_c", "qwha_idx"}  # no codes: rebuilt from W0
    fresh = MODELS["mlp"].build()
    peftkit.load(fresh, tmp_path / "ad")
    assert torch.equal(fresh.fc1.adapters["default"].qwha_idx, model.fc1.adapters["default"].qwha_idx)
    x = _x(6, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_calibrate_with_dict_batches_on_gpt2() -> None:
    spec = MODELS["gpt2"]
    model = spec.build()
    peftkit.adapt(model, peftkit.config("qwha", target_modules=["c_fc"], r=2, group_size=8))
    ids = spec.input(batch=6)
    report = qwha.calibrate(model, [{"input_ids": ids}])
    (before, after), = report.values()
    assert after < before


# -- errors -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    ({"bits": 0}, "QwhaConfig: bits must be an integer in 1..8"),
    ({"group_size": 0}, "QwhaConfig: group_size must be a positive integer"),
    ({"dropout": 0.1}, "QwhaConfig.dropout must be 0"),
    ({"r": 0}, "QwhaConfig.r must be a positive integer"),
    ({"alpha": 0.0}, "QwhaConfig.alpha must be > 0"),
])
def test_bad_config(kw: dict, msg: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match=msg):
        peftkit.config("qwha", target_modules=["fc1"], **kw)


class _Odd(nn.Module):
    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("model,kw,msg", [
    (_Odd(10), {}, "module 'fc': QWHA's Walsh–Hadamard transform needs d_in = 2\\^k·m .* d_in = 10"),
    (_Odd(16), {"r": 6}, "module 'fc': QWHA's budget p = r·\\(d_in \\+ d_out\\) = 144 exceeds the d_out·d_in = 128 "
                         "entries of F; use r <= 5"),
])
def test_layer_errors_leave_the_model_unchanged(model: nn.Module, kw: dict, msg: str) -> None:
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match=msg):
        peftkit.adapt(model, peftkit.config("qwha", target_modules=["fc"], **kw))
    assert same_state(before, state_copy(model)) and isinstance(model.fc, nn.Linear)


def test_calibrate_errors() -> None:
    model = _mlp()
    with pytest.raises(peftkit.PeftkitError, match=r"no calibration batch reached \['fc1', 'fc2'\]"):
        qwha.calibrate(model, [])
    with pytest.raises(peftkit.PeftkitError, match=r"module 'fc1': the calibration Gram must be a finite \(16, 16\)"):
        model.fc1.adapters["default"].initialize(torch.ones(3, 3))
    peftkit.merge(model)
    with pytest.raises(peftkit.PeftkitError, match="is merged into \\['fc1', 'fc2'\\]; unmerge before calibrating"):
        qwha.calibrate(model, [_x(4, 16)])
    with pytest.raises(peftkit.PeftkitError, match="module 'fc1': QWHA is merged into the layer; unmerge before"):
        model.fc1.adapters["default"].initialize()
    lora = MODELS["mlp"].build()
    peftkit.adapt(lora, peftkit.config("lora", target_modules=["fc1"]))
    with pytest.raises(peftkit.PeftkitError, match="adapter .default. has no Qwha layers"):
        qwha.calibrate(lora, [_x(4, 16)])


def test_corrupt_positions_in_a_file_are_refused(tmp_path) -> None:
    model = _mlp()
    peftkit.save(model, tmp_path / "ad")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if k.endswith("fc1.qwha_idx"))
    tensors[key][1] = tensors[key][0]  # a duplicate position
    save_file(tensors, f)
    fresh = MODELS["mlp"].build()
    before = state_copy(fresh)
    with pytest.raises(peftkit.PeftkitError, match="module 'fc1': the saved QWHA positions must be 96 distinct"):
        peftkit.load(fresh, tmp_path / "ad")
    assert same_state(before, state_copy(fresh)) and peftkit.adapter_names(fresh) == []
