"""Devices, mixed precision and gradient accumulation (issue 17), on the CPU only: the device choice (``auto``,
``torchrun``'s ``cuda:LOCAL_RANK``, nccl vs gloo), the clear errors for a device this machine lacks or an option
that cannot work, bf16 autocast training through the CLI, accumulation equal to one large batch, exact resume with
accumulation and with the fp16 loss scaler, and seeded random bases that do not depend on the device, the dtype or
the global RNG."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import peftkit
from peftkit import PeftkitError
from peftkit.cli import main
from peftkit.core.registry import get as get_method
from peftkit.train import checkpoint as C
from peftkit.train import distributed as D
from peftkit.train import trainer as T
from peftkit.train.trainer import method_procedures, train
from test_checkpoint import _Data, _Dies, _Net
from test_cli import _examples, _make_tiny_bert


# -- choosing the device ------------------------------------------------------------------------------------------
def _machine(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool, gpus: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus if cuda else 0)
    monkeypatch.setattr(T, "_mps_available", lambda: mps)


@pytest.mark.parametrize(("cuda", "mps", "want"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool,
                                             want: str) -> None:
    _machine(monkeypatch, cuda, mps)
    assert T.pick_device("auto") == torch.device(want)
    assert T.pick_device("cpu") == torch.device("cpu")


def test_a_missing_device_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, False, False)
    with pytest.raises(PeftkitError, match="--device cuda: this machine has no CUDA device"):
        T.pick_device("cuda")
    with pytest.raises(PeftkitError, match="--device mps: this machine has no MPS"):
        T.pick_device("mps")
    with pytest.raises(PeftkitError, match="--device must be one of"):
        T.pick_device("tpu")


def test_torchrun_ranks_take_their_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, True, False, gpus=2)
    assert T.pick_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert T.pick_device("cuda", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(PeftkitError, match="LOCAL_RANK 2 but only 2 CUDA device"):
        T.pick_device("cuda", local_rank=2)
    _machine(monkeypatch, False, False)
    assert T.pick_device("auto", local_rank=1) == torch.device("cpu")  # CPU processes share the CPU


def test_backend_is_nccl_on_cuda_and_gloo_otherwise() -> None:
    assert D.backend_for("cuda") == D.backend_for(torch.device("cuda", 3)) == "nccl"
    assert D.backend_for("cpu") == D.backend_for("mps") == "gloo"


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda:1", "nccl")])
def test_init_from_env_joins_with_the_device_backend(monkeypatch: pytest.MonkeyPatch, device: str,
                                                     backend: str) -> None:
    calls: list[Any] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda b: calls.append(("init", b)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(D, "world", lambda: (1, 2))
    assert D.local_rank() == 1
    assert D.init_from_env(device=device) == (1, 2)
    want = [("init", backend)] if backend == "gloo" else [("set_device", torch.device("cuda", 1)), ("init", "nccl")]
    assert calls == want


def test_precision_checks() -> None:
    assert T.check_precision("fp32", "cpu") is None
    assert T.check_precision("bf16", "cpu") is torch.bfloat16
    assert T.check_precision("fp16", "cuda") is torch.float16
    with pytest.raises(PeftkitError, match="--precision fp16 needs a CUDA or MPS device"):
        T.check_precision("fp16", "cpu")


# -- the CLI -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    model = _make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-device"))
    data = tmp_path_factory.mktemp("data") / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in _examples(120)))
    return model, data


def _args(tiny: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny[0]), "--data", str(tiny[1]), "--output", str(out), "--steps", "3",
            "--eval-size", "30", "--batch-size", "8", "--lr", "1e-2", "--no-progress", "--save-every", "1", *extra]


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: "), err
    return lines[0]


@pytest.mark.parametrize(("extra", "message"), [
    (("--device", "cuda"), "--device cuda: this machine has no CUDA device"),
    (("--device", "mps"), "--device mps: this machine has no MPS"),
    (("--device", "cpu", "--precision", "fp16"), "--precision fp16 needs a CUDA or MPS device"),
    (("--grad-accum", "0"), "argument --grad-accum: must be >= 1"),
    (("--grad-accum", "-2"), "argument --grad-accum: must be >= 1"),
])
def test_bad_device_options_are_one_line_and_write_nothing(tiny: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...],
                                                           message: str) -> None:
    _machine(monkeypatch, False, False)
    out = tmp_path / "run"
    line = _one_line_error(capsys, main(_args(tiny, out, *extra)))
    assert message in line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_eval_and_generate_on_a_missing_device(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, tiny: tuple[Path, Path]) -> None:
    _machine(monkeypatch, False, False)
    out = tmp_path / "run"
    assert main(_args(tiny, out, "--method", "ia3", "--device", "cpu")) == 0
    capsys.readouterr()
    assert "no CUDA device" in _one_line_error(capsys, main(["eval", "--adapter", str(out), "--device", "cuda"]))
    assert "no MPS" in _one_line_error(capsys, main(["generate", "hi", "--adapter", str(out), "--device", "mps"]))


def _train_and_eval(tiny: tuple[Path, Path], out: Path, capsys: pytest.CaptureFixture[str], *extra: str
                    ) -> dict[str, Any]:
    assert main(_args(tiny, out, *extra)) == 0
    printed = capsys.readouterr().out
    assert "in bf16" in printed and "× 2 accumulated" in printed
    info = json.loads((out / "train_info.json").read_text())
    assert (info["device"], info["precision"], info["grad_accum"]) == ("cpu", "bf16", 2)
    assert np.isfinite(info["final_loss"]) and info["steps"] == 3
    assert not (out / "checkpoints").exists()
    assert main(["eval", "--adapter", str(out), "--device", "cpu"]) == 0  # the saved adapter loads and reproduces
    assert "— reproduced" in capsys.readouterr().out
    return info


def test_bf16_with_accumulation_trains_saves_and_loads(tiny: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _train_and_eval(tiny, tmp_path / "ia3", capsys, "--method", "ia3", "--precision", "bf16", "--grad-accum", "2")


def test_bf16_default_lora(tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default method (LoRA, fused kernel) under bf16 autocast."""
    _train_and_eval(tiny, tmp_path / "lora", capsys, "--precision", "bf16", "--grad-accum", "2")


