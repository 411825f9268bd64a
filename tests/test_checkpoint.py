"""Resumable training (``peftkit.train.checkpoint``): a run interrupted after a checkpoint and resumed ends with
exactly the adapter, optimiser and losses of an uninterrupted run — also for procedures with state or that change the
adapter's structure during training (DyLoRA's sampler, TriAdaptLoRA's rank growth, DiffoRA's discretisation, LoCA's
alternating schedule) — and a bad or damaged checkpoint is a clear error that changes nothing."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import peftkit
from peftkit import PeftkitError
from peftkit.core.registry import get as get_method
from peftkit.train import checkpoint as C
from peftkit.train import train
from peftkit.train.density import DensityLoss
from peftkit.train.trainer import method_procedures

STEPS, EVERY, STOP = 12, 4, 10  # checkpoints after steps 4 and 8; the first run dies in step 10


class _Net(nn.Module):
    """Embedding → two Linear blocks → head; a mapping batch in, HF-style output with a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        h = self.emb(input_ids).mean(1)
        logits = self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))
        out: dict[str, Any] = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class _Data:
    """Re-iterable batches in a new seeded order every epoch (like peftkit.data.Batches)."""

    def __init__(self, n: int = 40, batch: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, 30, (n, 5), generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.batch, self.epoch = batch, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(100 + self.epoch))
        self.epoch += 1
        for s in range(0, len(order), self.batch):
            i = order[s: s + self.batch]
            yield {"input_ids": self.x[i], "labels": self.y[i]}


class _Dies:
    """The batches, but the run is killed when step ``stop`` asks for its batch."""

    def __init__(self, batches: Any, stop: int) -> None:
        self.batches, self.stop, self.n = batches, stop, 0

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            if self.n == self.stop:
                raise KeyboardInterrupt("killed")
            self.n += 1
            yield b


CASES: dict[str, dict[str, Any]] = {
    "lora": {"r": 4, "dropout": 0.2},  # dropout: the RNG state must be restored
    "dylora": {"r": 4},  # the rank sampler's generator
    # rank growth before and after the checkpoints: replayed on resume
    "triadaptlora": {"r": 4, "init_rank": 1, "total_steps": STEPS, "warmup_steps": 1, "interval": 2},
    "diffora": {"r": 2, "search_steps": 6, "rho": 0.5},  # discretised between the checkpoints (after step 6)
    "loca": {"n": 20, "t_loc": 8, "b_a": 2, "b_l": 2},  # alternating coefficient / location phases
}


def _run(method: str, directory: Path, *, stop: int | None = None, resume: bool = False,
         density: bool = False) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = _Net()
    info = get_method(method)
    fields = {"target_modules": ["fc1", "fc2"], "modules_to_save": ["head"], **CASES.get(method, {"r": 4})}
    fields = {k: v for k, v in fields.items() if k in info.config.field_names()}
    cfg = info.config.from_dict(fields)
    peftkit.adapt(model, cfg)
    procs = method_procedures(info, model, cfg)
    if density:
        procs.append(DensityLoss(model, 0.1, pattern=r"fc1"))
    data: Any = _Data()
    if stop is not None:
        data = _Dies(data, stop)
    try:
        res = train(model, data, steps=STEPS, lr=5e-2, progress=False, procedures=procs, checkpoint_dir=directory,
                    save_every=EVERY, resume=resume)
    except KeyboardInterrupt:
        return model, None
    return model, res


