"""Complex queries of the nine standard types (BetaE / CQD: 1p 2p 3p 2i 3i ip pi 2u up) over a knowledge graph,
with the usual filtered-answer protocol.

A query is a row of ids, anchors (``a``) and relations (``r``) in the order of :data:`LAYOUT`:

    1p  a r               ?y : r(a, y)
    2p  a r1 r2           ?y : ∃v r1(a, v) ∧ r2(v, y)
    3p  a r1 r2 r3        ?y : ∃v,w r1(a, v) ∧ r2(v, w) ∧ r3(w, y)
    2i  a1 r1 a2 r2       ?y : r1(a1, y) ∧ r2(a2, y)             (3i: a third branch a3 r3)
    ip  a1 r1 a2 r2 r3    ?y : ∃v r1(a1, v) ∧ r2(a2, v) ∧ r3(v, y)
    pi  a1 r1 r2 a2 r3    ?y : ∃v r1(a1, v) ∧ r2(v, y) ∧ r3(a2, y)
    2u  a1 r1 a2 r2       ?y : r1(a1, y) ∨ r2(a2, y)
    up  a1 r1 a2 r2 r3    ?y : ∃v (r1(a1, v) ∨ r2(a2, v)) ∧ r3(v, y)

Queries are sampled backwards from a random answer in the split's graph (train: the train graph; valid:
train + valid; test: train + valid + test), so every query has an answer there. For valid/test, the *easy* answers are
those already reachable in the previous graph (train, resp. train + valid) and the *hard* ones the rest; a query is
kept only with at least one hard answer, ranking is over the hard answers and every other answer (easy or hard) is
filtered out of the ranking. Training queries have only hard answers (all of them reachable in train).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..core.errors import PeftkitError

QUERY_TYPES = ("1p", "2p", "3p", "2i", "3i", "ip", "pi", "2u", "up")
LAYOUT = {"1p": "ar", "2p": "arr", "3p": "arrr", "2i": "arar", "3i": "ararar", "ip": "ararr", "pi": "arrar",
          "2u": "arar", "up": "ararr"}


class Graph:
    """Forward (``(h, r) -> tails``) and backward (``t -> [(h, r)]``) adjacency of a set of triples."""

    def __init__(self, *splits: torch.Tensor) -> None:
        self.out: dict[tuple[int, int], set[int]] = defaultdict(set)
        into: dict[int, set[tuple[int, int]]] = defaultdict(set)
        for triples in splits:
            for h, r, t in triples.tolist():
                self.out[(h, r)].add(t)
                into[t].add((h, r))
        self.into = {t: sorted(v) for t, v in into.items()}

    def project(self, sources: set[int], r: int) -> set[int]:
        out: set[int] = set()
        for s in sources:
            out |= self.out.get((s, r), set())
        return out


def answers(graph: Graph, qtype: str, q: tuple[int, ...]) -> set[int]:
    """The exact answer set of query ``q`` of type ``qtype`` on ``graph`` (symbolic, no embedding)."""
    p = graph.project
    if qtype in ("1p", "2p", "3p"):
        s = {q[0]}
        for r in q[1:]:
            s = p(s, r)
        return s
    if qtype in ("2i", "3i"):
        branches = [p({q[i]}, q[i + 1]) for i in range(0, len(q), 2)]
        return set.intersection(*branches)
    if qtype == "ip":
        return p(p({q[0]}, q[1]) & p({q[2]}, q[3]), q[4])
    if qtype == "pi":
        return p(p({q[0]}, q[1]), q[2]) & p({q[3]}, q[4])
    if qtype == "2u":
        return p({q[0]}, q[1]) | p({q[2]}, q[3])
    if qtype == "up":
        return p(p({q[0]}, q[1]) | p({q[2]}, q[3]), q[4])
    raise PeftkitError(f"unknown query type {qtype!r}; known: {', '.join(QUERY_TYPES)}")


def _sample(graph: Graph, qtype: str, target: int, rng: random.Random) -> tuple[int, ...] | None:
    """A query of ``qtype`` built backwards from ``target`` along ``graph``'s edges (None at a dead end)."""

    def back(e: int) -> tuple[int, int] | None:  # one incoming edge (h, r) of e
        edges = graph.into.get(e)
        return rng.choice(edges) if edges else None

    def path(e: int, hops: int) -> tuple[int, ...] | None:  # anchor r1 .. r_hops ending at e
        rels: list[int] = []
        for _ in range(hops):
            edge = back(e)
            if edge is None:
                return None
            e, r = edge
            rels.insert(0, r)
        return (e, *rels)

    def branches(e: int, n: int) -> tuple[int, ...] | None:  # n distinct incoming edges of e
        edges = graph.into.get(e, [])
        if len(edges) < n:
            return None
        return tuple(x for edge in rng.sample(edges, n) for x in edge)

    if qtype in ("1p", "2p", "3p"):
        return path(target, int(qtype[0]))
    if qtype in ("2i", "3i", "2u"):
        return branches(target, 3 if qtype == "3i" else 2)
    if qtype in ("ip", "up"):
        edge = back(target)
        if edge is None:
            return None
        inner = branches(edge[0], 2)
        return None if inner is None else (*inner, edge[1])
    if qtype == "pi":
        two, one = path(target, 2), back(target)
        if two is None or one is None:
            return None
        return (*two, *one)
    raise PeftkitError(f"unknown query type {qtype!r}; known: {', '.join(QUERY_TYPES)}")


