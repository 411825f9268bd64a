"""LoReFT / NoReFT / DiReFT: the intervention's formula against a hand computation, R's orthonormal rows through
training, which positions change (and which stay bit-identical) under left and right padding, the parameter count,
layer discovery, generation (prompt positions only) and save/load."""

from __future__ import annotations

import pytest
import torch

import peftkit
from conformance.models import tiny_bert, tiny_gpt2, tiny_llama
from peftkit.methods.loreft import (
    DiReftConfig,
    Intervention,
    LoReftConfig,
    NoReftConfig,
    choose,
    orthonormal_rows,
    reflectors,
)
from tolerance import assert_near


def _adapter(model: torch.nn.Module, name: str = "default"):
    return model.peftkit_model_adapters.adapters[name]


def _hand(h: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor, subtract: bool) -> torch.Tensor:
    """Φ(h) = h + Rᵀ(W h + b − R h), one row and one coordinate at a time (float64)."""
    out = h.clone()
    for n in range(h.shape[0]):
        for i in range(R.shape[0]):
            coef = sum(W[i, j] * h[n, j] for j in range(h.shape[1])) + b[i]
            if subtract:
                coef -= sum(R[i, j] * h[n, j] for j in range(h.shape[1]))
            for j in range(h.shape[1]):
                out[n, j] += R[i, j] * coef
    return out


@pytest.mark.parametrize("cfg,subtract", [(LoReftConfig(r=3, dropout=0.0), True),
                                          (NoReftConfig(r=3, dropout=0.0), True),
                                          (DiReftConfig(r=3, dropout=0.0), False)])
def test_formula_against_a_hand_computation(cfg: LoReftConfig, subtract: bool) -> None:
    torch.manual_seed(0)
    unit = Intervention(8, cfg, "cpu").double()
    with torch.no_grad():
        unit.source.bias.normal_()
    h = torch.randn(5, 8, dtype=torch.float64)
    R = unit.frame().detach()
    expected = _hand(h, R, unit.source.weight.detach(), unit.source.bias.detach(), subtract)
    assert_near(unit(h).detach(), expected, 8)
    if cfg.orthogonality:
        assert_near(R @ R.t(), torch.eye(3, dtype=torch.float64), 8)


def test_reflectors_give_back_the_frame() -> None:
    frame = torch.nn.init.orthogonal_(torch.empty(4, 10, dtype=torch.float64))
    x, signs = reflectors(frame)
    assert set(signs.tolist()) <= {-1.0, 1.0}
    assert_near(orthonormal_rows(x, signs), frame, 10)