@pytest.mark.parametrize("method", sorted(CASES))
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(method: str, tmp_path: Path) -> None:
    ref_model, ref = _run(method, tmp_path / "ref")
    _, dead = _run(method, tmp_path / "run", stop=STOP)
    assert dead is None
    assert C.latest_checkpoint(tmp_path / "run" / "").step == 8
    assert [p.name for p in (tmp_path / "run").glob("step-*")] == ["step-000008"]  # older ones deleted
    model, res = _run(method, tmp_path / "run", resume=True)
    assert res.steps == STEPS == ref.steps and res.examples == ref.examples
    assert res.losses == ref.losses  # the resumed run's losses from step 8 on are the uninterrupted run's
    want, got = C.training_state(ref_model), C.training_state(model)
    assert sorted(want) == sorted(got) and want
    for k in want:
        assert torch.equal(want[k], got[k]), k
    if method == "triadaptlora":  # the growth replayed: ranks beyond the initial ones
        assert any(t.shape[0] > 1 for k, t in got.items() if "lora_A" in k)


def test_density_loss_procedure_resumes_too(tmp_path: Path) -> None:
    ref_model, ref = _run("lora", tmp_path / "ref", density=True)
    _run("lora", tmp_path / "run", stop=STOP, density=True)
    model, res = _run("lora", tmp_path / "run", resume=True, density=True)
    assert res.losses == ref.losses
    for k, v in C.training_state(ref_model).items():
        assert torch.equal(v, C.training_state(model)[k])


def test_resume_checks_method_and_procedures(tmp_path: Path) -> None:
    _run("lora", tmp_path / "run", stop=STOP)
    with pytest.raises(PeftkitError, match="does not match this model"):
        _run("dora", tmp_path / "run", resume=True)
    with pytest.raises(PeftkitError, match="procedures"):
        _run("lora", tmp_path / "run", resume=True, density=True)
    with pytest.raises(PeftkitError, match="no checkpoint to resume from"):
        _run("lora", tmp_path / "nothing", resume=True)


def test_mismatched_shapes_change_nothing(tmp_path: Path) -> None:
    _run("lora", tmp_path / "run", stop=STOP)
    ckpt = C.latest_checkpoint(tmp_path / "run")
    model = _Net()
    peftkit.adapt(model, get_method("lora").config.from_dict({"target_modules": ["fc1", "fc2"], "r": 8,
                                                                "modules_to_save": ["head"]}))
    before = {k: v.clone() for k, v in C.training_state(model).items()}
    with pytest.raises(PeftkitError, match="has shape"):
        ckpt.restore_model(model)
    assert all(torch.equal(before[k], v) for k, v in C.training_state(model).items())


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run("lora", tmp_path / "run", stop=6)  # one checkpoint, step 4
    real = C.atomic_write_bytes

    def broken(path: Path, data: bytes) -> None:
        if path.name == "state.safetensors":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(C, "atomic_write_bytes", broken)
    with pytest.raises(PeftkitError, match="cannot write checkpoint"):
        _run("lora", tmp_path / "run", resume=True)  # resumes at 4, fails writing the checkpoint of step 8
    monkeypatch.undo()
    assert C.latest_checkpoint(tmp_path / "run").step == 4


def test_damaged_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    _run("lora", tmp_path / "run", stop=6)
    (tmp_path / "run" / "step-000004" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(PeftkitError, match="corrupted or incomplete"):
        C.latest_checkpoint(tmp_path / "run")


def test_pack_round_trips_nested_state() -> None:
    value = {"a": (1, 2.5, None, "x"), "b": {3: torch.arange(4), "k": [True, torch.ones(2, 2)]},
             "rng": random.getstate(), "np": np.random.get_state(), "__odd": 1}
    tensors: dict[str, torch.Tensor] = {}
    data = C.pack(value, tensors)
    import json

    back = C.unpack(json.loads(json.dumps(data)), tensors)
    assert back["a"] == value["a"] and back["rng"] == value["rng"] and back["__odd"] == 1
    assert torch.equal(back["b"][3], value["b"][3]) and torch.equal(back["b"]["k"][1], value["b"]["k"][1])
    assert back["np"][0] == "MT19937" and np.array_equal(back["np"][1], value["np"][1])
    assert back["np"][1].dtype == value["np"][1].dtype
    with pytest.raises(PeftkitError, match="state.f"):
        C.pack({"f": object()}, {})
