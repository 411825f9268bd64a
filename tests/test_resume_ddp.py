"""``peftkit train --resume DIR`` after the process was killed (SIGKILL) mid-run, and data-parallel training with
``torchrun`` (gloo, 2 processes): both end with the adapter of the plain uninterrupted single-process run."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multiproc import run_child
from peftkit.cli import main
from test_cli import _examples, _make_tiny_bert
from tolerance import assert_near

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny BERT without dropout (so that runs in different processes are comparable) and a CSV of 240 reviews."""
    model = _make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)
    data = tmp_path_factory.mktemp("data") / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in _examples(240)))
    return model, data


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--eval-size", "60",
            "--lr", "1e-2", "--no-progress", "--threads", "1", *extra]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / WEIGHTS))


KILLER = """
import os, signal, sys
import peftkit.train.trainer as T
from peftkit.cli import main

calls, real = [0], T.batch_size

def batch_size(batch):  # called once per training step, after the optimiser has not yet stepped
    calls[0] += 1
    if calls[0] == {stop}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(batch)

T.batch_size = batch_size
sys.exit(main({argv!r}))
"""


def test_killed_run_resumes_to_the_uninterrupted_adapter(tiny: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    model, data = tiny
    budget = ("--steps", "30", "--batch-size", "16", "--save-every", "8")
    assert main(_args(model, data, tmp_path / "ref", *budget)) == 0
    assert not (tmp_path / "ref" / "checkpoints").exists()  # a finished run keeps no checkpoints

    run = tmp_path / "run"
    script = textwrap.dedent(KILLER).format(stop=21, argv=_args(model, data, run, *budget))
    killed = lambda p: p.returncode == -9  # noqa: E731 — SIGKILL in step 21
    run_child([sys.executable, "-c", script], env=_env(), ok=killed, clean=[run])
    assert not (run / WEIGHTS).exists()
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 16

    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    want, got = _tensors(tmp_path / "ref"), _tensors(run)
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    ref_info = json.loads((tmp_path / "ref" / "train_info.json").read_text())
    info = json.loads((run / "train_info.json").read_text())
    assert info["steps"] == 30 and info["correct_after"] == ref_info["correct_after"]
    assert info["final_loss"] == ref_info["final_loss"]
    assert not (run / "checkpoints").exists()

    # a finished run has nothing to resume; options other than --threads / --no-progress are refused
    assert main(["train", "--resume", str(run)]) == 1
    assert "finished" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "ref"), "--lr", "1"]) == 1
    assert "drop --lr" in capsys.readouterr().err


def test_torchrun_two_processes_equal_one_process_with_double_batch(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    steps = ("--steps", "6", "--save-every", "0")
    assert main(_args(model, data, tmp_path / "one", *steps, "--batch-size", "16")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "peftkit",
           *_args(model, data, tmp_path / "two", *steps, "--batch-size", "8")]
    proc = run_child(cmd, env=_env(), clean=[tmp_path / "two"])
    assert proc.stdout.count("saved adapter to") == 1  # only rank 0 prints and writes
    assert "× 2 processes" in proc.stdout
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for k in one:  # 2 × 8 vs 16 examples: the gradient sums round differently (BERT: reductions ≤ 64 wide)
        assert_near(two[k], one[k], 64, layers=6, msg=k)
    assert max(float(t.abs().max()) for k, t in two.items() if "lora_B" in k) > 1e-3  # B starts at 0: it trained
    # one process with batch 8 alone trains a different adapter: the equality above needs the gradient sync
    assert main(_args(model, data, tmp_path / "half", *steps, "--batch-size", "8")) == 0
    half = _tensors(tmp_path / "half")
    assert max(float((half[k] - one[k]).abs().max()) for k in one) > 1e-3
    info = json.loads((tmp_path / "two" / "train_info.json").read_text())
    assert info["processes"] == 2 and info["examples_seen"] == 6 * 16


def test_torchrun_diffora_processes_take_the_same_theta_steps(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """DiffoRA trains its selection logits θ with its own optimiser, from each process's batch slice: the θ gradients
    are averaged over the processes, so 2 processes × batch 8 search and select exactly as 1 process × batch 16."""
    model, data = tiny
    steps = ("--method", "diffora", "--steps", "6", "--save-every", "0", "--opt", "search_steps=4",
             "--opt", "theta_lr=0.3")
    assert main(_args(model, data, tmp_path / "one", *steps, "--batch-size", "16")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "peftkit",
           *_args(model, data, tmp_path / "two", *steps, "--batch-size", "8")]
    run_child(cmd, env=_env(), clean=[tmp_path / "two"])
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for k in one:  # 2 × 8 vs 16 examples: the gradient sums round differently (BERT: reductions ≤ 64 wide)
        assert_near(two[k], one[k], 64, layers=6, msg=k)
    # the search moved θ far enough to matter: a 1-process run at batch 8 selects or trains differently
    assert main(_args(model, data, tmp_path / "half", *steps, "--batch-size", "8")) == 0
    half = _tensors(tmp_path / "half")
    assert sorted(half) != sorted(one) or max(float((half[k] - one[k]).abs().max()) for k in one) > 1e-3
