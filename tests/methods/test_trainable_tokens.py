"""Trainable tokens: only the chosen rows train and are replaced (exactly, alone on the layer); merge writes them into
the matrix and unmerge restores the originals bit for bit; Hugging Face PEFT's TRAINABLE_TOKENS files both ways."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from tolerance import assert_near

IDX = [3, 7, 11]


class _LM(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.embed_tokens(ids)))


def _model(seed: int = 0) -> _LM:
    torch.manual_seed(seed)
    return _LM()


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 3, 5, 7, 11, 3], [0, 2, 7, 19, 11, 4]])


def test_only_the_chosen_rows_change_and_alone_they_are_replaced_exactly() -> None:
    model = _model()
    e0 = model.embed_tokens.weight.detach().clone()
    peftkit.adapt(model, peftkit.config("trainable_tokens", token_indices=IDX))
    assert peftkit.summary(model).trainable == len(IDX) * 8
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(_ids()).logsumexp(-1).mean().backward()
        opt.step()
    values = dict(peftkit.adapted_layers(model))["embed_tokens"].adapters["default"].trainable_tokens_delta.detach()
    assert not torch.allclose(values, e0[IDX])  # trained
    emb = model.embed_tokens(torch.arange(20))
    expect = e0.clone()
    expect[IDX] = values
    assert torch.equal(emb, expect)  # chosen rows are the values exactly, the others the frozen base's
    assert torch.equal(model.embed_tokens.base_layer.weight, e0)  # the matrix itself never changed


def test_merge_replaces_rows_and_unmerge_restores_them_bit_for_bit() -> None:
    model = _model()
    e0 = model.embed_tokens.weight.detach().clone()
    peftkit.adapt(model, peftkit.config("trainable_tokens", token_indices=IDX))
    with torch.no_grad():
        ad = dict(peftkit.adapted_layers(model))["embed_tokens"].adapters["default"]
        ad.trainable_tokens_delta.mul_(3.0).add_(1.0)
        y = model(_ids())
        peftkit.merge(model)
        w = model.embed_tokens.base_layer.weight
        assert torch.equal(w[IDX], ad.trainable_tokens_delta)
        assert torch.equal(model(_ids()), y)
        peftkit.unmerge(model)
        assert torch.equal(model.embed_tokens.base_layer.weight, e0)


def test_bad_token_indices_are_refused() -> None:
    for idx, msg in [([], "non-empty"), ([1, 1], "more than once"), ([-1], "integers >= 0"), ([25], "outside")]:
        model = _model()
        with pytest.raises(peftkit.PeftkitError, match=msg):
            peftkit.adapt(model, peftkit.config("trainable_tokens", token_indices=idx))
        assert isinstance(model.embed_tokens, nn.Embedding)  # nothing changed


def test_hugging_face_peft_files_both_ways(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(_model(), peft.TrainableTokensConfig(target_modules=["embed_tokens"],
                                                                      token_indices=IDX))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    ours = _model()
    peftkit.load(ours, tmp_path / "peft")
    with torch.no_grad():
        assert_near(ours(_ids()), theirs(_ids()), dtype=torch.float32)
    # and back: peftkit's file loads in PEFT with the same outputs
    peftkit.save(ours, tmp_path / "ours", format="hf")
    back = peft.PeftModel.from_pretrained(_model(), tmp_path / "ours")
    with torch.no_grad():
        assert_near(back(_ids()), ours(_ids()), dtype=torch.float32)
        peftkit.merge(ours)
        assert_near(ours(_ids()), back(_ids()), dtype=torch.float32)


def test_mixed_with_lora_on_the_same_embedding() -> None:
    model = _model()
    e0 = model.embed_tokens.weight.detach().clone()
    peftkit.adapt(model, peftkit.config("trainable_tokens", token_indices=IDX), "tok")
    peftkit.adapt(model, peftkit.config("lora", target_modules=["embed_tokens"], r=2, init="random"), "lo")
    peftkit.set_active(model, ["tok", "lo"])
    layer = dict(peftkit.adapted_layers(model))["embed_tokens"]
    with torch.no_grad():
        layer.adapters["tok"].trainable_tokens_delta.add_(0.5)
        lo = layer.adapters["lo"]
        expect = e0.clone()
        expect[IDX] = layer.adapters["tok"].trainable_tokens_delta
        expect = expect + (lo.s * lo.lora_B @ lo.lora_A).t()
        assert_near(model.embed_tokens(torch.arange(20)), expect, 2, dtype=torch.float32)
