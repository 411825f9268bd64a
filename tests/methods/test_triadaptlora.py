"""TriAdaptLoRA's own properties (shared/methods/weight-space.md §4 "Sanity"): identity at init, the forward and ΔW
against a dense B·C·A built in the test, the triangular split (L zero above its block diagonal, U below), growth
leaves the output unchanged, the importance score against a reference, the linear (and non-linear) threshold
schedule, new tensors in the optimiser's existing group receive updates, the parameter count at init and after
growth, save/load after growth into a fresh base, the orthogonality loss, the rank budget, and the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from conformance.models import MODELS, perturb, same_state, state_copy
from peftkit.methods.triadaptlora import (
    TriAdaptGrowth,
    TriAdaptLora,
    budget_fraction,
    growth_count,
)
from peftkit.train.trainer import train

BLOCK_PATHS = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"]


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * float(expected.detach().abs().max()))


def _mlp(perturbed: bool = False, **kw) -> tuple[nn.Module, peftkit.AdapterConfig]:
    """MLP fc1 16 -> 32, fc2 32 -> 16, head 16 -> 4, with TriAdaptLoRA on fc1 and fc2."""
    model = MODELS["mlp"].build()
    cfg = peftkit.config("triadaptlora", target_modules=["fc1", "fc2"], **kw)
    peftkit.adapt(model, cfg)
    if perturbed:
        perturb(model, seed=3)
    return model, cfg


def _block(**kw) -> tuple[nn.Module, peftkit.AdapterConfig]:
    """Transformer block (d=16, ff=32) with TriAdaptLoRA on its six linears."""
    model = MODELS["block"].build()
    cfg = peftkit.config("triadaptlora", target_modules=["q", "k", "v", "o", "fc1", "fc2"], **kw)
    peftkit.adapt(model, cfg)
    return model, cfg


def _ads(model: nn.Module) -> list[TriAdaptLora]:
    return [layer.adapters["default"] for _, layer in peftkit.adapted_layers(model)]


def dense_c(ad: TriAdaptLora) -> torch.Tensor:
    """C = L + U assembled entry by entry from the strips: row strip k at rows [o_k, r_k), columns [0, r_k);
    column strip k at rows [0, r_k), columns [o_k, r_k)."""
    r = ad.rank
    c = torch.zeros(r, r)
    o = 0
    for row, col in zip(ad.lora_C_row, ad.lora_C_col):
        dr, rk = row.shape
        assert rk == o + dr and col.shape == (rk, dr)
        c[o:rk, :rk] += row.detach()
        c[:rk, o:rk] += col.detach()
        o = rk
    return c


def dense_delta(ad: TriAdaptLora) -> torch.Tensor:
    a = torch.cat([p.detach() for p in ad.lora_A], 0)
    b = torch.cat([p.detach() for p in ad.lora_B], 1)
    return ad.config.alpha / ad.config.r * b @ dense_c(ad) @ a


def _pairs(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


# -- init, forward, merge -----------------------------------------------------------------------------------------
def test_init_is_exactly_the_base() -> None:
    x = _x(5, 16)
    base = MODELS["mlp"].build()
    model, cfg = _mlp()
    assert torch.equal(model(x), base(x))
    for ad in _ads(model):
        assert ad.blocks == [1] and ad.s == 16.0 / 8  # s = α / r_ref
        assert not ad.lora_C_row[0].any() and not ad.lora_C_col[0].any()
        assert ad.lora_A[0].abs().max() > 0 and ad.lora_B[0].abs().max() > 0  # A, B ~ N(0, 0.02²)
    big = nn.Sequential(nn.Linear(400, 300))
    peftkit.adapt(big, peftkit.config("triadaptlora", target_modules=["0"], init_rank=8))
    a = big[0].adapters["default"]
    for p in (a.lora_A[0], a.lora_B[0]):
        assert abs(float(p.detach().std()) - 0.02) < 0.002


@pytest.mark.parametrize("blocks", [[1], [2, 1, 3]])
def test_forward_merge_and_delta_match_the_dense_reference(blocks: list[int]) -> None:
    model, _ = _mlp(block_ranks={"fc1": blocks, "fc2": blocks})
    perturb(model, seed=4)
    x = _x(3, 5, 16)
    ad = model.fc1.adapters["default"]
    assert ad.blocks == blocks
    base = model.fc1.base_layer(x)
    ref = base + x @ dense_delta(ad).t()
    _close(model.fc1(x), ref)  # fused path (dropout 0)
    _close(base + ad.delta(x, base), ref)  # generic activation path
    _close(ad.delta_weight(), dense_delta(ad))
    y = model(x)
    w0 = model.fc1.base_layer.weight.detach().clone()
    peftkit.merge(model)
    _close(model.fc1.base_layer.weight - w0, dense_delta(ad))
    _close(model(x), y)
    peftkit.unmerge(model)
    _close(model.fc1.base_layer.weight, w0)


def test_triangular_split() -> None:
    model, _ = _mlp(block_ranks={"fc1": [1, 2, 3]})
    perturb(model, seed=5)
    ad = model.fc1.adapters["default"]
    low, up = ad.triangles()
    assert low.shape == up.shape == (6, 6)
    torch.testing.assert_close(low + up, dense_c(ad), rtol=0, atol=0)
    o = 0
    for dr in ad.blocks:
        rk = o + dr
        assert not low[o:rk, rk:].any()  # L: zero above its block diagonal
        assert not up[rk:, o:rk].any()  # U: zero below it
        assert low[o:rk, :rk].abs().min() > 0 and up[:rk, o:rk].abs().min() > 0  # the strips themselves
        o = rk
    # a growth appends one zero row strip and one zero column strip; the old entries stay
    c_old = dense_c(ad)
    ad.grow(2)
    c_new = dense_c(ad)
    assert ad.blocks == [1, 2, 3, 2] and c_new.shape == (8, 8)
    assert torch.equal(c_new[:6, :6], c_old) and not c_new[6:].any() and not c_new[:, 6:].any()


def test_growth_leaves_the_output_unchanged() -> None:
    model, cfg = _mlp(total_steps=10, init_rank=2)
    perturb(model, seed=6)
    x = _x(7, 16)
    y = model(x)
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-3)
    proc = TriAdaptGrowth(model, cfg)
    proc.on_train_start(model, opt)
    proc.on_step_end(model, 4, opt)  # t = 5: φ = 0.5, k = ⌊(16 − 4)·0.5⌋ = 6 ≥ 2 modules: both grow
    assert [a.blocks for a in _ads(model)] == [[2, 4], [2, 4]]
    _close(model(x), y, rel=1e-6)
    peftkit.merge(model)  # and the merged weight is the same ΔW
    _close(model(x), y)


# -- importance and threshold ---------------------------------------------------------------------------------------
def test_importance_score_matches_the_reference() -> None:
    model, cfg = _mlp(block_ranks={"fc1": [1, 2], "fc2": [1, 2, 2]})
    perturb(model, seed=7)
    mods = [(p, layer.adapters["default"]) for p, layer in peftkit.adapted_layers(model)]
    proc = TriAdaptGrowth(model, cfg)
    n1 = [float(torch.linalg.matrix_norm(dense_c(a))) / len(a.blocks) for _, a in mods]  # ‖C‖_F / K
    assert len(mods[0][1].blocks) == 2 and len(mods[1][1].blocks) == 3
    for got, want in zip(proc.scores("default", mods), n1):  # first evaluation: n_prev = 0 (C = 0 at init)
        assert got == pytest.approx(want, rel=1e-6)
    with torch.no_grad():
        mods[0][1].lora_C_col[1].mul_(3.0)
    n2 = [float(torch.linalg.matrix_norm(dense_c(a))) / len(a.blocks) for _, a in mods]
    for got, a, b in zip(proc.scores("default", mods), n2, n1):  # score = n_t − n_prev
        assert got == pytest.approx(a - b, rel=1e-5, abs=1e-7)
    assert proc.scores("default", mods)[1] == pytest.approx(0.0, abs=1e-7)


def test_threshold_schedule_is_linear() -> None:
    warm, total, remaining = 10, 110, 40
    phis = [budget_fraction(t, warm, total) for t in range(warm, total + 1)]
    assert phis[0] == 0 and phis[-1] == 1
    steps = [b - a for a, b in zip(phis, phis[1:])]
    assert all(s == pytest.approx(1 / (total - warm)) for s in steps)  # φ rises linearly in t
    for t in range(warm + 1, total + 1):
        phi = budget_fraction(t, warm, total)
        assert growth_count("linear", remaining, phi) == max(1, math.floor(remaining * (t - warm) / (total - warm)))
        assert growth_count("nonlinear", remaining, phi) == max(1, math.floor(math.exp(phi * math.log(remaining))))
    assert growth_count("linear", remaining, 1.0) == remaining  # at t = T the whole remaining budget
    assert growth_count("linear", remaining, 0.001) == 1  # at least one module


def _set_norms(model: nn.Module, values: list[float]) -> None:
    """C of module i: one nonzero entry v_i (so ‖C‖_F = v_i)."""
    with torch.no_grad():
        for a, v in zip(_ads(model), values):
            for c in [*a.lora_C_row, *a.lora_C_col]:
                c.zero_()
            a.lora_C_row[-1][0, 0] = v


def test_the_kth_largest_score_is_the_threshold() -> None:
    model, cfg = _block(total_steps=100)  # 6 modules, R_target = 48, R_total = 6
    mods = [(p, layer.adapters["default"]) for p, layer in peftkit.adapted_layers(model)]
    assert [p for p, _ in mods] == BLOCK_PATHS
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-3)
    proc = TriAdaptGrowth(model, cfg)
    _set_norms(model, [0.1, 0.5, 0.2, 0.4, 0.3, 0.05])
    # t = 5: φ = 0.05, k = ⌊42·0.05⌋ = 2 → the two largest scores (attn.k 0.5, attn.o 0.4) grow by Δr = 4
    assert proc.grow(model, "default", mods, 5, opt) == ["attn.k", "attn.o"]
    assert proc.events[-1]["k"] == 2 and proc.events[-1]["threshold"] == pytest.approx(0.4)
    assert [a.rank for _, a in mods] == [1, 5, 1, 5, 1, 1]
    assert cfg.block_ranks == {"attn.k": [1, 4], "attn.o": [1, 4]}
    # the score is the rise of n = ‖C‖_F / K since the last evaluation, not the norm itself
    values = [0.9, 1.2, 0.6, 0.8, 0.6, 0.1]
    _set_norms(model, values)
    n_prev = [0.1, 0.5, 0.2, 0.4, 0.3, 0.05]
    scores = [v / len(a.blocks) - p for v, p, (_, a) in zip(values, n_prev, mods)]
    assert scores == pytest.approx([0.8, 0.1, 0.4, 0.0, 0.3, 0.05])
    # t = 10: φ = 0.1, remaining = 48 − 14 = 34, k = ⌊3.4⌋ = 3 → threshold 0.3: attn.q, attn.v, mlp.fc1 grow —
    # not attn.k, whose C has the largest norm (1.2)
    assert proc.grow(model, "default", mods, 10, opt) == ["attn.q", "attn.v", "mlp.fc1"]
    assert proc.events[-1]["k"] == 3 and proc.events[-1]["threshold"] == pytest.approx(0.3)


def test_ties_at_the_threshold_all_grow() -> None:
    model, cfg = _block(total_steps=100)
    mods = [(p, layer.adapters["default"]) for p, layer in peftkit.adapted_layers(model)]
    opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=0.1)
    _set_norms(model, [0.3, 0.3, 0.3, 0.1, 0.1, 0.1])
    grown = TriAdaptGrowth(model, cfg).grow(model, "default", mods, 3, opt)  # k = ⌊42·0.03⌋ = 1; 3 tie
    assert grown == BLOCK_PATHS[:3]


# -- the procedure in the trainer -----------------------------------------------------------------------------------
def test_new_tensors_join_the_existing_group_and_train_on_the_next_steps() -> None:
    model, cfg = _mlp(total_steps=20, orth_reg=0.0)
    perturb(model, seed=8)
    params = peftkit.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5)
    proc = TriAdaptGrowth(model, cfg)
    proc.on_train_start(model, opt)
    x, y = _pairs(1)[0]

    def step(i: int) -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        proc.on_step_end(model, i, opt)

    step(0)  # t = 1: φ = 0.05, k = ⌊14·0.05⌋ → 1: the top-scored module grows
    assert len(proc.events) == 1 and len(proc.events[0]["grown"]) == 1
    grown = model.get_submodule(proc.events[0]["grown"][0]).adapters["default"]
    new = [grown.lora_A[1], grown.lora_B[1], grown.lora_C_row[1], grown.lora_C_col[1]]
    assert len(opt.param_groups) == 1
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params + new]  # appended, same group
    assert all(p.requires_grad for p in new)
    before = [p.detach().clone() for p in new]
    step(1)  # the zero strips get gradients at once (A_k, B_k only through them: zero this step)
    assert not torch.equal(new[2], before[2]) and not torch.equal(new[3], before[3])
    assert all(p in opt.state for p in new)
    step(2)  # now the strips are nonzero and A_k, B_k move too
    for p, b in zip(new, before):
        assert not torch.equal(p, b)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-2)  # the schedule covers them (one group)


def test_training_grows_ranks_within_the_budget_and_the_count_follows() -> None:
    model, cfg = _block(total_steps=12, warmup_steps=2, interval=2, r=4)  # Δr = 2, R_target = 24
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 5, 16, generator=g) for _ in range(3)]
    proc = TriAdaptGrowth(model, cfg)

    def loss_fn(m: nn.Module, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = m(b)
        return (out ** 2).mean(), out

    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=5e-3)
    train(model, batches, steps=12, optimizer=opt, procedures=[proc], loss_fn=loss_fn, progress=False)
    assert proc.events
    r_total = 6
    for ev in proc.events:
        assert ev["step"] > 2 and ev["step"] % 2 == 0  # warmup and interval
        assert r_total < 24  # an event only starts below the target ...
        r_total = ev["total_rank"]
        assert r_total <= 24 - 1 + len(ev["grown"]) * 2  # ... and overshoots by less than (#grown)·Δr
    ads = _ads(model)
    assert sum(a.rank for a in ads) == r_total
    for a in ads:
        assert a.blocks == [1] + [2] * (len(a.blocks) - 1)
    # every tensor is in the optimiser (one group) and the count matches the formula after growth
    ids = {id(p) for p in opt.param_groups[0]["params"]}
    assert all(id(p) in ids for p in peftkit.trainable_parameters(model))
    trainable = sum(p.numel() for p in peftkit.trainable_parameters(model))
    formula = 0
    for (path, layer), a in zip(peftkit.adapted_layers(model), ads):
        assert cfg.block_ranks.get(path, [1]) == a.blocks
        h, rk, n = layer.host, 0, 0
        for dr in a.blocks:
            rk += dr
            n += dr * (h.d_in + h.d_out) + 2 * dr * rk
        formula += n
        assert TriAdaptLora.expected_params(h, a.config) == n == sum(p.numel() for p in a.parameters())
    assert trainable == formula == peftkit.summary(model).trainable
    # no growth once the target is met
    more = TriAdaptGrowth(model, cfg)
    model2, cfg2 = _mlp(total_steps=4, block_ranks={"fc1": [8], "fc2": [8]})
    assert more.grow(model2, "default", [(p, l.adapters["default"]) for p, l in peftkit.adapted_layers(model2)],
                     2, opt) == []


def test_parameter_count_at_init_and_with_uniform_blocks() -> None:
    model, cfg = _mlp(block_ranks={"fc1": [2, 2, 2]})
    r, dr = 6, 2  # uniform blocks: Σ_k 2·Δr·r_k = r² + r·Δr
    assert TriAdaptLora.expected_params(model.fc1.host, cfg) == r * (16 + 32) + r * r + r * dr
    assert TriAdaptLora.expected_params(model.fc2.host, cfg) == 1 * (32 + 16) + 2  # init: rank 1, C 1×1 twice
    assert peftkit.summary(model).trainable == r * 48 + r * r + r * dr + 48 + 2


def test_orthogonality_loss_matches_the_reference() -> None:
    model, cfg = _mlp(orth_reg=0.3, block_ranks={"fc1": [1, 2]})
    perturb(model, seed=9)
    proc = TriAdaptGrowth(model, cfg)
    ref = 0.0
    for a in _ads(model):
        aa = torch.cat(list(a.lora_A), 0)
        bb = torch.cat(list(a.lora_B), 1)
        eye = torch.eye(aa.shape[0])
        ref = ref + torch.linalg.matrix_norm(aa @ aa.t() - eye) + torch.linalg.matrix_norm(bb.t() @ bb - eye)
    loss = proc.extra_loss(model, None, None)
    _close(loss, 0.3 * ref / 4)  # mean over the 2·M = 4 factor matrices (author code)
    loss.backward()
    ad = model.fc1.adapters["default"]
    assert ad.lora_A[1].grad.abs().sum() > 0 and ad.lora_B[0].grad.abs().sum() > 0
    assert ad.lora_C_row[0].grad is None
    m0, c0 = _mlp(orth_reg=0.0)
    assert TriAdaptGrowth(m0, c0).extra_loss(m0, None, None) is None


# -- persistence ------------------------------------------------------------------------------------------------------
def test_save_load_after_growth(tmp_path) -> None:
    model, cfg = _mlp(total_steps=6)
    perturb(model, seed=10)
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=1e-2)
    train(model, _pairs(), steps=6, optimizer=opt, procedures=[TriAdaptGrowth(model, cfg)], progress=False)
    blocks = [a.blocks for a in _ads(model)]
    assert max(len(b) for b in blocks) > 1
    x = _x(5, 16)
    model.eval()
    y = model(x)
    peftkit.save(model, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["config"]["block_ranks"] == {p: b for p, b in zip(["fc1", "fc2"], blocks) if len(b) > 1}
    fresh = MODELS["mlp"].build()
    peftkit.load(fresh, tmp_path / "ad")
    assert [a.blocks for a in _ads(fresh)] == blocks
    assert torch.equal(fresh(x), y)
    assert peftkit.summary(fresh).adapters["default"] == peftkit.summary(model).adapters["default"]
    # without the record the saved tensors have no place in a freshly built adapter: refused, nothing changed
    saved["config"]["block_ranks"] = {}
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(saved))
    w = tmp_path / "ad" / "adapter_model.safetensors"  # drop the unit checksums, else they refuse the edit first
    save_file(load_file(str(w)), str(w))
    other = MODELS["mlp"].build()
    before = state_copy(other)
    with pytest.raises(peftkit.PeftkitError, match=r"tensor 'adapter\.fc\d\.lora_\w+\.1'"):
        peftkit.load(other, tmp_path / "ad")
    assert same_state(before, state_copy(other)) and peftkit.adapter_names(other) == []


# -- errors -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,match", [
    ({"init_rank": 0}, "init_rank"),
    ({"growth_rank": 0}, "growth_rank"),
    ({"interval": 0}, "interval"),
    ({"target_total_rank": 0}, "target_total_rank"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"total_steps": 5, "warmup_steps": 5}, "total_steps"),
    ({"orth_reg": -0.1}, "orth_reg"),
    ({"schedule": "cubic"}, "schedule"),
    ({"block_ranks": {"fc1": []}}, "block_ranks"),
    ({"block_ranks": {"fc1": [2, 0]}}, "block_ranks"),
])
def test_bad_config(fields: dict, match: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match=match):
        peftkit.config("triadaptlora", target_modules=["fc1"], **fields)


def test_procedure_errors_change_nothing() -> None:
    model, cfg = _mlp()  # no total_steps
    with pytest.raises(peftkit.PeftkitError, match="total_steps"):
        TriAdaptGrowth(model, cfg).on_train_start(model, None)
    model, cfg = _mlp(total_steps=10)
    perturb(model, seed=11)
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="optimiser"):
        TriAdaptGrowth(model, cfg).on_step_end(model, 0, None)
    assert same_state(before, state_copy(model)) and cfg.block_ranks == {}
    # two adapters built from one config object: growth would record both in it
    peftkit.adapt(model, cfg, name="other")
    peftkit.set_active(model, "default")
    before = state_copy(model)
    opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=0.1)
    with pytest.raises(peftkit.PeftkitError, match="share one config"):
        TriAdaptGrowth(model, cfg).on_step_end(model, 0, opt)
    assert same_state(before, state_copy(model)) and cfg.block_ranks == {}
    with pytest.raises(peftkit.PeftkitError, match="no TriAdaptLoRA adapter"):
        TriAdaptGrowth().on_step_end(MODELS["mlp"].build(), 0, opt)


def test_registered_with_its_procedure() -> None:
    info = peftkit.get_method("triadaptlora")
    assert info.procedure is TriAdaptGrowth and info.mergeable and info.init_is_identity


def test_total_steps_defaults_to_the_run_length_the_trainer_gives() -> None:
    """`peftkit train --method triadaptlora` without `--opt total_steps`: T is the run's length."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    model, cfg = _mlp(perturbed=True)  # no total_steps
    proc = TriAdaptGrowth(model, cfg)
    train(model, batches, steps=6, lr=1e-2, procedures=[proc], progress=False)
    assert proc.run_steps == 6 and proc._total(cfg, "default") == 6
    ref_model, ref_cfg = _mlp(perturbed=True, total_steps=6)
    ref = TriAdaptGrowth(ref_model, ref_cfg)
    train(ref_model, batches, steps=6, lr=1e-2, procedures=[ref], progress=False)
    assert proc.events and proc.events == ref.events and cfg.block_ranks == ref_cfg.block_ranks  # T = 6
