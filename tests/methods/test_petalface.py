"""PETALface (shared/methods/activation-space-and-procedures.md §6 "Sanity"): identity at init; the output is affine
in the gate, y(α) = (1 − α)·y(0) + α·y(1); α = 0 gives LoRA2 (HQ) no gradient. Plus: gates 0 / 1 reproduce each
branch alone against a hand-written LoRA reference (Linear and Conv2d), a batch of mixed gates equals per-sample runs,
init statistics, merging at the fixed gate, save/load, the QualityGate procedure (gates from a user function of the
inputs, in the trainer), and clear errors for gates outside [0, 1] that change nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
import peftkit.methods.petalface as pf
from conformance.models import MODELS, same_state, state_copy
from peftkit.train import train
from tolerance import assert_near


def _perturb(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * std)


def _block(**fields) -> tuple[nn.Module, torch.Tensor]:
    spec = MODELS["block"]
    model = spec.build()
    peftkit.adapt(model, peftkit.config("petalface", target_modules=spec.targets, r=4, **fields))
    return model, spec.input(batch=5)


def test_init_is_the_base_and_init_statistics() -> None:
    model, x = _block()
    y0 = MODELS["block"].build()(x)
    assert torch.equal(model(x), y0)
    with peftkit.condition(model, [0.0, 0.3, 1.0, 0.5, 0.9]):
        assert torch.equal(model(x), y0)
    big = nn.Sequential(nn.Linear(2000, 8))
    peftkit.adapt(big, peftkit.config("petalface", target_modules=["0"], r=8))
    a = big[0].adapters["default"]
    for down, up in ((a.lora_A_lq, a.lora_B_lq), (a.lora_A_hq, a.lora_B_hq)):
        assert down.shape == (8, 2000) and up.shape == (8, 8)
        assert abs(float(down.detach().std()) - 1 / 8) < 0.004 and abs(float(down.detach().mean())) < 0.004
        assert torch.count_nonzero(up) == 0
    assert not torch.equal(a.lora_A_lq, a.lora_A_hq)


def test_gate_zero_and_one_reproduce_each_branch_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(3, 4, 3, padding=1)).eval()
    peftkit.adapt(model, peftkit.config("petalface", target_modules=["0", "1"], r=2, scale=1.5))
    _perturb(model)
    lin, conv = model[0], model[1]
    a, c = lin.adapters["default"], conv.adapters["default"]
    x, z = torch.randn(3, 7, 6), torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        for gate, br in ((0.0, "lq"), (1.0, "hq")):
            down, up = getattr(a, f"lora_A_{br}"), getattr(a, f"lora_B_{br}")
            ref = F.linear(x, lin.base_layer.weight + 1.5 * up @ down, lin.base_layer.bias)
            cd, cu = getattr(c, f"lora_A_{br}"), getattr(c, f"lora_B_{br}")
            w = conv.base_layer.weight + 1.5 * (cu @ cd).view_as(conv.base_layer.weight)
            cref = F.conv2d(z, w, conv.base_layer.bias, padding=1)
            with peftkit.condition(model, [gate] * 3):
                torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(conv(z), cref, rtol=1e-5, atol=1e-5)
            a.gate = c.gate = gate  # the fixed-gate path (one branch computed) gives the same
            torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(conv(z), cref, rtol=1e-5, atol=1e-5)


def test_output_is_affine_in_the_gate_and_mixed_gates_equal_per_sample_runs() -> None:
    model, x = _block()
    _perturb(model)
    with torch.no_grad():
        with peftkit.condition(model, [0.0] * 5):
            y0 = model(x)
        with peftkit.condition(model, [1.0] * 5):
            y1 = model(x)
        assert not torch.allclose(y0, y1)
        # the block is nonlinear, so affinity is checked on one adapted layer: q's output
        q = model.attn.q
        xq = torch.randn(5, 4, 16)
        with peftkit.condition(model, [0.0] * 5):
            q0 = q(xq)
        with peftkit.condition(model, [1.0] * 5):
            q1 = q(xq)
        gates = torch.tensor([0.0, 0.25, 0.5, 0.8, 1.0])
        with peftkit.condition(model, gates):
            qm = q(xq)
            ym = model(x)
        assert_near(qm, (1 - gates)[:, None, None] * q0 + gates[:, None, None] * q1, 32, layers=3)
        for i, g in enumerate(gates.tolist()):
            with peftkit.condition(model, [g]):
                assert_near(ym[i:i + 1], model(x[i:i + 1]), 32, layers=3)
        with peftkit.condition(model, [0.5] * 5):
            y_half = model(x)
        assert_near(model(x), y_half, 32, layers=3)  # outside a block: default_gate = 0.5


def test_gate_zero_gives_the_hq_branch_no_gradient() -> None:
    model, x = _block()
    _perturb(model)
    with peftkit.condition(model, [0.0] * 5):
        model(x).square().sum().backward()
    for _, layer in peftkit.adapted_layers(model):
        a = layer.adapters["default"]
        assert torch.count_nonzero(a.lora_A_hq.grad) == 0 and torch.count_nonzero(a.lora_B_hq.grad) == 0
        assert a.lora_A_lq.grad.abs().sum() > 0 and a.lora_B_lq.grad.abs().sum() > 0
    model.zero_grad()
    with peftkit.condition(model, [1.0, 1.0, 0.0, 1.0, 1.0]):  # one low-quality sample: both branches learn
        model(x).square().sum().backward()
    for _, layer in peftkit.adapted_layers(model):
        a = layer.adapters["default"]
        assert all(p.grad.abs().sum() > 0 for p in a.parameters())


def test_bad_gates_are_refused_and_change_nothing() -> None:
    model, x = _block(default_gate=None)
    _perturb(model)
    before = state_copy(model)
    layers = [layer for _, layer in peftkit.adapted_layers(model)]
    for bad, match in [([0.0, 1.2, 0.5, 0.5, 0.5], r"lie in \[0, 1\]; sample\(s\) \[1\] have \[1.2"),
                       ([0.0, 0.1, -0.5, 0.5, float("nan")], r"sample\(s\) \[2, 4\] have \[-0.5, nan\]"),
                       ([[0.1, 0.2]] * 5, "one number in \\[0, 1\\] per sample"),
                       ([True, False, True, True, True], "one number in \\[0, 1\\] per sample")]:
        with pytest.raises(peftkit.PeftkitError, match=match):
            with peftkit.condition(model, bad):
                pytest.fail("the block must not run")
        assert all(layer.condition is None for layer in layers)
    with pytest.raises(peftkit.PeftkitError, match="needs a gate per sample"):
        model(x)
    with pytest.raises(peftkit.PeftkitError, match="merging needs a fixed gate"):
        peftkit.merge(model)
    assert all(not layer.merged for layer in layers)
    assert same_state(before, state_copy(model))
    with pytest.raises(peftkit.PeftkitError, match=r"default_gate must be in \[0, 1\]"):
        peftkit.config("petalface", default_gate=1.5)


def test_merge_at_the_fixed_gate_and_conditions_refused_while_merged() -> None:
    model, x = _block(default_gate=0.3)
    _perturb(model)
    with torch.no_grad():
        y = model(x)
        peftkit.merge(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        with pytest.raises(peftkit.PeftkitError, match="merged into 'attn.q'; unmerge before"):
            with peftkit.condition(model, [0.3] * 5):
                model(x)
        peftkit.unmerge(model)
        with peftkit.condition(model, [0.3] * 5):
            torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_save_load_under_gates(tmp_path) -> None:
    model, x = _block(default_gate=None)
    _perturb(model)
    gates = [0.1, 0.9, 0.5, 0.0, 1.0]
    with torch.no_grad(), peftkit.condition(model, gates):
        y = model(x)
    peftkit.save(model, tmp_path / "ad")
    fresh = MODELS["block"].build()
    peftkit.load(fresh, tmp_path / "ad")
    with torch.no_grad(), peftkit.condition(fresh, gates):
        assert torch.equal(fresh(x), y)
    assert peftkit.summary(model).trainable == sum(2 * 4 * (a + b) for a, b in [(16, 16)] * 4 + [(16, 32), (32, 16)])


def _score(x: torch.Tensor) -> torch.Tensor:
    """A stand-in image-quality metric: larger mean intensity = better, in (0, 1)."""
    return torch.sigmoid(x.flatten(1).mean(1))


def test_quality_gate_computes_gates_from_the_inputs() -> None:
    model, x = _block(default_gate=None)
    _perturb(model)
    gate = pf.QualityGate(_score, threshold=0.45)
    expected = 0.5 + (_score(x) - 0.45)
    torch.testing.assert_close(gate.gates(x), expected)
    with torch.no_grad():
        with peftkit.condition(model, expected):
            ref = model(x)
        with gate.attach(model):
            torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
            with pytest.raises(peftkit.PeftkitError, match="already attached"):
                gate.attach(model)
        with pytest.raises(peftkit.PeftkitError, match="needs a gate per sample"):  # detached on exit
            model(x)
        far = pf.QualityGate(lambda t: torch.full((t.shape[0],), 2.0))
        with far.attach(model), pytest.raises(peftkit.PeftkitError, match=r"lie in \[0, 1\]"):
            model(x)
        assert all(layer.condition is None for _, layer in peftkit.adapted_layers(model))
        assert far._open == []
        with pf.QualityGate(lambda t: torch.full((t.shape[0],), 2.0), clip=True).attach(model):
            with peftkit.condition(model, [1.0] * 5):
                ref1 = model(x)
            torch.testing.assert_close(model(x), ref1, rtol=0, atol=0)


def test_quality_gate_as_a_training_procedure() -> None:
    torch.manual_seed(0)
    model = MODELS["mlp"].build()
    peftkit.adapt(model, peftkit.config("petalface", target_modules=["fc1", "fc2"], r=4, default_gate=None,
                                        modules_to_save=["head"]))
    xs = torch.randn(64, 16)
    ys = (xs[:, 0] > 0).long() + 2 * (xs[:, 1] > 0).long()
    batches = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 64, 16)]
    gate = pf.QualityGate(_score)
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))  # peftkit's own (adapter_names=) stay
    result = train(model, batches, steps=40, lr=1e-2, procedures=[gate], progress=False)
    assert result.losses[-1] < result.losses[0]
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks  # the gate detached at the end
    for _, layer in peftkit.adapted_layers(model):  # both branches trained (gates strictly inside (0, 1))
        a = layer.adapters["default"]
        assert torch.count_nonzero(a.lora_B_lq) > 0 and torch.count_nonzero(a.lora_B_hq) > 0


@pytest.mark.parametrize("gate", [0.0, 0.3, 1.0])
def test_fixed_gate_fused_path_equals_the_two_branches(gate: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the fixed gate one rank-2r fused LoRA ([D_lq; D_hq], [(1−g)·U_lq, g·U_hq]) gives the two-branch outputs
    and gradients; at g = 0 / 1 the unused branch gets no gradient, as in the generic path."""
    model, x = _block(default_gate=gate, dropout=0.0)  # dropout (on each branch's output) takes the generic path
    _perturb(model)
    x = x.double().requires_grad_()
    model.double().train()
    results, calls, kernel = [], [], []
    real_kernel = pf.fused_lowrank_forward
    monkeypatch.setattr(pf, "fused_lowrank_forward", lambda *a: kernel.append(1) or real_kernel(*a))
    for fused in (True, False):
        for layer in [m for m in model.modules() if isinstance(m, peftkit.core.layer.AdaptedLayer)]:
            ad = layer.adapters["default"]
            if not fused:
                ad.fused_forward = lambda x: calls.append(1)  # returns None: the generic path
        model.zero_grad(set_to_none=True)
        x.grad = None
        y = model(x)
        assert calls == [] if fused else calls
        assert bool(kernel) == fused  # the fused run went through the low-rank kernel, the generic one did not
        kernel.clear()
        (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
        grads = {n: (None if p.grad is None else p.grad.clone())
                 for n, p in model.named_parameters() if p.requires_grad}
        results.append((y.detach(), x.grad.clone(), grads))
    (y1, gx1, g1), (y2, gx2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-12)
    for n in g2:
        if g2[n] is None:
            assert g1[n] is None, n
        else:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-10, atol=1e-12, msg=n)
    unused = "hq" if gate == 0.0 else "lq" if gate == 1.0 else None
    assert all((g is None) == (unused is not None and f"_{unused}" in n) for n, g in g1.items())


def test_fused_path_is_not_taken_under_per_sample_gates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a condition block every sample uses its own gate — the fixed-gate fused path would ignore them."""
    model, x = _block(default_gate=0.5, dropout=0.0)
    _perturb(model)
    fused_calls: list[int] = []
    cls = next(type(m.adapters["default"]) for m in model.modules() if isinstance(m, peftkit.core.layer.AdaptedLayer))
    real = cls.fused_forward
    monkeypatch.setattr(cls, "fused_forward", lambda self, x: fused_calls.append(1) or real(self, x))
    gates = [0.0, 0.3, 1.0, 0.5, 0.9]
    with peftkit.condition(model, gates):
        y = model(x)
    assert fused_calls == []
    for i, g in enumerate(gates):  # each sample equals a run at its gate as the fixed gate
        with peftkit.condition(model, [g]):
            assert_near(y[i:i + 1], model(x[i:i + 1]), 32, layers=3)
    model(x)
    assert fused_calls  # outside a block the fixed gate applies
