"""torch.compile, for every registered method (the cases come from the registry, as in ``test_matrix.py``).

* every method's adapted model compiles: compiled forward + backward agree with eager (the eager side runs the
  fused kernels where a method has them, the compiled side the generic path — :func:`peftkit.core.adapter.
  fused_allowed` is False while compiling), one model per method;
* ``torch._dynamo.explain`` finds no graph break inside peftkit code (an adapted layer, an adapter) on any model of
  the matrix, in training mode (the branches a training forward takes) — unless the method registers
  ``compile_breaks`` (data-dependent control flow, inside ``peftkit.condition`` blocks), in which case the declared
  breaks are asserted to happen there and nowhere else;
* ``torch.compile(model, fullgraph=True)`` of a LoRA / DoRA / IA3-adapted BERT and Llama (transformers models from
  small configs): forward + backward, agreeing with eager.

The compiled runs use ``backend="aot_eager"``: Dynamo's graph capture and AOTAutograd (where untraceable adapter
code, custom autograd functions and graph breaks show) without Inductor's code generation, which takes minutes per
model on this machine's CPUs. ``torch._dynamo.reset()`` runs between cases (no cache limit is reached).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

import peftkit
from conformance.models import MODELS, TinyModel, matrix_config_fields, model_for, perturb
from peftkit.core.registry import MethodInfo, all_methods
from tolerance import assert_near

METHODS = all_methods()
PEFTKIT_DIR = os.path.dirname(os.path.abspath(peftkit.__file__))
CASES = [
    pytest.param(info.name, spec.name, id=f"{info.name}-{spec.name}")
    for info in METHODS
    for spec in MODELS.values()
    if (spec.hf if info.model_level else set(spec.hosts) <= set(info.hosts))
]
# Graph breaks are looked for on every model for every method, except the two models that trace a whole attention
# block (slow to trace on this machine): there LoRA, DoRA, IA3 and the model-level methods (which run only there).
# Every method was checked on every model when this file was written (0 breaks inside peftkit).
MAINSTREAM = {"lora", "dora", "ia3"}
EXPLAIN_CASES = [
    p for p in CASES
    if p.values[1] not in ("block", "gpt2") or p.values[0] in MAINSTREAM or peftkit.get_method(p.values[0]).model_level
]
# per-sample condition values for the methods that read them (``uses_condition``), with the config fields that make
# them matter on the MLP: several distinct conditions per batch of 4
CONDITIONS: dict[str, tuple[dict, Callable[[], torch.Tensor]]] = {
    "conditional_ssf": ({}, lambda: torch.tensor([0, 2, 1, 1])),
    "polyhistor": ({"num_tasks": 3}, lambda: torch.tensor([2, 0, 1, 1])),
    "mtlora": ({"tasks": ["a"], "task_modules": ["fc2"]}, lambda: torch.tensor([0, 0, 1, 1])),
    "divcontrol": ({}, lambda: torch.rand(4, 4, generator=torch.Generator().manual_seed(0))),
    "petalface": ({}, lambda: torch.rand(4, generator=torch.Generator().manual_seed(0))),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model_for(info: MethodInfo) -> str:
    return model_for(info)


def _adapted(method: str, model_name: str, **extra) -> tuple[TinyModel, torch.nn.Module]:
    info, spec = peftkit.get_method(method), MODELS[model_name]
    model = spec.build()
    peftkit.adapt(model, info.config.from_dict({**matrix_config_fields(method, spec), **extra}))
    perturb(model, 1)
    return spec, model


def _breaks_inside_peftkit(explained) -> list[str]:
    """The graph breaks whose stack passes through peftkit's own code (an adapted layer, an adapter, the core)."""
    out = []
    for br in explained.break_reasons:
        frames = [f for f in br.user_stack if os.path.abspath(f.filename).startswith(PEFTKIT_DIR)]
        if frames:
            where = ", ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[-3:])
            out.append(f"{br.reason.splitlines()[0][:160]} at {where}")
    return out


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _forward_backward(spec: TinyModel, fn: Callable, model: torch.nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    y = spec.output(fn(x))
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * w).sum().backward()
    return y.detach(), _grads(model)


