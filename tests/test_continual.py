"""Continual learning: LAE's EMA and ensemble, ConPET's replay and selector, the ACC/BWT/FWT protocol, the learner."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import peftkit
from conformance.models import MLP
from peftkit.continual import (
    EMA,
    LAE,
    NEG,
    ContinualLearner,
    ContinualResult,
    DynamicConPET,
    ReplayMemory,
    Sequential,
    StaticConPET,
    Task,
    default_collate,
    max_prob_ensemble,
    replay_batches,
    results_markdown,
)
from peftkit.continual.ema import _named_adapter_params
from peftkit.core.errors import PeftkitError
from tolerance import assert_near


def _cfg() -> peftkit.AdapterConfig:
    return peftkit.config("lora", target_modules=["fc1", "fc2"], r=4, modules_to_save=["head"])


def _data(classes: tuple[int, ...], n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """Gaussian blobs: class c is centred at 3·e_c in R^16."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        c = classes[i % len(classes)]
        x = torch.randn(16, generator=g) * 0.5
        x[c] += 3.0
        out.append((x, c))
    return out


def _tasks() -> list[Task]:
    return [Task("a", (0, 1), _data((0, 1), 32, 0), _data((0, 1), 16, 1)),
            Task("b", (2, 3), _data((2, 3), 32, 2), _data((2, 3), 16, 3))]


def _model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


