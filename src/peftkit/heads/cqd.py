"""CQD and CQD^A: complex query answering over a frozen neural link predictor.

CQD — Arakelyan et al., ICLR 2021, "Complex Query Answering with Neural Link Predictors" (arXiv 2011.03459; code
uclnlp/cqd). CQD^A — Arakelyan et al., NeurIPS 2023, "Adapting Neural Link Predictors for Data-Efficient Complex
Query Answering" (arXiv 2301.12313; code EdinburghNLP/adaptive-cqd, ``cqda/cqd/base.py`` and ``discrete.py``).

    atom:   t(s, p, o) = σ(φ'(s, p, o)), φ from the frozen ComplEx (:mod:`peftkit.heads.complex_kge`);
            CQD: φ' = φ;  CQD^A: φ' = φ·(1 + α) + β with [α, β] = W_sp·[e_s; e_p] + W_o·e_o + b — the subject and
            predicate projections broadcast over the candidates ([B, 1]), the object projection over the queries
            ([1, N]); every Linear scaled by init_size = 1e-3 at init (:class:`AffineCalibration`, d_features and
            d_candidates), so CQD^A starts within ~1e-3·|φ| of CQD. Which of s, p, o feed α, β is ``adapt``.
    query:  ∧ = t-norm (product or Gödel min), ∨ = its t-conorm (probabilistic sum or max); an existential variable
            keeps a beam of the top-k entities of its atom, paths multiply out (3p keeps k² paths, as the official
            ``query_3p``) and the answer score is the max over the beam's paths.
    train:  CQD^A only: the calibration's α/β Linears on complex (e.g. 2p) training queries, 1-vs-all cross-entropy of
            the query scores against one answer per query (the official default loss), predictor frozen; optionally
            the calibration with the best validation score (checked every ``eval_every`` steps, and at init) is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PeftkitError
from ..data.kg_queries import LAYOUT, QuerySet
from .calibration import T_NORMS, AffineCalibration, atom_truth, t_conorm, t_norm
from .complex_kge import ComplEx, filtered_rank, rank_metrics

Paths = tuple[torch.Tensor, torch.Tensor]  # (path scores [B, P], end entities [B, P])


class CQD(nn.Module):
    """Beam-search query answering (``k`` beam width, ``tnorm`` "prod" or "min") over a frozen ``predictor``; with
    ``adapt`` (a subset of "spo") the CQD^A calibration is added and is the only trainable part."""

    def __init__(self, predictor: ComplEx, *, k: int = 5, tnorm: str = "prod", adapt: str | None = None,
                 init_size: float = 1e-3) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise PeftkitError(f"CQD: beam width k must be a positive integer, got {k!r}")
        if tnorm not in T_NORMS:
            raise PeftkitError(f"CQD: unknown t-norm {tnorm!r}; known: prod (product), min (Gödel)")
        if adapt is not None and (not adapt or set(adapt) - set("spo") or len(set(adapt)) != len(adapt)):
            raise PeftkitError(f"CQD^A: adapt must be a non-empty subset of 'spo' (which of subject, predicate, object "
                               f"embeddings give α, β), got {adapt!r}")
        self.predictor = predictor.eval().requires_grad_(False)
        self.k, self.tnorm, self.adapt = k, tnorm, adapt
        self.calibration: AffineCalibration | None = None
        if adapt is not None:
            d = 2 * predictor.rank
            n_sp = ("s" in adapt) + ("p" in adapt)
            self.calibration = AffineCalibration(d_features=d * n_sp or None, d_candidates=d if "o" in adapt else None,
                                                 init_size=init_size)

    def train(self, mode: bool = True) -> CQD:
        super().train(mode)
        self.predictor.eval()
        return self

    def atom_scores(self, heads: torch.Tensor, rels: torch.Tensor) -> torch.Tensor:
        """φ' of (head, rel, o) for every entity o → ``[M, N]`` (calibrated for CQD^A)."""
        pred = self.predictor
        s, p = pred.entity[heads], pred.relation[rels]
        phi = pred.score_o(s, p)
        if self.calibration is None:
            return phi
        feats = [x for x, c in ((s, "s"), (p, "p")) if c in self.adapt]  # type: ignore[operator]
        return self.calibration(phi, features=torch.cat(feats, -1) if feats else None,
                                candidates=pred.entity if "o" in self.adapt else None)  # type: ignore[operator]

    def atoms(self, heads: torch.Tensor, rels: torch.Tensor) -> torch.Tensor:
        """Truth σ(φ') of (head, rel, o) for every o → ``[M, N]``."""
        return atom_truth(self.atom_scores(heads, rels))

    # -- beam search ---------------------------------------------------------------------------------------------
    def _hop(self, paths: Paths, rel: torch.Tensor, final: bool) -> Paths | torch.Tensor:
        """Extend every path by one atom ``rel``: the answer vector [B, N] (max over paths) when ``final``, else the
        top-k continuations of each path (by the new atom's truth, as the official code)."""
        score, ends = paths
        b, p = ends.shape
        truth = self.atoms(ends.reshape(-1), rel.repeat_interleave(p)).view(b, p, -1)
        if final:
            return t_norm(score.unsqueeze(-1), truth, self.tnorm).max(1).values
        v, i = truth.topk(min(self.k, truth.shape[-1]), dim=-1)
        return t_norm(score.unsqueeze(-1), v, self.tnorm).reshape(b, -1), i.reshape(b, -1)

    def _chain(self, start: Paths, rels: list[torch.Tensor]) -> torch.Tensor:
        out: Paths | torch.Tensor = start
        for j, r in enumerate(rels):
            out = self._hop(out, r, final=j == len(rels) - 1)  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    def _anchor(self, a: torch.Tensor) -> Paths:
        return torch.ones(a.shape[0], 1, dtype=self.predictor.entity.dtype), a.unsqueeze(1)

    def _beam(self, scores: torch.Tensor) -> Paths:
        v, i = scores.topk(min(self.k, scores.shape[-1]), dim=-1)
        return v, i

    def forward(self, qtype: str, queries: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, N]`` of every entity as the answer of each query (rows laid out as ``LAYOUT[qtype]``)."""
        if qtype not in LAYOUT:
            raise PeftkitError(f"CQD: unknown query type {qtype!r}; known: {', '.join(LAYOUT)}")
        if queries.dim() != 2 or queries.shape[1] != len(LAYOUT[qtype]):
            raise PeftkitError(f"CQD: {qtype} queries must be [B, {len(LAYOUT[qtype])}], got {tuple(queries.shape)}")
        c = list(queries.unbind(1))
        tn: Callable[..., torch.Tensor] = lambda x, y: t_norm(x, y, self.tnorm)  # noqa: E731
        tc: Callable[..., torch.Tensor] = lambda x, y: t_conorm(x, y, self.tnorm)  # noqa: E731

        def one(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return self.atoms(a, r)

        if qtype in ("1p", "2p", "3p"):
            return self._chain(self._anchor(c[0]), c[1:])
        if qtype == "2i":
            return tn(one(c[0], c[1]), one(c[2], c[3]))
        if qtype == "3i":
            return tn(tn(one(c[0], c[1]), one(c[2], c[3])), one(c[4], c[5]))
        if qtype == "ip":
            return self._chain(self._beam(tn(one(c[0], c[1]), one(c[2], c[3]))), [c[4]])
        if qtype == "pi":
            return tn(self._chain(self._anchor(c[0]), [c[1], c[2]]), one(c[3], c[4]))
        if qtype == "2u":
            return tc(one(c[0], c[1]), one(c[2], c[3]))
        return self._chain(self._beam(tc(one(c[0], c[1]), one(c[2], c[3]))), [c[4]])  # up


def adapter_parameters(model: CQD) -> int:
    """Trainable parameters of the CQD^A calibration (0 for plain CQD)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_adaptation(
    model: CQD, queries: QuerySet, *, steps: int, lr: float = 1e-2, batch_size: int = 64, seed: int = 0,
    on_step: Callable[[int, float], None] | None = None, validate: Callable[[], float] | None = None,
    eval_every: int = 50,
) -> dict[str, float]:
    """Train the CQD^A calibration through the query answering of ``queries`` (Adam, 1-vs-all cross-entropy of the
    query scores against one answer drawn per query per step). With ``validate`` (a score, higher is better, e.g.
    the mean validation MRR), it is called before training and every ``eval_every`` steps and the best calibration
    is kept (step 0: the near-identity init). Returns ``loss`` (mean of the last 10 steps), ``best_step`` and
    ``best_score``."""
    if model.calibration is None:
        raise PeftkitError("train_adaptation needs a CQD with adapt='...' (the CQD^A calibration)")
    if len(queries) == 0:
        raise PeftkitError(f"no {queries.qtype} training queries to adapt on")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    best = {"best_step": 0.0, "best_score": float("-inf")}
    best_state = None

    def check(step: int) -> None:
        nonlocal best_state
        if validate is None:
            return
        score = validate()
        if score > best["best_score"]:
            best.update(best_step=float(step), best_score=score)
            best_state = {k: v.detach().clone() for k, v in model.calibration.state_dict().items()}  # type: ignore

    check(0)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(len(queries), (min(batch_size, len(queries)),), generator=gen)
        picks = torch.randint(1 << 30, (len(idx),), generator=gen).tolist()
        target = torch.tensor([queries.hard[i][j % len(queries.hard[i])] for i, j in zip(idx.tolist(), picks,
                                                                                       strict=True)])
        loss = F.cross_entropy(model(queries.qtype, queries.queries[idx]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            check(step + 1)
            model.train()
    model.eval()
    if best_state is not None:
        model.calibration.load_state_dict(best_state)  # type: ignore[union-attr]
    tail = losses[-10:]
    return {"loss": sum(tail) / len(tail) if tail else float("nan"), **best}


@torch.no_grad()
def evaluate(model: CQD, sets: dict[str, QuerySet], batch_size: int = 128) -> dict[str, dict[str, float]]:
    """Filtered MRR and Hits@1/3/10 per query type: every hard answer is ranked against the entities that are not
    answers (easy and other hard answers filtered out); per-answer metrics averaged within a query, then over
    queries (the BetaE / CQD protocol). ``n``: queries of the type."""
    model.eval()
    out: dict[str, dict[str, float]] = {}
    for qtype, qs in sets.items():
        per_query = []
        for i in range(0, len(qs), batch_size):
            scores = model(qtype, qs.queries[i: i + batch_size])
            for row, hard, easy in zip(scores, qs.hard[i: i + batch_size], qs.easy[i: i + batch_size], strict=True):
                ranks = torch.tensor([filtered_rank(row, a, hard + easy) for a in hard], dtype=torch.float64)
                per_query.append(rank_metrics(ranks))
        if per_query:
            out[qtype] = {m: sum(q[m] for q in per_query) / len(per_query) for m in per_query[0]}
            out[qtype]["n"] = len(per_query)
    return out