def test_epochs_count_optimiser_steps() -> None:
    from argparse import Namespace
    from types import SimpleNamespace

    from peftkit.tasks.run import TrainRun

    def steps(accum: int, epochs: float = 1.0, n_batches: int = 23) -> int:
        run = SimpleNamespace(args=Namespace(steps=None, epochs=epochs, grad_accum=accum))
        return TrainRun.steps(run, n_batches)  # type: ignore[arg-type]

    assert (steps(1), steps(4), steps(4, epochs=2.0), steps(50)) == (23, 6, 12, 1)


# -- the trainer: accumulation ------------------------------------------------------------------------------------
def _adapted(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    model = _Net()
    cfg = get_method("lora").config.from_dict({"target_modules": ["fc1", "fc2"], "modules_to_save": ["head"], "r": 4,
                                               "dropout": dropout})
    peftkit.adapt(model, cfg)
    with torch.no_grad():  # B ≠ 0, so that A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _batches(n: int, size: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 30, (n, 5), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": x[s: s + size], "labels": y[s: s + size]} for s in range(0, n, size)]


def _trained(batches: list[Any], steps: int, accum: int, opt: str) -> dict[str, torch.Tensor]:
    model = _adapted()
    params = peftkit.trainable_parameters(model)
    optimizer = torch.optim.SGD(params, lr=0.5) if opt == "sgd" else torch.optim.AdamW(params, lr=1e-2)
    train(model, batches, steps=steps, optimizer=optimizer, warmup=0, max_grad_norm=None, progress=False,
          grad_accum=accum)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_accumulating_two_micro_batches_equals_one_batch_of_twice_the_size(opt: str) -> None:
    b = 4
    start = {n: p.detach().clone() for n, p in _adapted().named_parameters() if p.requires_grad}
    big = _trained(_batches(6 * b, 2 * b), steps=3, accum=1, opt=opt)
    small = _trained(_batches(6 * b, b), steps=3, accum=2, opt=opt)
    plain = _trained(_batches(6 * b, b), steps=3, accum=1, opt=opt)  # 3 steps on the first 3 small batches
    for n in big:
        assert not torch.equal(big[n], start[n]), n
        torch.testing.assert_close(small[n], big[n], rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.allclose(plain[n], big[n], rtol=1e-3, atol=1e-4) for n in big)


def test_accumulation_counts_optimiser_steps_and_all_examples() -> None:
    model = _adapted()
    seen: list[int] = []

    from peftkit.core.procedure import Procedure

    class Steps(Procedure):
        def on_step_start(self, model: nn.Module, step: int) -> None:
            seen.append(step)

    res = train(model, _batches(40, 4), steps=3, lr=1e-2, progress=False, grad_accum=3, procedures=[Steps()])
    assert seen == [0, 1, 2] and res.steps == 3 and len(res.losses) == 3
    assert res.examples == 3 * 3 * 4 and res.grad_accum == 3
    # a one-shot iterator that runs out inside a step: that step uses the micro-batches it got
    res = train(_adapted(), iter(_batches(20, 4)), steps=5, lr=1e-2, progress=False, grad_accum=2)
    assert res.steps == 3 and res.examples == 20


def test_trainer_rejects_bad_accumulation_and_fp16_on_the_cpu() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PeftkitError, match="grad_accum must be an integer >= 1"):
            train(_adapted(), _batches(8, 4), steps=1, progress=False, grad_accum=bad)  # type: ignore[arg-type]
    with pytest.raises(PeftkitError, match="fp16 needs a CUDA or MPS device"):
        train(_adapted(), _batches(8, 4), steps=1, progress=False, precision="fp16")


