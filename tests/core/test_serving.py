"""Serving many adapters: mixed batches (also across ``generate``), the batched low-rank path, hot-swapping adapter
weights in place, and combining low-rank adapters."""

from __future__ import annotations

import pytest
import torch

import peftkit
from conformance.models import METHOD_OVERRIDES, MODELS, perturb, same_state, state_copy, tiny_llama
from peftkit.core.lowrank import LowRankUpdate
from tolerance import assert_near

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama_with(method: str, names: list[str]) -> torch.nn.Module:
    model = tiny_llama()
    for i, n in enumerate(names):
        fields = {"target_modules": LLAMA_TARGETS, **METHOD_OVERRIDES.get(method, {})}
        peftkit.adapt(model, peftkit.config(method, **fields), name=n)
        perturb(model, seed=10 + i, std=0.3)
    return model


def _generate(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, **kw)


def _alone(model: torch.nn.Module, name: str | None, ids: torch.Tensor, **kw) -> torch.Tensor:
    if name is None:
        with peftkit.disable(model):
            return _generate(model, ids, **kw)
    peftkit.set_active(model, name, trainable=False)
    return _generate(model, ids, **kw)


def _generate_methods() -> list[str]:
    return [i.name for i in peftkit.all_methods() if not i.model_level and "linear" in i.hosts
            and not i.adapter.uses_condition]


@pytest.mark.parametrize("method", _generate_methods())
def test_generate_each_sequence_with_its_own_adapter(method: str) -> None:
    model = _llama_with(method, ["a", "b"])
    ids = torch.randint(2, 50, (3, 5), generator=torch.Generator().manual_seed(0))
    names = ["a", None, "b"]
    with torch.no_grad(), peftkit.mixed_batch(model, names):
        out = _generate(model, ids)
    refs = [_alone(model, n, ids[i:i + 1]) for i, n in enumerate(names)]
    assert not torch.equal(refs[0], refs[2])  # the adapters really decode differently
    for i, ref in enumerate(refs):
        assert torch.equal(out[i:i + 1], ref), (method, names[i])


