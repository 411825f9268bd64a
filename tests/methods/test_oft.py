"""OFT: block-diagonal Cayley / Cayley–Neumann rotations of the input, the multiplicative merge, PEFT's block-size
rule, and Hugging Face PEFT's OFT files both directions."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from conformance.models import MODELS
from peft_interop import check_both_directions, peft_model
from peftkit.methods.oft import _nearest_divisor, cayley
from tolerance import assert_near

peft = pytest.importorskip("peft")

X = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
T = ["fc1", "fc2"]


def test_exact_cayley_is_orthogonal_and_neumann_approximates_its_transpose() -> None:
    q = 0.01 * torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # b = 5
    r = cayley(q, 5, None)
    eye = torch.eye(5, dtype=torch.float64).expand(3, 5, 5)
    assert_near(r @ r.transpose(-1, -2), eye, 5, dtype=torch.float32)
    rows, cols = torch.triu_indices(5, 5, 1)
    u = torch.zeros(3, 5, 5, dtype=torch.float64)
    u[:, rows, cols] = q
    skew = u - u.transpose(-1, -2)
    assert_near(r, (eye - skew) @ torch.linalg.inv(eye + skew), 5, dtype=torch.float32)
    # the truncated series of (I + Q)(I − Q)⁻¹ = Rᵀ (its last term Q⁴ halved, as PEFT 0.18): error O(|Q|⁴)
    neumann = cayley(q, 5, 5)
    assert (neumann - r.transpose(-1, -2)).abs().max() < 1e-5
    assert (cayley(q, 5, 2) - r.transpose(-1, -2)).abs().max() > 1e-4  # fewer terms: visibly worse


def test_block_size_rule_is_peft_s() -> None:
    from peft.tuners.oft.layer import OFTLayer

    for n in range(1, 130):
        for v in range(1, 140):
            assert _nearest_divisor(n, v) == OFTLayer.adjust_oft_parameters(None, n, v), (n, v)


def test_init_is_the_base_and_forward_is_a_rotated_input() -> None:
    base = MODELS["mlp"].build()
    model = copy.deepcopy(base)
    peftkit.adapt(model, peftkit.config("oft", target_modules=T, block_size=8))
    with torch.no_grad():
        assert torch.equal(model(X), base(X))  # q = 0: R = I exactly
    ad = dict(peftkit.adapted_layers(model))["fc1"].adapters["default"]
    assert tuple(ad.oft_R.shape) == (2, 28) and peftkit.summary(model).trainable == 2 * 28 + 4 * 28
    with torch.no_grad():
        ad.oft_R.normal_(std=0.1)
        r = torch.block_diag(*cayley(ad.oft_R, 8, 5))
        fc1 = base.fc1
        assert_near(model.fc1(X), (X @ r) @ fc1.weight.t() + fc1.bias, 16)
        assert_near(ad.delta(X, None), (X @ r - X) @ fc1.weight.t(), 16)  # next to other adapters


@pytest.mark.parametrize("fields", [
    {"block_size": 8},
    {"r": 4, "block_size": 0},
    {"block_size": 4, "block_share": True},
    {"block_size": 8, "cayley_neumann": False},
    {"block_size": 5},  # not a divisor of 16 / 32: moved to 4, as PEFT does
    {"block_size": 8, "neumann_terms": 3},
])
def test_matches_peft_both_directions(fields, tmp_path) -> None:
    peft_fields = {{"block_size": "oft_block_size", "cayley_neumann": "use_cayley_neumann",
                    "neumann_terms": "num_cayley_neumann_terms"}.get(k, k): v for k, v in fields.items()}
    if "r" not in peft_fields:
        peft_fields["r"] = 0
    check_both_directions(MODELS["mlp"].build(), X, peft.OFTConfig(target_modules=T, **peft_fields), "oft",
                          {"target_modules": T, **fields}, tmp_path, std=0.1)


def test_random_init_draws_like_peft() -> None:
    base = MODELS["mlp"].build()
    torch.manual_seed(3)
    pm = peft_model(base, peft.OFTConfig(target_modules=T, oft_block_size=8, r=0, init_weights=False))
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    peftkit.adapt(model, peftkit.config("oft", target_modules=T, block_size=8, init_weights=False))
    for path, layer in peftkit.adapted_layers(model):
        hf = pm.base_model.model.get_submodule(path).oft_R["default"].weight
        assert_near(layer.adapters["default"].oft_R.detach(), hf.detach(), 1)


def test_coft_and_both_sizes_are_refused() -> None:
    with pytest.raises(peftkit.PeftkitError, match="coft"):
        peftkit.config("oft", target_modules=T, coft=True)
    with pytest.raises(peftkit.PeftkitError, match="exactly one of r"):
        peftkit.config("oft", target_modules=T, r=2, block_size=8)
