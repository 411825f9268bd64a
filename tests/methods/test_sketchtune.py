"""SketchTune's own properties (shared/methods/weight-space.md §16 "Sanity"): the layer computes with Ŵ = T[C] and
each row-group of Ŵ has at most 2^bits distinct values; the sketch is a k-means fixed point whose error falls as the
number of centroids grows and is small at 4 bits; weighted k-means beats unweighted on a planted example; the
gather-based gradient equals the scatter-add formula and reaches only the tables; the parameter count (LLaMA-2-7B:
87.0M) and the size report's arithmetic; merge writes T[C] and unmerge restores W0 bit for bit; codes are saved as
uint8 and used at load; loading into another base fails clearly; calibration (Hessian-weighted k-means, GPTQ-like
compensated codes) lowers the error on the calibration data; and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
import peftkit.methods.sketchtune as sk
from conformance.models import MODELS, TinyModel, matrix_config_fields, perturb, same_state, state_copy
from peftkit.core.calibration import input_columns
from peftkit.core.host import Host
from peftkit.core.model import get_layer
from tolerance import assert_near


def _x(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class One(nn.Module):
    def __init__(self, d_in: int = 64, d_out: int = 32, std: float | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        if std is not None:
            nn.init.normal_(self.fc.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _one(d_in: int = 64, d_out: int = 32, seed: int = 0, std: float | None = None, adapt: bool = True,
         **kw) -> One:
    """A seeded Linear(d_in, d_out), SketchTune-adapted with ``kw`` unless ``adapt`` is False."""
    torch.manual_seed(seed)
    model = One(d_in, d_out, std).eval()
    if adapt:
        peftkit.adapt(model, peftkit.config("sketchtune", target_modules=["fc"], **kw))
    return model


def _ad(model: nn.Module, path: str = "fc", name: str = "default") -> sk.SketchTune:
    return get_layer(model, path).adapters[name]


def _w0(model: nn.Module, path: str = "fc") -> torch.Tensor:
    return get_layer(model, path).host.weight_2d().detach()


def _lookup(ad: sk.SketchTune) -> torch.Tensor:
    """Ŵ[i, j] = T[i, ⌊j/n⌋, C[i, j]] by plain indexing."""
    t, c = ad.sketch_tables.detach(), ad.sketch_codes.long()
    d_out, d_in = c.shape
    n = d_in // ad.groups
    rows = torch.arange(d_out)[:, None].expand(d_out, d_in)
    groups = (torch.arange(d_in) // n)[None, :].expand(d_out, d_in)
    return t[rows, groups, c]


def _adapt_tiny(tiny: TinyModel, **kw) -> nn.Module:
    model = tiny.build()
    peftkit.adapt(model, peftkit.config("sketchtune", **{**matrix_config_fields("sketchtune", tiny), **kw}))
    return model


# -- the representation -------------------------------------------------------------------------------------------
def test_layer_computes_with_the_table_lookup_and_groups_have_few_values(tiny: TinyModel) -> None:
    model = _adapt_tiny(tiny)
    perturb(model, seed=3)
    for path, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        w = ad.new_weight()
        assert torch.equal(w, _lookup(ad))
        assert ad.sketch_codes.dtype == torch.uint8 and int(ad.sketch_codes.max()) < 2 ** ad.bits
        for g in w.detach().view(ad.host.d_out, ad.groups, -1).reshape(-1, ad.host.d_in // ad.groups):
            assert g.unique().numel() <= 2 ** ad.bits, path
    # the whole model computes exactly what the de-sketched weights compute
    x = tiny.input()
    with torch.no_grad():
        y = tiny.run(model, x)
        peftkit.merge(model)
        torch.testing.assert_close(tiny.run(model, x), y, rtol=0, atol=1e-5 * float(y.abs().max()))


def test_linear_forward_is_x_what_transposed_plus_bias() -> None:
    model = _one(bits=3, groups_per_row=2)
    perturb(model, seed=1)
    x = _x(5, 7, 64)
    ref = F.linear(x, _lookup(_ad(model)), model.fc.bias)
    assert_near(model(x), ref, 64, layers=6)


def test_sketch_is_a_kmeans_fixed_point() -> None:
    model = _one(bits=3, groups_per_row=4, kmeans_iters=200)
    ad = _ad(model)
    x = _w0(model).view(-1, 16)
    t = ad.sketch_tables.detach().view(-1, 8)
    c = ad.sketch_codes.long().view(-1, 16)
    assert bool((t[:, 1:] >= t[:, :-1]).all())  # sorted tables
    # every code is the nearest entry; every used entry is the mean of its members
    dist = (x[:, :, None] - t[:, None, :]).abs()
    assert torch.allclose(dist.gather(2, c[:, :, None]).squeeze(2), dist.min(2).values)
    mass = torch.zeros_like(t).scatter_add_(1, c, torch.ones_like(x))
    mean = torch.zeros_like(t).scatter_add_(1, c, x) / mass.clamp_min(1)
    assert_near(t[mass > 0], mean[mass > 0], 64, layers=6)


def test_reconstruction_error_falls_as_centroids_grow() -> None:
    errs = [_ad(_one(d_in=128, d_out=64, bits=b, groups_per_row=4)).error() for b in (1, 2, 3, 4, 5)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] == 0.0  # 32 centroids for 32 weights per group: exact


def test_four_bit_sketch_is_close_to_the_base() -> None:
    model = _one(d_in=256, d_out=256, std=0.02, bits=4, groups_per_row=4)
    w0 = _w0(model)
    rel = _ad(model).error() / float(w0.norm())
    assert 0 < rel < 0.1
    x = _x(16, 256)
    with torch.no_grad(), peftkit.disable(model):
        y0 = model(x)
    assert float((model(x).detach() - y0).norm() / y0.norm()) < 0.15


def test_weighted_kmeans_beats_unweighted_on_a_planted_example() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, generator=g) * 0.1 - 1, torch.randn(50, generator=g) * 0.1 + 1,
                   torch.tensor([3.0, 3.1])])[None, :]
    w = torch.ones_like(x)
    w[0, -2:] = 1000.0  # two heavy weights at ≈ 3

    def werr(c: torch.Tensor, codes: torch.Tensor) -> float:
        return float((w * (x - c.gather(1, codes)) ** 2).sum())

    plain = werr(*sk.weighted_kmeans(x, 2))
    weighted = werr(*sk.weighted_kmeans(x, 2, w))
    c_weighted, _ = sk.weighted_kmeans(x, 2, w)
    assert abs(float(c_weighted[0, 1]) - 3.05) < 1e-5  # one centroid serves the heavy pair exactly
    assert weighted < 0.05 * plain, (weighted, plain)


def test_lloyd_never_worsens_its_seeds() -> None:
    x = _x(40, 24)
    w = _x(40, 24, seed=2).abs() + 0.1
    for k in (2, 4, 8):
        seeds = sk.weighted_kmeans(x, k, w, iters=0)
        fit = sk.weighted_kmeans(x, k, w, iters=50)
        e0, e1 = ((w * (x - c.gather(1, i)) ** 2).sum() for c, i in (seeds, fit))
        assert e1 <= e0


# -- training ---------------------------------------------------------------------------------------------------------
def test_gather_gradient_equals_the_scatter_add_formula() -> None:
    model = _one(bits=2, groups_per_row=4)
    perturb(model, seed=1)
    ad = _ad(model)
    x, v = _x(6, 64), _x(6, 32, seed=2)
    what = ad.new_weight().detach().requires_grad_(True)
    (F.linear(x, what, model.fc.bias) * v).sum().backward()
    gw = what.grad  # ∂L/∂Ŵ
    (model(x) * v).sum().backward()
    d_out, d_in = gw.shape
    idx = torch.arange(d_out)[:, None] * ad.groups * ad.k + (torch.arange(d_in) // 16)[None, :] * ad.k
    ref = torch.zeros(d_out * ad.groups * ad.k).index_add_(0, (idx + ad.sketch_codes.long()).view(-1), gw.view(-1))
    assert_near(ad.sketch_tables.grad.view(-1), ref, 64, layers=6)


def test_gradient_reaches_only_the_tables() -> None:
    model = _one(bits=4, groups_per_row=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.adapters.default.sketch_tables"]
    (model(_x(3, 64)) ** 2).sum().backward()
    ad = _ad(model)
    assert ad.sketch_tables.grad is not None and ad.sketch_tables.grad.abs().sum() > 0
    assert model.fc.base_layer.weight.grad is None and model.fc.base_layer.bias.grad is None
    assert not ad.sketch_codes.is_floating_point() and not ad.sketch_codes.requires_grad
    codes, w0 = ad.sketch_codes.clone(), _w0(model).clone()
    opt = torch.optim.Adam(peftkit.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (model(_x(3, 64)) ** 2).sum().backward()
        opt.step()
    assert torch.equal(ad.sketch_codes, codes) and torch.equal(_w0(model), w0)


def test_parameter_count_and_the_llama_2_7b_arithmetic() -> None:
    model = _one(d_in=64, d_out=48, bits=3, groups_per_row=8)
    assert peftkit.summary(model).trainable == 48 * 8 * 8
    cfg = peftkit.config("sketchtune", target_modules=["x"])  # defaults: 4 bits, 4 groups per row

    def rows(d_in: int, d_out: int) -> int:
        return sk.SketchTune.expected_params(Host(nn.Linear(d_in, d_out, device="meta")), cfg)

    per_block = 4 * rows(4096, 4096) + 2 * rows(4096, 11008) + rows(11008, 4096)  # q k v o, gate up, down
    assert 32 * per_block == 87_031_808  # "87.0M" in the SketchTune README


# -- size report ------------------------------------------------------------------------------------------------------
def test_size_ratio_of_four_bit_codes_on_a_256_by_256_layer() -> None:
    s = sk.sketch_size(_one(d_in=256, d_out=256, bits=4, groups_per_row=4))
    assert (s.layers, s.weights) == (1, 65536)
    assert s.original_bytes == 65536 * 4  # fp32
    assert s.code_bytes == 65536 * 4 // 8  # 4 bits a code
    assert s.table_bytes == 256 * 4 * 16 * 4  # d_out · G · 2^bits fp32 entries
    assert s.sketched_bytes == 98304 and s.ratio == 0.375
    assert s.resident_bytes == 65536 + s.table_bytes
    assert "37.5%" in str(s)
    half = _one(d_in=256, d_out=256, bits=4, groups_per_row=4)
    model16 = One(256, 256).half()
    peftkit.adapt(model16, peftkit.config("sketchtune", target_modules=["fc"]))
    s16 = sk.sketch_size(model16)
    assert (s16.code_bytes, s16.table_bytes, s16.original_bytes) == (32768, 32768, 131072) and s16.ratio == 0.5
    both = sk.sketch_size(half) + s16
    assert both.layers == 2 and both.sketched_bytes == 98304 + 65536


def test_size_report_sums_layers_and_counts_packed_odd_bit_widths() -> None:
    model = MODELS["mlp"].build()
    peftkit.adapt(model, peftkit.config("sketchtune", target_modules=["fc1", "fc2"], bits=3, groups_per_row=2))
    s = sk.sketch_size(model)
    assert s.layers == 2 and s.weights == 2 * 16 * 32
    assert s.code_bytes == 2 * (512 * 3 // 8)
    assert s.table_bytes == (32 + 16) * 2 * 8 * 4


# -- merge, save, load ------------------------------------------------------------------------------------------------
def test_merge_writes_the_desketched_weight_and_unmerge_restores_w0() -> None:
    model = _one(bits=2, groups_per_row=4)
    perturb(model, seed=2)
    w0 = _w0(model).clone()
    x = _x(4, 64)
    y = model(x).detach()
    peftkit.merge(model)
    assert torch.equal(_w0(model), _lookup(_ad(model)))
    assert_near(model(x), y, 64, layers=6)
    peftkit.unmerge(model)
    assert torch.equal(_w0(model), w0)
    with pytest.raises(peftkit.PeftkitError, match="merged"):
        peftkit.merge(model)
        _ad(model).initialize()


def test_saved_codes_are_uint8_and_used_at_load(tmp_path) -> None:
    model = _one(bits=3, groups_per_row=2)
    sk.calibrate(model, [_x(64, 64) * torch.logspace(-1, 1, 64)])  # codes differ from the data-free sketch
    perturb(model, seed=1)
    x = _x(4, 64)
    y = model(x).detach()
    peftkit.save(model, tmp_path / "ad")
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert tensors["adapter.fc.sketch_codes"].dtype == torch.uint8
    assert tensors["adapter.fc.sketch_codes"].shape == (32, 64)
    assert tensors["adapter.fc.sketch_tables"].shape == (32, 2, 8)
    fresh = _one(adapt=False)
    data_free = _one(bits=3, groups_per_row=2)
    assert not torch.equal(_ad(data_free).sketch_codes, _ad(model).sketch_codes)
    peftkit.load(fresh, tmp_path / "ad")
    assert torch.equal(_ad(fresh).sketch_codes, _ad(model).sketch_codes)
    assert torch.equal(fresh(x), y)


def test_loading_into_another_base_of_the_same_shape_fails_clearly(tmp_path) -> None:
    model = _one(bits=2, groups_per_row=2)
    peftkit.save(model, tmp_path / "ad")
    other = _one(seed=1, adapt=False)
    before = state_copy(other)
    with pytest.raises(peftkit.PeftkitError, match="another base weight"):
        peftkit.load(other, tmp_path / "ad")
    assert same_state(before, state_copy(other)) and peftkit.adapter_names(other) == []
    # the same base cast to bfloat16 is the same base
    same16 = _one(adapt=False).to(torch.bfloat16)
    peftkit.load(same16, tmp_path / "ad")
    assert _ad(same16).sketch_tables.dtype == torch.bfloat16


def test_corrupt_codes_in_a_file_are_refused(tmp_path) -> None:
    model = _one(bits=2, groups_per_row=2)
    peftkit.save(model, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["adapter.fc.sketch_codes"][0, 0] = 7  # 2 bits: codes 0..3
    save_file(tensors, str(path), metadata={"format": "pt"})
    fresh = _one(adapt=False)
    with pytest.raises(peftkit.PeftkitError, match="below 2\\^bits = 4"):
        peftkit.load(fresh, tmp_path / "ad")
    assert peftkit.adapter_names(fresh) == []


# -- calibration ------------------------------------------------------------------------------------------------------
def test_input_columns_reproduce_each_host_product(tiny: TinyModel) -> None:
    model = tiny.build()
    seen: dict[str, torch.Tensor] = {}
    hosts = {p: Host(model.get_submodule(p), p) for p in tiny.adapted}
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda _m, a, p=p: seen.__setitem__(p, a[0].detach())) for p in tiny.adapted]
    with torch.no_grad():
        tiny.run(model, tiny.input())
    for h in handles:
        h.remove()
    for p, host in hosts.items():
        x = seen[p]
        w = _x(host.d_out, host.d_in, seed=4)
        cols = input_columns(host, x)
        out = host.apply_weight(x, w).double()
        if host.is_conv:  # (B, d_out, *spatial) -> (N, d_out) in the row order of the unfolded columns
            out = out.flatten(2).transpose(1, 2)
        # exact float64 products vs the float32 host kernel: float32 rounding over a d_in-long reduction
        assert_near(cols @ w.double().t(), out.reshape(-1, host.d_out), cols.shape[-1], dtype=torch.float32)


def _calibrated(batches: list[torch.Tensor], **kw) -> tuple[nn.Module, tuple[float, float]]:
    model = _one(bits=2, groups_per_row=2)
    before, after = sk.calibrate(model, batches, **kw)["fc"]
    # the reported errors are ‖(W0 − Ŵ)·X‖_F on the calibration inputs
    x = torch.cat(batches).double()
    assert after == pytest.approx(float((x @ (_w0(model) - _ad(model).new_weight().detach()).double().t()).norm()))
    return model, (before, after)


def test_hessian_weighted_kmeans_lowers_the_error_for_unequal_input_scales() -> None:
    batches = [_x(128, 64, seed=s) * torch.logspace(-1.5, 1.5, 64) for s in (1, 2)]  # independent, unequal columns
    _, (data_free, weighted) = _calibrated(batches, compensate=False)
    assert weighted < 0.9 * data_free, (weighted, data_free)


def test_error_compensation_lowers_the_error_for_correlated_inputs() -> None:
    mix = _x(8, 64, seed=9)  # rank-8 inputs plus a little noise: strongly correlated columns
    batches = [_x(128, 8, seed=s) @ mix + 0.05 * _x(128, 64, seed=s + 10) for s in (1, 2)]
    _, (_, nearest) = _calibrated(batches, compensate=False)
    _, (data_free, compensated) = _calibrated(batches, compensate=True)
    assert compensated < 0.7 * min(nearest, data_free), (compensated, nearest, data_free)


def test_compensated_codes_without_correlation_are_the_nearest_codes() -> None:
    model = _one(bits=2, groups_per_row=4)
    ad = _ad(model)
    u = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(0)) + 0.5)  # diagonal H: no coupling
    codes = sk.compensated_codes(_w0(model), ad.sketch_tables.detach(), u)
    assert torch.equal(codes, ad.sketch_codes.long())


def test_calibrate_on_every_host_kind_and_dict_batches(tiny: TinyModel) -> None:
    model = _adapt_tiny(tiny)
    codes = {p: layer.adapters["default"].sketch_codes.clone() for p, layer in peftkit.adapted_layers(model)}
    res = sk.calibrate(model, [tiny.input(seed=s) for s in (1, 2)])
    assert set(res) == set(tiny.adapted)
    assert all(0 < after < float("inf") and 0 < before < float("inf") for before, after in res.values()), res
    assert any(not torch.equal(codes[p], layer.adapters["default"].sketch_codes)
               for p, layer in peftkit.adapted_layers(model))
    gpt = MODELS["gpt2"]
    model = _adapt_tiny(gpt)
    res = sk.calibrate(model, [{"input_ids": gpt.input(seed=1)}])
    assert set(res) == set(gpt.adapted)


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    ({"bits": 0}, "bits must be 1..8"),
    ({"bits": 9}, "bits must be 1..8"),
    ({"groups_per_row": 0}, "groups_per_row must be >= 1"),
    ({"kmeans_iters": -1}, "kmeans_iters must be >= 0"),
    ({"dropout": 0.1}, "dropout must be 0"),
])
def test_bad_config(kw: dict, msg: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match=msg):
        peftkit.config("sketchtune", target_modules=["fc"], **kw)


def test_groups_that_do_not_divide_the_row_leave_the_model_unchanged() -> None:
    model = MODELS["conv2d"].build()  # conv1: d_in = 3·3·3 = 27
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match=r"'conv1'.*groups_per_row = 4 does not divide .* d_in = 27"):
        peftkit.adapt(model, peftkit.config("sketchtune", target_modules=["conv1", "conv2"]))
    assert same_state(before, state_copy(model)) and peftkit.adapter_names(model) == []


def test_calibrate_errors() -> None:
    model = _one(bits=2, groups_per_row=2)
    with pytest.raises(peftkit.PeftkitError, match="damping must be > 0"):
        sk.calibrate(model, [_x(4, 64)], damping=0)
    with pytest.raises(peftkit.PeftkitError, match="no calibration batch reached"):
        sk.calibrate(model, [])
    peftkit.adapt(model, peftkit.config("sketchtune", target_modules=["fc"], bits=2, groups_per_row=2), name="b")
    with pytest.raises(peftkit.PeftkitError, match="2 SketchTune adapters"):
        sk.calibrate(model, [_x(4, 64)])
    with pytest.raises(peftkit.PeftkitError, match="no SketchTune adapter named 'zz'"):
        sk.sketch_size(model, "zz")
    peftkit.merge(model, ["b"])
    with pytest.raises(peftkit.PeftkitError, match="merged"):
        sk.calibrate(model, [_x(4, 64)], name="b")
    lora = _one(adapt=False)
    peftkit.adapt(lora, peftkit.config("lora", target_modules=["fc"]))
    with pytest.raises(peftkit.PeftkitError, match="0 SketchTune adapters"):
        sk.calibrate(lora, [_x(4, 64)])
