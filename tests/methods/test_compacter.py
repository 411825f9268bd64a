"""Compacter: PHM projections Σ A_i ⊗ B_i (checked against torch.kron by hand), the paper's parameter count with the
rule shared once, Compacter++ / Houlsby placement on Hugging Face models, the forward by hand, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from conformance.models import perturb, tiny_bert, tiny_gpt2, tiny_llama
from peftkit.core.errors import PeftkitError
from peftkit.ops.kronecker import kron_sum, low_rank
from tolerance import assert_near


def _by_hand(rule: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(rule[i], blocks[i]) for i in range(rule.shape[0]))


def test_kron_sum_is_the_sum_of_kronecker_products() -> None:
    g = torch.Generator().manual_seed(0)
    rule, blocks = torch.randn(3, 3, 3, generator=g), torch.randn(3, 5, 2, generator=g)
    assert_near(kron_sum(rule, blocks), _by_hand(rule, blocks), 3)
    rect = torch.randn(2, 4, 3, generator=g)  # a rule need not be square: (n, p, q) ⊗ (n, a, b) -> (p·a, q·b)
    assert kron_sum(rect, blocks[:2]).shape == (20, 6)
    assert_near(kron_sum(rect, blocks[:2]), _by_hand(rect, blocks[:2]), 2)
    left, right = torch.randn(3, 5, 2, generator=g), torch.randn(3, 2, 4, generator=g)
    assert_near(low_rank(left, right), torch.stack([left[i] @ right[i] for i in range(3)]), 2)
    with pytest.raises(ValueError, match="same n"):
        kron_sum(rule, blocks[:2])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).eval()


def _adapted(**fields) -> nn.Module:
    model = _mlp()
    peftkit.adapt(model, peftkit.config("compacter", target_modules=["0", "2"], reduction_factor=4.0, phm_dim=2,
                                        **fields))
    perturb(model, seed=1)
    return model


def test_phm_weight_and_forward_by_hand() -> None:
    model = _adapted(phm_rank=2)
    a = model[0].adapters["default"]
    rule = a.shared.phm_rule
    down = _by_hand(rule, torch.stack([a.W_down_left[i] @ a.W_down_right[i] for i in range(2)]))
    up = _by_hand(rule, torch.stack([a.W_up_left[i] @ a.W_up_right[i] for i in range(2)]))
    assert down.shape == (32, 8) and up.shape == (8, 32)  # c = 32 → m = 32 / 4
    assert_near(a.phm_weight("down"), down, 4)
    assert_near(a.phm_weight("up"), up, 4)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = model[0].base_layer(x)
        h = h + torch.nn.functional.gelu(h @ down + a.b_down) @ up + a.b_up
        h2 = model[2].base_layer(torch.nn.functional.gelu(h))
        b = model[2].adapters["default"]
        d2 = _by_hand(rule, torch.stack([b.W_down_left[i] @ b.W_down_right[i] for i in range(2)]))
        u2 = _by_hand(rule, torch.stack([b.W_up_left[i] @ b.W_up_right[i] for i in range(2)]))
        expected = h2 + torch.nn.functional.gelu(h2 @ d2 + b.b_down) @ u2 + b.b_up
        assert_near(model(x), expected, 32, layers=4)


def test_the_rule_is_one_tensor_shared_by_every_layer_and_both_projections() -> None:
    model = _adapted()
    a, b = model[0].adapters["default"], model[2].adapters["default"]
    assert a.rule("down") is a.rule("up") is b.rule("down")
    names = [n for n, _ in model.named_parameters() if "phm_rule" in n]
    assert names == ["0.adapters.default.shared_store.phm_rule"]  # trained and saved once


@pytest.mark.parametrize("factory,layers,c", [(tiny_bert, 2, 32), (tiny_gpt2, 1, 16)])
def test_parameter_count_is_the_papers_formula(factory, layers: int, c: int) -> None:
    """Compacter++ with r = 1 and no biases: 2·L·(c + m) + n³ (Mahabadi et al. 2021, §3.3), the rule counted once."""
    model = factory() if factory is tiny_bert else factory(c)
    n, rf = 4, 2.0
    peftkit.adapt(model, peftkit.config("compacter", reduction_factor=rf, phm_dim=n, phm_bias=False))
    m = int(c // rf)
    assert peftkit.summary(model).trainable == 2 * layers * (c + m) + n ** 3
    assert len(list(peftkit.adapted_layers(model))) == layers


def test_parameter_count_of_the_other_options() -> None:
    c, m, n, r = 32, 8, 2, 3  # layer "0": c = 32; layer "2": c = 16, m = 4
    model = _mlp()
    peftkit.adapt(model, peftkit.config("compacter", target_modules=["0", "2"], reduction_factor=4.0, phm_dim=n,
                                        phm_rank=r, shared_phm_rule=False))
    assert peftkit.summary(model).trainable == sum(2 * r * (cc + mm) + cc + mm + 2 * n ** 3
                                                   for cc, mm in ((c, m), (16, 4)))
    model = _mlp()
    peftkit.adapt(model, peftkit.config("compacter", target_modules=["0"], reduction_factor=4.0, phm_dim=n,
                                        factorized_phm_W=False, phm_bias=False))
    assert peftkit.summary(model).trainable == 2 * c * m // n + n ** 3


def test_compacter_plus_plus_placement_and_houlsby_placement() -> None:
    bert = tiny_bert()
    peftkit.adapt(bert, peftkit.config("compacter", reduction_factor=4.0))
    ffn = {f"bert.encoder.layer.{i}.output.dense" for i in range(2)}
    attn = {f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)}
    assert {p for p, _ in peftkit.adapted_layers(bert)} == ffn
    bert = tiny_bert()
    peftkit.adapt(bert, peftkit.config("compacter", reduction_factor=4.0, mh_adapter=True))
    assert {p for p, _ in peftkit.adapted_layers(bert)} == ffn | attn
    llama = tiny_llama()
    peftkit.adapt(llama, peftkit.config("compacter", reduction_factor=4.0, mh_adapter=True, output_adapter=False))
    assert {p for p, _ in peftkit.adapted_layers(llama)} == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    gpt2 = tiny_gpt2(16)
    peftkit.adapt(gpt2, peftkit.config("compacter", reduction_factor=4.0))
    assert {p for p, _ in peftkit.adapted_layers(gpt2)} == {"h.0.mlp.c_proj"}


def test_init_is_the_base_model_and_phm_init_is_not() -> None:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    base = _mlp()(x)
    model = _mlp()
    peftkit.adapt(model, peftkit.config("compacter", target_modules=["0", "2"], reduction_factor=4.0, phm_dim=2))
    assert torch.equal(model(x), base)
    model = _mlp()
    peftkit.adapt(model, peftkit.config("compacter", target_modules=["0", "2"], reduction_factor=4.0, phm_dim=2,
                                        init="phm", phm_init_range=0.1))
    assert not torch.allclose(model(x), base, rtol=0, atol=1e-6)


def test_save_load_roundtrip(tmp_path) -> None:
    model = _adapted(shared_phm_rule=True)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    peftkit.save(model, tmp_path / "c")
    fresh = _mlp()
    peftkit.load(fresh, tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert torch.equal(fresh[2].adapters["default"].rule("up"), model[0].adapters["default"].shared.phm_rule)


def test_bad_shapes_and_fields_are_clear_errors() -> None:
    with pytest.raises(PeftkitError, match="not a multiple of phm_dim = 3"):
        peftkit.adapt(_mlp(), peftkit.config("compacter", target_modules=["0"], phm_dim=3))
    with pytest.raises(PeftkitError, match="mh_adapter and output_adapter are both off"):
        peftkit.config("compacter", output_adapter=False)
    with pytest.raises(PeftkitError, match="phm_rank must be > 0"):
        peftkit.config("compacter", phm_rank=0)
    # a bottleneck c / reduction_factor that is not a multiple of n is rounded down to one (at least n)
    model = _mlp()
    peftkit.adapt(model, peftkit.config("compacter", target_modules=["0"], reduction_factor=5.0, phm_dim=4))
    assert model[0].adapters["default"].m == 4  # ⌊32 / 5⌋ = 6 -> 4
