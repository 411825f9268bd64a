"""``peftkit train --task multitask-digits --method mtlora`` (issue 21: MTLoRA's per-task streams and multi-scale
fusion on EfficientNet's stages, from the CLI): a tiny EfficientNet stand-in for the fast tests, the real pretrained
Lite0 in one integration test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.models import efficientnet as V
from peftkit.tasks import multitask_digits as M
from test_vision import TINY, needs_weights

TASKS = list(M.TASKS)


def _net(seed: int = 0) -> torch.nn.Module:
    """The task's model on the tiny EfficientNet: its layout, its MTLoRA config, its heads; every task-specific B
    drawn non-zero (at init B = 0 would hide the task LoRA's gradients to A)."""
    torch.manual_seed(seed)
    backbone = V.EfficientNetLite(10, **TINY).eval()
    stages, dims = M.stage_layout(backbone)
    task_modules = [f"{s}.{c}" for s in stages for c in ("_expand_conv", "_project_conv")
                    if hasattr(backbone.get_submodule(s), c)]
    peftkit.adapt(backbone, peftkit.config("mtlora", target_modules=["_expand_conv", "_project_conv"], r=4, tasks=TASKS,
                                           task_modules=task_modules, task_r=2, dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if ".task_B." in name or name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return M.build(backbone, stages, dims)


def _task_param(name: str) -> str | None:
    """The task a parameter belongs to (task-specific LoRA, Downsampler, head), None for shared ones."""
    for t in TASKS:
        if f".task_A.{t}" in name or f".task_B.{t}" in name or f"downsampler.{t}." in name or \
                name.startswith(f"heads.{t}."):
            return t
    return None


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
Y = M.multitask_labels([7, 2, 5, 0])


def test_stage_layout_of_lite0_and_the_tiny_stand_in() -> None:
    assert M.stage_layout(V.EfficientNetLite(10)) == (["_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"],
                                                      [24, 40, 112, 320])  # strides 4, 8, 16, 32
    assert M.stage_layout(V.EfficientNetLite(10, **TINY)) == (["_blocks.0", "_blocks.2"], [8, 12])
    assert Y.tolist() == [[7, 1, 1], [2, 0, 0], [5, 1, 1], [0, 0, 0]]  # digit, parity (odd), ge5


@pytest.mark.parametrize("task", TASKS)
def test_task_specific_parameters_get_gradients_only_from_their_own_loss(task: str) -> None:
    net = _net()
    net.train()
    logits = net(X)["logits"]
    i = TASKS.index(task)
    torch.nn.functional.cross_entropy(logits[task], Y[:, i]).backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    owned = {n: _task_param(n) for n in grads}
    assert {t for t in owned.values() if t} == set(TASKS)  # every task has its own parameters
    for n, g in grads.items():
        if owned[n] is not None and owned[n] != task:
            assert g is None or float(g.abs().max()) == 0.0, f"{n} got a gradient from {task}'s loss"
    mine = [n for n, t in owned.items() if t == task]
    assert len(mine) >= 2 + 2 * 3  # downsampler convs per scale + head layers + task LoRA (A, B) per task module
    for n in mine:
        assert grads[n] is not None and float(grads[n].abs().sum()) > 0, f"{n} got no gradient from {task}'s loss"
    # the task-agnostic LoRA learns from every task wherever a task stream reads the shared stream: every layer but
    # the very last one (an MT layer's task row is W·x_shared + its task LoRA — MTLoRA's 'matrix' mode — so the shared
    # LoRA of the last block's project conv reaches no task; its expand conv's does, through x_shared)
    shared = [n for n, t in owned.items() if t is None and n.endswith("lora_B")]
    last = "_blocks.2._project_conv."
    assert len(shared) == 5 and all(float(grads[n].abs().sum()) > 0 for n in shared if last not in n)
    assert all(float(grads[n].abs().sum()) == 0 for n in shared if last in n)


def test_every_scale_reaches_every_task_through_the_fusion() -> None:
    net = _net()
    torch.set_grad_enabled(False)
    try:
        _check_every_scale(net)
    finally:
        torch.set_grad_enabled(True)


def _check_every_scale(net: torch.nn.Module) -> None:
    base = net(X)["logits"]
    for t in TASKS:
        for k, conv in enumerate(net.features.downsampler[t]):
            saved = conv.weight.detach().clone()
            with torch.no_grad():
                conv.weight.zero_()
            changed = net(X)["logits"]
            with torch.no_grad():
                conv.weight.copy_(saved)
            assert float((changed[t] - base[t]).abs().max()) > 1e-4, f"scale {k} does not reach {t}'s logits"
            for u in TASKS:
                if u != t:
                    assert torch.equal(changed[u], base[u])  # another task's Downsampler is not in this one's path


def test_streams_equal_the_shared_one_until_a_task_lora_differs() -> None:
    """With every task-specific B at zero each task stream computes the shared stream (the restart copies it, a zero
    task LoRA adds nothing but its frozen part W·x of the shared row), so all tasks see the same features."""
    net = _net()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".task_B." in name:
                p.zero_()
        for t in TASKS[1:]:
            for a, b in zip(net.features.downsampler[t], net.features.downsampler[TASKS[0]]):
                a.weight.copy_(b.weight)
        f = net.features(X)
    for t in TASKS[1:]:
        for a, b in zip(f[t], f[TASKS[0]]):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        net.backbone.get_submodule("_blocks.2._project_conv").adapters["default"].task_B["parity"].fill_(0.5)
        g = net.features(X)
    assert float((g["parity"][1] - g["digit"][1]).abs().max()) > 1e-3  # the last stage reads parity's LoRA
    assert torch.allclose(g["parity"][0], g["digit"][0], atol=1e-5, rtol=1e-5)  # the first stage does not


def test_every_task_loss_falls_when_the_streams_train_together() -> None:
    """One batch, 30 AdamW steps on the summed loss through every stream and the fusion: each task's own loss
    falls (the streams train, not just one of them)."""
    net = _net()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)

    def losses() -> list[float]:
        with torch.no_grad():
            lg = net(X)["logits"]
        return [float(torch.nn.functional.cross_entropy(lg[t], Y[:, i])) for i, t in enumerate(TASKS)]

    before = losses()
    net.train()
    for _ in range(30):
        opt.zero_grad()
        net(X, Y)["loss"].backward()
        opt.step()
    net.eval()
    after = losses()
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)


@pytest.fixture
def tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(V.BACKBONES, "tiny-lite", (lambda n: V.EfficientNetLite(n, **TINY), "tiny, for tests"))
    return "tiny-lite"


def _train(model: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "multitask-digits", "--method", "mtlora", "--model", model, "--image-size", "16",
            "--eval-size", "60", "--output", str(out), "--no-progress", "--threads", "1", "--save-every", "0", *extra]


def test_cli_trains_every_stream_saves_and_eval_reproduces(tiny_backbone: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_train(tiny_backbone, out, "--steps", "10", "--batch-size", "16")) == 0
    stdout = capsys.readouterr().out
    info = json.loads((out / "train_info.json").read_text())
    assert info["task"] == "multitask-digits" and info["method"] == "mtlora" and info["stages"] == ["_blocks.0",
                                                                                                 "_blocks.2"]
    cfg = info["config"]
    assert cfg["tasks"] == TASKS and cfg["task_modules"] == ["_blocks.0._project_conv", "_blocks.2._expand_conv",
                                                             "_blocks.2._project_conv"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     M.HEADS_FILE, "train_info.json"]
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    for t in TASKS:  # each task's LoRA, Downsamplers and head were saved and trained away from their init
        assert any(f"task_B.{t}" in k and float(v.abs().max()) > 0 for k, v in saved.items())
    heads = load_file(out / M.HEADS_FILE)
    assert {k.split(".")[2] for k in heads if k.startswith("features.downsampler.")} == set(TASKS)
    assert info["steps"] == 10 and {f"accuracy_{w}_{t}" for w in ("before", "after") for t in TASKS} <= set(info)
    assert "held-out accuracy after:  digit " in stdout and "4 streams" in stdout

    assert main(["eval", "--adapter", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("— reproduced") == 3, text
    # a heads file that is not the run's own is refused
    blob = bytearray((out / M.HEADS_FILE).read_bytes())
    blob[-1] ^= 1
    (out / M.HEADS_FILE).write_bytes(bytes(blob))
    assert main(["eval", "--adapter", str(out)]) == 1
    assert "sha256 differs" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--method", "lora"], "use --method mtlora"),
    (["--opt", "tasks=[\"a\"]", "--opt", "task_modules=[\"_conv_head\"]"], "sets the tasks"),
    (["--max-length", "16"], "--max-length does not apply"),
    (["--targets", "_conv_head"], "--targets does not apply"),
    (["--image-size", "4"], "--image-size must be >= 8"),
])
def test_cli_bad_input_one_line_nothing_written(tiny_backbone: str, tmp_path: Path, extra: list[str], needle: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = _train(tiny_backbone, tmp_path / "never", "--steps", "1")
    if extra[0] == "--method":
        args[args.index("--method") + 1] = extra[1]
        extra = []
    assert main(args + extra) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("peftkit: error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "never").exists()


@pytest.mark.integration
@needs_weights
def test_pretrained_lite0_multitask_run_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "real"
    assert main(["train", "--task", "multitask-digits", "--method", "mtlora", "--steps", "3", "--batch-size", "8",
                 "--image-size", "16", "--eval-size", "24", "--output", str(out), "--no-progress",
                 "--save-every", "0"]) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["stages"] == ["_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"] and info["steps"] == 3
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert capsys.readouterr().out.count("— reproduced") == 3
