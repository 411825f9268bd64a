"""CQD^A-style affine score calibration — Arakelyan et al. 2023, "Adapting Neural Link Predictors for Data-Efficient
Complex Query Answering" (NeurIPS 2023, arXiv 2301.12313; official code EdinburghNLP/adaptive-cqd,
``cqda/cqd/base.py``).

    forward:  φ' = φ·(1 + α) + β, with α, β the sum of the enabled sources:
                per class  [α_c, β_c] (a column per class/candidate, broadcast [1, C]),
                per relation [α_p, β_p] (a row per sample's relation id, broadcast [B, 1]),
                from features  [α, β] = init_size·(W e + b), W ∈ R^{2×d}  (broadcast [B, 1]),
                from candidates [α_o, β_o] = init_size·(W_o e_o + b_o) per candidate o (broadcast [1, C]) — CQD^A's
                               object-side projection of the candidate entity's embedding,
                score-only  [α, β] = init_size·(w φ + b), w ∈ R^{2×1}  (elementwise, [B, C])
    init:     per-class / per-relation tables are 0 (exact identity); the Linear sources have weight and bias
              scaled by ``init_size`` = 1e-3 as in CQD^A, so the transform starts within ~1e-3·|φ| of the identity
    merge:    none — a wrapper over a frozen model's scores, not a layer method; only α/β parameters train.

:class:`CalibratedModel` wraps any frozen model (its output, or its ``.logits``, is the score tensor) and freezes it.
:func:`expected_calibration_error` (equal-width confidence bins) and :func:`fit_calibration` (full-batch LBFGS on
cached scores) support the usual recalibration on a held-out split. The CQD query-answering helpers
:func:`atom_truth`, :func:`t_norm`, :func:`t_conorm` give the fuzzy logic (product or Gödel) CQD^A trains through;
:mod:`peftkit.heads.cqd` is CQD^A itself (a frozen ComplEx, beam search over complex queries, and this calibration
with s, p as ``features`` and o as ``candidates``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.errors import PeftkitError


class AffineCalibration(nn.Module):
    """``φ' = φ·(1+α) + β`` with α, β from the enabled sources (see the module docstring); at least one is needed.

    ``num_classes``: per-class/per-candidate table (scores' last dim must equal it). ``num_relations``: per-relation
    table indexed by ``relation`` ids at call time. ``d_features``: α, β predicted from a feature vector per sample
    (e.g. the query entity's embedding). ``d_candidates``: α, β predicted from a feature vector per candidate (the
    object entity's embedding in CQD^A). ``score_only``: α, β predicted elementwise from φ itself."""

    def __init__(
        self, num_classes: int | None = None, *, num_relations: int | None = None, d_features: int | None = None,
        score_only: bool = False, init_size: float = 1e-3, d_candidates: int | None = None,
    ) -> None:
        super().__init__()
        for field, v in (("num_classes", num_classes), ("num_relations", num_relations), ("d_features", d_features),
                         ("d_candidates", d_candidates)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise PeftkitError(f"AffineCalibration.{field} must be a positive integer or None, got {v!r}")
        if num_classes is None and num_relations is None and d_features is None and d_candidates is None \
                and not score_only:
            raise PeftkitError("AffineCalibration needs at least one of num_classes, num_relations, d_features, "
                               "d_candidates, score_only")
        if not init_size > 0:
            raise PeftkitError(f"AffineCalibration.init_size must be > 0, got {init_size}")
        self.num_classes, self.num_relations, self.d_features = num_classes, num_relations, d_features
        self.d_candidates = d_candidates
        self.per_class = nn.Parameter(torch.zeros(2, num_classes)) if num_classes else None
        self.per_relation = nn.Parameter(torch.zeros(num_relations, 2)) if num_relations else None
        self.from_features = self._small_linear(d_features, init_size) if d_features else None
        self.from_score = self._small_linear(1, init_size) if score_only else None
        self.from_candidates = self._small_linear(d_candidates, init_size) if d_candidates else None

    @staticmethod
    def _small_linear(d: int, init_size: float) -> nn.Linear:
        lin = nn.Linear(d, 2)
        with torch.no_grad():
            lin.weight.mul_(init_size)
            lin.bias.mul_(init_size)
        return lin

    def alpha_beta(
        self, scores: torch.Tensor, relation: torch.Tensor | None = None, features: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """α and β, each broadcastable to ``scores`` ([B, C])."""
        if scores.dim() != 2:
            raise PeftkitError(f"AffineCalibration: scores must be [batch, classes], got shape {tuple(scores.shape)}")
        b, c = scores.shape
        alpha = scores.new_zeros(1, 1)
        beta = scores.new_zeros(1, 1)
        if self.per_class is not None:
            if c != self.num_classes:
                raise PeftkitError(f"AffineCalibration: scores have {c} classes but num_classes={self.num_classes}")
            alpha, beta = alpha + self.per_class[0][None], beta + self.per_class[1][None]
        if self.per_relation is not None:
            if relation is None or relation.shape != (b,):
                raise PeftkitError(f"AffineCalibration: relation must be a [batch]={b} tensor of ids (num_relations="
                                   f"{self.num_relations}), got {None if relation is None else tuple(relation.shape)}")
            if relation.min() < 0 or relation.max() >= self.num_relations:
                raise PeftkitError(f"AffineCalibration: relation ids must be in [0, {self.num_relations})")
            ab = self.per_relation[relation]
            alpha, beta = alpha + ab[:, :1], beta + ab[:, 1:]
        if self.from_features is not None:
            if features is None or features.shape != (b, self.d_features):
                raise PeftkitError(f"AffineCalibration: features must be [batch, d_features]=({b}, {self.d_features}), "
                                   f"got {None if features is None else tuple(features.shape)}")
            ab = self.from_features(features.to(scores.dtype))
            alpha, beta = alpha + ab[:, :1], beta + ab[:, 1:]
        if self.from_candidates is not None:
            if candidates is None or candidates.shape != (c, self.d_candidates):
                got = None if candidates is None else tuple(candidates.shape)
                raise PeftkitError(f"AffineCalibration: candidates must be [classes, d_candidates]=({c}, "
                                   f"{self.d_candidates}), got {got}")
            ab = self.from_candidates(candidates.to(scores.dtype))
            alpha, beta = alpha + ab[:, 0][None], beta + ab[:, 1][None]
        if self.from_score is not None:
            ab = self.from_score(scores.unsqueeze(-1))
            alpha, beta = alpha + ab[..., 0], beta + ab[..., 1]
        return alpha, beta

    def forward(
        self, scores: torch.Tensor, relation: torch.Tensor | None = None, features: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        alpha, beta = self.alpha_beta(scores, relation, features, candidates)
        return scores * (1 + alpha) + beta


class CalibratedModel(nn.Module):
    """A frozen ``model`` whose scores (its output, or ``output.logits``) pass through ``calibration``.

    The model is put in eval mode with every parameter frozen; ``relation`` / ``features`` keyword arguments go to
    the calibration, everything else to the model."""

    def __init__(self, model: nn.Module, calibration: AffineCalibration) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.calibration = calibration

    def train(self, mode: bool = True) -> CalibratedModel:
        super().train(mode)
        self.model.eval()  # the frozen model keeps its inference behaviour (dropout off)
        return self

    def scores(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The frozen model's raw scores (no calibration)."""
        out = self.model(*args, **kwargs)
        out = getattr(out, "logits", out)
        if not isinstance(out, torch.Tensor):
            raise PeftkitError(f"CalibratedModel: the model returned {type(out).__name__}, not a score tensor "
                               "or an output with .logits")
        return out

    def forward(self, *args: Any, relation: torch.Tensor | None = None, features: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        return self.calibration(self.scores(*args, **kwargs), relation, features)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over ``n_bins`` equal-width bins of the top-class confidence."""
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise PeftkitError(f"ECE: probs must be [N, C] and labels [N], got {tuple(probs.shape)}, "
                           f"{tuple(labels.shape)}")
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    bins = torch.clamp((conf.double() * n_bins).ceil().long() - 1, 0, n_bins - 1)  # (lo, hi] bins, 0 in the first
    # per bin: Σ correct − Σ confidence = |B_b|·(acc_b − conf_b)
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    cf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf.double())
    return float((acc - cf).abs().sum() / probs.shape[0])


def fit_calibration(
    calibration: AffineCalibration, scores: torch.Tensor, labels: torch.Tensor, *, steps: int = 100,
    lr: float = 0.5, relation: torch.Tensor | None = None, features: torch.Tensor | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> float:
    """Fit ``calibration`` to cached (detached) ``scores`` by full-batch LBFGS on ``loss_fn`` (default: 1-vs-all
    cross-entropy over classes/candidates, CQD^A's default); returns the final loss."""
    scores = scores.detach()
    opt = torch.optim.LBFGS(list(calibration.parameters()), lr=lr, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(calibration(scores, relation, features), labels)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(loss_fn(calibration(scores, relation, features), labels))


# -- CQD query answering on calibrated atom scores --------------------------------------------------------------
def atom_truth(scores: torch.Tensor, negated: bool = False) -> torch.Tensor:
    """Truth value of an atom, σ(φ'); a negated atom is 1 − σ(φ')."""
    t = torch.sigmoid(scores)
    return 1 - t if negated else t


T_NORMS = ("prod", "min")


def _check_kind(kind: str) -> None:
    if kind not in T_NORMS:
        raise PeftkitError(f"unknown t-norm {kind!r}; known: prod (product), min (Gödel)")


def t_norm(a: torch.Tensor, b: torch.Tensor, kind: str = "prod") -> torch.Tensor:
    """Conjunction: the product t-norm a·b (``kind="prod"``) or the Gödel t-norm min(a, b) (``"min"``)."""
    _check_kind(kind)
    return a * b if kind == "prod" else torch.minimum(a, b)


def t_conorm(a: torch.Tensor, b: torch.Tensor, kind: str = "prod") -> torch.Tensor:
    """Disjunction, dual of :func:`t_norm`: the probabilistic sum a + b − a·b, or max(a, b) for Gödel."""
    _check_kind(kind)
    return a + b - a * b if kind == "prod" else torch.maximum(a, b)
