"""DiffoRA's own properties (shared/methods/weight-space.md §7 "Sanity", an unconfirmed reading): identity at init,
the relaxation weights (softmax over {LoRA, zero} = σ(θ)), the relaxed forward against a reference and with all γ = 1
equal to LoRA, θ changes only on the held-out step (from the held-out batch's gradient, nothing else moves), the
discretisation keeps exactly ⌈ρ·n⌉ modules by γ and the dropped ones give exactly the base output and leave the model
and the optimiser, merge == unmerge in both phases, the search inside the trainer, save/load after discretisation,
and the errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy
from peftkit.methods.diffora import Diffora, DifforaSearch, discretize, relaxation_weights
from peftkit.train.trainer import train
from tolerance import assert_near

BLOCK_PATHS = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"]
R = 4


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * float(expected.detach().abs().max()))


def _mlp(perturbed: bool = True, **kw) -> tuple[nn.Module, peftkit.AdapterConfig]:
    """MLP fc1 16 -> 32, fc2 32 -> 16, head 16 -> 4 (trained as modules_to_save), DiffoRA on fc1 and fc2."""
    model = MODELS["mlp"].build()
    cfg = peftkit.config("diffora", target_modules=["fc1", "fc2"], r=R, modules_to_save=["head"], **kw)
    peftkit.adapt(model, cfg)
    if perturbed:
        perturb(model, seed=3)
    return model, cfg


def _block(thetas: list[float] | None = None, **kw) -> tuple[nn.Module, peftkit.AdapterConfig]:
    """Transformer block (d=16, ff=32): six candidate modules, perturbed, with the given logits."""
    model = MODELS["block"].build()
    cfg = peftkit.config("diffora", target_modules=["q", "k", "v", "o", "fc1", "fc2"], r=R, **kw)
    peftkit.adapt(model, cfg)
    perturb(model, seed=4)
    if thetas is not None:
        _set_thetas(model, thetas)
    return model, cfg


def _ads(model: nn.Module) -> list[Diffora]:
    return [layer.adapters["default"] for _, layer in peftkit.adapted_layers(model)]


def _set_thetas(model: nn.Module, values: list[float]) -> None:
    for a, v in zip(_ads(model), values):
        a.theta.fill_(v)


def _thetas(model: nn.Module) -> torch.Tensor:
    return torch.stack([a.theta.clone() for a in _ads(model)])


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _lora_ref(layer, x: torch.Tensor, gate: float | torch.Tensor) -> torch.Tensor:
    """base(x) + Γ·s·x·Aᵀ·Bᵀ written out."""
    a = layer.adapters["default"]
    return layer.base_layer(x) + gate * a.s * (x @ a.lora_A.t() @ a.lora_B.t())


def _held(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)


def _theta_grads(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """∂ CE(model(x), y) / ∂θ on a copy of the model (the reference for the θ step)."""
    m = copy.deepcopy(model)
    ts = [a.theta for a in _ads(m)]
    for t in ts:
        t.requires_grad_(True)
    return torch.stack(torch.autograd.grad(F.cross_entropy(m(batch[0]), batch[1]), ts))


# -- relaxation ---------------------------------------------------------------------------------------------------
def test_init_is_the_base_and_theta_is_no_parameter() -> None:
    x = _x(5, 16)
    model, cfg = _mlp(perturbed=False)
    assert torch.equal(model(x), MODELS["mlp"].build()(x))
    for a in _ads(model):
        assert a.mode == "search" and float(a.theta) == 0.0 and float(a.gate()) == 0.5
        assert "theta" in a.state_dict() and all("theta" not in n for n, _ in a.named_parameters())
    assert not any("theta" in n for n, p in model.named_parameters() if p.requires_grad)
    n_lora = sum(R * (h_in + h_out) for h_in, h_out in [(16, 32), (32, 16)])
    assert peftkit.summary(model).adapters["default"] == n_lora + 16 * 4 + 4  # + the head copy


def test_relaxation_weights() -> None:
    theta = torch.linspace(-6, 6, 25)
    w = relaxation_weights(theta)
    assert w.shape == (25, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(25))  # a distribution over {LoRA, zero}
    torch.testing.assert_close(w[:, 0], torch.sigmoid(theta))  # γ = σ(θ)
    assert (w[1:, 0] > w[:-1, 0]).all() and float(relaxation_weights(torch.tensor(0.0))[0]) == 0.5


def test_relaxed_forward_is_gamma_times_lora_and_gamma_one_is_lora() -> None:
    model, cfg = _mlp()
    _set_thetas(model, [0.7, -1.3])
    x = _x(3, 16)
    for layer, t in zip([model.fc1], [0.7]):
        _close(layer(x), _lora_ref(layer, x, torch.sigmoid(torch.tensor(t))))
        base = layer.base_layer(x)
        _close(base + layer.adapters["default"].delta(x, base), _lora_ref(layer, x, torch.sigmoid(torch.tensor(t))))
    # all γ = 1 (σ(50) rounds to 1 in fp32) is LoRA with the same factors
    _set_thetas(model, [50.0, 50.0])
    lora = MODELS["mlp"].build()
    peftkit.adapt(lora, peftkit.config("lora", target_modules=["fc1", "fc2"], r=R, modules_to_save=["head"]))
    lora.load_state_dict({k: v for k, v in model.state_dict().items() if "theta" not in k})
    assert_near(model(x), lora(x), 32, layers=3)  # DiffoRA's forward vs LoRA's


# -- the held-out step ----------------------------------------------------------------------------------------------
def test_logits_change_only_on_the_held_out_step() -> None:
    model, cfg = _mlp(theta_lr=0.01)
    _set_thetas(model, [0.2, -0.1])
    held = _held()
    train_batch = (_x(8, 16, seed=2), torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(2)))
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-2)
    proc = DifforaSearch(model, cfg, held_out=[held])
    proc.on_train_start(model, opt)
    # the weight step on the training batch: θ gets no gradient and does not move
    theta0, params0 = _thetas(model), _params(model)
    F.cross_entropy(model(train_batch[0]), train_batch[1]).backward()
    assert all(a.theta.grad is None for a in _ads(model))
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert torch.equal(_thetas(model), theta0)
    assert not torch.equal(model.fc1.adapters["default"].lora_B, params0["fc1.adapters.default.lora_B"])
    # the θ step on the held-out batch: only θ moves, by Adam's first step −lr·g/|g| on g = ∂L_held/∂θ
    g_held, g_train = _theta_grads(model, held), _theta_grads(model, train_batch)
    assert not torch.allclose(g_held, g_train, rtol=0.1)
    params1 = _params(model)
    proc.on_step_end(model, 0, opt)
    assert proc.theta_steps == 1
    assert same_state(params1, _params(model))  # weights, head: unchanged
    opt_state = proc.optimizers["default"].state
    g_used = torch.stack([opt_state[a.theta]["exp_avg"] / (1 - 0.5) for a in _ads(model)])  # β1 = 0.5
    _close(g_used - 1e-3 * theta0, g_held, rel=1e-5)  # Adam's L2 weight decay (1e-3) adds wd·θ to the gradient
    _close(_thetas(model) - theta0, -0.01 * torch.sign(g_held), rel=1e-3)
    assert all(not a.theta.requires_grad and a.theta.grad is None for a in _ads(model))


def test_without_held_out_batches_the_step_uses_the_training_batch() -> None:
    model, cfg = _mlp()
    proc = DifforaSearch(model, cfg)
    with pytest.raises(peftkit.PeftkitError, match="held-out batches"):
        proc.on_step_end(model, 0, None)
    batch = _held(seed=9)
    assert proc.extra_loss(model, batch, None) is None
    g = _theta_grads(model, batch)
    proc.on_step_end(model, 0, None)
    opt_state = proc.optimizers["default"].state
    _close(torch.stack([opt_state[a.theta]["exp_avg"] / 0.5 for a in _ads(model)]), g)


# -- discretisation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.5, 0.34, 0.3, 0.01, 1.0])
def test_discretisation_keeps_the_top_ceil_rho_n_and_the_rest_is_the_base(rho: float) -> None:
    thetas = [0.3, -0.2, 0.5, 0.1, -0.4, 0.2]
    model, cfg = _block(thetas, rho=rho)
    x = _x(2, 5, 16)
    before = {p: layer.adapters["default"].lora_B.detach().clone() for p, layer in peftkit.adapted_layers(model)}
    kept = math.ceil(rho * 6)
    top = sorted(range(6), key=lambda i: -thetas[i])[:kept]
    assert discretize(model) == {"default": [BLOCK_PATHS[i] for i in sorted(top)]}
    assert cfg.selected == [BLOCK_PATHS[i] for i in sorted(top)] and len(cfg.selected) == kept
    expected = 0
    for i, (path, layer) in enumerate(peftkit.adapted_layers(model)):
        a = layer.adapters["default"]
        assert not hasattr(a, "theta")
        xi = x if "fc2" not in path else _x(2, 5, 32)
        if i in top:  # Γ = 1, the weights learned during the search (no re-init) with γ folded into B
            assert a.mode == "on"
            _close(a.lora_B, torch.sigmoid(torch.tensor(thetas[i])) * before[path])
            _close(layer(xi), _lora_ref(layer, xi, 1.0))
            expected += R * (layer.host.d_in + layer.host.d_out)
        else:  # switched off: no tensors, exactly the base layer
            assert a.mode == "off" and len(a.state_dict()) == 0
            assert torch.equal(layer(xi), layer.base_layer(xi))
            assert torch.equal(a.fused_forward(xi), layer.base_layer(xi))  # the base layer alone, no adapter work
            base = layer.base_layer(xi)
            assert torch.equal(a.delta(xi, base), torch.zeros_like(base))
        assert Diffora.expected_params(layer.host, a.config) == sum(p.numel() for p in a.parameters())
    assert peftkit.summary(model).trainable == expected


def test_ties_keep_model_order() -> None:
    model, cfg = _block([0.0] * 6, rho=0.5)
    assert discretize(model)["default"] == BLOCK_PATHS[:3]


def test_discretisation_drops_tensors_from_the_optimiser_and_training_goes_on() -> None:
    model, cfg = _block([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], rho=0.5)
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-2)
    x = _x(4, 5, 16)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dropped = [p for i, a in enumerate(_ads(model)) if i % 2 for p in (a.lora_A, a.lora_B)]
    discretize(model, optimizer=opt)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in ids for p in dropped) and not any(p in opt.state for p in dropped)
    assert ids == {id(p) for p in peftkit.trainable_parameters(model)}
    train(model, [x], steps=2, optimizer=opt, loss_fn=lambda m, b: (m(b).pow(2).mean(), None), progress=False)


def test_merge_unmerge_in_both_phases() -> None:
    model, cfg = _block([0.4, -0.3, 0.2, 0.0, 1.0, -2.0])
    x = _x(3, 5, 16)
    w0 = {p: layer.base_layer.weight.detach().clone() for p, layer in peftkit.adapted_layers(model)}
    y = model(x)
    peftkit.merge(model)
    _close(model(x), y)
    _set_thetas(model, [3.0] * 6)  # θ moves while merged: unmerge still subtracts the merged ΔW
    peftkit.unmerge(model)
    for p, layer in peftkit.adapted_layers(model):
        _close(layer.base_layer.weight, w0[p])
    peftkit.merge(model)
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="merged"):
        discretize(model)
    assert same_state(before, state_copy(model)) and cfg.selected is None
    peftkit.unmerge(model)
    discretize(model)
    y = model(x)
    peftkit.merge(model)
    _close(model(x), y)
    peftkit.unmerge(model)
    for p, layer in peftkit.adapted_layers(model):
        _close(layer.base_layer.weight, w0[p])


# -- the procedure in the trainer -----------------------------------------------------------------------------------
def test_search_then_lora_in_the_trainer() -> None:
    model, cfg = _mlp(search_steps=3, rho=0.5, theta_lr=0.05)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    held = [_held(seed=s) for s in (11, 12)]
    used: list[object] = []

    def held_loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        used.append(b)
        out = m(b[0])
        return F.cross_entropy(out, b[1]), out

    proc = DifforaSearch(model, cfg, held_out=held, loss_fn=held_loss)
    theta0 = _thetas(model)
    seen: list[torch.Tensor] = []

    class Spy(peftkit.Procedure):
        def on_step_end(self, m: nn.Module, step: int, optimizer=None) -> None:
            seen.append(_thetas(m) if _ads(m)[0].mode == "search" else torch.tensor([]))

    result = train(model, batches, steps=6, lr=1e-2, procedures=[proc, Spy()], progress=False)
    assert result.steps == 6 and proc.theta_steps == 3
    assert [id(b) for b in used] == [id(held[0]), id(held[1]), id(held[0])]  # θ only ever sees held-out batches
    assert all(len(s) == 2 for s in seen[:2]) and all(len(s) == 0 for s in seen[2:])  # discretised after step 3
    assert not torch.equal(seen[0], theta0) and not torch.equal(seen[1], seen[0])
    assert cfg.selected == proc.selected["default"] and len(cfg.selected) == 1
    assert sorted(a.mode for a in _ads(model)) == ["off", "on"]
    # without search_steps the search runs to the end of training, then discretises
    model2, cfg2 = _mlp()
    train(model2, batches, steps=2, lr=1e-2, procedures=[DifforaSearch(model2, cfg2, held_out=held)],
          progress=False)
    assert cfg2.selected is not None and len(cfg2.selected) == 1


# -- persistence and the shared checks after discretisation --------------------------------------------------------
def test_save_load_after_discretisation(tmp_path) -> None:
    model, cfg = _block([0.1, 0.9, -0.5, 0.4, 0.3, 0.0], rho=0.5)
    x = _x(3, 5, 16)
    peftkit.save(model, tmp_path / "search")  # the search phase round-trips too (θ is saved)
    fresh = MODELS["block"].build()
    peftkit.load(fresh, tmp_path / "search")
    assert torch.equal(fresh(x), model(x)) and torch.equal(_thetas(fresh), _thetas(model))
    discretize(model)
    y = model(x)
    peftkit.save(model, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["config"]["selected"] == ["attn.k", "attn.o", "mlp.fc1"]  # top 3 by θ, in model order
    keys = set(peftkit.adapter_state_dict(model))  # the dropped modules have no tensors in the file
    assert {k.rsplit(".", 1)[0] for k in keys} == {"adapter.attn.k", "adapter.attn.o", "adapter.mlp.fc1"}
    fresh = MODELS["block"].build()
    peftkit.load(fresh, tmp_path / "ad")
    assert torch.equal(fresh(x), y)
    assert [a.mode for a in _ads(fresh)] == ["off", "on", "off", "on", "on", "off"]
    wrong = MODELS["block"].build(wide=True)  # mlp.fc1 is 16 -> 48 there
    before = state_copy(wrong)
    with pytest.raises(peftkit.PeftkitError, match="tensor '"):
        peftkit.load(wrong, tmp_path / "ad")
    assert same_state(before, state_copy(wrong)) and peftkit.adapter_names(wrong) == []
    # deepcopy and torch.compile of the discretised model
    assert torch.equal(copy.deepcopy(model)(x), y)
    _close(torch.compile(model, backend="aot_eager")(x), y)


# -- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,match", [
    ({"rho": 0.0}, "rho"), ({"rho": 1.5}, "rho"), ({"search_steps": 0}, "search_steps"),
    ({"theta_lr": 0.0}, "theta_lr"),
])
def test_bad_config(fields: dict, match: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match=match):
        peftkit.config("diffora", target_modules=["fc1"], **fields)


def test_errors_change_nothing() -> None:
    model, cfg = _block([0.1] * 6)
    discretize(model)
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="search phase"):
        discretize(model)
    with pytest.raises(peftkit.PeftkitError, match="already discretised"):
        _ads(model)[0].switch(True)
    assert same_state(before, state_copy(model))
    model, cfg = _block([0.1] * 6)
    peftkit.adapt(model, cfg, name="other")
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="share one config"):
        discretize(model, "default")
    assert same_state(before, state_copy(model)) and cfg.selected is None
    with pytest.raises(peftkit.PeftkitError, match="no DiffoRA adapter"):
        DifforaSearch().on_train_start(MODELS["mlp"].build(), None)
    with pytest.raises(peftkit.PeftkitError, match="held_out batches are empty"):
        DifforaSearch(model, None, held_out=[]).on_step_end(model, 0, None)
    with pytest.raises(peftkit.PeftkitError, match="no adapter named"):
        discretize(model, "nope")


def test_registered_with_its_procedure() -> None:
    info = peftkit.get_method("diffora")
    assert info.procedure is DifforaSearch and info.mergeable and info.init_is_identity


# -- the method's default path (issue 21 item 2) --------------------------------------------------------------------
def test_discretisation_changes_the_output_by_the_dropped_modules_only() -> None:
    """γ is folded into the kept B: a kept module's ΔW does not jump from γ ≈ ½ to 1; the output after discretising
    is the relaxed output with the dropped modules' gates at 0."""
    thetas = [0.3, -0.2, 0.5, 0.1, -0.4, 0.2]
    model, cfg = _block(thetas, rho=0.5)
    x = _x(2, 5, 16)
    kept = sorted(range(6), key=lambda i: -thetas[i])[:3]
    with torch.no_grad():
        y0 = model(x)
        ref = copy.deepcopy(model)
        for i, a in enumerate(_ads(ref)):
            if i not in kept:
                a.theta.fill_(-1e4)  # σ(θ) = 0: the dropped module's contribution taken out, the rest relaxed
        y_ref = ref(x)
        discretize(model)
        y1 = model(x)
    dropped = float((y_ref - y0).abs().max())
    assert dropped > 1e-2
    assert float((y1 - y0).abs().max()) <= dropped * (1 + 1e-4)
    _close(y1, y_ref)


