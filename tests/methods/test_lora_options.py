"""LoRA's Hugging Face PEFT options implemented in peftkit: ``lora_bias`` (a trainable bias on B), grouped
convolutions as hosts (grouped B, PEFT's layout), and ``trainable_token_indices`` (embedding rows next to the
low-rank layers) — each against a by-hand computation, through peftkit's own save / load in both formats, and merge."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from tolerance import assert_near


class Net(nn.Module):
    """Embedding → Linear (bias) → Linear (no bias) → grouped Conv1d (groups 2) over the sequence as channels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.nobias = nn.Linear(8, 8, bias=False)
        self.grouped = nn.Conv1d(4, 6, 3, padding=1, groups=2)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.nobias(torch.tanh(self.fc(self.emb(ids))))  # (B, 4, 8): 4 positions as conv channels
        return self.grouped(h)


def _ids() -> torch.Tensor:
    return torch.tensor([[0, 3, 7, 19], [5, 5, 1, 12]])


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _own_round_trip(model: nn.Module, tmp_path: Path, fmt: str) -> None:
    peftkit.save(model, tmp_path / fmt, format=fmt)
    fresh = Net()
    peftkit.load(fresh, tmp_path / fmt)
    with torch.no_grad():
        assert torch.equal(fresh(_ids()), model(_ids()))


# -- lora_bias -------------------------------------------------------------------------------------------------------
def test_lora_bias_adds_a_scaled_bias_on_b(tmp_path: Path) -> None:
    model = peftkit.adapt(Net(), peftkit.config("lora", target_modules=["fc"], r=2, lora_alpha=6, lora_bias=True))
    ad = model.fc.adapters["default"]
    assert ad.lora_B_bias is not None and torch.equal(ad.lora_B_bias, torch.zeros(8))  # init: ΔW = 0, c = 0
    _perturb(model)
    for fmt in ("hf", "peftkit"):
        _own_round_trip(model, tmp_path, fmt)
    x = torch.randn(3, 8)
    with torch.no_grad():
        w, b = ad.host.weight, ad.host.bias
        expected = x @ w.t() + b + 3.0 * (x @ ad.lora_A.t() @ ad.lora_B.t() + ad.lora_B_bias)
        assert_near(model.fc(x), expected, 8)
        y = model(_ids())
        bias0 = model.fc.base_layer.bias.detach().clone()
        peftkit.merge(model)
        assert_near(model.fc.base_layer.bias, bias0 + 3.0 * ad.lora_B_bias.detach())
        assert_near(model(_ids()), y, 8, layers=3)
        peftkit.unmerge(model)
        assert_near(model.fc.base_layer.bias, bias0)
    n = sum(p.numel() for p in peftkit.trainable_parameters(model))
    assert n == peftkit.get_method("lora").adapter.expected_params(ad.host, ad.config) == 2 * 16 + 8


def test_lora_bias_on_a_layer_without_bias_runs_but_refuses_to_merge() -> None:
    model = peftkit.adapt(Net(), peftkit.config("lora", target_modules=["nobias"], r=2, lora_bias=True))
    _perturb(model)
    with torch.no_grad():
        y = model(_ids())
        w = model.nobias.base_layer.weight.detach().clone()
        with pytest.raises(peftkit.PeftkitError, match="bias.*cannot be merged into a layer without a bias"):
            peftkit.merge(model)
        assert torch.equal(model.nobias.base_layer.weight, w) and model.nobias.base_layer.bias is None
        assert torch.equal(model(_ids()), y)


def test_lora_bias_is_refused_on_embeddings_and_unknown_spellings_still_fail() -> None:
    with pytest.raises(peftkit.PeftkitError, match="lora_bias=True on 'emb'"):
        peftkit.adapt(Net(), peftkit.config("lora", target_modules=["emb"], lora_bias=True))
    with pytest.raises(peftkit.PeftkitError, match="lora_bias"):
        peftkit.config("lora", lora_bais=True)
    with pytest.raises(peftkit.PeftkitError, match="lora_bias"):
        peftkit.config("dora", lora_bias=True)  # DoRA does not implement it: refused by name


