"""BOFT: butterfly products of Cayley blocks against PEFT's permutation matrices, orthogonality, the scaled
multiplicative merge, PEFT's multiplicative dropout, and Hugging Face PEFT's BOFT files both directions."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from conformance.models import MODELS
from peft_interop import check_both_directions, peft_model
from tolerance import assert_near

peft = pytest.importorskip("peft")

X = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
T = ["fc1", "fc2"]


def _adapted(**fields):
    model = MODELS["mlp"].build()
    peftkit.adapt(model, peftkit.config("boft", target_modules=T, **fields))
    with torch.no_grad():
        for _, layer in peftkit.adapted_layers(model):
            layer.adapters["default"].boft_R.normal_(0, 0.3)
            layer.adapters["default"].boft_s.normal_(1, 0.2)
    return model


@pytest.mark.parametrize("fields", [{"block_size": 4, "n_butterfly_factor": 2},
                                    {"block_num": 8, "n_butterfly_factor": 3, "block_size": 0},
                                    {"block_size": 2, "n_butterfly_factor": 1}])
def test_rotation_is_peft_s_butterfly_product_and_orthogonal(fields) -> None:
    """R = Π P_i·blockdiag(Cayley(U_i))·P_iᵀ with PEFT's own permutation matrices (its CUDA-path definition, which
    PEFT on a CPU never runs for m > 1)."""
    from peft.tuners.boft.layer import BOFTLayer

    model = _adapted(**fields)
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        d, m, n, b = layer.host.d_in, ad.m, ad.n, ad.b
        want = None
        for i in range(m):
            perm = BOFTLayer.block_butterfly_perm(None, d, n // 2 ** i, b // 2, m - 1)
            p = BOFTLayer.perm2mat(None, perm).double()
            u = ad.boft_R.detach()[i].double()
            s = 0.5 * (u - u.transpose(-1, -2))
            eye = torch.eye(b, dtype=torch.float64)
            q = [(eye - s[j]) @ torch.linalg.inv(eye + s[j]) for j in range(n)]
            mi = p @ torch.block_diag(*q) @ p.t()
            want = mi if want is None else mi @ want
        r = ad.rotation_matrix().detach()
        assert_near(r, want.float(), d)
        assert_near(r @ r.t(), torch.eye(d), d)
        if m > 1:
            assert not torch.equal(ad.perm[1], torch.arange(d))  # a real butterfly
        xin = torch.randn(3, d)
        w = layer.host.weight_2d().detach()
        assert_near(ad.delta(xin, None).detach(),
                    (xin @ r @ w.t()) * ad.boft_s.detach().squeeze(-1) - xin @ w.t(), 32)


def test_identity_init_and_params_and_merge_round_trip() -> None:
    base = MODELS["mlp"].build()
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config("boft", target_modules=T, block_size=4, n_butterfly_factor=2))
    with torch.no_grad():
        assert torch.equal(model(X), base(X))
    assert peftkit.summary(model).trainable == (2 * 4 * 16 + 32) + (2 * 8 * 16 + 16)
    model = _adapted(block_size=4, n_butterfly_factor=2)
    w0 = {p: layer.host.weight_2d().detach().clone() for p, layer in peftkit.adapted_layers(model)}
    with torch.no_grad():
        y = model(X)
        peftkit.merge(model)
        assert_near(model(X), y, 64)
        peftkit.unmerge(model)
    for p, layer in peftkit.adapted_layers(model):
        assert_near(layer.host.weight_2d().detach(), w0[p], 64)


@pytest.mark.parametrize("fields", [{"block_size": 4}, {"block_num": 2, "block_size": 0}, {"block_size": 8}])
def test_matches_peft_both_directions(fields, tmp_path) -> None:
    peft_fields = {"boft_" + k: v for k, v in fields.items()}
    check_both_directions(MODELS["mlp"].build(), X, peft.BOFTConfig(target_modules=T, **peft_fields), "boft",
                          {"target_modules": T, **fields}, tmp_path)


def test_training_dropout_matches_peft_draw_for_draw() -> None:
    base = MODELS["mlp"].build()
    pm = peft_model(base, peft.BOFTConfig(target_modules=T, boft_block_size=2, boft_dropout=0.5))
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config("boft", target_modules=T, block_size=2, dropout=0.5))
    for path, layer in peftkit.adapted_layers(model):
        hf = pm.base_model.model.get_submodule(path)
        with torch.no_grad():
            for name in ("boft_R", "boft_s"):
                getattr(hf, name)["default"].normal_(0.5, 0.3)
                getattr(layer.adapters["default"], name).copy_(getattr(hf, name)["default"])
    pm.train()
    model.train()
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        ref = pm(X)
        torch.manual_seed(seed)
        y = model(X)
        assert_near(y.detach(), ref.detach(), 64)
        outs.append(y.detach())
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # blocks really dropped, differently per seed
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(X), outs[0])


def test_bad_block_settings_name_the_layer() -> None:
    with pytest.raises(peftkit.PeftkitError, match="exactly one of block_size and block_num"):
        peftkit.config("boft", target_modules=T, block_size=4, block_num=4)
    with pytest.raises(peftkit.PeftkitError, match="fc1.*divisible by BOFT's block_size 5"):
        _adapted(block_size=5)
    with pytest.raises(peftkit.PeftkitError, match="fc1.*block_size · 2"):
        _adapted(block_size=8, n_butterfly_factor=3)