# -- the trainer: precision ---------------------------------------------------------------------------------------
def test_bf16_runs_the_forward_under_autocast_with_fp32_master_weights() -> None:
    model = _adapted(dropout=0.1)  # dropout: LoRA's generic path (the fused kernel's bf16 is the precision branch's)
    seen: list[tuple[bool, torch.dtype]] = []
    hook = model.fc1.register_forward_hook(
        lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    grads: list[torch.dtype] = []
    for p in peftkit.trainable_parameters(model):
        p.register_hook(lambda g: grads.append(g.dtype))
    res = train(model, _batches(16, 4), steps=2, lr=1e-2, progress=False, precision="bf16")
    hook.remove()
    assert seen and all(on and dt == torch.bfloat16 for on, dt in seen)
    assert grads and set(grads) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in peftkit.trainable_parameters(model))
    assert res.precision == "bf16" and all(np.isfinite(res.losses))
    assert not torch.is_autocast_enabled("cpu")


# -- the trainer: resume -------------------------------------------------------------------------------------------
STEPS, EVERY = 6, 2


def _run(directory: Path, *, accum: int, stop: int | None = None, resume: bool = False, precision: str = "fp32",
         method: str = "lora") -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = _Net()
    info = get_method(method)
    fields = {"target_modules": ["fc1", "fc2"], "modules_to_save": ["head"], "r": 4, "dropout": 0.2}
    cfg = info.config.from_dict({k: v for k, v in fields.items() if k in info.config.field_names()})
    peftkit.adapt(model, cfg)
    data: Any = _Data()
    if stop is not None:
        data = _Dies(data, stop)
    try:
        res = train(model, data, steps=STEPS, lr=5e-2, progress=False, procedures=method_procedures(info, model, cfg),
                    checkpoint_dir=directory, save_every=EVERY, resume=resume, grad_accum=accum, precision=precision)
    except KeyboardInterrupt:
        return model, None
    return model, res


def _same_run(ref: tuple[nn.Module, Any], got: tuple[nn.Module, Any]) -> None:
    assert got[1].steps == ref[1].steps and got[1].examples == ref[1].examples
    assert got[1].losses == ref[1].losses
    want, have = C.training_state(ref[0]), C.training_state(got[0])
    assert sorted(want) == sorted(have) and want
    for k in want:
        assert torch.equal(want[k], have[k]), k


@pytest.mark.parametrize("method", ["lora", "dylora"])
def test_resume_with_accumulation_is_exact(tmp_path: Path, method: str) -> None:
    ref = _run(tmp_path / "ref", accum=2, method=method)
    # 5 micro-batches per epoch: the run dies in step 5 (micro-batch 9) after the checkpoint of step 4
    _, dead = _run(tmp_path / "run", accum=2, stop=9, method=method)
    assert dead is None and C.latest_checkpoint(tmp_path / "run").step == 4
    assert C.latest_checkpoint(tmp_path / "run").meta["trainer"]["micro_batches"] == 8
    _same_run(ref, _run(tmp_path / "run", accum=2, resume=True, method=method))
    with pytest.raises(PeftkitError, match="grad_accum 2, this run has 1"):
        _run(tmp_path / "run", accum=1, resume=True, method=method)


