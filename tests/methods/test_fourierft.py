"""FourierFT: seeded frequencies (PEFT's draw), ΔW = α·Re(IDFT2(sparse spectrum)) against the cosine sum, and Hugging
Face PEFT's FOURIERFT files both directions on Linear and GPT-2 Conv1D hosts."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import peftkit
from conformance.models import MODELS, tiny_gpt2
from peft_interop import check_both_directions, peft_model
from peftkit.ops.spectral import random_frequencies, sparse_ifft2_real
from tolerance import assert_near

peft = pytest.importorskip("peft")

X = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))


def test_ifft_is_the_cosine_sum() -> None:
    d_out, d_in, n = 12, 10, 7
    loc = random_frequencies(d_out, d_in, n, seed=3)
    assert len(set(zip(loc[0].tolist(), loc[1].tolist(), strict=True))) == n  # distinct locations
    c = torch.randn(n, dtype=torch.float64)
    j = torch.arange(d_out, dtype=torch.float64)[:, None]
    k = torch.arange(d_in, dtype=torch.float64)[None, :]
    expected = sum(c[i] * torch.cos(2 * math.pi * (j * loc[0, i] / d_out + k * loc[1, i] / d_in))
                   for i in range(n)) / (d_out * d_in)
    assert_near(sparse_ifft2_real(c.float(), loc, d_out, d_in).double(), expected, d_out * d_in, dtype=torch.float32)


def test_locations_and_init_are_peft_s() -> None:
    base = MODELS["mlp"].build()
    torch.manual_seed(4)
    pm = peft_model(base, peft.FourierFTConfig(n_frequency=20, target_modules=["fc1", "fc2"], random_loc_seed=9))
    model = copy.deepcopy(base)
    torch.manual_seed(4)
    peftkit.adapt(model, peftkit.config("fourierft", target_modules=["fc1", "fc2"], n=20, seed=9))
    for path, layer in peftkit.adapted_layers(model):
        hf = pm.base_model.model.get_submodule(path)
        ad = layer.adapters["default"]
        assert torch.equal(ad.locations, hf.indices["default"])  # integer draws: exactly PEFT's
        assert_near(ad.fourierft_spectrum.detach(), hf.fourierft_spectrum["default"].detach(), 1)
        assert_near(ad.delta_weight().detach(), hf.get_delta_weight("default").detach(), 20)


def test_init_zeros_is_the_base_and_gaussian_is_not() -> None:
    base = MODELS["mlp"].build()
    with torch.no_grad():
        y0 = base(X)
        zeros = copy.deepcopy(base)
        peftkit.adapt(zeros, peftkit.config("fourierft", target_modules=["fc1", "fc2"], n=20, init="zeros"))
        assert torch.equal(zeros(X), y0)
        gauss = copy.deepcopy(base)
        peftkit.adapt(gauss, peftkit.config("fourierft", target_modules=["fc1", "fc2"], n=20))
        assert (gauss(X) - y0).abs().max() > 1e-3
    assert peftkit.summary(gauss).trainable == 40


@pytest.mark.parametrize("init", [True, False])
def test_matches_peft_both_directions(init: bool, tmp_path) -> None:
    check_both_directions(
        MODELS["mlp"].build(), X,
        peft.FourierFTConfig(n_frequency=24, scaling=70.0, random_loc_seed=5, target_modules=["fc1", "fc2"],
                             n_frequency_pattern={"fc2": 40}, init_weights=init),
        "fourierft", {"target_modules": ["fc1", "fc2"], "n": 24, "scale": 70.0, "seed": 5,
                      "overrides": {"fc2": {"n": 40}}, "init": "zeros" if init else "gaussian"}, tmp_path,
        std=2.0,
    )


def test_matches_peft_on_gpt2_conv1d(tmp_path) -> None:
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    targets = ["c_attn", "c_proj", "c_fc"]
    check_both_directions(
        tiny_gpt2(), ids, peft.FourierFTConfig(n_frequency=30, target_modules=targets, fan_in_fan_out=True),
        "fourierft", {"target_modules": targets, "n": 30}, tmp_path, run=lambda m, x: m(x).last_hidden_state,
        std=2.0,
    )


def test_too_many_frequencies_are_refused() -> None:
    model = MODELS["mlp"].build()
    with pytest.raises(peftkit.PeftkitError, match="exceeds this layer's limit of 512"):
        peftkit.adapt(model, peftkit.config("fourierft", target_modules=["fc1"], n=513))
    assert not list(peftkit.adapted_layers(model))
