"""Mixed precision, for every registered method (the cases come from the registry, as in ``test_matrix.py``): each
layer method on the matrix's MLP (LayerNorm-only methods on its norm model), each model-level method on the tiny
GPT-2.

* autocast (bfloat16, and float16 where it applies) forward + backward agrees with the float32 generic path, and
  the fused kernels agree with the generic path under autocast, within a bound derived from the dtype's eps;
* bfloat16 / float16 weights (``model.to(dtype)`` before ``adapt``) train: forward, backward, optimiser step,
  finite loss, changed output; the adapter keeps float32 parameters (the default, see ``core/precision.py``);
* every adapted layer returns the dtype its host layer alone returns under the same setting (training and
  inference);
* merge / unmerge on a bfloat16 base: the merged model computes the adapted function, the unmerge restores the
  weights bit for bit, the rounding error is recorded and an update the rounding erases is reported;
* a method registered with ``half_precision=False`` is refused at ``adapt`` time on a half-precision model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings

import pytest
import torch

import peftkit
from conformance.models import MODELS, TinyModel, matrix_config_fields, model_for, perturb
from peftkit.core import registry
from peftkit.core.layer import AdaptedLayer
from peftkit.core.registry import MethodInfo, all_methods


def _model_for(info: MethodInfo) -> str:
    return model_for(info)


METHODS = all_methods()
CASES = [pytest.param(info.name, id=info.name) for info in METHODS]
MERGEABLE = [pytest.param(info.name, id=info.name) for info in METHODS if info.mergeable]
# products a signal passes through, input to output, forward: the MLP's fc1 → fc2 → head; the norm model's
# fc → (ln, rms, ln_f as scalings) → head; GPT-2's block: c_attn, q·kᵀ, att·v, c_proj, c_fc, c_proj
DEPTH = {"mlp": 3, "norm": 3, "gpt2": 6, "embedding": 2}
ROWS = 40  # ≥ every tiny layer's d_in / d_out: the float32 fused kernels take their folded branches too


def test_every_method_is_covered() -> None:
    assert {p.values[0] for p in CASES} == {info.name for info in all_methods()}


def _bound(dtype: torch.dtype, depth: int, backward: bool = False) -> float:
    """Relative error, to the output's scale, of ``depth`` stacked products computed in ``dtype`` instead of
    float32: each product rounds its two operands and its result (3 × eps/2), and the error passes on through the
    later layers with a gain of about 1 — 1.5·eps per product; a backward makes the same products twice over (the
    input and the weight gradients)."""
    return 1.5 * torch.finfo(dtype).eps * depth * (2 if backward else 1)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    scale = float(expected.detach().abs().max().clamp_min(1e-12))
    err = float((actual.detach().float() - expected.detach().float()).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:.3g} × scale {scale:.3g}"


def _build(method: str, dtype: torch.dtype | None = None, seed: int = 1) -> tuple[TinyModel, torch.nn.Module]:
    info = peftkit.get_method(method)
    spec = MODELS[_model_for(info)]
    model = spec.build()
    if dtype is not None:
        model.to(dtype)
    peftkit.adapt(model, info.config.from_dict(matrix_config_fields(method, spec)))
    perturb(model, seed)
    return spec, model


def _input(spec: TinyModel, dtype: torch.dtype | None = None, batch: int = ROWS) -> torch.Tensor:
    x = spec.input(batch=batch // (5 if spec.name == "norm" else 1))
    return x.to(dtype) if dtype is not None and x.is_floating_point() else x


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _forward_backward(spec: TinyModel, model: torch.nn.Module, x: torch.Tensor, autocast: torch.dtype | None,
                      generic: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output (float32 copy) and the trainable parameters' gradients of ``Σ y ⊙ w`` (w seeded); the backward runs
    outside the autocast block, as in a training loop."""
    model.zero_grad(set_to_none=True)
    with _autocast(autocast), peftkit.unfused() if generic else contextlib.nullcontext():
        y = spec.run(model, x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y.float() * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return y.detach().float(), grads


@pytest.mark.parametrize("method", CASES)
def test_autocast_agrees_with_float32_generic_path(method: str) -> None:
    spec, model = _build(method)
    x = _input(spec)  # eval mode (no dropout draws to match); the fused kernels run as in training: grad mode is on
    depth = DEPTH[spec.name]
    y32, g32 = _forward_backward(spec, model, x, None, generic=True)
    for dt in (torch.bfloat16, torch.float16):
        y, g = _forward_backward(spec, model, x, dt, generic=False)
        _close(y, y32, _bound(dt, depth), f"{dt} autocast output")
        for n in g32:
            assert g[n].dtype == g32[n].dtype, f"{n}: gradient dtype {g[n].dtype}, parameter {g32[n].dtype}"
            _close(g[n], g32[n], _bound(dt, depth, backward=True), f"{dt} autocast gradient of {n}")


@pytest.mark.parametrize("method", CASES)
def test_fused_and_generic_agree_under_autocast(method: str) -> None:
    spec, model = _build(method)
    x = _input(spec)
    depth = DEPTH[spec.name]
    y_gen, g_gen = _forward_backward(spec, model, x, torch.bfloat16, generic=True)
    y, g = _forward_backward(spec, model, x, torch.bfloat16, generic=False)
    # two computations in bfloat16, each within the bound of the float32 result
    _close(y, y_gen, 2 * _bound(torch.bfloat16, depth), "fused vs generic output")
    for n in g_gen:
        _close(g[n], g_gen[n], 2 * _bound(torch.bfloat16, depth, backward=True), f"fused vs generic gradient of {n}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", CASES)
def test_half_precision_weights_train(method: str, dtype: torch.dtype) -> None:
    spec, model = _build(method, dtype)
    model.train()
    params = peftkit.trainable_parameters(model)
    # the default: adapter parameters in float32; modules_to_save copies (whole modules the model runs in its own
    # dtype, like the frozen original) and methods registered with float32_params=False keep the model's dtype
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    own = torch.float32 if peftkit.get_method(method).float32_params else dtype
    assert named and all(p.dtype == (dtype if ".copies." in n else own) for n, p in named.items())
    x = _input(spec, dtype)
    with torch.no_grad():
        y0 = spec.run(model, x)
    assert y0.dtype == dtype
    y = spec.run(model, x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    loss = (y.float() * w).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
    torch.optim.SGD(params, lr=0.5).step()
    with torch.no_grad():
        y1 = spec.run(model, x)
    assert torch.isfinite(y1).all() and y1.dtype == dtype
    assert not torch.equal(y1, y0), "an optimiser step did not change the output"


@pytest.mark.parametrize("method", [p for p in CASES if not peftkit.get_method(p.values[0]).model_level])
def test_half_precision_adapters_train(method: str) -> None:
    # the opt-out: a model cast after adapt has bfloat16 adapters, which train as well
    spec, model = _build(method)
    model.to(torch.bfloat16).train()
    params = peftkit.trainable_parameters(model)
    assert all(p.dtype == torch.bfloat16 for p in params)
    x = _input(spec, torch.bfloat16)
    y = spec.run(model, x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


SETTINGS = {  # name -> (model weight dtype, autocast dtype)
    "autocast-bf16": (None, torch.bfloat16),
    "bf16": (torch.bfloat16, None),
    "bf16+autocast-bf16": (torch.bfloat16, torch.bfloat16),
}  # float16 weights: test_half_precision_weights_train checks the model's output dtype


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("method", CASES)
def test_output_dtype_is_the_host_layers(method: str, setting: str) -> None:
    weights, autocast = SETTINGS[setting]
    info = peftkit.get_method(method)
    spec, model = _build(method, weights)
    x = _input(spec, weights, batch=ROWS)
    seen: list[tuple[str, torch.dtype, torch.dtype]] = []

    def hook(layer: AdaptedLayer, args: tuple, out: torch.Tensor) -> None:
        with torch.no_grad():
            seen.append((layer.host.name, out.dtype, layer.base_layer(*args).dtype))

    hooks = [layer.register_forward_hook(hook) for _, layer in peftkit.adapted_layers(model)]
    try:
        for training in (True, False):  # the fused training kernels, then the inference path
            model.train(training)
            with torch.set_grad_enabled(training), _autocast(autocast):
                y = spec.run(model, x)
            with torch.no_grad(), peftkit.disable(model), _autocast(autocast):
                y_base = spec.run(model, x)
            assert y.dtype == y_base.dtype
    finally:
        for h in hooks:
            h.remove()
    if not info.model_level:
        assert seen
    for name, got, expected in seen:
        assert got == expected, f"{name}: adapted output {got}, the host layer alone gives {expected}"


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_unmerge_on_a_bfloat16_base(method: str) -> None:
    spec, model = _build(method, torch.bfloat16)
    model.eval()
    x = _input(spec, torch.bfloat16)
    with torch.no_grad():
        y = spec.run(model, x).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a visible update: no rounding warning
        peftkit.merge(model)
    layers = [layer for _, layer in peftkit.adapted_layers(model)]
    for layer in layers:
        assert layer.merged == ["default"] and layer.host.weight.dtype == torch.bfloat16
        # the largest rounding error of the merged weight: at most half a bfloat16 ulp of its largest entry
        w = layer.host.weight.detach().float()
        assert layer.merge_error is not None
        assert 0 <= layer.merge_error <= float(w.abs().max()) * torch.finfo(torch.bfloat16).eps / 2
    with torch.no_grad():
        y_merged = spec.run(model, x).float()
    # merged (weights rounded once) vs unmerged (each product rounded): both within the bound of the exact output
    _close(y_merged, y, 2 * _bound(torch.bfloat16, DEPTH[spec.name]), "merged vs unmerged output")
    peftkit.unmerge(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:  # the claim is bit-exactness, so the comparison is exact
        assert torch.equal(after[k], before[k]), f"{k} is not restored exactly"
    assert all(layer.merge_error is None and not layer.merged for layer in layers)


def test_merge_of_a_tiny_update_into_bfloat16_is_reported() -> None:
    spec, model = _build("lora", torch.bfloat16)
    for _, layer in peftkit.adapted_layers(model):  # an update ~1e-4 of the weights: below bfloat16's rounding
        with torch.no_grad():
            layer.adapters["default"].lora_B.mul_(1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="rounding to the weight's precision erases most of the update"):
        peftkit.merge(model)
    peftkit.unmerge(model)
    for k in before:
        assert torch.equal(model.state_dict()[k], before[k])


def test_merge_rounds_once_from_float32() -> None:
    spec, model = _build("lora", torch.bfloat16)
    path, layer = next(iter(peftkit.adapted_layers(model)))
    w0 = layer.host.weight.detach().clone()
    delta = layer.adapters["default"].delta_weight().detach()
    peftkit.merge(model)
    once = (w0.float() + delta.float()).to(torch.bfloat16)  # the sum exact in float32, one rounding
    got = layer.host.weight.detach()
    # rounding once is within half an ulp of the exact sum everywhere; W0 + round(ΔW) rounds twice
    ulp = torch.finfo(torch.bfloat16).eps * once.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    assert ((got.float() - (w0.float() + delta.float())).abs() <= ulp / 2 + 1e-30).all(), path
    assert float((got.float() - once.float()).abs().max()) == 0.0


def test_a_method_that_cannot_run_in_half_precision_is_refused_at_adapt() -> None:
    from peftkit.methods.lora import Lora, LoraConfig

    @dataclasses.dataclass
    class NoHalfConfig(LoraConfig):
        pass

    class NoHalf(Lora):
        pass

    registry.register("_no_half", config=NoHalfConfig, paper="-", description="-", params="-",
                      half_precision=False, half_precision_note="needs float64 LU at init")(NoHalf)
    try:
        spec = MODELS["mlp"]
        model = spec.build().to(torch.bfloat16)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(peftkit.PeftkitError, match=r"method '_no_half' cannot run on a bfloat16 model "
                                                       r"\(needs float64 LU at init\); adapt a float32 model"):
            peftkit.adapt(model, NoHalfConfig(target_modules=["fc1"]))
        assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
        assert model.state_dict().keys() == state.keys()
        peftkit.adapt(spec.build(), NoHalfConfig(target_modules=["fc1"]))  # float32: fine
    finally:
        registry._REGISTRY.pop("_no_half", None)


def test_bound_is_meaningful() -> None:
    # the bounds are far below what an adapter changes: a check that passed because the adapter did nothing
    # would not pass here (LoRA's perturbed update moves the MLP's output by ≫ the bound)
    spec, model = _build("lora")
    x = _input(spec)
    with torch.no_grad():
        y = spec.run(model, x)
        with peftkit.disable(model):
            y_base = spec.run(model, x)
    rel = float((y - y_base).abs().max() / y.abs().max())
    assert rel > 10 * _bound(torch.bfloat16, DEPTH["mlp"]) and math.isfinite(rel)
