"""ComplEx link predictor with N3 regularisation — Trouillon et al. 2016, Lacroix et al. 2018 ("Canonical Tensor
Decomposition for Knowledge Base Completion"), as CQD (Arakelyan et al. 2021) and CQD^A train it (official code:
pminervini/KBC ``kbc/models.py`` / ``kbc/regularizers.py``; EdinburghNLP/adaptive-cqd ``cqda/cqd/base.py``).

    score:  φ(s, p, o) = Re⟨e_s, e_p, ē_o⟩, each embedding 2·rank reals = rank complex numbers (re | im halves);
            for all objects at once  φ(s, p, ·) = (s_re·p_re − s_im·p_im) E_reᵀ + (s_im·p_re + s_re·p_im) E_imᵀ
    loss:   1-vs-all cross-entropy over every object (and every subject) + λ·N3, N3 = Σ_f Σ |f|³ / batch over the
            moduli √(re² + im²) of the batch's subject, predicate and object embeddings
    init:   N(0, 1)·init_size (1e-3); Adagrad (lr 0.1), as the KBC code.

This is the frozen predictor that CQD's query answering (:mod:`peftkit.heads.cqd`) reads; it is trained once per
graph and never touched by the CQD^A adaptation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ComplEx(nn.Module):
    """Entity and relation embeddings ``[n, 2·rank]`` (real half first, imaginary half second)."""

    def __init__(self, num_entities: int, num_relations: int, rank: int, init_size: float = 1e-3) -> None:
        super().__init__()
        self.rank = rank
        self.entity = nn.Parameter(torch.randn(num_entities, 2 * rank) * init_size)
        self.relation = nn.Parameter(torch.randn(num_relations, 2 * rank) * init_size)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., : self.rank], x[..., self.rank:]

    def score_o(self, s: torch.Tensor, p: torch.Tensor, o: torch.Tensor | None = None) -> torch.Tensor:
        """φ(s, p, o) for subject/predicate embeddings ``[B, 2r]`` against objects ``o`` ``[N, 2r]`` (default: all
        entities) → ``[B, N]``."""
        o = self.entity if o is None else o
        (sr, si), (pr, pi), (or_, oi) = self._halves(s), self._halves(p), self._halves(o)
        return (sr * pr - si * pi) @ or_.transpose(-1, -2) + (si * pr + sr * pi) @ oi.transpose(-1, -2)

    def score_s(self, p: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """φ(s, p, o) for every subject s → ``[B, N]``."""
        (pr, pi), (or_, oi) = self._halves(p), self._halves(o)
        er, ei = self._halves(self.entity)
        return (or_ * pr + oi * pi) @ er.T + (oi * pr - or_ * pi) @ ei.T

    def score_triples(self, triples: torch.Tensor) -> torch.Tensor:
        """φ of each (s, p, o) row of ``triples`` ``[B, 3]`` → ``[B]``."""
        s, p, o = self.entity[triples[:, 0]], self.relation[triples[:, 1]], self.entity[triples[:, 2]]
        return (self.score_o(s.unsqueeze(1), p.unsqueeze(1), o.unsqueeze(1))).reshape(-1)

    def loss(self, triples: torch.Tensor, reg_weight: float) -> torch.Tensor:
        """1-vs-all cross-entropy for the object and the subject of every triple, plus ``reg_weight``·N3."""
        s, p, o = self.entity[triples[:, 0]], self.relation[triples[:, 1]], self.entity[triples[:, 2]]
        fit = F.cross_entropy(self.score_o(s, p), triples[:, 2]) + F.cross_entropy(self.score_s(p, o), triples[:, 0])
        n3 = sum((torch.sqrt(a ** 2 + b ** 2) ** 3).sum() for a, b in map(self._halves, (s, p, o)))
        return fit + reg_weight * n3 / triples.shape[0]


def train_complex(
    model: ComplEx, triples: torch.Tensor, *, epochs: int, batch_size: int = 128, lr: float = 0.1,
    reg_weight: float = 1e-2, seed: int = 0, on_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """Adagrad on shuffled mini-batches of ``triples`` for ``epochs``; returns the last epoch's mean loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adagrad(model.parameters(), lr=lr)
    mean = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(len(triples), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            batch = triples[order[i: i + batch_size]]
            loss = model.loss(batch, reg_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        mean = total / len(triples)
        if on_epoch is not None:
            on_epoch(epoch, mean)
    return mean


@torch.no_grad()
def link_prediction(model: ComplEx, triples: torch.Tensor, known: list[torch.Tensor]) -> dict[str, float]:
    """Filtered link prediction over both directions (objects of (s, p, ?), subjects of (?, p, o)): every other
    true triple in ``known`` (all splits) is removed from the ranking; ties count half. MRR and Hits@1/3/10."""
    all_known = torch.cat(known)
    obj: dict[tuple[int, int], list[int]] = {}
    subj: dict[tuple[int, int], list[int]] = {}
    for h, r, t in all_known.tolist():
        obj.setdefault((h, r), []).append(t)
        subj.setdefault((r, t), []).append(h)
    s, p, o = model.entity[triples[:, 0]], model.relation[triples[:, 1]], model.entity[triples[:, 2]]
    ranks = []
    for scores, gold, filt in ((model.score_o(s, p), triples[:, 2], [obj[(h, r)] for h, r, _ in triples.tolist()]),
                               (model.score_s(p, o), triples[:, 0], [subj[(r, t)] for _, r, t in triples.tolist()])):
        for row, g, f in zip(scores, gold.tolist(), filt, strict=True):
            ranks.append(filtered_rank(row, g, f))
    return rank_metrics(torch.tensor(ranks, dtype=torch.float64))


def filtered_rank(scores: torch.Tensor, answer: int, filtered: list[int]) -> float:
    """1 + #(non-filtered entities scoring above ``answer``) + ½·#(ties), the answer itself never counted."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[filtered] = False
    keep[answer] = False
    s = scores[answer]
    return 1.0 + float((scores[keep] > s).sum()) + 0.5 * float((scores[keep] == s).sum())


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """MRR and Hits@1/3/10 of a vector of ranks."""
    return {"mrr": float((1 / ranks).mean()), **{f"hits@{k}": float((ranks <= k).double().mean()) for k in (1, 3, 10)}}