@dataclass
class QuerySet:
    """``queries``: [B, len(LAYOUT[qtype])] ids; ``hard[i]`` the answers to rank, ``easy[i]`` the filtered ones."""

    qtype: str
    queries: torch.Tensor
    hard: list[list[int]]
    easy: list[list[int]]

    def __len__(self) -> int:
        return len(self.hard)


def generate(graph: Graph, qtype: str, n: int, seed: int, easy_graph: Graph | None = None,
             max_tries: int = 50) -> QuerySet:
    """Up to ``n`` distinct queries of ``qtype`` whose answers on ``graph`` include one not reachable on
    ``easy_graph`` (when given). Deterministic in ``seed``."""
    if qtype not in LAYOUT:
        raise PeftkitError(f"unknown query type {qtype!r}; known: {', '.join(QUERY_TYPES)}")
    rng = random.Random(f"{seed}-{qtype}")
    targets = sorted(graph.into)
    seen: set[tuple[int, ...]] = set()
    rows, hard, easy = [], [], []
    for _ in range(n * max_tries):
        if len(rows) >= n:
            break
        q = _sample(graph, qtype, rng.choice(targets), rng)
        if q is None or q in seen:
            continue
        seen.add(q)
        full = answers(graph, qtype, q)
        old = answers(easy_graph, qtype, q) if easy_graph is not None else set()
        new = full - old
        if not new:
            continue
        rows.append(q)
        hard.append(sorted(new))
        easy.append(sorted(old))
    width = len(LAYOUT[qtype])
    tensor = torch.tensor(rows, dtype=torch.long) if rows else torch.zeros(0, width, dtype=torch.long)
    return QuerySet(qtype, tensor, hard, easy)


def split_queries(kg: object, split: str, types: tuple[str, ...], n: int, seed: int) -> dict[str, QuerySet]:
    """The queries of one split (``train`` / ``valid`` / ``test``) of a :class:`~peftkit.data.kg.KnowledgeGraph`."""
    parts = {"train": ("train",), "valid": ("train", "valid"), "test": ("train", "valid", "test")}
    if split not in parts:
        raise PeftkitError(f"split must be train, valid or test, got {split!r}")
    graph = Graph(*(getattr(kg, s) for s in parts[split]))
    easy = Graph(*(getattr(kg, s) for s in parts[split][:-1])) if split != "train" else None
    return {t: generate(graph, t, n, seed + hash_split(split), easy) for t in types}


def hash_split(split: str) -> int:
    return {"train": 0, "valid": 1_000, "test": 2_000}[split]