def test_every_method_is_covered_and_conditions_are_known() -> None:
    assert {p.values[0] for p in CASES} == {info.name for info in METHODS}
    assert {i.name for i in METHODS if getattr(i.adapter, "uses_condition", False)} == set(CONDITIONS)
    for info in METHODS:  # a declared break is a reason in words, for a method whose forward branches on data
        assert not info.compile_breaks or (len(info.compile_breaks) > 20 and info.adapter.uses_condition)


@pytest.mark.parametrize("method", [pytest.param(i.name, id=i.name) for i in METHODS])
def test_compiled_forward_backward_agrees_with_eager(method: str) -> None:
    info = peftkit.get_method(method)
    spec, model = _adapted(method, _model_for(info))
    x = spec.input()
    y, g = _forward_backward(spec, model, model, x)
    compiled = torch.compile(model, backend="aot_eager")
    yc, gc = _forward_backward(spec, compiled, model, x)
    assert_near(yc, y, 64, layers=4)
    assert gc.keys() == g.keys() and g
    for n in g:
        assert_near(gc[n], g[n], 64, layers=6, scale=float(g[n].abs().max()) or None, msg=n)


@pytest.mark.parametrize("method,model_name", EXPLAIN_CASES)
def test_no_graph_break_inside_adapted_layers(method: str, model_name: str) -> None:
    spec, model = _adapted(method, model_name)
    model.train()  # the branches a training forward takes (dropout, training-only paths)
    breaks = _breaks_inside_peftkit(torch._dynamo.explain(model)(spec.input()))
    assert breaks == [], f"{method} on {model_name}: {breaks}"


@pytest.mark.parametrize("method", sorted(CONDITIONS))
def test_condition_blocks_compile_or_break_as_declared(method: str) -> None:
    info = peftkit.get_method(method)
    extra, values = CONDITIONS[method]
    spec, model = _adapted(method, "mlp", **extra)
    x = spec.input()
    with peftkit.condition(model, values()):
        y = spec.run(model, x)
        explained = torch._dynamo.explain(model)(x)
        breaks = _breaks_inside_peftkit(explained)
        if info.compile_breaks:
            assert breaks, f"{method} declares compile_breaks but compiled without one"
        else:
            assert breaks == [], breaks
        compiled = torch.compile(model, backend="aot_eager")
        assert_near(spec.output(compiled(x)), y.detach(), 64, layers=4)


def test_mixed_batch_compiles_without_a_break() -> None:
    spec = MODELS["block"]
    model = spec.build()
    for i, n in enumerate(["a", "b"]):
        peftkit.adapt(model, peftkit.config("lora", target_modules=spec.targets, r=2 + 2 * i), name=n)
        perturb(model, 10 + i)
    x = spec.input()
    with torch.no_grad(), peftkit.mixed_batch(model, ["b", None, "a", "b"]):
        y = spec.run(model, x)
        assert _breaks_inside_peftkit(torch._dynamo.explain(model)(x)) == []
        assert_near(spec.run(torch.compile(model, backend="aot_eager"), x), y, 64, layers=4)


# -- fullgraph=True on real transformers models ----------------------------------------------------------------------
def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                      eos_token_id=None)
    return LlamaForCausalLM(cfg)


HF = {
    "bert": (_bert, {"target_modules": ["query", "key", "value", "dense"]}, {"feedforward_modules": ["dense"]}),
    "llama": (_llama, {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]}, {"feedforward_modules": ["down_proj"]}),
}


@pytest.mark.parametrize("arch", sorted(HF))
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_fullgraph_transformers(method: str, arch: str) -> None:
    build, fields, ia3_extra = HF[arch]
    model = build()
    peftkit.adapt(model, peftkit.config(method, **fields, **(ia3_extra if method == "ia3" else {})))
    perturb(model, 1)
    model.train()
    ids = torch.randint(2, 50, (2, 8), generator=torch.Generator().manual_seed(0))

    def run(fn: Callable) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = fn(input_ids=ids).logits
        logits.pow(2).sum().backward()
        return logits.detach(), _grads(model)

    y, g = run(model)
    yc, gc = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    assert_near(yc, y, 32, layers=4)
    assert gc.keys() == g.keys() and any(".adapters." in n for n in g)
    for n in g:
        assert_near(gc[n], g[n], 32, layers=6, msg=n)
