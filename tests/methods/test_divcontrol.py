"""DivControl-style SVD components (shared/methods/activation-space-and-procedures.md §14 "Sanity"): with g ≡ 1 the
layer reconstructs W (the base model exactly at init); a one-hot g selects one tailor group. Plus: layer outputs
against W_c built from an independent float64 SVD (Linear, Conv2d), linearity in g, mixed gates equal per-sample
runs, gradients only to the gated tailors, a soft gate network trained through peftkit.condition, merging at g ≡ 1,
save/load, parameter counts, and clear errors that change nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
import peftkit.methods.divcontrol as dc
from conformance.models import MODELS, same_state, state_copy
from tolerance import assert_near


def _perturb(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.mul_(1 + torch.randn(p.shape, generator=g) * std)


def _w_c(w: torch.Tensor, sigma: torch.Tensor, n_g: int, groups: int, gate: torch.Tensor) -> torch.Tensor:
    """W_c = U_G·diag(σ_G)·V_Gᵀ + U_T·diag(σ_T ⊙ ĝ)·V_Tᵀ from a float64 SVD of the (d_out, d_in) weight."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = u.shape[1]
    grp = torch.arange(k - n_g) * groups // (k - n_g)
    weight = torch.cat([torch.ones(n_g, dtype=torch.float64), gate.double()[grp]]) * sigma.double()
    return ((u * weight) @ vh).float()


def _linear_conv(**fields) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Conv2d(3, 8, 3, padding=1)).eval()
    peftkit.adapt(model, peftkit.config("divcontrol", target_modules=["0", "1"], **fields))
    return model


def test_g_one_reconstructs_w_and_init_is_the_base() -> None:
    model = _linear_conv()
    x, z = torch.randn(4, 5, 10), torch.randn(4, 3, 6, 6)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.Conv2d(3, 8, 3, padding=1)).eval()
    with torch.no_grad():
        assert torch.equal(model[0](x), base[0](x)) and torch.equal(model[1](z), base[1](z))
        with peftkit.condition(model, torch.ones(4, 4)):
            assert torch.equal(model[0](x), base[0](x)) and torch.equal(model[1](z), base[1](z))
    for layer in (model[0], model[1]):
        a = layer.adapters["default"]
        assert_near((a.U * a.S) @ a.Vh, layer.host.weight_2d(), 32, layers=3)


def test_one_hot_gates_select_one_tailor_group_against_a_reference() -> None:
    model = _linear_conv(learngene_fraction=0.25, groups=3)
    _perturb(model)
    lin, conv = model[0], model[1]
    x, z = torch.randn(3, 5, 10), torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        for j in range(3):
            gate = F.one_hot(torch.tensor(j), 3).float()
            with peftkit.condition(model, gate.expand(3, 3)):
                y, yc = lin(x), conv(z)
            for layer, inp, out in ((lin, x, y), (conv, z, yc)):
                a = layer.adapters["default"]
                sigma = torch.cat([a.S[:a.n_g], a.sigma_tailors])
                w = _w_c(layer.host.weight_2d(), sigma, a.n_g, 3, gate)
                ref = layer.host.apply_weight(inp, w, layer.base_layer.bias)
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        a = lin.adapters["default"]
        assert a.n_g == 2 and a.group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # k = 10: 2 learngenes, 8 tailors
        with peftkit.condition(model, torch.zeros(3, 3)):  # g = 0: the learngenes alone
            w = _w_c(lin.host.weight_2d(), a.S, a.n_g, 3, torch.zeros(3))
            torch.testing.assert_close(lin(x), F.linear(x, w, lin.base_layer.bias), rtol=1e-4, atol=1e-5)


def test_output_is_linear_in_the_gate_and_mixed_gates_equal_per_sample_runs() -> None:
    model = _linear_conv(groups=2)
    _perturb(model)
    x = torch.randn(4, 5, 10)
    lin = model[0]
    with torch.no_grad():
        outs = {}
        for key, g in (("g0", [0.0, 0.0]), ("a", [1.0, 0.0]), ("b", [0.0, 1.0])):
            with peftkit.condition(model, torch.tensor([g] * 4)):
                outs[key] = lin(x)
        gates = torch.tensor([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0], [0.3, 1.7]])
        with peftkit.condition(model, gates):
            y = lin(x)
        ref = outs["g0"] + gates[:, :1, None] * (outs["a"] - outs["g0"]) + gates[:, 1:, None] * (outs["b"] - outs["g0"])
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        for i in range(4):
            with peftkit.condition(model, gates[i:i + 1]):
                assert_near(y[i:i + 1], lin(x[i:i + 1]), 32, layers=3)


