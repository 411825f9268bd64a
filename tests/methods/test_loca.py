"""LoCA's own properties (shared/methods/weight-space.md §8 "Sanity"): the DCT matrices are the orthonormal DCT-II
(definition, C·Cᵀ = I, an FFT-based DCT); ΔW equals α·Cᵀ·S·C with S built as a sparse COO tensor (duplicates
summed) and the sum of rank-1 outer products, on both forward paths; ‖ΔW‖_F = α‖a‖ for distinct locations; init is
the base; ∂L/∂a equals autograd of an explicit reference; the location gradient equals the spec's clamped central
finite difference times (d − 1) (borders, the ±1 clamp, ℓ outside [0, 0.999]); the schedule trains exactly the
tensors the spec says at every step and gives the locations their own lr; parameter count 3n (n once the locations
freeze); merge; save/load with learned locations; clear errors that change nothing."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
import peftkit.methods.loca as loca
from conformance.models import MODELS, same_state, state_copy
from peftkit.core.procedure import Procedure
from peftkit.train.trainer import train
from tolerance import assert_near


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(d_in: int = 20, d_out: int = 12, **kw) -> tuple[nn.Module, loca.Loca]:
    """nn.Sequential(Linear(d_in, d_out)) with a LoCA adapter on it, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    peftkit.adapt(model, peftkit.config("loca", target_modules=["0"], **kw))
    return model, model[0].adapters["default"]


def _set(ad: loca.Loca, a: torch.Tensor, ell: torch.Tensor) -> None:
    with torch.no_grad():
        ad.loca_a.copy_(a)
        ad.loca_l.copy_(ell)


def _ref_c(n: int) -> torch.Tensor:
    """The DCT-II matrix from its definition, entry by entry with math.cos."""
    c = torch.empty(n, n, dtype=torch.float64)
    for k in range(n):
        for j in range(n):
            c[k, j] = math.sqrt((1 if k == 0 else 2) / n) * math.cos(math.pi * (2 * j + 1) * k / (2 * n))
    return c


