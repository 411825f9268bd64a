"""CrossTune — Lu et al. 2024, "CrossTune: Black-Box Few-Shot Classification with Label Enhancement"
(LREC-COLING 2024, arXiv 2403.12468). No official code was found; the architecture below is the spec's best
reading of the paper's abstract (unconfirmed details: the score layer ``w·LN(r_k + e_k)`` and the pooling).

    features: H_x = f(x) ∈ R^{n×d} (token features of the frozen, black-box encoder f, computed once under no_grad
              and cached); e_k = mean-pool f(y_k) ∈ R^d for each label description y_k
    forward:  r_k = MHA(q = e_k W_q, K = H_x W_k, V = H_x W_v)  (padding tokens masked),
              s_k = w·LN(r_k + e_k) + b,   p(k | x) = softmax_k(s_k)
    init:     PyTorch defaults for MHA / LN, w ~ U(±1/√d), b = 0; trained by cross-entropy on the few-shot data
    merge:    none — a head over cached features; no gradient ever reaches the encoder.

Every label is an independent query through shared weights, so permuting the label descriptions permutes the
logits and a new label set needs no new parameters. :class:`TeacherAgreementFilter` is the paper's switch mechanism
for generated (e.g. ChatGPT-written) extra examples: a teacher classifier's prediction must agree with the intended
label, else the sample is dropped (or, with ``relabel=True``, kept with the teacher's label — unconfirmed variant).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.errors import PeftkitError


@dataclass
class CachedFeatures:
    """Token features ``h`` [N, n, d] of a frozen encoder, with ``mask`` [N, n] (True = a real token)."""

    h: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.h.shape[0]

    def subset(self, idx: Sequence[int] | torch.Tensor) -> CachedFeatures:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return CachedFeatures(self.h[idx], self.mask[idx])

    def pooled(self) -> torch.Tensor:
        """Mean over real tokens: [N, d]."""
        m = self.mask.unsqueeze(-1).to(self.h.dtype)
        return (self.h * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def cache_features(
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], texts: Sequence[str], batch_size: int = 64
) -> CachedFeatures:
    """Run the black-box ``encode(texts) -> (token features [b, n, d], mask [b, n])`` once, under ``no_grad``, and
    cache the detached results padded to the longest sequence."""
    hs: list[torch.Tensor] = []
    ms: list[torch.Tensor] = []
    for i in range(0, len(texts), batch_size):
        h, m = encode(list(texts[i:i + batch_size]))
        hs.append(h.detach().float())
        ms.append(m.bool())
    n = max(h.shape[1] for h in hs)
    h = torch.cat([F.pad(x, (0, 0, 0, n - x.shape[1])) for x in hs])
    m = torch.cat([F.pad(x, (0, n - x.shape[1])) for x in ms])
    return CachedFeatures(h, m)


def hf_encoder(model: nn.Module, tokenizer: Any, max_length: int = 128) -> Callable[[list[str]], tuple[torch.Tensor,
                                                                                                        torch.Tensor]]:
    """An ``encode`` function for :func:`cache_features` over a Hugging Face encoder (its ``last_hidden_state``)."""

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state, batch["attention_mask"].bool()

    return encode


class CrossAttentionLabelHead(nn.Module):
    """Label-enhanced cross-attention: label embeddings ``e`` [K, d] attend to input token features ``h`` [B, n, d]
    and each label's attended vector is scored, giving logits [B, K]. Trainable: 4d² + 4d (MHA) + 2d (LN) + d + 1
    (score) parameters, d = ``d_model``, whatever the number of labels."""

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if d_model < 1 or n_heads < 1 or d_model % n_heads:
            raise PeftkitError(f"CrossAttentionLabelHead: d_model ({d_model}) must be a positive multiple of "
                               f"n_heads ({n_heads})")
        self.d_model, self.n_heads = d_model, n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model) for _ in range(4))
        self.attn_drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.score = nn.Linear(d_model, 1)
        nn.init.zeros_(self.score.bias)

    def attend(self, h: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Multi-head cross-attention of the K label queries over the tokens, [B, K, d] — the same function as
        ``nn.MultiheadAttention(q=e, k=v=h)`` with these projections, computed label-side: per head h,
        ``q_h·(W_k,h x + b_k,h) = (W_k,hᵀ q_h)·x + const`` and ``Σ_j a_j (W_v,h x_j + b_v,h) = W_v,h (Σ_j a_j x_j) +
        b_v,h``, so the n token features are never projected (O(B·K·n·d) instead of O(B·n·d²))."""
        b, n, d = h.shape
        k, nh, dh = labels.shape[0], self.n_heads, d // self.n_heads
        q = self.q_proj(labels).view(k, nh, dh)
        u = torch.einsum("khe,hed->khd", q, self.k_proj.weight.view(nh, dh, d)) / dh**0.5  # [K, nh, d]
        logits = torch.einsum("khd,bnd->bkhn", u, h)
        if mask is not None:
            logits = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        a = self.attn_drop(logits.softmax(-1))
        pooled = torch.einsum("bkhn,bnd->bkhd", a, h)  # attention-pooled raw features per head
        v = torch.einsum("bkhd,hed->bkhe", pooled, self.v_proj.weight.view(nh, dh, d)) + self.v_proj.bias.view(nh, dh)
        return self.out_proj(v.reshape(b, k, d))

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3 or h.shape[-1] != self.d_model or labels.dim() != 2 or labels.shape[-1] != self.d_model:
            raise PeftkitError(f"CrossAttentionLabelHead: need features [B, n, {self.d_model}] and label embeddings "
                               f"[K, {self.d_model}], got {tuple(h.shape)} and {tuple(labels.shape)}")
        r = self.attend(h, mask, labels)
        return self.score(self.norm(r + labels)).squeeze(-1)