def test_beam_search_needs_repeat_and_then_matches() -> None:
    model = _llama_with("lora", ["a", "b"])
    ids = torch.randint(2, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pytest.raises(peftkit.PeftkitError, match=r"repeat=3"), \
            peftkit.mixed_batch(model, ["a", "b"]):
        _generate(model, ids, num_beams=3)
    with torch.no_grad(), peftkit.mixed_batch(model, ["a", "b"], repeat=3):
        out = _generate(model, ids, num_beams=3)
    for i, n in enumerate(["a", "b"]):
        assert torch.equal(out[i:i + 1], _alone(model, n, ids[i:i + 1], num_beams=3))


def test_bad_names_are_refused_and_nothing_changes() -> None:
    model = _llama_with("lora", ["a", "b"])
    with pytest.raises(peftkit.PeftkitError, match=r"unknown adapter\(s\) \['zz'\]; loaded adapters: \['a', 'b'\]"):
        with peftkit.mixed_batch(model, ["a", "zz"]):
            pass
    for bad in ("a", [], None):
        with pytest.raises(peftkit.PeftkitError, match="names must be"), peftkit.mixed_batch(model, bad):
            pass
    with pytest.raises(peftkit.PeftkitError, match="repeat"), peftkit.mixed_batch(model, ["a"], repeat=0):
        pass
    assert all(layer.route is None for _, layer in peftkit.adapted_layers(model))


# -- the batched low-rank path ----------------------------------------------------------------------------------
def _many_lora(ranks: list[int], model_name: str = "block") -> tuple[torch.nn.Module, list[str]]:
    spec = MODELS[model_name]
    model = spec.build()
    names = []
    for i, r in enumerate(ranks):
        names.append(f"ad{i}")
        peftkit.adapt(model, peftkit.config("lora", target_modules=spec.targets, r=r, alpha=2 * r), name=names[-1])
        perturb(model, seed=i)
    return model, names


def _count_batched(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    orig = LowRankUpdate.batched_delta.__func__

    def spy(cls, adapters, x, index, out, inplace=False):
        y = orig(cls, adapters, x, index, out, inplace)
        calls.append(0 if y is None else len(adapters))
        return y

    monkeypatch.setattr(LowRankUpdate, "batched_delta", classmethod(spy))
    return calls


@pytest.mark.parametrize("model_name", ["block", "mlp", "gpt2"])
def test_batched_lowrank_equals_each_sample_alone(model_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, names = _many_lora([2, 4, 8, 4, 2], model_name)
    spec = MODELS[model_name]
    x = spec.input(batch=7)
    routed = [names[0], names[2], None, names[1], names[4], names[3], names[2]]
    calls = _count_batched(monkeypatch)
    with torch.no_grad(), peftkit.mixed_batch(model, routed):
        y = spec.run(model, x)
    assert calls and all(c == 5 for c in calls)  # every adapted layer took the batched path with all 5 adapters
    for i, n in enumerate(routed):
        if n is None:
            with peftkit.disable(model):
                ref = spec.run(model, x[i:i + 1])
        else:
            peftkit.set_active(model, n)
            ref = spec.run(model, x[i:i + 1])
        torch.testing.assert_close(y[i:i + 1], ref, rtol=1e-5, atol=1e-5)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), peftkit.mixed_batch(model, [routed[i] for i in perm]):
        torch.testing.assert_close(spec.run(model, x[perm]), y[perm], rtol=1e-5, atol=1e-5)


def test_batched_family_next_to_an_adapter_that_reads_the_base_output() -> None:
    """LoRA adapters (batched, accumulated in place) and an IA3 adapter (scales the base output) in one batch."""
    model, names = _many_lora([2, 4])
    spec = MODELS["block"]
    peftkit.adapt(model, peftkit.config("ia3", target_modules=spec.targets), name="ia")
    perturb(model, seed=7)
    x = spec.input(batch=5)
    routed = [names[0], "ia", names[1], None, "ia"]
    with torch.no_grad(), peftkit.mixed_batch(model, routed):
        y = spec.run(model, x)
    for i, n in enumerate(routed):
        if n is None:
            continue
        peftkit.set_active(model, n)
        with torch.no_grad():
            torch.testing.assert_close(y[i:i + 1], spec.run(model, x[i:i + 1]), rtol=1e-5, atol=1e-5)


def test_batched_lowrank_trains_like_the_per_adapter_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training mode: the mixed batch's loss gradient reaches each adapter exactly as the per-adapter path gives it."""
    model, names = _many_lora([2, 4, 8])
    spec = MODELS["block"]
    x = spec.input(batch=6)
    routed = [names[0], names[1], names[2], names[2], None, names[0]]
    peftkit.set_active(model, names)
    model.train()

    def grads(batched: bool) -> list[torch.Tensor]:
        model.zero_grad()
        if not batched:
            monkeypatch.setattr(LowRankUpdate, "batched_delta", classmethod(lambda cls, *args: None))
        with peftkit.mixed_batch(model, routed):
            spec.run(model, x).pow(2).sum().backward()
        monkeypatch.undo()
        return [p.grad.clone() for p in peftkit.trainable_parameters(model)]

    for g1, g2 in zip(grads(True), grads(False)):
        assert_near(g1, g2, 64, layers=6)


def test_zero_padded_ranks_change_nothing() -> None:
    """A rank-2 adapter padded with zero rows/columns to rank 8 gives the same mixed output."""
    model, names = _many_lora([2, 8])
    spec = MODELS["block"]
    x = spec.input(batch=4)
    routed = [names[0], names[1], names[0], names[1]]
    with torch.no_grad(), peftkit.mixed_batch(model, routed):
        y = spec.run(model, x)
    padded, _ = _many_lora([8, 8])
    with torch.no_grad():
        for (_, l2), (_, l1) in zip(peftkit.adapted_layers(padded), peftkit.adapted_layers(model)):
            src, dst = l1.adapters[names[0]], l2.adapters[names[0]]
            dst.lora_A.zero_()[:2] = src.lora_A
            dst.lora_B.zero_()[:, :2] = src.lora_B  # α = 2r: both have s = 2
            assert dst.s == src.s
            l2.adapters[names[1]].load_state_dict(l1.adapters[names[1]].state_dict())
    with torch.no_grad(), peftkit.mixed_batch(padded, routed):
        assert_near(spec.run(padded, x), y, 64, layers=6)


# -- hot-swapping ------------------------------------------------------------------------------------------------
def _mlp_lora(seed: int, r: int = 4, alpha: float = 8.0, dropout: float = 0.0) -> torch.nn.Module:
    spec = MODELS["mlp"]
    model = spec.build()
    peftkit.adapt(model, peftkit.config("lora", target_modules=spec.targets, r=r, alpha=alpha, dropout=dropout),
                  name="a")
    perturb(model, seed=seed)
    return model


@pytest.mark.parametrize("fmt", ["peftkit", "hf"])
def test_hotswap_copies_in_place(tmp_path, fmt: str) -> None:
    spec = MODELS["mlp"]
    x = spec.input()
    donor = _mlp_lora(seed=5)
    peftkit.save(donor, tmp_path / "b", format=fmt)
    y_donor = spec.run(donor, x)
    model = _mlp_lora(seed=1)
    model.eval()
    ids = {id(p) for p in model.parameters()}
    modules = [id(mod) for mod in model.modules()]
    y_before = spec.run(model, x)
    assert peftkit.hotswap(model, tmp_path / "b", name="a") == "a"
    assert {id(p) for p in model.parameters()} == ids and [id(mod) for mod in model.modules()] == modules
    assert_near(spec.run(model, x), y_donor, 64, layers=6)
    assert not torch.allclose(y_before, y_donor)


def test_hotswap_keeps_a_compiled_model_working(tmp_path) -> None:
    spec = MODELS["mlp"]
    x = spec.input()
    donor = _mlp_lora(seed=5)
    peftkit.save(donor, tmp_path / "b")
    model = _mlp_lora(seed=1)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        compiled(x)
        peftkit.hotswap(model, tmp_path / "b")
        assert_near(spec.output(compiled(x)), spec.run(donor, x), 64, layers=6)


@pytest.mark.parametrize("other, match", [
    (lambda: _mlp_lora(seed=5, r=8, alpha=16.0),
     r"tensor 'adapter\.fc1\.lora_A' has shape \(8, 16\) there .*prepare_hotswap\(model, 8"),
    (lambda: _mlp_lora(seed=5, dropout=0.1), r"config field 'dropout' is 0.1 there but 0.0"),
])
def test_hotswap_refuses_incompatible_and_changes_nothing(tmp_path, other, match) -> None:
    peftkit.save(other(), tmp_path / "b")
    model = _mlp_lora(seed=1)
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match=match):
        peftkit.hotswap(model, tmp_path / "b", name="a")
    assert same_state(before, state_copy(model)) and peftkit.adapter_names(model) == ["a"]


def test_hotswap_refuses_another_method(tmp_path) -> None:
    spec = MODELS["mlp"]
    donor = spec.build()
    peftkit.adapt(donor, peftkit.config("ia3", target_modules=spec.targets), name="a")
    peftkit.save(donor, tmp_path / "b")
    model = _mlp_lora(seed=1)
    before = state_copy(model)
    with pytest.raises(peftkit.PeftkitError, match="a 'ia3' adapter but 'a' is 'lora'"):
        peftkit.hotswap(model, tmp_path / "b")
    assert same_state(before, state_copy(model))


# -- combining ---------------------------------------------------------------------------------------------------
def _dw(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {p: layer.adapters[name].delta_weight().double() for p, layer in peftkit.adapted_layers(model)
            if name in layer.adapters}


def test_combine_cat_is_exactly_the_weighted_sum() -> None:
    model, names = _many_lora([2, 4, 8])
    w = {names[0]: 0.5, names[1]: -1.5, names[2]: 2.0}
    peftkit.combine(model, w, "mix", how="cat")
    ref = {p: sum(c * _dw(model, n)[p] for n, c in w.items()) for p in _dw(model, "mix")}
    for p, d in _dw(model, "mix").items():
        torch.testing.assert_close(d, ref[p], rtol=0, atol=1e-5)
    assert peftkit.get_config(model, "mix").r == 14
    spec = MODELS["block"]
    x = spec.input()
    peftkit.set_active(model, "mix")
    y = spec.run(model, x)
    peftkit.merge(model)  # the combined adapter is an ordinary adapter: merge gives the same output
    torch.testing.assert_close(spec.run(model, x), y, rtol=1e-5, atol=1e-5)


def test_combine_svd_full_rank_exact_and_truncated_optimal() -> None:
    model, names = _many_lora([2, 4])
    w = {names[0]: 1.0, names[1]: 0.5}
    peftkit.combine(model, w, "full", how="svd", rank=6)
    peftkit.combine(model, w, "low", how="svd", rank=3)
    full, low = _dw(model, "full"), _dw(model, "low")
    for p in full:
        ref = _dw(model, names[0])[p] + 0.5 * _dw(model, names[1])[p]
        torch.testing.assert_close(full[p], ref, rtol=0, atol=1e-5)
        sv = torch.linalg.svdvals(ref)
        err = torch.linalg.matrix_norm(low[p] - ref)  # Eckart–Young: the Frobenius error is the dropped tail
        torch.testing.assert_close(err, sv[3:].norm(), rtol=1e-4, atol=1e-5)


def test_combine_linear_follows_the_hf_convention() -> None:
    model, names = _many_lora([4, 4])
    peftkit.combine(model, {names[0]: 4.0, names[1]: 1.0}, "lin", how="linear")
    for _, layer in peftkit.adapted_layers(model):
        a0, a1 = (layer.adapters[n] for n in names)
        b = 2.0 * a0.s * a0.lora_B + a1.s * a1.lora_B
        a = 2.0 * a0.lora_A + a1.lora_A
        assert_near(layer.adapters["lin"].delta_weight(), b @ a, 64, layers=6)
    # one adapter with weight w: exactly w·ΔW
    peftkit.combine(model, {names[0]: 2.5}, "one", how="linear")
    for p, d in _dw(model, "one").items():
        torch.testing.assert_close(d, 2.5 * _dw(model, names[0])[p], rtol=0, atol=1e-5)


def test_combine_refuses_bad_input_and_changes_nothing() -> None:
    spec = MODELS["block"]
    model, names = _many_lora([2, 4])
    peftkit.adapt(model, peftkit.config("ia3", target_modules=spec.targets), name="ia")
    peftkit.adapt(model, peftkit.config("lora", target_modules=["q", "k"], r=2), name="qk")
    before, adapters = state_copy(model), peftkit.adapter_names(model)
    cases = [
        ({names[0]: 1.0, "ia": 1.0}, "cat", None, r"adapter 'ia' \(ia3\) is not a low-rank"),
        ({names[0]: 1.0, "qk": 1.0}, "cat", None, r"has adapters \['ad0'\] but not \['qk'\]"),
        ({names[0]: 1.0, names[1]: 1.0}, "linear", None, r"one rank; layer 'attn.q' has ranks \[2, 4\]"),
        ({names[0]: 1.0}, "svd", None, "needs rank="),
        ({names[0]: 1.0}, "sum", None, "how must be"),
        ({"nope": 1.0}, "cat", None, r"no adapter named 'nope'; loaded adapters"),
        ({names[0]: float("nan")}, "cat", None, "finite number"),
    ]
    for w, how, rank, match in cases:
        with pytest.raises(peftkit.PeftkitError, match=match):
            peftkit.combine(model, w, "new", how=how, rank=rank)
        assert peftkit.adapter_names(model) == adapters and same_state(before, state_copy(model))
