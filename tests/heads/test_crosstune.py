"""CrossTune head over cached features of a frozen tiny encoder: no gradient reaches the encoder, labels are
permutation-equivariant, padding is ignored, and it learns a toy task from few examples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import PeftkitError
from peftkit.heads.crosstune import (
    CrossAttentionLabelHead,
    TeacherAgreementFilter,
    cache_features,
    predict,
    train_head,
)
from tolerance import assert_near

VOCAB = {w: i + 1 for i, w in enumerate("good great fine bad awful poor the a movie plot was is".split())}
D = 16


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(len(VOCAB) + 1, D, padding_idx=0)
        self.mix = nn.Linear(D, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.emb(ids)))


def _encode_fn(enc: TinyEncoder, calls: list[bool]):
    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        toks = [[VOCAB[w] for w in t.split()] for t in texts]
        n = max(map(len, toks))
        ids = torch.tensor([t + [0] * (n - len(t)) for t in toks])
        calls.append(torch.is_grad_enabled())
        return enc(ids), ids != 0

    return encode


def _toy(n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos, neg, filler = ["good", "great", "fine"], ["bad", "awful", "poor"], ["the", "a", "movie", "plot", "was", "is"]
    texts, ys = [], []
    for _ in range(n):
        y = int(torch.randint(2, (1,), generator=g))
        words = [filler[int(i)] for i in torch.randint(len(filler), (int(torch.randint(2, 6, (1,), generator=g)),),
                                                          generator=g)]
        words.insert(int(torch.randint(len(words) + 1, (1,), generator=g)),
                     (pos if y else neg)[int(torch.randint(3, (1,), generator=g))])
        texts.append(" ".join(words))
        ys.append(y)
    return texts, torch.tensor(ys)


def test_features_cached_without_grad_and_encoder_untouched() -> None:
    enc = TinyEncoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    calls: list[bool] = []
    texts, y = _toy(40, 0)
    feats = cache_features(_encode_fn(enc, calls), texts, batch_size=16)
    assert calls == [False, False, False]  # 3 batches, all under no_grad
    assert not feats.h.requires_grad and feats.h.grad_fn is None
    labels = cache_features(_encode_fn(enc, calls), ["bad", "good"]).pooled()
    head = CrossAttentionLabelHead(D, n_heads=2, dropout=0.0)
    train_head(head, feats, y, labels, epochs=3)
    assert all(p.grad is None for p in enc.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert sum(p.numel() for p in head.parameters()) == 4 * D * D + 4 * D + 2 * D + D + 1


def test_label_permutation_equivariance_and_padding() -> None:
    torch.manual_seed(1)
    head = CrossAttentionLabelHead(D, n_heads=4, dropout=0.0).eval()
    h, mask = torch.randn(3, 6, D), torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    labels = torch.randn(5, D)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = head(h, mask, labels)
    assert out.shape == (3, 5)
    assert_near(head(h, mask, labels[perm]), out[:, perm], 32, layers=3)
    h2 = h.clone()
    h2[0, 4:] = 100.0  # padded positions cannot matter
    assert_near(head(h2, mask, labels), out, 32, layers=3)
    assert torch.allclose(head(h[:1, :4], None, labels), out[:1], atol=1e-5)


def test_learns_toy_task_few_shot() -> None:
    enc = TinyEncoder()
    encode = _encode_fn(enc, [])
    tr_t, tr_y = _toy(32, 0)
    te_t, te_y = _toy(200, 1)
    labels = cache_features(encode, ["bad awful poor", "good great fine"]).pooled()
    head = train_head(CrossAttentionLabelHead(D, n_heads=2, dropout=0.0), cache_features(encode, tr_t), tr_y,
                      labels, epochs=60, lr=3e-3)
    acc = (predict(head, cache_features(encode, te_t), labels).argmax(-1) == te_y).float().mean()
    assert acc > 0.9, acc


def test_attention_equals_torch_multihead_attention() -> None:
    torch.manual_seed(2)
    head = CrossAttentionLabelHead(D, n_heads=4, dropout=0.0).eval()
    mha = nn.MultiheadAttention(D, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([head.q_proj.weight, head.k_proj.weight, head.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([head.q_proj.bias, head.k_proj.bias, head.v_proj.bias]))
        mha.out_proj.load_state_dict(head.out_proj.state_dict())
    h, labels = torch.randn(3, 6, D), torch.randn(2, D)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    ref, _ = mha(labels.expand(3, -1, -1), h, h, key_padding_mask=~mask)
    assert torch.allclose(head.attend(h, mask, labels), ref, atol=1e-5)


def test_teacher_filter() -> None:
    teacher = lambda texts: [1 if "good" in t else 0 for t in texts]  # noqa: E731
    texts, kept = TeacherAgreementFilter(teacher)(["good a", "good b", "bad c"], [1, 0, 0])
    assert texts == ["good a", "bad c"] and kept == [1, 0]
    texts, relab = TeacherAgreementFilter(teacher, relabel=True)(["good a", "good b", "bad c"], [1, 0, 0])
    assert relab == [1, 1, 0] and len(texts) == 3


def test_bad_input() -> None:
    with pytest.raises(PeftkitError, match="multiple of"):
        CrossAttentionLabelHead(10, n_heads=3)
    head = CrossAttentionLabelHead(D, n_heads=2)
    with pytest.raises(PeftkitError, match="label embeddings"):
        head(torch.randn(2, 3, D), None, torch.randn(2, D + 1))