# -- grouped convolutions ---------------------------------------------------------------------------------------------
def test_grouped_conv_lora_is_a_dense_a_and_a_grouped_b(tmp_path: Path) -> None:
    model = peftkit.adapt(Net(), peftkit.config("lora", target_modules=["grouped"], r=4, lora_alpha=4))
    layer = model.grouped
    ad = layer.adapters["default"]
    assert layer.host.kind == "grouped_conv" and layer.host.d_in == 4 * 3
    assert ad.lora_A.shape == (4, 12) and ad.lora_B.shape == (6, 2)  # B: r/G = 2 rank channels per output channel
    _perturb(model)
    x = torch.randn(2, 4, 8)
    conv = model.grouped.base_layer
    with torch.no_grad():
        h = F.conv1d(x, ad.lora_A.reshape(4, 4, 3), padding=1)  # A sees every input channel
        up = F.conv1d(h, ad.lora_B.reshape(6, 2, 1), groups=2)  # B: grouped 1×1, as PEFT's lora_B
        assert_near(model.grouped(x), conv(x) + up, 12, layers=2)
        # the 2-D view is the block-diagonal dense weight, and writing it back gives the grouped kernel
        w2 = layer.host.weight_2d()
        assert w2.shape == (6, 12) and torch.equal(w2[:3, 6:], torch.zeros(3, 6))
        assert torch.equal(layer.host.to_native(w2), conv.weight)
        y = model(_ids())
        with pytest.raises(peftkit.PeftkitError, match="grouped convolution \\(groups=2\\).*across its groups"):
            peftkit.merge(model)
        assert torch.equal(model(_ids()), y)
    assert sum(p.numel() for p in peftkit.trainable_parameters(model)) == 4 * 12 + 6 * 2
    for fmt in ("hf", "peftkit"):
        _own_round_trip(model, tmp_path, fmt)


def test_grouped_conv_rank_must_be_a_multiple_of_the_groups() -> None:
    with pytest.raises(peftkit.PeftkitError, match="multiple of the groups, got r=3"):
        peftkit.adapt(Net(), peftkit.config("lora", target_modules=["grouped"], r=3))
    with pytest.raises(peftkit.PeftkitError, match="not supported on grouped convolutions"):
        peftkit.adapt(Net(), peftkit.config("lora", target_modules=["grouped"], r=2, init="pissa"))


def test_grouped_conv_dora_norms_the_adapted_dense_weight() -> None:
    model = peftkit.adapt(Net(), peftkit.config("dora", target_modules=["grouped"], r=2))
    _perturb(model)
    layer = model.grouped
    ad = layer.adapters["default"]
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        dense_b = torch.block_diag(ad.lora_B[:3], ad.lora_B[3:])  # (6, 2): one rank channel per group
        v = layer.host.weight_2d() + ad.s * dense_b @ ad.lora_A
        w_eff = (ad.magnitude / v.norm(dim=1))[:, None] * v
        expected = F.conv1d(x, w_eff.reshape(6, 4, 3), layer.host.bias, padding=1)
        assert_near(model.grouped(x), expected, 12, layers=2)


# -- trainable_token_indices ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["dict", "list"])
def test_trainable_token_rows_train_next_to_the_low_rank_layers(spelling: str, tmp_path: Path) -> None:
    tokens = {"emb": [3, 5]} if spelling == "dict" else [3, 5]
    cfg = peftkit.config("lora", target_modules=["fc"], r=2, trainable_token_indices=tokens)
    model = peftkit.adapt(Net(), cfg)
    assert peftkit.get_config(model, "default").trainable_token_indices == {"emb": [3, 5]}  # module names
    rows = model.emb.adapters["default"]
    assert rows.trainable_tokens_delta.shape == (2, 8)
    e0 = model.emb.base_layer.weight.detach().clone()
    with torch.no_grad():
        rows.trainable_tokens_delta.copy_(torch.arange(16.0).view(2, 8))
        out = model.emb(_ids())
        assert torch.equal(out[1, 0], torch.arange(8.0, 16.0)) and torch.equal(out[1, 1], torch.arange(8.0, 16.0))
        assert torch.equal(out[0, 1], torch.arange(8.0)) and torch.equal(out[0, 0], e0[0])
        _perturb(model)
    for fmt in ("hf", "peftkit"):
        _own_round_trip(model, tmp_path, fmt)
    with torch.no_grad():
        y = model(_ids())
        peftkit.merge(model)
        assert torch.equal(model.emb.base_layer.weight[3], rows.trainable_tokens_delta[0])
        assert_near(model(_ids()), y, 8, layers=3)
        peftkit.unmerge(model)
        assert torch.equal(model.emb.base_layer.weight, e0)
    n = sum(p.numel() for p in peftkit.trainable_parameters(model))
    assert n == 2 * 8 + 2 * (8 + 8)


