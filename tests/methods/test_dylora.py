"""DyLoRA's own properties (shared/methods/weight-space.md §5 "Sanity"): b = r is exactly LoRA with α/r, the
forward at every active rank b, frozen-mode gradient masks, identity at init, merged == unmerged for every b,
set_rank and the rank sampler (seeded, resumable, resets after training), the parameter count and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from conformance.models import MODELS, perturb
from peftkit.methods.dylora import DyLoRASampler, set_rank
from tolerance import assert_near

R = 6


def _model(seed: int = 0) -> nn.Module:
    """MLP: fc1 16 -> 32, fc2 32 -> 16, head 16 -> 4."""
    return MODELS["mlp"].build(seed=seed)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * float(expected.detach().abs().max()))


def _adapted(perturbed: bool = True, name: str = "default", model: nn.Module | None = None, **kw) -> nn.Module:
    model = _model() if model is None else model
    peftkit.adapt(model, peftkit.config("dylora", target_modules=["fc1", "fc2"], **{"r": R, "alpha": 12.0, **kw}),
                  name=name)
    if perturbed:
        perturb(model, seed=3)
    return model


def _ranks(model: nn.Module, name: str = "default") -> list[int]:
    return [layer.adapters[name].rank for _, layer in peftkit.adapted_layers(model) if name in layer.adapters]


# -- (a) b = r is LoRA with α/r; the forward at every b ---------------------------------------------------------------
def test_full_rank_is_exactly_lora() -> None:
    dy, lo = _adapted(), _model()
    peftkit.adapt(lo, peftkit.config("lora", target_modules=["fc1", "fc2"], r=R, alpha=12.0))
    with torch.no_grad():
        for (_, a), (_, b) in zip(peftkit.adapted_layers(dy), peftkit.adapted_layers(lo)):
            b.adapters["default"].lora_A.copy_(a.adapters["default"].lora_A)
            b.adapters["default"].lora_B.copy_(a.adapters["default"].lora_B)
    assert _ranks(dy) == [R, R]
    x = _x(3, 5, 16)
    with torch.no_grad():
        assert_near(dy(x), lo(x), 32, layers=3)  # DyLoRA's code vs LoRA's
        base = dy.fc1.base_layer(x)
        assert_near(dy.fc1.adapters["default"].delta(x, base), lo.fc1.adapters["default"].delta(x, base), 16,
                    layers=2)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_at_every_rank_uses_the_leading_factors_and_alpha_over_b(rslora: bool) -> None:
    model = _adapted(rslora=rslora)
    layer = model.fc1
    ad = layer.adapters["default"]
    x = _x(4, 16)
    outs = []
    with torch.no_grad():
        for b in range(1, R + 1):
            set_rank(model, b)
            s = 12.0 / (b**0.5 if rslora else b)
            assert ad.scaling() == pytest.approx(s)
            ref = layer.base_layer(x) + s * (x @ ad.lora_A[:b].t()) @ ad.lora_B[:, :b].t()
            _close(layer(x), ref)
            outs.append(layer(x))
    assert all(not torch.equal(outs[i], outs[i + 1]) for i in range(R - 1))


# -- (b) frozen-mode gradient masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["frozen", "full"])
@pytest.mark.parametrize("b", [1, 3, R])
def test_gradient_masks(mode: str, b: int) -> None:
    model = _adapted(mode=mode).train()
    set_rank(model, b)
    x = _x(8, 16)
    (model(x) * _x(8, 4, seed=4)).sum().backward()
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        rows = ad.lora_A.grad.abs().sum(1) > 0
        cols = ad.lora_B.grad.abs().sum(0) > 0
        live = torch.zeros(R, dtype=torch.bool)
        if mode == "frozen":
            live[b - 1] = True  # only row / column b−1 (0-based) learn
        else:
            live[:b] = True
        assert torch.equal(rows, live) and torch.equal(cols, live)


def test_eval_mode_backward_is_not_masked() -> None:
    model = _adapted(mode="frozen")
    set_rank(model, 3)
    model(_x(8, 16)).sum().backward()
    ad = model.fc1.adapters["default"]
    assert torch.equal(ad.lora_A.grad.abs().sum(1) > 0, torch.arange(R) < 3)


# -- (c) identity at init, (d) merged == unmerged for every b ----------------------------------------------------------
def test_init_is_exactly_the_base_for_every_rank() -> None:
    x = _x(4, 16)
    with torch.no_grad():
        y0 = _model()(x)
        model = _adapted(perturbed=False)
        for b in range(1, R + 1):
            set_rank(model, b)
            assert torch.equal(model(x), y0)


def test_merged_equals_unmerged_for_every_rank() -> None:
    model = _adapted()
    x = _x(6, 16)
    w0 = model.fc1.base_layer.weight.detach().clone()
    with torch.no_grad():
        for b in range(1, R + 1):
            set_rank(model, b)
            y = model(x)
            peftkit.merge(model)
            ad = model.fc1.adapters["default"]
            _close(model.fc1.base_layer.weight, w0 + 12.0 / b * ad.lora_B[:, :b] @ ad.lora_A[:b])
            _close(model(x), y)
            with pytest.raises(peftkit.PeftkitError, match="merged"):
                set_rank(model, 1 if b > 1 else 2)  # a merged adapter keeps its rank
            peftkit.unmerge(model)
            _close(model.fc1.base_layer.weight, w0)


def test_other_hosts(tiny) -> None:
    model = tiny.build()
    x = tiny.input()
    with torch.no_grad():
        y0 = tiny.run(model, x)
        peftkit.adapt(model, peftkit.config("dylora", target_modules=tiny.targets, r=4))
        assert torch.equal(tiny.run(model, x), y0)
        perturb(model, seed=1)
        set_rank(model, 2)
        y = tiny.run(model, x)
        assert not torch.equal(y, y0)
        peftkit.merge(model)
        _close(tiny.run(model, x), y)


# -- set_rank ---------------------------------------------------------------------------------------------------------
def test_set_rank_errors_change_nothing() -> None:
    model = _adapted(overrides={"fc2": {"r": 3}})
    assert _ranks(model) == [R, 3]
    for bad in (0, 4, R + 1, 2.0, True):  # 4 fits fc1 (r = 6) but not fc2 (r = 3): all-or-nothing
        with pytest.raises(peftkit.PeftkitError, match=r"takes ranks 1\.\.(6|3), got"):
            set_rank(model, bad)
        assert _ranks(model) == [R, 3]
    with pytest.raises(peftkit.PeftkitError, match="no adapter named 'nope'"):
        set_rank(model, 1, name="nope")
    plain = _model()
    peftkit.adapt(plain, peftkit.config("lora", target_modules=["fc1"]))
    with pytest.raises(peftkit.PeftkitError, match="no adapter with an adjustable rank"):
        set_rank(plain, 1)
    with pytest.raises(peftkit.PeftkitError, match=r"adapter 'default' \(lora\) has no adapter with an adjustable"):
        peftkit.set_rank(plain, 1, name="default")


def test_set_rank_by_name_and_eval_rank() -> None:
    model = _adapted(name="a", eval_rank=2)
    _adapted(name="b", model=model)
    assert _ranks(model, "a") == [2, 2] and _ranks(model, "b") == [R, R]
    set_rank(model, 4, name="b")
    assert _ranks(model, "a") == [2, 2] and _ranks(model, "b") == [4, 4]


# -- the rank sampler ------------------------------------------------------------------------------------------------
def test_sampler_is_registered_and_samples_one_uniform_rank_for_all_layers() -> None:
    assert peftkit.get_method("dylora").procedure is DyLoRASampler
    model = _adapted(eval_rank=2)
    cfg = peftkit.get_config(model, "default")
    proc = peftkit.get_method("dylora").procedure(model=model, config=cfg)
    seen = []
    for step in range(300):
        proc.on_step_start(model, step)
        ranks = _ranks(model)
        assert ranks == [proc.rank] * 2  # one b for every layer
        seen.append(proc.rank)
    counts = torch.bincount(torch.tensor(seen), minlength=R + 1)[1:]
    assert counts.sum() == 300 and counts.min() > 25  # every b in 1..r, roughly uniformly (expected 50 each)
    assert proc.state_dict()["step"] == 300
    proc.on_train_end(model)
    assert _ranks(model) == [2, 2]  # eval_rank


def test_sampler_is_seeded_and_resumable() -> None:
    model = _adapted()

    def draws(proc: DyLoRASampler, n: int) -> list[int]:
        out = []
        for step in range(n):
            proc.on_step_start(model, step)
            out.append(proc.rank)
        return out

    a, b = DyLoRASampler(seed=7), DyLoRASampler(seed=7)
    assert draws(a, 20) == draws(b, 20)
    assert draws(DyLoRASampler(seed=8), 20) != draws(DyLoRASampler(seed=7), 20)
    state = a.state_dict()
    expected = draws(a, 10)
    resumed = DyLoRASampler(seed=0)
    resumed.load_state_dict(state)
    assert resumed.step == 20 and draws(resumed, 10) == expected
    resumed.on_train_end(model)
    assert _ranks(model) == [R, R]


def test_sampler_with_a_config_touches_only_that_adapter() -> None:
    model = _adapted(name="a")
    _adapted(name="b", model=model)
    proc = DyLoRASampler(model=model, config=peftkit.get_config(model, "a"), seed=1)
    for step in range(10):
        proc.on_step_start(model, step)
        if proc.rank != R:
            break
    assert _ranks(model, "a") == [proc.rank] * 2 and proc.rank != R and _ranks(model, "b") == [R, R]
    with pytest.raises(peftkit.PeftkitError, match="no DyLoRA adapter"):
        DyLoRASampler(seed=0).on_step_start(_model(), 0)


def test_frozen_training_steps_only_move_the_sampled_row_and_column() -> None:
    model = _adapted(mode="frozen").train()
    proc = DyLoRASampler(model=model, config=peftkit.get_config(model, "default"), seed=3)
    opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=0.1)
    x, target = _x(16, 16), _x(16, 4, seed=2)
    for step in range(6):
        proc.on_step_start(model, step)
        ad = model.fc1.adapters["default"]
        a0, b0 = ad.lora_A.detach().clone(), ad.lora_B.detach().clone()
        opt.zero_grad()
        ((model(x) - target) ** 2).mean().backward()
        opt.step()
        moved_rows = (ad.lora_A.detach() != a0).any(1)
        moved_cols = (ad.lora_B.detach() != b0).any(0)
        assert torch.equal(moved_rows, torch.arange(R) == proc.rank - 1)
        assert torch.equal(moved_cols, torch.arange(R) == proc.rank - 1)
    proc.on_train_end(model)


# -- bookkeeping, persistence, errors ----------------------------------------------------------------------------------
def test_parameter_count() -> None:
    model = _adapted(perturbed=False)
    for _, layer in peftkit.adapted_layers(model):
        ad = layer.adapters["default"]
        n = R * (layer.host.d_in + layer.host.d_out)
        assert sum(p.numel() for p in ad.parameters()) == n == type(ad).expected_params(layer.host, ad.config)
    assert peftkit.summary(model).trainable == R * (16 + 32) + R * (32 + 16)


def test_save_load_round_trip_is_bit_identical(tmp_path) -> None:
    model = _adapted(eval_rank=4)
    set_rank(model, 3)
    peftkit.save(model, tmp_path / "ad")
    set_rank(model, 4)
    x = _x(5, 16)
    with torch.no_grad():
        y = model(x)
    fresh = _model()
    peftkit.load(fresh, tmp_path / "ad")
    assert _ranks(fresh) == [4, 4]  # the active rank is not state: a loaded adapter starts at eval_rank
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


@pytest.mark.parametrize("fields", [{"eval_rank": 0}, {"eval_rank": 9, "r": 8}, {"mode": "half"}, {"r": 0},
                                    {"overrides": {"fc2": {"r": 2}}, "eval_rank": 3}])
def test_bad_config_fields(fields: dict) -> None:
    with pytest.raises(peftkit.PeftkitError):
        cfg = peftkit.config("dylora", target_modules=["fc1", "fc2"], **fields)
        cfg.for_module("fc2")


def test_default_mode_follows_the_run_budget() -> None:
    """`mode="auto"` (the default): full training of A[:b], B[:, :b] unless the run gives every rank 250 expected
    updates of its own row (frozen, the official callback's mode, needs the paper's long runs)."""
    from peftkit.methods.dylora import FROZEN_UPDATES_PER_RANK, DyLoRASampler
    from peftkit.train.trainer import train

    cfg = peftkit.config("dylora", target_modules=["fc1"], r=8)
    assert cfg.mode == "auto" and FROZEN_UPDATES_PER_RANK == 250
    assert cfg.train_mode(300) == "full" and cfg.train_mode(None) == "full"
    assert cfg.train_mode(2000) == "frozen" and cfg.train_mode(1999) == "full"
    assert peftkit.config("dylora", target_modules=["fc1"], r=8, mode="frozen").train_mode(10) == "frozen"
    model = _adapted()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
    a0 = model.fc1.adapters["default"].lora_A.detach().clone()
    train(model, batches, steps=6, lr=1e-2, procedures=[DyLoRASampler(model, peftkit.get_config(model, "default"))],
          progress=False)
    ad = model.fc1.adapters["default"]
    assert ad.train_mode == "full"
    assert (ad.lora_A - a0).abs().amax(1).gt(0).all()  # full mode: every row of A below the drawn b trains
    with pytest.raises(peftkit.PeftkitError, match="mode"):
        peftkit.config("dylora", target_modules=["fc1"], mode="half")
