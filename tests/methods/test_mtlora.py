"""MTLoRA (shared/methods/activation-space-and-procedures.md §5 "Sanity"): at init y = y_t = W·x for all t; changing
task t's LoRA changes only y_t; task streams have the shared stream's shapes. Plus: a two-head model on a tiny shared
backbone against a hand-written reference of the official block (y_t = W·x + s_t·B_t·A_t·x_t, task streams through
the block's own residual / norm / GELU), gradients per task, parameter counts, merging the task-agnostic part,
save/load, training both heads, and clear errors that change nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
import peftkit.methods.mtlora as mt
from conformance.models import same_state, state_copy
from peftkit.train import train
from tolerance import assert_near

TASKS = ["cls", "depth"]


class TwoTask(nn.Module):
    """A stem, one pre-norm MLP block and two heads: {"cls": (B, 3), "depth": (B, 1)}."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(8, d)
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.heads = nn.ModuleDict({"cls": nn.Linear(d, 3), "depth": nn.Linear(d, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.stem(x))
        h = h + self.fc2(F.gelu(self.fc1(self.ln(h))))
        return {t: head(h) for t, head in self.heads.items()}


def _model(d: int = 16, perturb: bool = True, **fields) -> TwoTask:
    torch.manual_seed(0)
    model = TwoTask(d).eval()
    cfg = dict(target_modules=["stem", "fc1", "fc2"], tasks=TASKS, task_modules=["fc1", "fc2"], r=4, task_r=2,
               scale=2.0, task_scale=3.0, dropout=0.0, modules_to_save=["heads.cls", "heads.depth"])
    cfg.update(fields)
    peftkit.adapt(model, peftkit.config("mtlora", **cfg))
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in peftkit.trainable_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _x(b: int = 5) -> torch.Tensor:
    return torch.randn(b, 8, generator=torch.Generator().manual_seed(2))


def _lora(layer, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, base_in: torch.Tensor) -> torch.Tensor:
    return F.linear(base_in, layer.base_layer.weight, layer.base_layer.bias) + s * x @ a.t() @ b.t()


def _reference(model: TwoTask, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """The official MT block by hand: y = W·x + s·B·A·x (shared), y_t = W·x + s_t·B_t·A_t·x_t (task t)."""
    ad = {n: getattr(model, n).adapters["default"] for n in ("stem", "fc1", "fc2")}
    stem = ad["stem"]
    h0 = torch.tanh(_lora(model.stem, x, stem.lora_A, stem.lora_B, 2.0, x))
    n = model.ln(h0)
    f1 = _lora(model.fc1, n, ad["fc1"].lora_A, ad["fc1"].lora_B, 2.0, n)
    g = F.gelu(f1)
    h = h0 + _lora(model.fc2, g, ad["fc2"].lora_A, ad["fc2"].lora_B, 2.0, g)
    out = {"shared": {t: model.heads[t].copies["default"](h) for t in TASKS}}
    for t in TASKS:
        f1_t = _lora(model.fc1, n, ad["fc1"].task_A[t], ad["fc1"].task_B[t], 3.0, n)  # x_t = x at the first MT layer
        g_t = F.gelu(f1_t)
        h_t = h0 + _lora(model.fc2, g_t, ad["fc2"].task_A[t], ad["fc2"].task_B[t], 3.0, g)  # W·x: the shared input
        out[t] = {u: model.heads[u].copies["default"](h_t) for u in TASKS}
    return out


def test_init_every_stream_is_the_base() -> None:
    torch.manual_seed(0)
    base = TwoTask().eval()
    model = _model(perturb=False)
    x = _x()
    y0 = base(x)
    outs = mt.forward_tasks(model, x)
    assert list(outs) == ["shared", *TASKS]
    for stream in outs.values():
        for t in TASKS:
            assert_near(stream[t], y0[t], 32, layers=4)  # zero task B / LoRA B vs the bare base: 4 chained layers
            assert stream[t].shape == y0[t].shape  # task streams have the shared stream's shapes


def test_streams_match_the_official_block_by_hand() -> None:
    model = _model()
    x = _x()
    with torch.no_grad():
        outs = mt.forward_tasks(model, x)
        ref = _reference(model, x)
        for s in ref:
            for t in TASKS:
                assert_near(outs[s][t], ref[s][t], 32, layers=4)  # stem, fc1, fc2 (k ≤ 2d = 32), head
        plain = model(x)  # outside a condition block: the shared stream alone
        for t in TASKS:
            assert_near(plain[t], outs["shared"][t], 32, layers=4)
        assert not torch.allclose(outs["cls"]["cls"], outs["depth"]["cls"])
        assert not torch.allclose(outs["cls"]["cls"], outs["shared"]["cls"])


def test_changing_one_tasks_lora_changes_only_its_stream() -> None:
    model = _model()
    x = _x()
    with torch.no_grad():
        before = mt.forward_tasks(model, x)
        model.fc2.adapters["default"].task_B["depth"].add_(0.5)
        model.fc1.adapters["default"].task_A["depth"].add_(0.5)
        after = mt.forward_tasks(model, x)
    for t in TASKS:
        torch.testing.assert_close(after["shared"][t], before["shared"][t], rtol=0, atol=0)
        torch.testing.assert_close(after["cls"][t], before["cls"][t], rtol=0, atol=0)
        assert not torch.allclose(after["depth"][t], before["depth"][t])


def test_task_loss_reaches_its_own_and_the_shared_parameters_only() -> None:
    model = _model()
    outs = mt.forward_tasks(model, _x())
    outs["cls"]["cls"].square().sum().backward()
    for n in ("stem", "fc1", "fc2"):
        a = getattr(model, n).adapters["default"]
        if n == "fc2":  # the last MT layer's shared LoRA is not part of y_t ('matrix' mode)
            assert not a.lora_A.grad.any() and not a.lora_B.grad.any()
        else:  # earlier shared LoRAs reach task t through W·x of the shared stream
            assert a.lora_A.grad.abs().sum() > 0 and a.lora_B.grad.abs().sum() > 0, n
        if n != "stem":
            assert a.task_A["cls"].grad.abs().sum() > 0 and a.task_B["cls"].grad.abs().sum() > 0
            assert not a.task_A["depth"].grad.any() and not a.task_B["depth"].grad.any()
    assert model.heads["depth"].copies["default"].weight.grad is None


def test_parameter_counts() -> None:
    model = _model(perturb=False)
    d = 16
    lora = 4 * ((8 + d) + (d + 2 * d) + (2 * d + d))
    task = 2 * 2 * ((d + 2 * d) + (2 * d + d))
    heads = (d * 3 + 3) + (d + 1)
    assert peftkit.summary(model).trainable == lora + task + heads
    assert not model.stem.adapters["default"].task_A  # TA-only layer
    ref = mt.Mtlora.expected_params(model.fc1.host, peftkit.get_config(model, "default"))
    assert ref == (4 + 2 * 2) * (d + 2 * d)


def test_merge_folds_the_shared_part_and_refuses_streams_while_merged() -> None:
    model = _model()
    x = _x()
    with torch.no_grad():
        outs = mt.forward_tasks(model, x)
        w = model.fc1.base_layer.weight.clone()
        peftkit.merge(model)
        a = model.fc1.adapters["default"]
        torch.testing.assert_close(model.fc1.base_layer.weight, w + 2.0 * a.lora_B @ a.lora_A)
        for t in TASKS:
            assert_near(model(x)[t], outs["shared"][t], 32, layers=4)  # merged weights vs W·x + s·B·A·x
        with pytest.raises(peftkit.PeftkitError, match="merged into 'stem'; unmerge before"):
            mt.forward_tasks(model, x)
        peftkit.unmerge(model)
        again = mt.forward_tasks(model, x)
        for s in outs:
            for t in TASKS:
                assert_near(again[s][t], outs[s][t], 32, layers=4)  # W + ΔW − ΔW rounds: not bit-equal


def test_save_load_reproduces_every_stream(tmp_path) -> None:
    model = _model()
    x = _x()
    with torch.no_grad():
        outs = mt.forward_tasks(model, x)
    peftkit.save(model, tmp_path / "ad")
    torch.manual_seed(0)
    fresh = TwoTask().eval()
    peftkit.load(fresh, tmp_path / "ad")
    with torch.no_grad():
        again = mt.forward_tasks(fresh, x)
    for s in outs:
        for t in TASKS:
            assert torch.equal(again[s][t], outs[s][t])


def test_training_both_heads_in_one_forward() -> None:
    model = _model(perturb=False, dropout=0.05)
    xs = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    cls, depth = (xs[:, 0] > 0).long() + (xs[:, 1] > 0).long(), xs[:, 2:4].sum(1, keepdim=True)
    batches = [(xs[i:i + 16], cls[i:i + 16], depth[i:i + 16]) for i in range(0, 64, 16)]

    def loss_fn(m: nn.Module, batch) -> tuple[torch.Tensor, object]:
        x, c, dep = batch
        outs = mt.forward_tasks(m, x)
        return F.cross_entropy(outs["cls"]["cls"], c) + F.mse_loss(outs["depth"]["depth"], dep), outs

    result = train(model, batches, steps=40, lr=2e-2, loss_fn=loss_fn, progress=False)
    assert result.losses[-1] < 0.7 * result.losses[0]
    for n in ("fc1", "fc2"):
        a = getattr(model, n).adapters["default"]
        assert all(torch.count_nonzero(a.task_B[t]) > 0 for t in TASKS)


def test_bad_configs_and_stream_ids_are_refused_and_change_nothing() -> None:
    for fields, match in [(dict(tasks=["a", "a"], task_modules=["fc1"]), "duplicate names"),
                          (dict(tasks=["shared"], task_modules=["fc1"]), "not a valid task name"),
                          (dict(tasks=["a.b"], task_modules=["fc1"]), "not a valid task name"),
                          (dict(tasks=["a"]), "tasks and task_modules go together"),
                          (dict(task_modules=["fc1"]), "tasks and task_modules go together"),
                          (dict(task_r=0), r"task_r \(rank\) must be a positive integer")]:
        with pytest.raises(peftkit.PeftkitError, match=match):
            peftkit.config("mtlora", target_modules=["fc1"], **fields)
    torch.manual_seed(0)
    plain = TwoTask().eval()
    before = state_copy(plain)
    with pytest.raises(peftkit.PeftkitError, match=r"task_modules entry 'heads.cls' matches none of the targeted"):
        peftkit.adapt(plain, peftkit.config("mtlora", target_modules=["fc1", "fc2"], tasks=TASKS,
                                            task_modules=["fc2", "heads.cls"]))
    assert same_state(before, state_copy(plain)) and not peftkit.adapter_names(plain)
    assert not any(type(m).__name__ == "AdaptedLayer" for m in plain.modules())

    model = _model()
    x = _x()
    before = state_copy(model)
    for ids, match in [([0, 0, 3, 1, 1], r"stream ids \[3\] are out of range"),
                       ([0.0, 1.0, 0.0, 1.0, 2.0], "1-D sequence of integers")]:
        with pytest.raises(peftkit.PeftkitError, match=match), peftkit.condition(model, ids):
            pytest.fail("the block must not run")
    with pytest.raises(peftkit.PeftkitError, match=r"on 'fc1': task 'cls' has 2 rows but the shared stream 1"):
        with peftkit.condition(model, [0, 2, 2, 1, 1]):
            model(x)
    assert all(layer.condition is None for _, layer in peftkit.adapted_layers(model))
    assert same_state(before, state_copy(model))
    with pytest.raises(peftkit.PeftkitError, match="no active mtlora adapter"):
        mt.forward_tasks(plain, x)
