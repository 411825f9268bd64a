"""Fault injection on training runs (issue 18): two ``peftkit train`` on one output folder, ``--resume`` from another
directory or on changed data, and tampered checkpoint ``state.json`` fields — each a clear error, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import PeftkitError
from peftkit.cli import main
from peftkit.train import checkpoint as C
from peftkit.train import train
from test_cli import _examples, _make_tiny_bert


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _csv(path: Path, seed: int = 0) -> Path:
    path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in _examples(120, seed)))
    return path


def _args(model: Path | str, data: Path | str, out: Path | str, steps: int = 8, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--steps", str(steps),
            "--eval-size", "20", "--lr", "1e-2", "--batch-size", "8", "--no-progress", "--threads", "1", *extra]


def _error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err, err
    return err.strip()


def test_two_trainers_on_one_output_folder(tiny_model_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The second run fails at once with a clear error; the first completes and keeps its adapter and checkpoints."""
    data, out = _csv(tmp_path / "d.csv"), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([sys.executable, "-m", "peftkit", *_args(tiny_model_dir, data, out, 300, "--save-every",
                                                                      "50")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".out.peftkit-lock"
    deadline = time.time() + 60
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()
    t0 = time.perf_counter()
    msg = _error(capsys, main(_args(tiny_model_dir, data, out, 8, "--overwrite")))
    assert "is in use by another peftkit train (pid" in msg and time.perf_counter() - t0 < 10, msg
    assert first.poll() is None, "the first run had finished before the second started: nothing was tested"
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "train_info.json"]
    assert not lock.exists()
    assert json.loads((out / "train_info.json").read_text())["steps"] == 300
    # once finished, the folder is free again (and still refuses a new run without --overwrite)
    assert "already exists" in _error(capsys, main(_args(tiny_model_dir, data, out)))


def test_resume_from_another_directory_reads_the_runs_own_data(tiny_model_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A relative --data resolved at train time: a resume from elsewhere trains on the same file, and refuses when
    that file's content changed."""
    run_dir, other = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir(), other.mkdir()
    _csv(run_dir / "reviews.csv", seed=0)
    _csv(other / "reviews.csv", seed=5)  # same relative name, other content
    real = C.save_checkpoint

    def dies_after_step_4(*a: Any, **k: Any) -> Path:
        folder = real(*a, **k)
        if k["step"] == 4:
            raise KeyboardInterrupt("killed")
        return folder

    monkeypatch.chdir(run_dir)
    monkeypatch.setattr(C, "save_checkpoint", dies_after_step_4)
    assert main(_args(tiny_model_dir, "reviews.csv", "out", 8, "--save-every", "2")) != 0  # interrupted
    monkeypatch.undo()
    out = run_dir / "out"
    assert (out / "checkpoints").is_dir() and not (run_dir / ".out.peftkit-lock").exists()
    monkeypatch.chdir(other)
    original = (run_dir / "reviews.csv").read_bytes()
    (run_dir / "reviews.csv").write_bytes(original.replace(b",pos", b",neg", 3))
    msg = _error(capsys, main(["train", "--resume", str(out)]))
    assert "reviews.csv" in msg and "changed since the run started" in msg, msg
    (run_dir / "reviews.csv").write_bytes(original)
    assert main(["train", "--resume", str(out)]) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["steps"] == 8 and Path(info["model"]).is_absolute()
    assert any(str(run_dir / "reviews.csv") == v for v in info.values() if isinstance(v, str)), info


# -- checkpoints -------------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.fc1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.head(torch.relu(self.fc1(self.emb(input_ids).mean(1))))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


class _Data:
    def __init__(self, stop: int | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y, self.stop = torch.randint(0, 30, (32, 5), generator=g), torch.randint(0, 3, (32,)), stop

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for n, s in enumerate(range(0, 32, 8)):
            if n == self.stop:
                raise KeyboardInterrupt("killed")
            yield {"input_ids": self.x[s:s + 8], "labels": self.y[s:s + 8]}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _Net()
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc1"], r=2))
    return model


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    with pytest.raises(KeyboardInterrupt):  # 3 steps done, checkpoint after step 2
        train(_model(), _Data(stop=3), steps=6, lr=1e-2, progress=False, checkpoint_dir=d, save_every=2)
    return d


def _set(path: list[Any], value: Any) -> Any:
    def edit(state: dict[str, Any]) -> None:
        obj = state
        for k in path[:-1]:
            obj = obj[k]
        if value is _DELETE:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
    return edit


_DELETE = object()
STATE_CASES = {
    "step_negative": (_set(["step"], -5), "must be >= 0"),
    "step_beyond_total": (_set(["step"], 99), "not before the run's last step"),
    "step_string": (_set(["step"], "2"), "'step' must be int"),
    "lr_string": (_set(["optimizer", "param_groups", 0, "lr"], "abc"), "lr is 'abc', not a number"),
    "lr_negative": (_set(["optimizer", "param_groups", 0, "lr"], -1.0), "not a number >= 0"),
    "rng_python_garbage": (_set(["rng", "python"], {"__tuple__": [3, "x", None]}), "RNG state is unusable"),
    "rng_torch_wrong_tensor": (_set(["rng", "torch"], {"__tensor__": "t0"}), "RNG state is unusable"),
    "rng_torch_missing_tensor": (_set(["rng", "torch"], {"__tensor__": "t999"}), "state.json is damaged"),
    "rng_deleted": (_set(["rng"], _DELETE), "'rng' is missing"),
    "meta_deleted": (_set(["meta"], _DELETE), "'meta' is missing"),
    "optimizer_deleted": (_set(["optimizer"], _DELETE), "'optimizer' is missing"),
    "losses_strings": (_set(["losses"], ["a", "b"]), "'losses' must hold numbers"),
    "seconds_nan": (_set(["seconds"], float("nan")), "must be >= 0"),
    "procedures_garbage": (_set(["procedures"], [1]), "'class' and 'state'"),
    "schedule_lr_string": (_set(["schedule", "base_lrs"], ["x"]), "base_lrs must be numbers"),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_tampered_checkpoint_state_is_one_clear_error(checkpoint_dir: Path, tmp_path: Path, case: str) -> None:
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, d)
    folder = d / json.loads((d / C.LATEST).read_text())["folder"]
    state = json.loads((folder / "state.json").read_text())
    edit, needle = STATE_CASES[case]
    edit(state)
    (folder / "state.json").write_text(json.dumps(state))
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftkitError, match=needle):
        train(model, _Data(), steps=6, lr=1e-2, progress=False, checkpoint_dir=d, save_every=2, resume=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_untampered_checkpoint_still_resumes(checkpoint_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, d)
    res = train(_model(), _Data(), steps=6, lr=1e-2, progress=False, checkpoint_dir=d, save_every=2, resume=True)
    assert res.steps == 6 and len(res.losses) == 6