def test_rows_stay_orthonormal_through_training() -> None:
    model = tiny_llama()
    peftkit.adapt(model, LoReftConfig(r=4, prefix_positions=2, suffix_positions=2, dropout=0.0))
    units = [u for site in _adapter(model).sites for u in site.units]
    assert len(units) == 2 * 2  # two layers, untied prefix and suffix
    before = [u.frame().detach().clone() for u in units]
    opt = torch.optim.AdamW(peftkit.trainable_parameters(model), lr=0.05, weight_decay=0.1)
    ids = torch.randint(2, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(10):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for u, r0 in zip(units, before, strict=True):
        R = u.frame().detach()
        assert (R - r0).abs().max() > 1e-2  # R moved ...
        assert_near(R @ R.t(), torch.eye(4), 32)  # ... and its rows stayed orthonormal


def test_choose_counts_real_tokens_under_left_and_right_padding() -> None:
    right = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    left = right.flip(1)
    # p = 2, s = 1: the first two and the last real token; 4 tokens -> 2 + 1; 1 token -> ⌊1/2⌋ = 0 each side
    exp_right = torch.tensor([[1, 1, 0, 0, 0, 0, 2], [1, 1, 0, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.int8)
    exp_left = torch.tensor([[1, 1, 0, 0, 0, 0, 2], [0, 0, 0, 1, 1, 0, 2], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.int8)
    assert torch.equal(choose(right, 2, 1), exp_right)
    assert torch.equal(choose(left, 2, 1), exp_left)
    # both sides longer than half a short sample: at most ⌊n/2⌋ each, never overlapping
    assert torch.equal(choose(torch.ones(1, 5, dtype=torch.bool), 3, 3), torch.tensor([[1, 1, 0, 2, 2]],
                                                                                     dtype=torch.int8))
    # one side: up to all real tokens
    assert torch.equal(choose(left[1:2], 5, 0), torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.int8))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_only_chosen_positions_change(padding: str) -> None:
    model = tiny_llama()
    ids = torch.randint(2, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    if padding == "left":
        mask = mask.flip(1)
    outs: list[torch.Tensor] = []
    peftkit.adapt(model, LoReftConfig(layers=[1], prefix_positions=2, suffix_positions=2, r=2))
    model.model.layers[1].register_forward_hook(lambda m, a, out: outs.append(out.detach().clone()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        with peftkit.disable(model):
            model(input_ids=ids, attention_mask=mask)
    adapted, base = outs
    changed = (adapted != base).any(-1)
    real = [range(8), range(5) if padding == "right" else range(3, 8)]
    expected = torch.zeros(2, 8, dtype=torch.bool)
    for row, toks in enumerate(real):
        toks = list(toks)
        for t in toks[:2] + toks[-2:]:
            expected[row, t] = True
    assert torch.equal(changed, expected)
    assert torch.equal(adapted[~expected], base[~expected])  # untouched positions: bit-identical to the base


@pytest.mark.parametrize("build,path", [(tiny_bert, "bert.encoder.layer"), (tiny_llama, "model.layers"),
                                        (tiny_gpt2, "h")])
@pytest.mark.parametrize("cfg,sides", [(LoReftConfig(r=2), 1), (LoReftConfig(r=2, suffix_positions=1), 2),
                                       (LoReftConfig(r=2, suffix_positions=1, tied_weights=True), 1)])
def test_parameter_count_and_layers(build, path: str, cfg: LoReftConfig, sides: int) -> None:
    model = build()
    d = model.config.hidden_size
    peftkit.adapt(model, cfg)
    n_layers = len(model.get_submodule(path))
    assert _adapter(model).paths == [f"{path}.{i}" for i in range(n_layers)]
    # AdapterHub and pyreft count R (d·r), W (r·d) and b (r) per intervention
    assert peftkit.summary(model).trainable == n_layers * sides * (2 * 2 * d + 2)


def test_chosen_layers_and_layer_module() -> None:
    model = tiny_llama()
    peftkit.adapt(model, LoReftConfig(layers=[1], layer_module="layers"))
    assert _adapter(model).paths == ["model.layers.1"]
    with pytest.raises(peftkit.PeftkitError, match="layers=\\[5\\]"):
        peftkit.adapt(tiny_llama(), LoReftConfig(layers=[5]))
    with pytest.raises(peftkit.PeftkitError, match="layer_module"):
        peftkit.adapt(tiny_llama(), LoReftConfig(layer_module="nothing"))


@pytest.mark.parametrize("fields,match", [({"prefix_positions": 0}, "not both 0"), ({"suffix_positions": -1}, ">= 0"),
                                          ({"layers": []}, "layers"), ({"non_linearity": "cube"}, "non_linearity"),
                                          ({"r": 0}, "r")])
def test_bad_config_is_one_clear_error(fields: dict, match: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match=match):
        LoReftConfig(**fields)


def test_generate_intervenes_on_the_prompt_only() -> None:
    model = tiny_llama()
    prompt = torch.randint(2, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model.generate(prompt, max_new_tokens=6, do_sample=False)
    peftkit.adapt(model, LoReftConfig(r=4, prefix_positions=2, suffix_positions=2))
    with torch.no_grad():
        torch.manual_seed(3)
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.5)
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert not torch.equal(got, base)
        # reference: the adapted model on the prompt, then the base model from that cache, greedily
        out = model(input_ids=prompt, use_cache=True)
        cache, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1, keepdim=True)]
        with peftkit.disable(model):
            for _ in range(5):
                out = model(input_ids=tokens[-1], cache=cache, use_cache=True)
                cache = out.past_key_values
                tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(got, torch.cat([prompt, *tokens], dim=1))


def test_save_load_and_generate_round_trip(tmp_path) -> None:
    model = tiny_llama()
    peftkit.adapt(model, NoReftConfig(r=2, suffix_positions=1, non_linearity="tanh"))
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.3)
    prompt = torch.randint(2, 50, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=4, do_sample=False)
    peftkit.save(model, tmp_path / "ad")
    fresh = tiny_llama()
    peftkit.load(fresh, tmp_path / "ad")
    assert peftkit.get_config(fresh, "default") == peftkit.get_config(model, "default")
    with torch.no_grad():
        assert torch.equal(fresh.generate(prompt, max_new_tokens=4, do_sample=False), want)


def test_merge_refuses_and_deleting_removes_the_hooks() -> None:
    model = tiny_llama()
    ids = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    peftkit.adapt(model, LoReftConfig())
    with pytest.raises(peftkit.PeftkitError):
        peftkit.merge(model)
    peftkit.delete(model, "default")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)
    assert not any(layer._forward_hooks for layer in model.model.layers)