def test_fp16_loss_scaler_is_checkpointed_and_resume_is_exact(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 is refused on the CPU for speed, not correctness: let it through to check the scaler's round trip."""
    monkeypatch.setattr(T, "check_precision", lambda precision, device: T.PRECISIONS[precision])
    scales: list[float] = []
    real = torch.amp.GradScaler.update

    def update(self: Any, new_scale: Any = None) -> None:
        real(self, new_scale if len(scales) else 2.0**10)  # a non-default scale, so that losing it shows
        scales.append(self.get_scale())

    monkeypatch.setattr(torch.amp.GradScaler, "update", update)
    ref = _run(tmp_path / "ref", accum=2, precision="fp16")
    assert scales[0] == 2.0**10
    scales.clear()
    _run(tmp_path / "run", accum=2, stop=9, precision="fp16")
    saved = C.latest_checkpoint(tmp_path / "run").meta["trainer"]
    assert saved["precision"] == "fp16" and saved["scaler"]["scale"] == 2.0**10
    scales.append(1.0)  # the resumed run must not force the scale again: it restores it
    _same_run(ref, _run(tmp_path / "run", accum=2, resume=True, precision="fp16"))
    assert scales[1] == 2.0**10
    with pytest.raises(PeftkitError, match="precision fp16, this run has fp32"):
        _run(tmp_path / "run", accum=2, resume=True)


# -- seeded random bases -----------------------------------------------------------------------------------------
SEEDED = {"randlora": {"r": 4}, "mos": {"r": 4}, "paca": {"r": 4}, "loca": {"n": 8}}


def _mlp(dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    with torch.device(device):
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).to(dtype)


def _adapt(method: str, model: nn.Module) -> nn.Module:
    info = get_method(method)
    peftkit.adapt(model, info.config.from_dict({"target_modules": ["0", "2"], **SEEDED[method]}))
    return model


def _draws(model: nn.Module) -> dict[str, torch.Tensor]:
    """The randomly drawn tensors of an adapter (its bases, indices and random inits; not the copied weights)."""
    keep = ("shared_store.A", "shared_store.B", "checksum", "idx", "pool_a", "loca_l")
    return {n: t for n, t in {**dict(model.named_buffers()), **dict(model.named_parameters())}.items()
            if any(k in n for k in keep)}


@pytest.mark.parametrize("method", sorted(SEEDED))
def test_seeded_draws_do_not_depend_on_the_dtype_and_follow_the_device(method: str) -> None:
    torch.manual_seed(0)
    ref = _draws(_adapt(method, _mlp()))
    assert ref
    torch.manual_seed(0)
    half = _draws(_adapt(method, _mlp(torch.bfloat16)))
    assert sorted(half) == sorted(ref)
    for n, t in ref.items():  # equal up to the host dtype's rounding (a half host's adapter is kept in float32)
        assert torch.equal(half[n].to(torch.bfloat16), t.to(torch.bfloat16)), n
    meta = _draws(_adapt(method, _mlp(device="meta")))  # the device-agnostic path: every draw lands on the host's
    assert sorted(meta) == sorted(ref) and all(t.device.type == "meta" for t in meta.values())


@pytest.mark.parametrize("method", ["randlora", "mos", "paca"])
def test_seeded_bases_use_a_cpu_generator_and_leave_the_global_rng_alone(method: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[torch.device] = []
    real = torch.Generator

    def generator(*args: Any, **kwargs: Any) -> torch.Generator:
        g = real(*args, **kwargs)
        made.append(g.device)
        return g

    host = _mlp()
    monkeypatch.setattr(torch, "Generator", generator)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model = _adapt(method, host)
    monkeypatch.undo()
    assert made and all(d == torch.device("cpu") for d in made)
    assert torch.equal(torch.get_rng_state(), state)
    host = _mlp()
    torch.manual_seed(123)  # another global seed: the same adapter (the method's own seed decides)
    again = _draws(_adapt(method, host))
    for n, t in _draws(model).items():
        assert torch.equal(again[n], t), n


def test_cli_resume_keeps_accumulation_and_precision(tiny: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``peftkit train --resume`` of a run interrupted mid-step continues with its own --grad-accum / --precision and
    ends with the uninterrupted run's adapter, bit for bit."""
    from safetensors.torch import load_file

    extra = ("--method", "ia3", "--steps", "4", "--grad-accum", "2", "--save-every", "2", "--precision", "bf16")
    assert main(_args(tiny, tmp_path / "ref", *extra)) == 0
    calls, real = [0], T.batch_size

    def dies(batch: Any) -> int:  # once per micro-batch: the 7th is step 3's second
        calls[0] += 1
        if calls[0] == 7:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(T, "batch_size", dies)
    assert main(_args(tiny, tmp_path / "run", *extra)) == 130
    monkeypatch.setattr(T, "batch_size", real)
    assert C.latest_checkpoint(tmp_path / "run" / "checkpoints").meta["trainer"]["micro_batches"] == 4
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "× 2 accumulated" in capsys.readouterr().out
    info = json.loads((tmp_path / "run" / "train_info.json").read_text())
    assert (info["grad_accum"], info["precision"], info["steps"]) == (2, "bf16", 4)
    want, got = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ref", "run"))
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