def test_gradients_reach_only_the_gated_tailors_and_learngenes_when_asked() -> None:
    model = _linear_conv(groups=2)
    _perturb(model)
    assert [n for n, _ in model.named_parameters() if _.requires_grad] == [
        "0.adapters.default.sigma_tailors", "1.adapters.default.sigma_tailors"]
    with peftkit.condition(model, torch.tensor([[1.0, 0.0]] * 4)):
        model[0](torch.randn(4, 10)).square().sum().backward()
    a = model[0].adapters["default"]
    g = a.sigma_tailors.grad
    assert (g[a.group == 0] != 0).all() and torch.count_nonzero(g[a.group == 1]) == 0
    model = _linear_conv(groups=2, train_learngenes=True)
    _perturb(model)
    model[0](torch.randn(4, 10)).square().sum().backward()
    a = model[0].adapters["default"]
    assert (a.sigma_learngenes.grad != 0).all() and (a.sigma_tailors.grad != 0).all()


def test_a_soft_gate_network_trains_through_condition() -> None:
    torch.manual_seed(0)
    model = _linear_conv(groups=2)
    gate = dc.TailorGate(d_in=6, groups=2, hidden=8)
    e = torch.randn(4, 6)
    x = torch.randn(4, 10)
    target = torch.randn(4, 12)
    opt = torch.optim.Adam([*peftkit.trainable_parameters(model), *gate.parameters()], lr=1e-2)
    before = {n: p.detach().clone() for n, p in gate.named_parameters()}
    losses = []
    for _ in range(30):
        g = gate(e)
        torch.testing.assert_close(g.sum(1), torch.ones(4))
        with peftkit.condition(model, g):
            loss = F.mse_loss(model[0](x), target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(before[n], p) for n, p in gate.named_parameters())


def test_merge_at_g_one_and_conditions_refused_while_merged() -> None:
    model = _linear_conv()
    _perturb(model)
    x = torch.randn(4, 5, 10)
    with torch.no_grad():
        y = model[0](x)
        peftkit.merge(model)
        torch.testing.assert_close(model[0](x), y, rtol=1e-5, atol=1e-5)
        with pytest.raises(peftkit.PeftkitError, match="unmerge before running under peftkit.condition"):
            with peftkit.condition(model, torch.ones(4, 4)):
                model[0](x)
        peftkit.unmerge(model)
        with peftkit.condition(model, torch.ones(4, 4)):
            torch.testing.assert_close(model[0](x), y, rtol=1e-5, atol=1e-5)


def test_save_load_under_gates_and_parameter_counts(tmp_path) -> None:
    spec = MODELS["block"]
    model = spec.build()
    peftkit.adapt(model, peftkit.config("divcontrol", target_modules=spec.targets, learngene_fraction=0.5, groups=3))
    _perturb(model)
    x = spec.input(batch=3)
    gates = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 2.0]])
    with torch.no_grad(), peftkit.condition(model, gates):
        y = model(x)
    peftkit.save(model, tmp_path / "ad")
    fresh = spec.build()
    peftkit.load(fresh, tmp_path / "ad")
    with torch.no_grad(), peftkit.condition(fresh, gates):
        assert torch.equal(fresh(x), y)
    assert peftkit.summary(model).trainable == 6 * 8  # k = 16 on every layer, ⌊16·0.5⌋ = 8 learngenes


def test_bad_gates_and_configs_are_refused_and_change_nothing() -> None:
    model = _linear_conv(groups=2)
    _perturb(model)
    before = state_copy(model)
    shape_msg = r"rows of 2 group weights, one per sample, got torch.float32 of shape \(4, 3\)"
    for bad, match in [(torch.ones(4, 3), shape_msg),
                       (torch.ones(4), "rows of 2 group weights"),
                       (torch.ones(4, 2, dtype=torch.long), "rows of 2 group weights"),
                       (torch.tensor([[1.0, 0.0], [-0.1, 1.0], [0.5, float("nan")], [1.0, 1.0]]),
                        r"finite and non-negative; sample\(s\) \[1, 2\]")]:
        with pytest.raises(peftkit.PeftkitError, match=match), peftkit.condition(model, bad):
            pytest.fail("the block must not run")
    assert same_state(before, state_copy(model))
    assert all(layer.condition is None for _, layer in peftkit.adapted_layers(model))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(10, 4)).eval()
    snap = state_copy(plain)
    msg = r"module '0': 2 tailor components \(k = 4, 2 learngenes\) cannot fill 3"
    with pytest.raises(peftkit.PeftkitError, match=msg):
        peftkit.adapt(plain, peftkit.config("divcontrol", target_modules=["0"], groups=3))
    assert same_state(snap, state_copy(plain)) and isinstance(plain[0], nn.Linear)
    with pytest.raises(peftkit.PeftkitError, match=r"learngene_fraction must be in \[0, 1\)"):
        peftkit.config("divcontrol", learngene_fraction=1.0)
    with pytest.raises(peftkit.PeftkitError, match="groups must be a positive integer"):
        peftkit.config("divcontrol", groups=0)