def test_trainable_token_indices_refusals() -> None:
    with pytest.raises(peftkit.PeftkitError, match="'head' names no nn.Embedding"):
        peftkit.adapt(Net(), peftkit.config("lora", target_modules=["fc"], trainable_token_indices={"head": [1]}))
    with pytest.raises(peftkit.PeftkitError, match="trainable_token_indices"):
        peftkit.config("lora", target_modules=["fc"], trainable_token_indices={"emb": []})
    with pytest.raises(peftkit.PeftkitError, match="outside the embedding's vocabulary"):
        peftkit.adapt(Net(), peftkit.config("lora", target_modules=["fc"], trainable_token_indices=[20]))
    assert math.isclose(peftkit.config("lora", r=4, lora_alpha=8).scaling, 2.0)


# -- KaSA (kasa_config) --------------------------------------------------------------------------------------------
def test_kasa_drops_the_smallest_singular_directions_and_trains_a_diagonal(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="regularisers"):
        cfg = peftkit.config("lora", target_modules=["fc"], r=2, lora_alpha=4, kasa_config={"beta": 1e-4})
    model = peftkit.adapt(Net(), cfg)
    ad = model.fc.adapters["default"]
    assert "kasa_A0" not in ad.state_dict() and ad.lora_diag.shape == (2,)  # recomputed from the base, not saved
    assert sum(p.numel() for p in peftkit.trainable_parameters(model)) == 2 * 16 + 2
    _perturb(model)
    with pytest.warns(UserWarning, match="regularisers"):
        for fmt in ("hf", "peftkit"):
            _own_round_trip(model, tmp_path, fmt)
    w, b = model.fc.base_layer.weight.detach(), model.fc.base_layer.bias.detach()
    u, s, vh = torch.linalg.svd(w)
    w_t = (u[:, :6] * s[:6]) @ vh[:6]  # the 6 largest of 8 singular directions kept
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = x @ w_t.t() + b + 2.0 * (x @ ad.lora_A.t()) * ad.lora_diag @ ad.lora_B.t()
        assert_near(model.fc(x), expected, 8, layers=2)
        y = model(_ids())
        peftkit.merge(model)
        assert_near(model.fc.base_layer.weight, w_t + 2.0 * (ad.lora_B * ad.lora_diag) @ ad.lora_A, 8)
        assert_near(model(_ids()), y, 8, layers=3)


def test_kasa_refusals() -> None:
    with pytest.raises(peftkit.PeftkitError, match="r = 8 must be below min"):
        peftkit.adapt(Net(), peftkit.config("lora", target_modules=["fc"], r=8, kasa_config={}))
    with pytest.raises(peftkit.PeftkitError, match="KaSA adapts Linear layers only"):
        peftkit.adapt(Net(), peftkit.config("lora", target_modules=["grouped"], r=2, kasa_config={}))
    with pytest.raises(peftkit.PeftkitError, match="kasa_config must be a dict"):
        peftkit.config("lora", kasa_config={"alpha": 1.0})


# -- BD-LoRA (use_bdlora) --------------------------------------------------------------------------------------------
def test_block_diagonal_factors(tmp_path: Path) -> None:
    bd = {"target_modules_bd_a": ["fc"], "target_modules_bd_b": ["nobias"], "nblocks": 2}
    model = peftkit.adapt(Net(), peftkit.config("lora", target_modules=["fc", "nobias"], r=4, use_bdlora=bd))
    a_side, b_side = model.fc.adapters["default"], model.nobias.adapters["default"]
    assert a_side.lora_A.shape == (4, 4) and b_side.lora_B.shape == (8, 2)  # stacked blocks, as PEFT stores them
    _perturb(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        a = torch.block_diag(a_side.lora_A[:2], a_side.lora_A[2:])  # (4, 8): rank rows 0-1 read inputs 0-3
        assert_near(model.fc(x), model.fc.base_layer(x) + a_side.s * x @ a.t() @ a_side.lora_B.t(), 8, layers=2)
        bb = torch.block_diag(b_side.lora_B[:4], b_side.lora_B[4:])
        assert_near(model.nobias(x), x @ (model.nobias.base_layer.weight + b_side.s * bb @ b_side.lora_A).t(), 8)
    for fmt in ("hf", "peftkit"):
        _own_round_trip(model, tmp_path, fmt)
    with pytest.raises(peftkit.PeftkitError, match="matches neither"):
        peftkit.adapt(Net(), peftkit.config("lora", target_modules=["fc", "emb"], use_bdlora=bd))
    with pytest.raises(peftkit.PeftkitError, match="multiples of nblocks = 3"):
        peftkit.adapt(Net(), peftkit.config("lora", target_modules=["fc"], r=3, use_bdlora={**bd, "nblocks": 3}))
