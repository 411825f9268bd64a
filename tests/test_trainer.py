"""The plain training loop (hook order, extra loss, schedule, epochs) and the Hugging Face Trainer bridge."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from conformance.models import MLP
from peftkit.train.trainer import accuracy, linear_schedule, train
from tolerance import assert_near


class Recorder(peftkit.Procedure):
    """Records every hook call as (hook, step) and returns ``extra`` (a callable or None) as the extra loss."""

    def __init__(self, extra: Any = None) -> None:
        self.calls: list[tuple[str, int | None]] = []
        self.step: int | None = None
        self.extra = extra
        self.optimizer_seen: list[bool] = []

    def on_train_start(self, model: nn.Module, optimizer: Any = None) -> None:
        self.calls.append(("train_start", None))
        self.optimizer_seen.append(optimizer is not None)

    def on_step_start(self, model: nn.Module, step: int) -> None:
        self.step = step
        self.calls.append(("step_start", step))

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        self.calls.append(("extra_loss", self.step))
        return self.extra(model) if self.extra else None

    def on_step_end(self, model: nn.Module, step: int, optimizer: Any = None) -> None:
        self.calls.append(("step_end", step))
        self.optimizer_seen.append(optimizer is not None)

    def on_train_end(self, model: nn.Module) -> None:
        self.calls.append(("train_end", None))


def _lora_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP()
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc1", "fc2"], r=4, modules_to_save=["head"]))
    return model


def _pairs(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def test_hooks_called_in_order_with_step_numbers() -> None:
    model = _lora_mlp()
    rec = Recorder()
    result = train(model, _pairs(2), steps=3, progress=False, procedures=[rec])
    expected = [("train_start", None)]
    for s in range(3):
        expected += [("step_start", s), ("extra_loss", s), ("step_end", s)]
    expected.append(("train_end", None))
    assert rec.calls == expected
    assert all(rec.optimizer_seen)
    assert result.steps == 3 and result.examples == 24 and len(result.losses) == 3


def test_extra_loss_is_added_to_the_gradient() -> None:
    """With plain SGD (no warmup, no clipping) one step moves θ by −lr·(∇task + ∇extra); extra = c·Σθ² adds
    exactly −lr·2c·θ0 to the update of every trainable tensor."""
    lr, c = 0.1, 0.5
    base = _lora_mlp()
    # make B non-zero so that every factor has a gradient from the task loss too
    with torch.no_grad():
        for p in peftkit.trainable_parameters(base):
            p.add_(0.05 * torch.randn_like(p))
    plain, extra = copy.deepcopy(base), copy.deepcopy(base)
    theta0 = [p.detach().clone() for p in peftkit.trainable_parameters(base)]

    def run(model: nn.Module, procs: list[peftkit.Procedure]) -> list[torch.Tensor]:
        opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=lr)
        train(model, _pairs(1), steps=1, optimizer=opt, warmup=0, max_grad_norm=None, progress=False,
              procedures=procs)
        return [p.detach().clone() for p in peftkit.trainable_parameters(model)]

    def sq_norm(model: nn.Module) -> torch.Tensor:
        return c * sum((p ** 2).sum() for p in peftkit.trainable_parameters(model))

    after_plain = run(plain, [])
    after_extra = run(extra, [Recorder(sq_norm)])
    assert len(after_plain) == len(theta0) > 0
    for t0, a, b in zip(theta0, after_plain, after_extra):
        torch.testing.assert_close(b - a, -lr * 2 * c * t0, rtol=1e-4, atol=1e-6)


def test_training_lowers_the_loss_and_touches_only_adapter_weights() -> None:
    model = _lora_mlp().eval()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = _pairs(4)
    result = train(model, data, steps=60, lr=1e-2, progress=False)
    assert sum(result.losses[-4:]) < 0.7 * sum(result.losses[:4])
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    acc, correct, total = accuracy(model, data)
    assert total == 32 and acc == correct / 32 and acc > 0.5
    assert model.training is False  # train() and accuracy() restore the mode the model had


def test_reiterates_an_iterable_but_not_an_iterator() -> None:
    data = _pairs(3)
    assert train(_lora_mlp(), data, steps=7, progress=False).steps == 7
    assert train(_lora_mlp(), iter(data), steps=7, progress=False).steps == 3


def test_schedule_warms_up_then_decays_to_zero() -> None:
    f = linear_schedule(10, 2)
    values = [f(i) for i in range(10)]
    assert values[0] < values[1] < values[2] == 1.0
    assert all(a > b for a, b in zip(values[2:], values[3:]))
    assert values[-1] == pytest.approx(1 / 8)
    assert linear_schedule(100, 0.1)(9) < 1.0 and linear_schedule(100, 0.1)(10) == 1.0


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(peftkit.PeftkitError, match="no trainable parameters"):
        train(MLP().requires_grad_(False), _pairs(1), steps=1, progress=False)
    with pytest.raises(peftkit.PeftkitError, match="steps must be"):
        train(_lora_mlp(), _pairs(1), steps=0, progress=False)
    with pytest.raises(peftkit.PeftkitError, match="loss became nan"):
        train(_lora_mlp(), _pairs(1), steps=2, progress=False,
              procedures=[Recorder(lambda m: torch.tensor(float("nan")))])


# -- Hugging Face Trainer bridge -------------------------------------------------------------------------------
def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["query", "value"], r=4,
                                        modules_to_save=["classifier"]))
    return model


def _hf_dataset(n: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 50, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(n)]


def _hf_train(tmp_path: Any, model: nn.Module, procs: list[peftkit.Procedure], mixin: bool) -> Any:
    from transformers import Trainer, TrainingArguments

    from peftkit.train.hf import ProcedureLossMixin, as_trainer_callback

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                             learning_rate=1e-3)
    if mixin:
        class ProcTrainer(ProcedureLossMixin, Trainer):
            pass

        trainer = ProcTrainer(model=model, args=args, train_dataset=_hf_dataset(), procedures=procs)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=_hf_dataset(), callbacks=[as_trainer_callback(procs)])
    trainer.train()
    return trainer


def test_hf_callback_drives_the_hooks(tmp_path: Any) -> None:
    rec = Recorder(lambda m: torch.tensor(0.0))
    model = _tiny_bert()
    before = {k: v.clone() for k, v in peftkit.adapter_state_dict(model).items()}
    trainer = _hf_train(tmp_path, model, [rec], mixin=False)
    hooks = [c for c in rec.calls if c[0] != "extra_loss"]
    expected = [("train_start", None)] + [h for s in range(3) for h in (("step_start", s), ("step_end", s))]
    assert hooks == expected + [("train_end", None)]
    assert not any(c[0] == "extra_loss" for c in rec.calls)  # a callback cannot add a loss term
    assert all(rec.optimizer_seen)
    after = peftkit.adapter_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the adapter trained
    assert trainer.state.global_step == 3


def test_hf_mixin_adds_the_extra_loss(tmp_path: Any) -> None:
    big = 50.0
    plain = _hf_train(tmp_path / "a", _tiny_bert(), [Recorder()], mixin=True)
    rec = Recorder(lambda m: torch.tensor(big))
    extra = _hf_train(tmp_path / "b", _tiny_bert(), [rec], mixin=True)
    plain_losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    extra_losses = [h["loss"] for h in extra.state.log_history if "loss" in h]
    assert len(plain_losses) == len(extra_losses) == 3
    for a, b in zip(plain_losses, extra_losses):
        assert b == pytest.approx(a + big, abs=1e-3)
    assert [c[1] for c in rec.calls if c[0] == "extra_loss"] == [0, 1, 2]
    assert [c for c in rec.calls if c[0] in ("train_start", "train_end")] == [("train_start", None),
                                                                             ("train_end", None)]


# -- DyLoRA's rank sampling through both trainers ----------------------------------------------------------------
class _RankSpy(peftkit.Procedure):
    """Listed after the sampler: at each step start, snapshots one layer's A and B and the sampled rank; at step end
    records which rows of A / columns of B the optimiser moved."""

    def __init__(self, sampler: Any, layer: Any) -> None:
        self.sampler, self.layer = sampler, layer
        self.ranks: list[int] = []
        self.moved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _ad(self) -> Any:
        return self.layer.adapters["default"]

    def on_step_start(self, model: nn.Module, step: int) -> None:
        self.ranks.append(self.sampler.rank)
        assert self._ad().rank == self.sampler.rank
        self.a0, self.b0 = self._ad().lora_A.detach().clone(), self._ad().lora_B.detach().clone()

    def on_step_end(self, model: nn.Module, step: int, optimizer: Any = None) -> None:
        ad = self._ad()
        self.moved.append(((ad.lora_A.detach() != self.a0).any(1), (ad.lora_B.detach() != self.b0).any(0)))


def _check_dylora_run(spy: _RankSpy, r: int, steps: int) -> None:
    assert len(spy.ranks) == steps and all(1 <= b <= r for b in spy.ranks)
    assert len(set(spy.ranks)) > 1  # the rank is re-sampled every step
    for b, (rows, cols) in zip(spy.ranks, spy.moved):  # frozen mode + plain SGD: only row / column b-1 moves
        assert torch.equal(rows, torch.arange(r) == b - 1) and torch.equal(cols, torch.arange(r) == b - 1)
    assert spy._ad().rank == r  # back to the full rank (eval_rank unset) after training


def test_dylora_sampler_in_the_project_trainer() -> None:
    from peftkit.methods.dylora import DyLoRASampler

    torch.manual_seed(0)
    model = MLP()
    # the official frozen mode ("auto", the default, picks full for 8 steps)
    cfg = peftkit.config("dylora", target_modules=["fc1", "fc2"], r=4, modules_to_save=["head"], mode="frozen")
    peftkit.adapt(model, cfg)
    with torch.no_grad():  # B ≠ 0 so that A's rows get gradients from the first step
        for p in peftkit.trainable_parameters(model):
            p.normal_(0, 0.1)
    sampler = DyLoRASampler(model, cfg, seed=1)
    spy = _RankSpy(sampler, model.fc1)
    opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=0.05)
    train(model, _pairs(), steps=8, optimizer=opt, procedures=[sampler, spy], progress=False, max_grad_norm=None)
    _check_dylora_run(spy, 4, 8)


def test_dylora_sampler_in_transformers_trainer(tmp_path: Any) -> None:
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from peftkit.methods.dylora import DyLoRASampler
    from peftkit.train.hf import as_trainer_callback

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=32, num_labels=2))
    cfg = peftkit.config("dylora", target_modules=["query", "value"], r=4, modules_to_save=["classifier"],
                         mode="frozen")
    peftkit.adapt(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora" in n:
                p.normal_(0, 0.1)
    sampler = DyLoRASampler(model, cfg, seed=2)
    spy = _RankSpy(sampler, model.bert.encoder.layer[0].attention.self.query)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, max_grad_norm=0.0)
    opt = torch.optim.SGD(peftkit.trainable_parameters(model), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    Trainer(model=model, args=args, train_dataset=_hf_dataset(), optimizers=(opt, sched),
            callbacks=[as_trainer_callback([sampler, spy])]).train()
    _check_dylora_run(spy, 4, 6)
    # the trained adapter saves and reloads, and evaluates at any rank b <= r without retraining
    peftkit.save(model, tmp_path / "dy")
    torch.manual_seed(0)
    fresh = BertForSequenceClassification(model.config)
    peftkit.load(fresh, tmp_path / "dy")
    x = torch.randint(5, 50, (3, 8))
    model.eval(), fresh.eval()
    from peftkit.methods.dylora import set_rank

    for b in (1, 3):
        set_rank(model, b), set_rank(fresh, b)
        assert_near(fresh(input_ids=x).logits, model(input_ids=x).logits, 64, layers=6)


def test_head_param_groups_put_the_saved_head_at_its_own_lr() -> None:
    from peftkit.train.trainer import head_param_groups

    model = _tiny_bert()  # LoRA on query/value, classifier in modules_to_save
    groups = head_param_groups(model, 1e-4, 5e-3)
    assert [g["lr"] for g in groups] == [1e-4, 5e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    adapter = {names[id(p)] for p in groups[0]["params"]}
    head = {names[id(p)] for p in groups[1]["params"]}
    assert head == {"classifier.copies.default.weight", "classifier.copies.default.bias"}
    assert adapter and all("lora_" in n for n in adapter)
    assert len(adapter) + len(head) == len(peftkit.trainable_parameters(model))
    # the schedule scales both groups; after one step each group moved by its own lr (Adam: |Δ| ≈ lr)
    opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = {"input_ids": torch.randint(5, 50, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    train(model, [batch], steps=1, optimizer=opt, warmup=0, progress=False, max_grad_norm=None)
    step = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad}
    assert step["classifier.copies.default.weight"] == pytest.approx(5e-3, rel=0.05)
    assert max(v for n, v in step.items() if "lora_B" in n) == pytest.approx(1e-4, rel=0.05)
