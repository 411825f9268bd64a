"""Every method's CLI defaults work on every task that allows the method: ``peftkit train --task T --method M`` with
nothing else builds the config the command builds and adapts the task's default model shape (the packaged models'
widths — MiniLM-L6 384/1536, SmolLM2-135M 576/1536, EfficientNet-Lite0's 16…1280 channels — at one to three layers,
random weights), through :class:`peftkit.tasks.run.TrainRun` as the command does, then runs one training
forward/backward.

A method's default rank is a ceiling (:func:`peftkit.core.adapter.fit_ranks`): MTLoRA's r = 64 and LoCA's n = 1000
exceed EfficientNet's first 32→16 convolution, which gets its limit instead; a rank the user gives above a layer's
limit stays an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

import peftkit
from peftkit import vision as V
from peftkit.cli import build_parser
from peftkit.core.errors import PeftkitError
from peftkit.core.registry import all_methods
from peftkit.tasks import get_task
from peftkit.tasks.image_classification import _targets_for
from peftkit.tasks.run import TrainRun, release_run_locks

#: transformer layers of the stand-in models: one, except for the methods whose defaults need more (MoS shares its
#: 4-rank pools over >= 3 layers; ExPLoRA unfreezes the last block and adapts the others)
LAYERS = {"mos": 3, "explora": 2}


def _minilm(head: type) -> Callable[[str], nn.Module]:
    def build(method: str) -> nn.Module:
        c = tf.BertConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=12, vocab_size=256,
                          num_hidden_layers=LAYERS.get(method, 1), max_position_embeddings=512, num_labels=3)
        return head(c).eval()
    return build


def _smollm(method: str) -> nn.Module:
    c = tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                       num_hidden_layers=LAYERS.get(method, 1), vocab_size=256, max_position_embeddings=256,
                       tie_word_embeddings=True)
    return tf.LlamaForCausalLM(c).eval()


def _ids(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 256, (2, 8), generator=torch.Generator().manual_seed(0))}


TASKS: dict[str, tuple[dict, Callable[[str], nn.Module], Callable[[nn.Module], dict], list[str] | None]] = {
    "classification": (get_task("classification").defaults, _minilm(tf.BertForSequenceClassification), _ids, None),
    "token-classification": (get_task("token-classification").defaults, _minilm(tf.BertForTokenClassification), _ids,
                             None),
    "causal-lm": (get_task("causal-lm").defaults, _smollm, _ids, []),
    "image-classification": (get_task("image-classification").defaults, lambda method: V.EfficientNetLite(10).eval(),
                             lambda m: {"images": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
                                        }, [V.HEAD]),
}


def _allowed(task: str, info) -> bool:
    if info.name == "llama_adapter":  # attention over learned prompts inside Llama / Mistral / GPT-2 decoders only
        return task == "causal-lm"
    if task != "image-classification":
        return True
    try:
        _targets_for(info, None)
    except PeftkitError:
        return False
    return True


CASES = [(t, i.name) for t in TASKS for i in all_methods() if _allowed(t, i)]


#: methods that have no meaningful default for a field the user must give (which tokens train)
#: and VB-LoRA, whose default vector length (PEFT's 256) divides neither MiniLM's 384 nor SmolLM2's 576 widths
#: (LLaMA-Adapter's default 30 prompt layers are SmolLM2's 30; the stand-in decoder here has one)
REQUIRED = {"trainable_tokens": ("--opt", "token_indices=[1,2,3]"), "vblora": ("--opt", "vector_length=64"),
            "llama_adapter": ("--opt", "adapter_layers=1")}


def _run(task: str, method: str, out: Path, *extra: str) -> tuple[TrainRun, nn.Module]:
    defaults, build, _, heads = TASKS[task]
    extra = (*REQUIRED.get(method, ()), *extra)
    args = build_parser().parse_args(["train", "--task", task, "--method", method, "--output", str(out),
                                      "--no-progress", *extra])
    if task == "image-classification":  # what the image task's train does before and after TrainRun
        args.targets = _targets_for(peftkit.get_method(method), args.targets)
    try:
        run = TrainRun(args, defaults, tag="t")
        if task == "image-classification":
            run.cfg_fields.setdefault("layers_pattern", V.LAYERS_PATTERN)
        torch.manual_seed(0)
        model = build(method)
        run.adapt(model, heads=heads)
    finally:
        release_run_locks()
    return run, model


def test_every_task_allows_most_methods() -> None:
    per_task = {t: sum(1 for task, _ in CASES if task == t) for t in TASKS}
    assert per_task["classification"] == len(all_methods()) - 1  # all but the decoder-only LLaMA-Adapter
    assert 15 <= per_task["image-classification"] < len(all_methods())
    assert ("image-classification", "mtlora") in CASES and ("image-classification", "loca") in CASES


@pytest.mark.parametrize("task,method", CASES)
def test_cli_defaults_adapt_the_tasks_default_model(task: str, method: str, tmp_path: Path) -> None:
    run, model = _run(task, method, tmp_path / "out")
    assert peftkit.adapter_names(model) == ["default"]
    if not peftkit.get_method(method).model_level:
        assert list(peftkit.adapted_layers(model))
    assert peftkit.summary(model).trainable > 0
    model.train()
    out = model(**TASKS[task][2](model))
    logits = out if isinstance(out, torch.Tensor) else out.logits
    logits.float().square().mean().backward()
    assert any(p.grad is not None for p in peftkit.trainable_parameters(model))


# (method, rank field, its default, on _blocks.0._project_conv (32 -> 16), on _blocks.1._project_conv (96 -> 24))
LOWERED = [("mtlora", "r", 64, 16, 24), ("loca", "n", 1000, 32 * 16, 1000)]


@pytest.mark.parametrize("method,field,default,first,second", LOWERED)
def test_a_default_above_a_layers_limit_is_lowered_on_that_layer_only(method: str, field: str, default: int,
                                                                       first: int, second: int,
                                                                       tmp_path: Path) -> None:
    run, model = _run("image-classification", method, tmp_path / "out")
    assert getattr(peftkit.get_method(method).config(), field) == default
    assert getattr(run.cfg, field) == default
    assert getattr(run.cfg.for_module("_blocks.0._project_conv"), field) == first
    assert getattr(run.cfg.for_module("_blocks.1._project_conv"), field) == second
    assert getattr(run.cfg.for_module("_conv_head"), field) == default  # 320 -> 1280: room for the default
    # the entries name one module exactly: a longer name ending in it keeps its own value
    assert getattr(run.cfg.for_module("_blocks.10._blocks.0._project_conv"), field) == default


def test_an_explicit_rank_above_a_layers_limit_stays_an_error(tmp_path: Path) -> None:
    with pytest.raises(PeftkitError, match=r"'_blocks.0._project_conv': rank 64 exceeds this layer's limit of 16"):
        _run("image-classification", "mtlora", tmp_path / "a", "--rank", "64")
    with pytest.raises(PeftkitError, match=r"rank 1000 exceeds this layer's limit of 512 \(LocaConfig.n"):
        _run("image-classification", "loca", tmp_path / "b", "--opt", "n=1000")


def test_the_lowered_config_is_saved_and_loads(tmp_path: Path) -> None:
    run, model = _run("image-classification", "mtlora", tmp_path / "out")
    peftkit.save(model, tmp_path / "saved")
    fresh = V.EfficientNetLite(10).eval()
    peftkit.load(fresh, tmp_path / "saved")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert fresh._blocks[0]._project_conv.adapters["default"].lora_A.shape[0] == 16