# -- LAE ----------------------------------------------------------------------------------------------------------
def test_ema_update_equals_formula_and_head_is_shared() -> None:
    model = _model()
    peftkit.adapt(model, _cfg(), "online")
    peftkit.adapt(model, _cfg(), "offline", activate=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    on = {k: p.detach().clone() for k, (p, _) in _named_adapter_params(model, "online").items()}
    off = {k: p.detach().clone() for k, (p, _) in _named_adapter_params(model, "offline").items()}
    d = 0.9
    EMA("online", "offline", d).update(model)
    after = _named_adapter_params(model, "offline")
    assert len(after) == len(on) > 2
    for k, (p, saved) in after.items():
        want = on[k] if saved else d * off[k] + (1 - d) * on[k]
        assert_near(p.detach(), want, 2, layers=1)  # d·off + (1 − d)·on: a 2-term sum
    assert any(saved for _, saved in after.values()) and not all(saved for _, saved in after.values())
    # decay 1 keeps the offline PET fixed (the shared head still follows the online one)
    before = {k: p.detach().clone() for k, (p, _) in _named_adapter_params(model, "offline").items()}
    EMA("online", "offline", 1.0, share_saved=False).update(model)
    for k, (p, _) in _named_adapter_params(model, "offline").items():
        assert torch.equal(p, before[k])


def test_ema_rejects_mismatched_adapters() -> None:
    model = _model()
    peftkit.adapt(model, _cfg(), "online")
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc1", "fc2"], r=2, modules_to_save=["head"]), "off")
    with pytest.raises(PeftkitError, match="shape"):
        EMA("online", "off").update(model)
    with pytest.raises(PeftkitError, match="decay"):
        EMA("online", "off", 1.5)


def test_ensemble_takes_the_max_probability() -> None:
    a = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.1, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    p = max_prob_ensemble(a, b)
    torch.testing.assert_close(p, torch.maximum(a.softmax(-1), b.softmax(-1)))
    assert p.argmax(-1).tolist() == [0, 2]  # the confident model wins each row
    torch.testing.assert_close(max_prob_ensemble(a, a), a.softmax(-1))  # θ_off = θ_on: the single model
    mask = torch.tensor([False, True, True])
    p = max_prob_ensemble(a, b, mask=mask)
    assert p[:, 0].eq(0).all() and p.argmax(-1).tolist() == [1, 2]


# -- ConPET replay ------------------------------------------------------------------------------------------------
def test_replay_memory_respects_its_size_and_shares_it_evenly() -> None:
    mem = ReplayMemory(31, seed=0)
    for k in range(3):
        mem.add(k, [(torch.zeros(1), 100 * k + i) for i in range(50)])
        assert len(mem) <= 31
    assert [len(mem.examples(k)) for k in range(3)] == [10, 10, 10]
    assert all(y // 100 == k for k in range(3) for _, y in mem.examples(k))
    with pytest.raises(PeftkitError, match="never stored"):
        mem.examples(7)
    with pytest.raises(PeftkitError, match="already"):
        mem.add(0, [(torch.zeros(1), 0)])


def test_replay_batches_composition_and_balance_over_past_tasks() -> None:
    mem = ReplayMemory(60, seed=0)
    for k in range(3):
        mem.add(k, [(torch.zeros(2), k) for _ in range(40)])
    new = [(torch.zeros(2), 9) for _ in range(24)]
    batches = list(replay_batches(new, mem, batch_size=8, steps=600, ratio=1.0, seed=1))
    assert len(batches) == 600
    counts: Counter[int] = Counter()
    for _, y in batches:
        assert int((y == 9).sum()) == 4  # n_new = int(8·1/2)
        counts.update(y[y != 9].tolist())
    total = sum(counts.values())
    assert total == 600 * 4 and set(counts) == {0, 1, 2}
    assert all(abs(c / total - 1 / 3) < 0.03 for c in counts.values())  # uniform over past tasks
    # ratio 3: n_new = int(8·3/4) = 6; new examples without replacement: every 24 new ones are all distinct
    new = [(torch.tensor([float(i), 0.0]), 9) for i in range(24)]
    xs = torch.cat([x[y == 9, 0] for x, y in replay_batches(new, mem, batch_size=8, steps=4, ratio=3.0)])
    assert len(xs) == 24 and sorted(xs.tolist()) == list(range(24))
    # no memory yet: the whole batch is new
    _, y = next(replay_batches(new, None, batch_size=8, steps=1))
    assert y.eq(9).all()


# -- ConPET dynamic ----------------------------------------------------------------------------------------------
def _dynamic() -> tuple[MLP, DynamicConPET]:
    model = _model()
    method = DynamicConPET(memory_size=16)
    ContinualLearner(model, _cfg(), method, _tasks(), num_classes=4)
    method.begin_task(0)
    method.begin_task(1)
    return model, method


@pytest.mark.parametrize("planted", [0, 1])
def test_selector_routes_to_the_planted_task_module(planted: int) -> None:
    model, method = _dynamic()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        head = model.head.copies["selector"]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
        head.bias[planted] = 10.0
    x = torch.randn(5, 16)
    picks = method.select(model, x)
    assert picks.tolist() == [[planted]] * 5
    scores = method.assemble(model, x, picks)
    with peftkit.mixed_batch(model, [f"task{planted}"] * 5):
        expert = model(x)
    own = list(method.tasks[planted].classes)
    other = list(method.tasks[1 - planted].classes)
    torch.testing.assert_close(scores[:, own], expert[:, own])
    assert scores[:, other].eq(NEG).all()  # unselected tasks keep the constant
    # teacher forcing: labels of the other task force their module in
    labels = torch.tensor([other[0]] * 5)
    assert method.select(model, x, labels).tolist() == [[1 - planted]] * 5


def test_dynamic_training_step_leaves_old_modules_without_gradient() -> None:
    model, method = _dynamic()
    peftkit.set_active(model, "task1")
    x, y = default_collate(_tasks()[0].train[:4] + _tasks()[1].train[:4])
    loss, _ = method.loss(model, (x, y))
    loss.backward()
    grads = {k: p.grad for k, (p, _) in _named_adapter_params(model, "task1").items()}
    assert all(g is not None for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())
    for name in ("task0", "selector"):
        assert all(p.grad is None for p, _ in _named_adapter_params(model, name).values())


# -- the protocol --------------------------------------------------------------------------------------------------
def test_acc_bwt_fwt_on_a_hand_made_matrix() -> None:
    r = ContinualResult("m", ["a", "b", "c"],
                        [[0.9, 0.3, 0.2], [0.6, 0.8, 0.4], [0.5, 0.7, 0.9]], [0.5, 0.25, 0.1])
    assert r.average_accuracy == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert r.backward_transfer == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert r.forward_transfer == pytest.approx(((0.3 - 0.25) + (0.4 - 0.1)) / 2)
    assert r.average_incremental_accuracy == pytest.approx((0.9 + (0.6 + 0.8) / 2 + 2.1 / 3) / 3)
    md = results_markdown([r])
    assert "| m | 0.700 |" in md and "-0.250" in md and "+0.175" in md
    assert r.matrix_markdown().count("\n") == 5
    with pytest.raises(PeftkitError, match="3×3"):
        ContinualResult("m", ["a", "b", "c"], [[0.1]], [0.0])


@pytest.mark.parametrize("method", [Sequential, StaticConPET, DynamicConPET, LAE])
def test_learner_runs_a_two_task_sequence(method: type) -> None:
    torch.set_num_threads(1)
    model = _model()
    kwargs = {"memory_size": 16} if method in (StaticConPET, DynamicConPET) else {}
    if method is LAE:
        kwargs = {"decay": 0.9, "freeze_steps": 5}
    m = method(**kwargs)
    learner = ContinualLearner(model, _cfg(), m, _tasks(), num_classes=4, steps=40, batch_size=8, lr=1e-2)
    result = learner.run()
    assert len(result.matrix) == 2 and all(len(r) == 2 for r in result.matrix)
    assert all(0.0 <= a <= 1.0 for r in result.matrix for a in r)
    assert result.matrix[0][0] > 0.8  # the blobs are separable: task a is learnt
    assert learner.evaluate(1, within_task=True) > 0.8  # and so is task b, within its classes
    if method is not LAE:  # LAE's CE over new classes alone leaves old logits uncalibrated on this tiny MLP
        assert result.matrix[1][1] > 0.8
    names = set(peftkit.adapter_names(model))
    want = {Sequential: {"pet"}, StaticConPET: {"pet"}, LAE: {"online", "offline"},
            DynamicConPET: {"selector", "task0", "task1"}}[method]
    assert names == want
    if method is StaticConPET:
        assert m.memory is not None and len(m.memory) <= 16 and m.memory.tasks() == [0, 1]
    with pytest.raises(PeftkitError, match="task id 5"):
        learner.evaluate(5)
    with pytest.raises(PeftkitError, match="unknown task"):
        learner.evaluate("zzz")


def test_lae_freezes_the_pet_for_the_first_steps_of_later_tasks() -> None:
    model = _model()
    m = LAE(decay=0.5, freeze_steps=3)
    learner = ContinualLearner(model, _cfg(), m, _tasks(), num_classes=4, steps=3, batch_size=8)
    m.begin_task(0)
    m.train_task(0, steps=3, batch_size=8, lr=1e-2, seed=0)
    m.begin_task(1)
    pet = {k: p.detach().clone() for k, (p, s) in _named_adapter_params(model, "online").items() if not s}
    m.train_task(1, steps=3, batch_size=8, lr=1e-2, seed=1)
    for k, (p, s) in _named_adapter_params(model, "online").items():
        if not s:
            assert torch.equal(p, pet[k]) and p.requires_grad
    assert learner.evaluate(1) >= 0.0


def test_lae_keeps_a_factor_its_method_freezes_frozen_after_the_head_only_phase() -> None:
    """MiCA's B is saved but never trained: LAE's freeze/unfreeze of the online PET must leave it alone."""
    model = _model()
    cfg = peftkit.config("lora", target_modules=["fc1", "fc2"], r=4, init="mica", modules_to_save=["head"])
    m = LAE(decay=0.5, freeze_steps=1)
    ContinualLearner(model, cfg, m, _tasks(), num_classes=4, steps=2, batch_size=8)
    m.begin_task(0)
    start = {k: p.detach().clone() for k, (p, s) in _named_adapter_params(model, "online").items() if not s}
    m.train_task(0, steps=2, batch_size=8, lr=1e-2, seed=0)
    m.begin_task(1)
    m.train_task(1, steps=3, batch_size=8, lr=1e-2, seed=1)
    online = {k: p for k, (p, s) in _named_adapter_params(model, "online").items() if not s}
    b_keys = [k for k in online if k.endswith(("lora_B", "lora_B.original"))]  # LAE parametrises B (its scaler)
    assert b_keys and all(torch.equal(online[k], start[k]) and not online[k].requires_grad for k in b_keys)
    assert any(not torch.equal(online[k], start[k]) for k in online if k.endswith("lora_A"))


def test_bad_sequences_are_rejected_and_the_model_is_unchanged() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = _tasks()
    overlap = [tasks[0], Task("c", (1, 2), _data((1, 2), 8, 4), _data((1, 2), 8, 5))]
    with pytest.raises(PeftkitError, match="share class 1"):
        ContinualLearner(model, _cfg(), Sequential(), overlap, num_classes=4)
    with pytest.raises(PeftkitError, match="not among its classes"):
        ContinualLearner(model, _cfg(), Sequential(), [Task("d", (0,), _data((0, 1), 8, 6), _data((0,), 4, 7))],
                         num_classes=4)
    with pytest.raises(PeftkitError, match="outside the head"):
        ContinualLearner(model, _cfg(), Sequential(), [Task("e", (4,), [(torch.zeros(16), 4)],
                                                            [(torch.zeros(16), 4)])], num_classes=4)
    with pytest.raises(PeftkitError, match="modules_to_save"):
        ContinualLearner(model, peftkit.config("lora", target_modules=["fc1"]), Sequential(), tasks, num_classes=4)
    assert not peftkit.adapter_names(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    m = Sequential()
    ContinualLearner(model, _cfg(), m, tasks, num_classes=4)
    with pytest.raises(PeftkitError, match="task id 3"):
        m.begin_task(3)
    with pytest.raises(PeftkitError, match="expected task 0"):
        m.begin_task(1)
    assert not peftkit.adapter_names(model)


def test_task_incremental_setting_evaluates_within_each_task() -> None:
    torch.set_num_threads(1)
    model = _model()
    with pytest.raises(PeftkitError, match="setting"):
        ContinualLearner(model, _cfg(), Sequential(), _tasks(), num_classes=4, setting="domain")
    learner = ContinualLearner(model, _cfg(), LAE(decay=0.9), _tasks(), num_classes=4, steps=40, batch_size=8,
                               lr=1e-2, setting="task")
    result = learner.run()
    assert result.matrix[1][1] == learner.evaluate(1, within_task=True) > 0.8
    assert result.matrix[1][0] == learner.evaluate(0, within_task=True)


def test_old_import_path_reexports_the_package() -> None:
    import peftkit.continual as new
    import peftkit.train.continual as old

    assert set(old.__all__) == set(new.__all__) and len(new.__all__) > 10
    for name in new.__all__:
        assert getattr(old, name) is getattr(new, name)


# -- LAE: when the offline PET is made, how long a new task trains the head alone (issue 21 item 1) ---------------
def test_lae_offline_pet_is_made_when_task_1_starts_from_the_pet_trained_on_task_0() -> None:
    torch.set_num_threads(1)
    model = _model()
    m = LAE(decay=0.9999)
    learner = ContinualLearner(model, _cfg(), m, _tasks(), num_classes=4)
    m.begin_task(0)
    assert peftkit.adapter_names(model) == ["online"]  # no offline PET and no ensemble during task 0
    assert m.procedures() == [m]
    init = {k: p.detach().clone() for k, (p, s) in _named_adapter_params(model, "online").items() if not s}
    m.train_task(0, steps=20, batch_size=8, lr=1e-2, seed=0)
    m.end_task(0)
    trained = {k: p.detach().clone() for k, (p, s) in _named_adapter_params(model, "online").items() if not s}
    moved = max(float((trained[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-2  # task 0 changed the PET
    x, _ = default_collate(_tasks()[0].eval)
    allowed = m.class_mask(m.seen_classes())
    with torch.no_grad():
        scores = m.scores(model, x, allowed)
        torch.testing.assert_close(scores, model(x).masked_fill(~allowed, float("-inf")).softmax(-1))
    assert learner.evaluate(0) > 0.8
    m.begin_task(1)
    assert set(peftkit.adapter_names(model)) == {"online", "offline"}
    assert m.ema in m.procedures()
    for k, (p, s) in _named_adapter_params(model, "offline").items():
        if not s:
            assert torch.equal(p, trained[k])  # the copy is the trained PET, not the initial one


def test_lae_default_trains_the_head_alone_for_the_official_share_of_later_tasks() -> None:
    torch.set_num_threads(1)
    model = _model()
    m = LAE()
    ContinualLearner(model, _cfg(), m, _tasks(), num_classes=4)
    seen: list[bool] = []

    def spy(model: torch.nn.Module, step: int, optimizer: object = None) -> None:
        seen.append(all(p.requires_grad for p in m._online_pet()))

    m.on_step_end = spy  # type: ignore[method-assign]
    m.begin_task(0)
    m.train_task(0, steps=10, batch_size=8, lr=1e-2, seed=0)
    assert seen == [True] * 10  # task 0: the PET trains from the first step
    seen.clear()
    m.begin_task(1)
    m.train_task(1, steps=10, batch_size=8, lr=1e-2, seed=1)
    assert seen == [False] * 6 + [True] * 4  # official: 3 of 5 epochs head-only
    assert all(p.requires_grad for p in m._online_pet())
    with pytest.raises(PeftkitError, match="freeze"):
        LAE(freeze=1.0)


def test_dynamic_conpet_top1_expert_trains_on_new_and_replayed_examples() -> None:
    """Official ConPET trains the expert over the same dynamic-replay loader as the selector (new + replayed)."""
    torch.set_num_threads(1)
    model = _model()
    m = DynamicConPET(memory_size=16, topk=1)
    learner = ContinualLearner(model, _cfg(), m, _tasks(), num_classes=4, steps=4, batch_size=8, lr=1e-2)
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    loss = m.loss

    def spy(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, object]:
        seen[m._training_selector].append(batch[1].clone())
        return loss(model, batch)

    m.loss = spy  # type: ignore[method-assign]
    learner.run()
    assert len(seen[True]) == 4 and len(seen[False]) == 8  # task 1: selector 4 steps; experts 4 + 4 steps
    expert1 = torch.cat(seen[False][4:])
    assert int((expert1 < 2).sum()) == 4 * 4  # n_new = int(8·1/2) = 4: the other 4 of each batch are replayed


# -- LAE's learnable PET output scaler (official Scaler(None) on each LoRA update) --------------------------------
def _by_hand(x: torch.Tensor, base: MLP, pets: dict, scales: dict, head: torch.nn.Module) -> torch.Tensor:
    """The MLP with fc_i(x) = x·W_iᵀ + b_i + (α/r)·s_i·(x·A_iᵀ)·B_iᵀ, from the plain tensors."""
    def fc(name: str, h: torch.Tensor) -> torch.Tensor:
        lin, (a, b, c) = getattr(base, name), pets[name]
        return torch.nn.functional.linear(h, lin.weight, lin.bias) + c * scales[name] * ((h @ a.t()) @ b.t())

    return head(fc("fc2", torch.tanh(fc("fc1", x))))


def test_lae_scales_each_lora_update_by_its_own_learnt_scalar() -> None:
    from peftkit.continual.lae import lora_pets

    model, method = _model(), LAE(decay=0.9, freeze=0.0)
    ContinualLearner(model, _cfg(), method, _tasks(), num_classes=4, steps=2, batch_size=8)
    method.begin_task(0)
    pets = dict(zip(("fc1", "fc2"), lora_pets(model, "online")))
    scales = method.scales("online")
    assert len(scales) == 2 and all(float(s.detach()) == 1.0 and s.requires_grad for s in scales)
    with torch.no_grad():  # a non-zero B and scalars away from 1
        for s, pet in zip((-0.7, 1.9), pets.values()):
            pet.parametrizations.lora_B.original.normal_()
            pet.parametrizations.lora_B[0].scale.fill_(s)
    x = torch.randn(6, 16)
    model.train()
    y = model(x)
    (y ** 2).sum().backward()
    # the same function and the same ∂/∂s from the plain tensors
    ref_s = {n: torch.tensor(v, requires_grad=True) for n, v in (("fc1", -0.7), ("fc2", 1.9))}
    plain = {n: (p.lora_A.detach(), p.parametrizations.lora_B.original.detach(), p.s) for n, p in pets.items()}
    head = model.head.copies["online"]
    y_ref = _by_hand(x, _model(), plain, ref_s, head)
    (y_ref ** 2).sum().backward()
    assert_near(y.detach(), y_ref.detach(), 32, layers=3)
    for name, s in zip(("fc1", "fc2"), scales):
        assert s.grad is not None and float(s.grad.abs()) > 0
        assert_near(s.grad, ref_s[name].grad, 6 * 32, layers=6)
    assert LAE(scaler=False).scaler is False


def test_lae_offline_pet_copies_and_averages_the_scalars() -> None:
    model, method = _model(), LAE(decay=0.9, freeze=0.0)
    learner = ContinualLearner(model, _cfg(), method, _tasks(), num_classes=4, steps=4, batch_size=8, lr=5e-2)
    method.begin_task(0)
    method.train_task(0, steps=4, batch_size=8, lr=5e-2, seed=0)
    method.end_task(0)
    online = [float(s.detach()) for s in method.scales("online")]
    assert all(abs(s - 1.0) > 1e-4 for s in online)  # trained
    method.begin_task(1)
    assert [float(s.detach()) for s in method.scales("offline")] == online  # the offline PET starts as the trained one
    assert not any(s.requires_grad for s in method.scales("offline"))
    keys = [k for k in _named_adapter_params(model, "offline") if k.endswith(".scale")]
    assert len(keys) == 2  # EMA'd with the rest of the PET
    method.ema.update(model)
    now_on = [float(s.detach()) for s in method.scales("online")]
    for off, before, on in zip(method.scales("offline"), online, now_on):
        assert abs(float(off.detach()) - (0.9 * before + 0.1 * on)) < 1e-6
    assert learner.evaluate(0) >= 0.0


def test_lae_saves_its_pets_with_the_scalars_folded_in(tmp_path) -> None:
    from peftkit.continual.lae import lora_pets

    model, method = _model(), LAE(decay=0.9, freeze=0.0)
    learner = ContinualLearner(model, _cfg(), method, _tasks(), num_classes=4, steps=4, batch_size=8, lr=5e-2)
    result = learner.run()
    x = torch.randn(7, 16)
    model.eval()
    with peftkit.mixed_batch(model, ["online"] * 7):
        before = model(x).detach()
    b_before = [p.parametrizations.lora_B.original.detach().clone() for p in lora_pets(model, "online")]
    with method.exported():
        assert method.scales("online") == []
        for name in ("online", "offline"):
            peftkit.save(model, tmp_path / name, name)
    assert [float(s.detach()) for s in method.scales("online")] != [1.0, 1.0]  # restored, still trained values
    for p, b in zip(lora_pets(model, "online"), b_before):
        assert torch.equal(p.parametrizations.lora_B.original, b)
    with peftkit.mixed_batch(model, ["online"] * 7):
        assert torch.equal(model(x), before)
    fresh = _model()
    peftkit.load(fresh, tmp_path / "online")
    fresh.eval()
    assert_near(fresh(x).detach(), before, 32, layers=3)  # a plain LoRA with the same function
    assert len(result.matrix) == 2