def _dct_fft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II of the last dim via one FFT (Makhoul): v = [x_0, x_2, …, x_3, x_1]."""
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    k = torch.arange(n, dtype=torch.float64)
    y = (torch.fft.fft(v) * torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))).real
    scale = torch.full_like(k, math.sqrt(2 / n))
    scale[0] = math.sqrt(1 / n)
    return y * scale


def _ref_dw(ad: loca.Loca, a: torch.Tensor | None = None) -> torch.Tensor:
    """α·Cᵀ·S·C in float64, S as the official sparse COO tensor made dense (duplicates summed)."""
    d_out, d_in = ad.host.d_out, ad.host.d_in
    a = ad.loca_a.detach().double() if a is None else a
    rows, cols = ad.locations()
    s = torch.sparse_coo_tensor(torch.stack([rows, cols]), a, (d_out, d_in), check_invariants=True).to_dense()
    return ad.alpha * _ref_c(d_out).t() @ s @ _ref_c(d_in)


# -- the transform --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 16, 37])
def test_dct_matrix_is_the_orthonormal_dct2(n: int) -> None:
    c = loca.dct_matrix(n)
    torch.testing.assert_close(c, _ref_c(n), rtol=0.0, atol=1e-14)
    torch.testing.assert_close(c @ c.t(), torch.eye(n, dtype=torch.float64), rtol=0.0, atol=1e-13)
    x = torch.randn(3, n, generator=_g(n), dtype=torch.float64)
    torch.testing.assert_close(x @ c.t(), _dct_fft(x), rtol=0.0, atol=1e-12)
    c32 = loca.dct_matrix(n, torch.float32)  # the float32 matrices the adapters use: orthonormal to 1e-6
    assert_near(c32 @ c32.t(), torch.eye(n), 32, layers=3)


def test_layers_of_one_adapter_share_one_matrix_per_size_and_do_not_save_it(tmp_path) -> None:
    model = MODELS["block"].build()
    peftkit.adapt(model, peftkit.config("loca", target_modules=["q", "k", "fc1", "fc2"], n=8))
    q, k, fc1 = (model.get_submodule(p).adapters["default"] for p in ("attn.q", "attn.k", "mlp.fc1"))
    assert q.dct()[0] is k.dct()[0] is fc1.dct()[1]  # C_16 once
    assert fc1.dct()[0].shape == (32, 32)
    peftkit.save(model, tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors").keys()
    assert not any("dct" in key for key in keys)
    assert {key.rsplit(".", 1)[1] for key in keys} == {"loca_a", "loca_l", "loca_shape"}


# -- forward -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [6, 100])  # n < d_out + d_in: gathered DCT rows; otherwise the dense Cᵀ·S·C
def test_delta_weight_is_the_2d_idct_of_the_scattered_coefficients(n: int) -> None:
    _, ad = _linear(n=n, alpha=2.5)
    a = torch.randn(n, generator=_g(1), dtype=torch.float64)
    ell = torch.rand(2, n, generator=_g(2), dtype=torch.float64)
    ell[:, 1] = ell[:, 0]  # a duplicate location: the coefficients add up
    _set(ad, a, ell)
    dw = ad.delta_weight()
    torch.testing.assert_close(dw, _ref_dw(ad), rtol=0.0, atol=1e-12)
    rows, cols = ad.locations()
    c_out, c_in = _ref_c(12), _ref_c(20)
    outer = sum(2.5 * a[k] * torch.outer(c_out[rows[k]], c_in[cols[k]]) for k in range(n))
    torch.testing.assert_close(dw, outer, rtol=0.0, atol=1e-12)
    assert rows[0] == rows[1] and cols[0] == cols[1]


def test_positions_follow_the_official_rounding() -> None:
    _, ad = _linear(n=5)
    _set(ad, torch.zeros(5, dtype=torch.float64), torch.tensor([[0.0, 0.5, 0.999, 1.5, -0.2],
                                                                [0.04, 0.05, 0.999, 0.26, 0.3]]))
    rows, cols = ad.locations()
    assert rows.tolist() == [0, round(0.5 * 11), round(0.999 * 11), round(0.999 * 11), 0]
    assert cols.tolist() == [round(0.04 * 19), round(0.05 * 19), 19, round(0.26 * 19), round(0.3 * 19)]


def test_distinct_locations_give_frobenius_norm_alpha_times_norm_a() -> None:
    _, ad = _linear(n=30, alpha=3.0)
    flat = torch.randperm(12 * 20, generator=_g(3))[:30]
    ell = torch.stack([(flat // 20).double() / 11, (flat % 20).double() / 19])  # exactly on the grid
    a = torch.randn(30, generator=_g(4), dtype=torch.float64)
    _set(ad, a, ell)
    assert len(set(zip(*[t.tolist() for t in ad.locations()]))) == 30
    assert float(ad.delta_weight().norm()) == pytest.approx(3.0 * float(a.norm()), rel=1e-12)


def test_init_is_the_base_with_3n_trainable_per_layer() -> None:
    spec = MODELS["block"]
    model, x = spec.build(), spec.input()
    y0 = model(x)
    torch.manual_seed(0)
    peftkit.adapt(model, peftkit.config("loca", target_modules=["q", "v", "fc1"], n=40))
    assert torch.equal(model(x), y0)
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        assert torch.equal(ad.loca_a, torch.zeros(40)) and ad.delta_weight().abs().max() == 0
        assert 0 <= float(ad.loca_l.detach().min()) and float(ad.loca_l.detach().max()) < 1
        assert ad.expected_params(ad.host, ad.config) == 120
    assert peftkit.summary(model).trainable == 3 * 120


# -- gradients -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,train_locations", [(4, True), (4, False), (100, True), (100, False)])
def test_coefficient_gradient_equals_autograd_of_the_reference(n: int, train_locations: bool) -> None:
    model, ad = _linear(n=n, alpha=1.7)
    _set(ad, torch.randn(n, generator=_g(5), dtype=torch.float64), torch.rand(2, n, generator=_g(6),
                                                                                dtype=torch.float64))
    ad.loca_l.requires_grad_(train_locations)
    x = torch.randn(7, 20, generator=_g(7), dtype=torch.float64)
    w = torch.randn(7, 12, generator=_g(8), dtype=torch.float64)
    (model(x) * w).sum().backward()

    a_ref = ad.loca_a.detach().clone().requires_grad_(True)
    base = model[0].base_layer
    y_ref = x @ (base.weight + _ref_dw(ad, a_ref)).t() + base.bias
    (y_ref * w).sum().backward()
    torch.testing.assert_close(ad.loca_a.grad, a_ref.grad, rtol=0.0, atol=1e-10)
    assert (ad.loca_l.grad is not None) == train_locations


@pytest.mark.parametrize("n", [6, 100])
def test_location_gradient_is_the_clamped_central_difference(n: int) -> None:
    model, ad = _linear(n=n, alpha=0.8)
    ell = torch.rand(2, n, generator=_g(9), dtype=torch.float64)
    ell[:, 0] = torch.tensor([0.0, 0.0])  # top-left corner: the lower neighbours clamp to the border
    ell[:, 1] = torch.tensor([0.999, 0.999])  # bottom-right corner
    ell[:, 2] = torch.tensor([1.3, -0.2])  # outside the clamp: no gradient reaches ℓ
    # magnitudes over three decades: the ±1 clamp bites for the large ones only
    a = torch.randn(n, generator=_g(10), dtype=torch.float64) * torch.logspace(-1, 2, n, dtype=torch.float64)
    _set(ad, a, ell)
    x = torch.randn(9, 20, generator=_g(11), dtype=torch.float64)
    w = torch.randn(9, 12, generator=_g(12), dtype=torch.float64)
    (model(x) * w).sum().backward()

    # the spec: G = ∂L/∂(ΔW/α), K = C_out·G·C_inᵀ, finite difference on the integer positions, clamp ±1, ×(d − 1)
    g = 0.8 * w.t() @ x
    k = _ref_c(12) @ g @ _ref_c(20).t()
    rows, cols = ad.locations()
    up, down = (rows + 1).clamp(max=11), (rows - 1).clamp(min=0)
    right, left = (cols + 1).clamp(max=19), (cols - 1).clamp(min=0)
    raw_row = 0.5 * a * (k[up, cols] - k[down, cols])
    raw_col = 0.5 * a * (k[rows, right] - k[rows, left])
    inside = ((ell >= 0) & (ell <= loca.LOCATION_CLAMP)).double()
    expected = torch.stack([raw_row.clamp(-1, 1) * 11, raw_col.clamp(-1, 1) * 19]) * inside
    torch.testing.assert_close(ad.loca_l.grad, expected, rtol=0.0, atol=1e-10)
    assert (raw_row.abs() > 1).any() and (raw_row.abs() < 1).any()  # both regimes covered
    assert ad.loca_l.grad[:, 2].abs().max() == 0 and ad.loca_l.grad[:, 0].abs().max() > 0
    # the coefficients' gradient is K at the locations, on the same backward
    torch.testing.assert_close(ad.loca_a.grad, k[rows, cols], rtol=0.0, atol=1e-10)


# -- the schedule -------------------------------------------------------------------------------------------------
def test_location_phase_follows_the_spec_pattern() -> None:
    _, ad = _linear(n=4, t_loc=100, b_a=10, b_l=20)
    got = [ad.location_phase(t) for t in range(130)]
    assert got == [0 < t < 100 and t % 30 >= 10 for t in range(130)]
    assert not got[0] and not any(got[100:]) and got[10:30] == [True] * 20 and got[30:40] == [False] * 10
    assert peftkit.get_method("loca").procedure is loca.LocaSchedule


class _Spy(Procedure):
    """After LocaSchedule's on_step_start (procedures run in order): which tensors require grad, and after the step
    which tensors the optimiser changed."""

    def __init__(self, layers: list[loca.Loca]) -> None:
        self.layers, self.log = layers, []

    def on_step_start(self, model: nn.Module, step: int) -> None:
        self.flags = [(a.loca_a.requires_grad, a.loca_l.requires_grad) for a in self.layers]
        self.before = [(a.loca_a.detach().clone(), a.loca_l.detach().clone()) for a in self.layers]

    def on_step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        changed = [(not torch.equal(a.loca_a, b[0]), not torch.equal(a.loca_l, b[1]))
                   for a, b in zip(self.layers, self.before)]
        self.log.append((self.flags, changed, len(optimizer.param_groups)))


def _mlp_batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = _g(20)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def test_schedule_trains_coefficients_and_locations_in_alternation() -> None:
    model = MODELS["mlp"].build()
    torch.manual_seed(0)
    peftkit.adapt(model, peftkit.config("loca", target_modules=["fc1", "fc2"], n=24, t_loc=70, b_a=10, b_l=20))
    layers = [layer.adapters["default"] for _, layer in peftkit.adapted_layers(model)]
    sched, spy = loca.LocaSchedule(), _Spy(layers)
    train(model, _mlp_batches(), steps=80, lr=1e-2, procedures=[sched, spy], progress=False)
    for t, (flags, changed, n_groups) in enumerate(spy.log):
        loc = 0 < t < 70 and t % 30 >= 10
        assert flags == [(not loc, loc)] * 2, t  # only the phase's tensor requires grad ...
        assert changed == [(not loc, loc)] * 2, t  # ... and only it moves (AdamW skips tensors without gradient)
        assert n_groups == 1  # the optimiser (and its LR schedule) are left as they were
    # after training the locations stay frozen (t ≥ t_loc): the paper's n trainable per layer
    assert sched.t == 80 and sched.state_dict() == {"t": 80}
    assert all(a.loca_a.requires_grad and not a.loca_l.requires_grad for a in layers)
    assert peftkit.summary(model).trainable == 2 * 24


def test_location_step_is_adamw_at_location_lr_under_the_schedule() -> None:
    model, ad = _linear(n=10, t_loc=100, location_lr=3e-3)
    _set(ad, torch.randn(10, generator=_g(16), dtype=torch.float64), torch.rand(2, 10, generator=_g(17),
                                                                                 dtype=torch.float64))
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=0.5, weight_decay=0.1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 ** i)
    ref = nn.Parameter(ad.loca_l.detach().clone())  # the same tensor under its own AdamW at lr 3e-3 × multiplier
    ref_opt = torch.optim.AdamW([ref], lr=3e-3, weight_decay=0.1)
    proc = loca.LocaSchedule()
    proc.load_state_dict({"t": 12})  # resume inside the first location phase (t mod 30 in [10, 30))
    proc.on_train_start(model, opt)
    x = torch.randn(6, 20, generator=_g(18), dtype=torch.float64)
    start = ad.loca_l.detach().clone()
    for i in range(3):
        proc.on_step_start(model, i)
        assert ad.loca_l.requires_grad and not ad.loca_a.requires_grad
        (model(x).sin().sum() * 100).backward()
        ref.grad = ad.loca_l.grad.clone()
        for g in ref_opt.param_groups:
            g["lr"] = 3e-3 * 0.5 ** i
        opt.step(), ref_opt.step(), lr_sched.step()
        opt.zero_grad(set_to_none=True)
        proc.on_step_end(model, i, opt)
        torch.testing.assert_close(ad.loca_l.detach(), ref.detach(), rtol=0.0, atol=1e-12)
    assert float((ad.loca_l.detach() - start).abs().max()) > 1e-3  # it moved, at ~3e-3 per step and not at 0.5
    assert len(opt.param_groups) == 1
    proc.on_train_end(model)  # t = 15 < t_loc: the search goes on in a next run
    assert ad.loca_a.requires_grad and ad.loca_l.requires_grad


def test_schedule_leaves_frozen_adapters_alone(tmp_path) -> None:
    model = MODELS["mlp"].build()
    peftkit.adapt(model, peftkit.config("loca", target_modules=["fc1"], n=8))
    peftkit.save(model, tmp_path / "a")
    fresh = MODELS["mlp"].build()
    peftkit.load(fresh, tmp_path / "a")  # frozen (loaded for inference)
    with pytest.raises(peftkit.PeftkitError, match="no trainable LoCA adapter"):
        loca.LocaSchedule().on_train_start(fresh, None)
    peftkit.adapt(fresh, peftkit.config("loca", target_modules=["fc2"], n=8), name="new")
    sched = loca.LocaSchedule()
    sched.on_step_start(fresh, 0)
    sched.on_train_end(fresh)
    assert peftkit.trainable_parameters(fresh) == [fresh.fc2.adapters["new"].loca_a, fresh.fc2.adapters["new"].loca_l]


# -- merge, save / load ------------------------------------------------------------------------------------------------
def test_merge_writes_w0_plus_the_idct_and_unmerge_restores() -> None:
    model, ad = _linear(n=30, alpha=2.0)
    _set(ad, torch.randn(30, generator=_g(13), dtype=torch.float64), torch.rand(2, 30, generator=_g(14),
                                                                                 dtype=torch.float64))
    x = torch.randn(5, 20, generator=_g(15), dtype=torch.float64)
    y = model(x)
    w0 = model[0].base_layer.weight.detach().clone()
    peftkit.merge(model)
    torch.testing.assert_close(model[0].base_layer.weight, w0 + _ref_dw(ad), rtol=0.0, atol=1e-12)
    torch.testing.assert_close(model(x), y, rtol=0.0, atol=1e-12)
    peftkit.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, w0, rtol=0.0, atol=1e-14)


def test_save_load_keeps_learned_locations(tmp_path) -> None:
    spec = MODELS["mlp"]
    model = spec.build()
    torch.manual_seed(0)
    peftkit.adapt(model, peftkit.config("loca", target_modules=["fc1", "fc2"], n=24, t_loc=1000, b_a=1, b_l=3,
                                        location_lr=0.05))
    ad = model.fc1.adapters["default"]
    start = ad.locations()
    train(model, _mlp_batches(), steps=24, lr=5e-2, procedures=[loca.LocaSchedule()], progress=False)
    moved = ad.locations()
    assert not (torch.equal(moved[0], start[0]) and torch.equal(moved[1], start[1])), "the locations never moved"
    x = spec.input()
    model.eval()
    y = model(x)
    peftkit.save(model, tmp_path / "a")
    fresh = spec.build()
    peftkit.load(fresh, tmp_path / "a")
    got = fresh.fc1.adapters["default"]
    assert torch.equal(got.loca_l, ad.loca_l) and all(torch.equal(u, v) for u, v in zip(got.locations(), moved))
    assert torch.equal(fresh(x), y)


# -- errors --------------------------------------------------------------------------------------------------------
def test_n_larger_than_the_spectrum_is_refused_and_changes_nothing() -> None:
    model = MODELS["mlp"].build()
    before, types = state_copy(model), [type(m) for m in model.modules()]
    with pytest.raises(peftkit.PeftkitError, match=r"module 'fc1': rank 513 exceeds this layer's limit of 512 "
                                                   r"\(LocaConfig.n; d_in=16, d_out=32\)"):
        peftkit.adapt(model, peftkit.config("loca", target_modules=["fc1", "fc2"], n=513))
    assert same_state(before, state_copy(model)) and [type(m) for m in model.modules()] == types
    assert peftkit.adapter_names(model) == []


@pytest.mark.parametrize("fields,match", [
    ({"n": 0}, r"LocaConfig.n .* positive integer"),
    ({"alpha": 0.0}, r"LocaConfig.alpha must be > 0"),
    ({"t_loc": -1}, r"LocaConfig.t_loc must be >= 0"),
    ({"b_a": 0, "b_l": 0}, r"b_a \+ b_l"),
    ({"location_lr": -1e-4}, r"LocaConfig.location_lr must be > 0"),
    ({"n": 1.5}, r"LocaConfig.n must be int"),
])
def test_bad_config_is_a_clear_error(fields: dict, match: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match=match):
        peftkit.config("loca", target_modules=["fc1"], **fields)


def test_a_wrong_shaped_base_is_refused(tmp_path) -> None:
    src = MODELS["mlp"].build()
    peftkit.adapt(src, peftkit.config("loca", target_modules=["fc1"], n=8))
    peftkit.save(src, tmp_path / "a")
    wrong = MODELS["mlp"].build(wide=True)  # fc1 is 16 -> 24: a and ℓ have the same shapes, the layer does not
    before = state_copy(wrong)
    with pytest.raises(peftkit.PeftkitError, match=r"tensor 'adapter.fc1.loca_shape' records .* \(32, 16\) .* "
                                                   r"\(24, 16\)"):
        peftkit.load(wrong, tmp_path / "a")
    assert same_state(before, state_copy(wrong)) and peftkit.adapter_names(wrong) == []


def test_t_loc_defaults_to_a_tenth_of_the_run() -> None:
    """Paper: T_loc ≈ 10 % of all steps. The default is that share of the run the trainer tells the schedule; an int
    is a number of steps."""
    from peftkit.train.trainer import train

    for steps, searched in ((30, 3), (60, 6)):
        model = MODELS["mlp"].build()
        peftkit.adapt(model, peftkit.config("loca", target_modules=["fc1"], n=8, b_a=1, b_l=1))
        ad = model.fc1.adapters["default"]
        loc_steps: list[int] = []

        class Spy(peftkit.Procedure):
            def __init__(self, ad: loca.Loca, seen: list[int]) -> None:
                self.ad, self.seen = ad, seen

            def on_step_start(self, m: torch.nn.Module, step: int) -> None:
                if self.ad.loca_l.requires_grad:
                    self.seen.append(step)

        train(model, _mlp_batches(), steps=steps, lr=1e-2, procedures=[loca.LocaSchedule(), Spy(ad, loc_steps)],
              progress=False)
        assert loc_steps == [t for t in range(1, searched) if t % 2 == 1]  # 0 < t < 0.1·steps, odd t
        assert not ad.loca_l.requires_grad  # the search is over
    assert loca.location_steps(peftkit.config("loca", target_modules=["fc1"], t_loc=7), 1000) == 7
    with pytest.raises(peftkit.PeftkitError, match="share of the run"):
        peftkit.config("loca", target_modules=["fc1"], t_loc=1.5)