def train_head(
    head: CrossAttentionLabelHead, feats: CachedFeatures, y: torch.Tensor, labels: torch.Tensor, *,
    epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-2, batch_size: int = 32, seed: int = 0,
) -> CrossAttentionLabelHead:
    """Cross-entropy training of ``head`` on cached features (AdamW, shuffled mini-batches); returns it in eval."""
    if len(feats) != y.shape[0]:
        raise PeftkitError(f"train_head: {len(feats)} feature rows but {y.shape[0]} labels")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(feats), generator=g).split(batch_size):
            loss = F.cross_entropy(head(feats.h[idx], feats.mask[idx], labels), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def predict(head: CrossAttentionLabelHead, feats: CachedFeatures, labels: torch.Tensor,
            batch_size: int = 256) -> torch.Tensor:
    """Logits [N, K] of ``head`` over cached features, in eval mode."""
    head.eval()
    return torch.cat([head(feats.h[i:i + batch_size], feats.mask[i:i + batch_size], labels)
                      for i in range(0, len(feats), batch_size)])


class TeacherAgreementFilter:
    """Keeps generated examples whose teacher prediction equals the intended label (CrossTune's switch
    mechanism). ``teacher(texts) -> predicted label ids``; ``relabel=True`` keeps disagreeing samples with the
    teacher's label instead of dropping them."""

    def __init__(self, teacher: Callable[[list[str]], Sequence[int] | torch.Tensor], relabel: bool = False) -> None:
        self.teacher = teacher
        self.relabel = relabel

    def __call__(self, texts: Sequence[str], intended: Sequence[int]) -> tuple[list[str], list[int]]:
        if len(texts) != len(intended):
            raise PeftkitError(f"TeacherAgreementFilter: {len(texts)} texts but {len(intended)} intended labels")
        pred = [int(p) for p in self.teacher(list(texts))]
        if self.relabel:
            return list(texts), pred
        keep = [i for i, (p, t) in enumerate(zip(pred, intended)) if p == int(t)]
        return [texts[i] for i in keep], [int(intended[i]) for i in keep]
