"""TLoRA's own properties (shared/methods/weight-space.md §3 "Sanity"): T == I at init (Prop. 1), output == base at
init, the tensor-ring / Kronecker transform and the three residuals against their trace definitions, merged ==
unmerged, full-rank T after perturbation, the parameter formula, factorisation rules and errors, the identity
regulariser, and save/load."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy
from peftkit.methods.tlora import factorize, identity_regularizer
from tolerance import assert_near

RESIDUALS = ("lora", "ttv", "ttm")


def _model(seed: int = 0) -> nn.Module:
    """MLP: fc1 16 -> 32 (d_in = 2·2·4), fc2 32 -> 16 (d_in = 2·4·4), head 16 -> 4."""
    return MODELS["mlp"].build(seed=seed)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * float(expected.detach().abs().max()))


def _adapted(residual: str = "lora", rt: int = 1, r: int = 3, perturbed: bool = True, **kw) -> nn.Module:
    model = _model()
    peftkit.adapt(model, peftkit.config("tlora", target_modules=["fc1", "fc2"], r=r, transform_rank=rt,
                                        residual=residual, **kw))
    if perturbed:
        perturb(model, seed=3)
    return model


# -- reference implementations straight from the trace definitions ------------------------------------------
def _digits(dims: list[int]) -> torch.Tensor:
    """(∏dims, D): the big-endian multi-index of every flat index."""
    n, out = math.prod(dims), []
    flat = torch.arange(n)
    for k in range(len(dims)):
        out.append(flat // math.prod(dims[k + 1:]) % dims[k])
    return torch.stack(out, dim=1)


def _as_ring(core: torch.Tensor) -> torch.Tensor:
    return core.double() if core.dim() == 4 else core.double()[:, :, None, None]


def _trm_reference(cores: list[torch.Tensor]) -> torch.Tensor:
    """M[ō, ī] = tr(G¹[o₁, i₁]⋯Gᴰ[o_D, i_D]) for every (ō, ī) at once (R = 1: plain products)."""
    do, di = _digits([c.shape[0] for c in cores]), _digits([c.shape[1] for c in cores])
    prod = None
    for d, c in enumerate(cores):
        g = _as_ring(c)[do[:, d]][:, di[:, d]]  # (O, I, R, R)
        prod = g if prod is None else prod @ g
    return prod.diagonal(dim1=-2, dim2=-1).sum(-1)


def _ttv_reference(out_cores: list[torch.Tensor], in_cores: list[torch.Tensor]) -> torch.Tensor:
    """Δ[ō, ī] = tr(B¹[o₁]⋯Bᴰ[o_D] C¹[i₁]⋯Cᴰ[i_D])."""
    do, di = _digits([c.shape[0] for c in out_cores]), _digits([c.shape[0] for c in in_cores])
    left = None
    for d, c in enumerate(out_cores):
        g = c.double()[do[:, d]]
        left = g if left is None else left @ g
    right = None
    for d, c in enumerate(in_cores):
        g = c.double()[di[:, d]]
        right = g if right is None else right @ g
    return (left[:, None] @ right[None, :]).diagonal(dim1=-2, dim2=-1).sum(-1)


def _dense_weight(ad) -> torch.Tensor:
    """W0·T + s·Δ from the reference definitions (float64)."""
    w0 = ad.host.weight_2d().detach().double()
    t = _trm_reference([c.detach() for c in ad.transform])
    if ad.residual == "lora":
        delta = ad.lora_B.detach().double() @ ad.lora_A.detach().double()
    elif ad.residual == "ttv":
        delta = _ttv_reference([c.detach() for c in ad.ttv_out], [c.detach() for c in ad.ttv_in])
    else:
        delta = _trm_reference([c.detach() for c in ad.ttm])
    return w0 @ t + ad.s * delta


# -- Prop. 1: identity at init --------------------------------------------------------------------------------
@pytest.mark.parametrize("rt", [1, 2, 3, 4])
def test_transform_is_identity_at_init(rt: int) -> None:
    model = _adapted(rt=rt, perturbed=False)
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        t = ad.transform_matrix()
        eye = torch.eye(layer.host.d_in)
        if rt in (1, 2, 4):  # 1/R_T exact in binary: T == I bit for bit (spec: "verified, error 0.0")
            assert torch.equal(t, eye)
        else:
            assert_near(t, eye, 64, layers=6)
        for core in ad.transform:
            assert core.shape == ((core.shape[0],) * 2 if rt == 1 else (core.shape[0],) * 2 + (rt, rt))


@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("rt", [1, 2])
def test_init_output_is_exactly_the_base(residual: str, rt: int) -> None:
    x = _x(4, 5, 16)
    with torch.no_grad():
        y0 = _model()(x)
        model = _adapted(residual, rt, perturbed=False)
        assert torch.equal(model(x), y0)  # fused path (one adapter)
        layer = model.fc1
        b0 = layer.base_layer(x)
        assert torch.equal(layer.adapters["default"].delta(x, b0), torch.zeros_like(b0))  # generic path


def test_gpt2_conv1d_host() -> None:
    spec = MODELS["gpt2"]
    x = spec.input()
    with torch.no_grad():
        y0 = spec.run(spec.build(), x)
        model = spec.build()
        peftkit.adapt(model, peftkit.config("tlora", target_modules=spec.targets, r=2, transform_rank=2,
                                            residual="ttv"))
        assert_near(spec.run(model, x), y0, 64, layers=6)
        perturb(model, seed=2)
        layer = model.h[0].attn.c_attn  # Conv1D: weight stored (d_in, d_out)
        ad = layer.adapters["default"]
        xs = _x(3, 16)
        ref = xs.double() @ _dense_weight(ad).t() + layer.base_layer.bias.double()
        _close(layer(xs).double(), ref)
        y = spec.run(model, x)
        peftkit.merge(model)
        _close(spec.run(model, x), y)


# -- the math against the trace definitions ---------------------------------------------------------------------
@pytest.mark.parametrize("factors", [None, [8, 2], [4, 1, 2, 2]])
def test_transform_follows_the_tensor_ring_trace_definition_big_endian(factors: list[int] | None) -> None:
    for rt in (1, 2, 3):
        model = _adapted(rt=rt, overrides={"fc1": {"factors_in": factors}})
        ad = model.fc1.adapters["default"]
        assert ad.factors_in == (factors or [2, 2, 4])
        cores = [c.detach() for c in ad.transform]
        _close(ad.transform_matrix().double(), _trm_reference(cores))
        if rt == 1:  # R_T = 1 is the Kronecker product in the same (big-endian) order
            kron = cores[0]
            for c in cores[1:]:
                kron = torch.kron(kron, c)
            _close(ad.transform_matrix(), kron)
        x = _x(7, 16)
        _close(ad.transform_input(x), x @ ad.transform_matrix().t())


@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("rt", [1, 2])
def test_forward_is_x_times_w0_t_plus_s_delta(residual: str, rt: int) -> None:
    model = _adapted(residual, rt)
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        x = _x(2, 5, layer.host.d_in)
        with torch.no_grad():
            ref = (x.double() @ _dense_weight(ad).t() + layer.base_layer.bias.double()).float()
            _close(layer(x), ref)  # fused: host(x·Tᵀ) + s·Δx
            base = layer.base_layer(x)
            _close(base + ad.delta(x, base), ref)  # generic: base + (x·Tᵀ − x)·W0ᵀ + s·Δx
            t = _trm_reference([c.detach() for c in ad.transform])
            _close(ad.residual_weight().double(), _dense_weight(ad) - layer.base_layer.weight.double() @ t)


def test_default_scaling_is_rslora_with_alpha_one() -> None:
    cfg = peftkit.config("tlora", target_modules=["fc1"], r=4)
    assert cfg.alpha == 1.0 and cfg.rslora and cfg.scaling == pytest.approx(1 / 2)
    assert peftkit.config("tlora", r=4, alpha=2.0, rslora=False).scaling == 0.5
    model = _adapted("lora", r=4, alpha=3.0)
    assert model.fc1.adapters["default"].s == pytest.approx(3 / 2)


def _one(d_in: int, d_out: int, **fields) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    peftkit.adapt(model, peftkit.config("tlora", target_modules=["0"], **fields))
    return model


def test_residual_inits() -> None:
    ad = _one(400, 16, r=8)[0].adapters["default"]
    assert torch.count_nonzero(ad.lora_B) == 0
    # kaiming_normal(a=√5) on (r, d_in): std = √(2/(1+5))/√d_in
    assert abs(ad.lora_A.std().item() - 1 / math.sqrt(3 * 400)) < 0.05 / math.sqrt(3 * 400)
    ad = _one(400, 64, r=8, residual="ttv", factors_in=[20, 20], factors_out=[8, 8])[0].adapters["default"]
    assert torch.count_nonzero(ad.ttv_out[0]) == 0
    assert abs(ad.ttv_out[1].std().item() - math.sqrt(8) / 64) < 0.1 * math.sqrt(8) / 64
    for core in ad.ttv_in:
        assert abs(core.std().item() - 1 / math.sqrt(20)) < 0.1 / math.sqrt(20)
    ad = _one(24, 16, r=4, residual="ttm")[0].adapters["default"]
    assert torch.count_nonzero(ad.ttm[0]) == 0 and all(torch.count_nonzero(c) > 0 for c in list(ad.ttm)[1:])


# -- merging ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("rt", [1, 2])
def test_merged_equals_unmerged_and_unmerge_restores(residual: str, rt: int) -> None:
    model = _adapted(residual, rt)
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in peftkit.adapted_layers(model)}
    x = _x(6, 16)
    with torch.no_grad():
        y = model(x)
        merged_ref = {n: _dense_weight(l.adapters["default"]) for n, l in peftkit.adapted_layers(model)}
        peftkit.merge(model)
        for n, layer in peftkit.adapted_layers(model):
            _close(layer.base_layer.weight.double(), merged_ref[n])  # W0·T + s·Δ
        _close(model(x), y)
        peftkit.unmerge(model)
        for n, layer in peftkit.adapted_layers(model):
            _close(layer.base_layer.weight, w0[n])
        _close(model(x), y)


def test_transform_is_full_rank_after_perturbation() -> None:
    for rt in (1, 2):
        model = _adapted(rt=rt)
        for _, layer in peftkit.adapted_layers(model):
            t = layer.adapters["default"].transform_matrix().double()
            assert torch.linalg.matrix_rank(t).item() == layer.host.d_in


# -- parameter count and factorisation -------------------------------------------------------------------------
def test_parameter_count_formula() -> None:
    # fc1: d_in = 16 -> [2, 2, 4] (Σ I² = 24), d_out = 32 -> [2, 4, 4]
    cases = {("lora", 2, 4): 24 * 4 + 4 * (16 + 32), ("ttv", 2, 2): 24 * 4 + 4 * (2 + 4 + 4 + 2 + 2 + 4),
             ("ttm", 1, 2): 24 + 4 * (2 * 2 + 4 * 2 + 4 * 4)}
    for (residual, rt, r), n in cases.items():
        model = _model()
        peftkit.adapt(model, peftkit.config("tlora", target_modules=["fc1"], r=r, transform_rank=rt,
                                            residual=residual))
        ad = model.fc1.adapters["default"]
        assert sum(p.numel() for p in ad.parameters()) == n
        assert type(ad).expected_params(ad.host, ad.config) == n
        assert peftkit.summary(model).trainable == n


def test_factorisation_rules() -> None:
    assert factorize(768, 3) == [8, 8, 12] and factorize(320, 3) == [4, 8, 10]  # the official table
    assert factorize(320, 2) == [16, 20]  # table only for three factors
    assert factorize(16, 3) == [2, 2, 4] and factorize(64, 3) == [4, 4, 4] and factorize(17, 3) == [1, 1, 17]
    for n in (12, 30, 64, 96, 97, 1000):
        for k in (1, 2, 3, 4):
            f = factorize(n, k)
            assert len(f) == k and math.prod(f) == n and f == sorted(f)
    ad = _one(24, 16, factors_in=[4, 6], residual="ttm")[0].adapters["default"]
    assert ad.factors_in == [4, 6] and ad.factors_out == [4, 4]  # ttm: as many out factors as in factors
    assert [tuple(c.shape) for c in ad.transform] == [(4, 4), (6, 6)]


@pytest.mark.parametrize("fields,needle", [
    ({"factors_in": [2, 2, 2]}, r"'fc1'.*\[2, 2, 2\].*8.*d_in = 16"),
    ({"factors_out": [2, 9], "residual": "ttv"}, r"'fc1'.*\[2, 9\].*18.*d_out = 32"),
    ({"factors_in": [4, 4], "factors_out": [2, 4, 4], "residual": "ttm"}, r"'fc1'.*differ in length"),
])
def test_bad_factorisations_raise_and_change_nothing(fields: dict, needle: str) -> None:
    model = _model()
    before, types = state_copy(model), [type(m) for m in model.modules()]
    with pytest.raises(peftkit.PeftkitError, match=needle):
        peftkit.adapt(model, peftkit.config("tlora", target_modules=["fc1", "fc2"], **fields))
    assert same_state(before, state_copy(model)) and [type(m) for m in model.modules()] == types
    assert peftkit.adapter_names(model) == []


@pytest.mark.parametrize("fields", [{"transform_rank": 0}, {"residual": "svd"}, {"factors_in": [0, 16]},
                                    {"num_factors": 0}, {"factors_out": []}, {"r": 0}])
def test_bad_config_fields(fields: dict) -> None:
    with pytest.raises(peftkit.PeftkitError):
        peftkit.config("tlora", target_modules=["fc1"], **fields)


def test_unsupported_host_is_refused() -> None:
    model = MODELS["conv2d"].build()
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="does not support Conv2d"):
        peftkit.adapt(model, peftkit.config("tlora", target_modules=["conv1"]))
    assert same_state(before, state_copy(model))


# -- the input transform is applied core by core -----------------------------------------------------------------
def test_forward_never_materialises_t() -> None:
    model = _adapted("lora", rt=1).train()
    shapes: list[tuple[int, ...]] = []
    x = _x(8, 16).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        model.fc1(x)
    assert shapes and (16, 16) not in shapes


# -- the identity regulariser ----------------------------------------------------------------------------------
def test_identity_regularizer() -> None:
    for rt in (1, 2):
        model = _adapted(rt=rt, perturbed=False)
        assert identity_regularizer(model).item() == 0.0
        perturb(model, seed=5)
        expected = 0.0
        for _, layer in peftkit.adapted_layers(model):
            for core in layer.adapters["default"].transform:
                c = core.detach().double()
                eye = torch.eye(c.shape[0], dtype=torch.float64)
                if rt == 1:
                    expected += torch.linalg.norm(c - eye).item()
                else:
                    expected += sum(torch.linalg.norm(c[:, :, i, j] - eye / rt).item()
                                    for i in range(rt) for j in range(rt))
        reg = identity_regularizer(model)
        assert reg.item() == pytest.approx(expected, rel=1e-5)
        reg.backward()
        assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in model.fc1.adapters["default"].transform)
    with pytest.raises(peftkit.PeftkitError, match="no active TLoRA"):
        identity_regularizer(_model())


# -- persistence -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", RESIDUALS)
def test_save_load_round_trip_is_bit_identical(residual: str, tmp_path) -> None:
    model = _adapted(residual, rt=2)
    peftkit.save(model, tmp_path / "ad")
    fresh = _model()
    peftkit.load(fresh, tmp_path / "ad")
    x = _x(5, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