def _spy_modes(seen: list[list[str]], b_of_kept: list[torch.Tensor]) -> peftkit.Procedure:
    class Spy(peftkit.Procedure):
        def on_step_end(self, m: nn.Module, step: int, optimizer=None) -> None:
            seen.append([a.mode for a in _ads(m)])
            on = [a for a in _ads(m) if a.mode == "on"]
            if on:
                b_of_kept.append(on[0].lora_B.detach().clone())

    return Spy()


def test_default_searches_half_the_run_then_fine_tunes_the_kept_modules() -> None:
    model, cfg = _mlp()  # search_steps=None: the default, and what `peftkit train --method diffora` uses
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    proc = DifforaSearch(model, cfg, held_out=[_held(seed=11)])
    seen: list[list[str]] = []
    kept_b: list[torch.Tensor] = []
    train(model, batches, steps=8, lr=1e-2, procedures=[proc, _spy_modes(seen, kept_b)], progress=False)
    assert proc.run_steps == 8 and proc.theta_steps == 4
    assert [s == ["search", "search"] for s in seen] == [True] * 3 + [False] * 5  # discretised after step 4 of 8
    assert sorted(seen[-1]) == ["off", "on"] and len(kept_b) == 5
    assert float((kept_b[-1] - kept_b[0]).abs().max()) > 1e-4  # the kept module is fine-tuned after the search
    # search_share moves the switch; search_steps still wins when given
    assert DifforaSearch(model, cfg) is not None and cfg.search_limit(10) == 5
    assert peftkit.config("diffora", target_modules=["fc1"], search_share=0.25).search_limit(10) == 3
    assert peftkit.config("diffora", target_modules=["fc1"], search_steps=7).search_limit(10) == 7
    with pytest.raises(peftkit.PeftkitError, match="search_share"):
        peftkit.config("diffora", target_modules=["fc1"], search_share=0.0)


def test_without_held_out_batches_the_procedure_asks_its_run_for_a_share() -> None:
    model, cfg = _mlp()
    proc = DifforaSearch(model, cfg)
    assert proc.held_out_share == 0.1 and DifforaSearch(model, cfg, held_out=[_held()]).held_out_share == 0.0
    held = [_held(seed=21)]
    proc.set_held_out(held)
    used: list[object] = []
    proc.loss_fn = lambda m, b: (used.append(b), (F.cross_entropy(m(b[0]), b[1]), None))[1]
    train_batch = _held(seed=22)
    train(model, [train_batch], steps=4, lr=1e-2, procedures=[proc], progress=False)
    assert len(used) == 2 and all(torch.equal(b[0], held[0][0]) for b in used)  # never the training batch
