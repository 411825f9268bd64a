"""CQD / CQD^A (heads/cqd.py), ComplEx (heads/complex_kge.py), the KG reader and the complex-query generator.

Independent references: ComplEx against ``Re(Σ s·p·conj(o))`` in complex arithmetic; beam search against an
exhaustive enumeration of every variable assignment; the query answers against a brute-force existential check over
the raw triples; filtered ranks by hand.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from peftkit import PeftkitError
from peftkit.data.kg import load_kg, packaged_dir
from peftkit.data.kg_queries import LAYOUT, QUERY_TYPES, Graph, answers, generate, split_queries
from peftkit.heads.calibration import t_conorm, t_norm
from peftkit.heads.complex_kge import ComplEx, filtered_rank, link_prediction, train_complex
from peftkit.heads.cqd import CQD, adapter_parameters, evaluate, train_adaptation
from tolerance import assert_near


def write_kg(folder: Path, n_ent: int = 9, n_rel: int = 3, n: int = 60, seed: int = 0) -> Path:
    """A random KG folder: ``n`` distinct triples split 70/15/15 into train/valid/test TSV files."""
    rng = random.Random(seed)
    triples = rng.sample([(h, r, t) for h in range(n_ent) for r in range(n_rel) for t in range(n_ent) if h != t], n)
    cut1, cut2 = int(0.7 * n), int(0.85 * n)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", triples[:cut1]), ("valid", triples[cut1:cut2]), ("test", triples[cut2:])):
        (folder / f"{split}.txt").write_text("".join(f"e{h}\tr{r}\te{t}\n" for h, r, t in rows))
    return folder


def random_complex(n_ent: int, n_rel: int, rank: int = 4, seed: int = 0) -> ComplEx:
    torch.manual_seed(seed)
    m = ComplEx(n_ent, n_rel, rank).double()
    with torch.no_grad():  # scores of order 1, so that σ(φ) spreads over (0, 1) and the beam order matters
        m.entity.normal_()
        m.relation.normal_()
    return m


# -- ComplEx --------------------------------------------------------------------------------------------------
def test_complex_scores_match_the_complex_trilinear_product() -> None:
    m = random_complex(6, 2, rank=3)
    c_ent = torch.complex(m.entity[:, :3], m.entity[:, 3:])
    c_rel = torch.complex(m.relation[:, :3], m.relation[:, 3:])
    ref = torch.einsum("sd,pd,od->spo", c_ent, c_rel, c_ent.conj()).real  # [s, p, o]
    with torch.no_grad():
        assert_near(m.score_o(m.entity, m.relation[1].expand(6, -1)), ref[:, 1, :], 3)
        assert_near(m.score_s(m.relation[0].expand(6, -1), m.entity), ref[:, 0, :].T, 3)
        tr = torch.tensor([[0, 1, 5], [4, 0, 2]])
        assert_near(m.score_triples(tr), torch.stack([ref[0, 1, 5], ref[4, 0, 2]]), 3)


def test_complex_training_improves_filtered_link_prediction(tmp_path: Path) -> None:
    kg = load_kg(write_kg(tmp_path / "kg"))
    torch.manual_seed(0)
    m = ComplEx(kg.num_entities, kg.num_relations, 8)
    before = link_prediction(m, kg.train, [kg.train, kg.valid, kg.test])["mrr"]
    train_complex(m, kg.train, epochs=60, batch_size=16, lr=0.1, reg_weight=1e-3)
    after = link_prediction(m, kg.train, [kg.train, kg.valid, kg.test])
    assert after["mrr"] > before + 0.3 and after["hits@10"] >= after["hits@3"] >= after["hits@1"]


def test_filtered_rank_by_hand() -> None:
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.7])
    assert filtered_rank(s, 2, [0]) == 2.5  # 0.8 above, 0.9 filtered, one tie (entity 4) counts half
    assert filtered_rank(s, 2, [0, 1, 4]) == 1.0
    assert filtered_rank(s, 3, []) == 5.0


# -- t-norms ----------------------------------------------------------------------------------------------------
def test_t_norms_and_conorms() -> None:
    a, b = torch.tensor([0.2, 0.9, 1.0, 0.0]), torch.tensor([0.5, 0.3, 0.4, 0.7])
    assert torch.allclose(t_norm(a, b, "min"), torch.tensor([0.2, 0.3, 0.4, 0.0]))
    assert torch.allclose(t_conorm(a, b, "min"), torch.tensor([0.5, 0.9, 1.0, 0.7]))
    assert torch.allclose(t_norm(a, b), torch.tensor([0.1, 0.27, 0.4, 0.0]))
    assert torch.allclose(t_conorm(a, b), torch.tensor([0.6, 0.93, 1.0, 0.7]))
    for kind in ("prod", "min"):  # boundary: 1 is the t-norm's identity, 0 the t-conorm's
        assert torch.equal(t_norm(a, torch.ones(4), kind), a) and torch.equal(t_conorm(a, torch.zeros(4), kind), a)
    with pytest.raises(PeftkitError, match="unknown t-norm"):
        t_norm(a, b, "lukasiewicz")


# -- beam search vs exhaustive enumeration -----------------------------------------------------------------------
def exhaustive(m: ComplEx, qtype: str, q: list[int], kind: str) -> torch.Tensor:
    """max over every assignment of the query's variables of the fuzzy truth, from the full truth tables."""
    c_ent = torch.complex(m.entity[:, : m.rank], m.entity[:, m.rank:])
    c_rel = torch.complex(m.relation[:, : m.rank], m.relation[:, m.rank:])
    T = torch.sigmoid(torch.einsum("sd,pd,od->pso", c_ent, c_rel, c_ent.conj()).real)  # T[r][s, o]
    n = m.entity.shape[0]
    tn, tc = (lambda x, y: t_norm(x, y, kind)), (lambda x, y: t_conorm(x, y, kind))
    best = torch.zeros(n, dtype=T.dtype)
    nvars = {"1p": 0, "2p": 1, "3p": 2, "2i": 0, "3i": 0, "ip": 1, "pi": 1, "2u": 0, "up": 1}[qtype]
    for vs in itertools.product(range(n), repeat=nvars):
        if qtype == "1p":
            t = T[q[1]][q[0]]
        elif qtype == "2p":
            t = tn(T[q[1]][q[0], vs[0]], T[q[2]][vs[0]])
        elif qtype == "3p":
            t = tn(tn(T[q[1]][q[0], vs[0]], T[q[2]][vs[0], vs[1]]), T[q[3]][vs[1]])
        elif qtype == "2i":
            t = tn(T[q[1]][q[0]], T[q[3]][q[2]])
        elif qtype == "3i":
            t = tn(tn(T[q[1]][q[0]], T[q[3]][q[2]]), T[q[5]][q[4]])
        elif qtype == "ip":
            t = tn(tn(T[q[1]][q[0], vs[0]], T[q[3]][q[2], vs[0]]), T[q[4]][vs[0]])
        elif qtype == "pi":
            t = tn(tn(T[q[1]][q[0], vs[0]], T[q[2]][vs[0]]), T[q[4]][q[3]])
        elif qtype == "2u":
            t = tc(T[q[1]][q[0]], T[q[3]][q[2]])
        else:  # up
            t = tn(tc(T[q[1]][q[0], vs[0]], T[q[3]][q[2], vs[0]]), T[q[4]][vs[0]])
        best = torch.maximum(best, t)
    return best


def _queries(qtype: str, n_ent: int, n_rel: int, count: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(qtype) * 7 + ord(qtype[0]))
    cols = [torch.randint(n_ent if c == "a" else n_rel, (count,), generator=g) for c in LAYOUT[qtype]]
    return torch.stack(cols, 1)


@pytest.mark.parametrize("kind", ["prod", "min"])
@pytest.mark.parametrize("qtype", QUERY_TYPES)
def test_beam_search_with_full_beam_equals_exhaustive_search(qtype: str, kind: str) -> None:
    m = random_complex(7, 3)
    qs = _queries(qtype, 7, 3)
    with torch.no_grad():
        full = CQD(m, k=7, tnorm=kind)(qtype, qs)
        small = CQD(m, k=2, tnorm=kind)(qtype, qs)
        ref = torch.stack([exhaustive(m, qtype, q, kind) for q in qs.tolist()])
    assert_near(full, ref, 8, layers=3)
    assert (small <= ref + 1e-12).all()  # a beam explores a subset of the assignments: a lower bound
    if qtype in ("1p", "2i", "3i", "2u"):  # no variable: nothing to prune
        assert_near(small, ref, 8, layers=3)


def test_beam_of_one_follows_the_best_first_hop() -> None:
    m = random_complex(7, 3)
    q = torch.tensor([[2, 0, 1]])
    with torch.no_grad():
        cqd = CQD(m, k=1)
        first = cqd.atoms(q[:, 0], q[:, 1])[0]
        v = int(first.argmax())
        expect = first[v] * cqd.atoms(torch.tensor([v]), q[:, 2])[0]
        assert_near(cqd("2p", q)[0], expect, 8)


def test_cqd_refuses_bad_settings() -> None:
    m = random_complex(5, 2)
    with pytest.raises(PeftkitError, match="beam width"):
        CQD(m, k=0)
    with pytest.raises(PeftkitError, match="unknown t-norm"):
        CQD(m, tnorm="max")
    with pytest.raises(PeftkitError, match="subset of 'spo'"):
        CQD(m, adapt="sx")
    with pytest.raises(PeftkitError, match=r"2p queries must be \[B, 3\]"):
        CQD(m)("2p", torch.zeros(2, 4, dtype=torch.long))


# -- CQD^A ----------------------------------------------------------------------------------------------------
def test_cqda_at_identity_equals_cqd_and_near_identity_at_init() -> None:
    m = random_complex(7, 3, rank=5)
    qs = _queries("ip", 7, 3)
    base = CQD(m, k=3)
    adapted = CQD(m, k=3, adapt="spo").double()
    assert adapter_parameters(base) == 0
    assert adapter_parameters(adapted) == (2 * 20 + 2) + (2 * 10 + 2)  # Linear(4r→2) on [e_s; e_p], Linear(2r→2)
    with torch.no_grad():
        near = adapted("ip", qs)
        assert (near - base("ip", qs)).abs().max() < 1e-2  # init_size 1e-3: within ~1e-3·|φ| of the identity
        assert not torch.equal(near, base("ip", qs))
        for p in adapted.calibration.parameters():
            p.zero_()  # α = β = 0: φ·(1 + 0) + 0 is φ exactly
        assert torch.equal(adapted("ip", qs), base("ip", qs))


def test_object_side_projection_depends_on_the_candidate_embedding() -> None:
    m = random_complex(6, 2, rank=3)
    cqd = CQD(m, adapt="o").double()
    with torch.no_grad():
        lin = cqd.calibration.from_candidates
        lin.weight.normal_()
        lin.bias.zero_()
        phi = m.score_o(m.entity[[1]], m.relation[[0]])
        ab = m.entity @ lin.weight.T  # [N, 2]: α_o, β_o from e_o
        assert_near(cqd.atom_scores(torch.tensor([1]), torch.tensor([0])), phi * (1 + ab[:, 0]) + ab[:, 1], 6)


def test_cqda_trains_only_the_calibration_and_lowers_the_loss(tmp_path: Path) -> None:
    kg = load_kg(write_kg(tmp_path / "kg", n=80))
    torch.manual_seed(0)
    m = ComplEx(kg.num_entities, kg.num_relations, 6)
    train_complex(m, kg.train, epochs=30, batch_size=16, reg_weight=1e-3)
    m = m.double()
    frozen = {k: v.clone() for k, v in m.state_dict().items()}
    tr = split_queries(kg, "train", ("2p",), 40, 0)["2p"]
    model = CQD(m, k=3, adapt="spo").double()
    losses: list[float] = []
    train_adaptation(model, tr, steps=60, lr=0.05, batch_size=16, on_step=lambda i, x: losses.append(x))
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in frozen.items())
    assert all(p.requires_grad for p in model.calibration.parameters())
    assert not any(p.requires_grad for p in model.predictor.parameters())
    res = evaluate(model, split_queries(kg, "test", ("2p", "up"), 20, 0))
    assert all(0 < r["mrr"] <= 1 and r["hits@1"] <= r["hits@3"] <= r["hits@10"] for r in res.values())


def test_validation_keeps_the_best_calibration(tmp_path: Path) -> None:
    """``validate`` is called at init and every ``eval_every`` steps; the best-scoring calibration is the one kept."""
    kg = load_kg(write_kg(tmp_path / "kg", n=80))
    m = random_complex(kg.num_entities, kg.num_relations, rank=4)
    tr = split_queries(kg, "train", ("2p",), 30, 0)["2p"]
    model = CQD(m, k=3, adapt="sp").double()
    init = {k: v.clone() for k, v in model.calibration.state_dict().items()}
    calls: list[int] = []

    def prefer_init() -> float:  # the score falls with every call: step 0 wins
        calls.append(len(calls))
        return -float(len(calls))

    fit = train_adaptation(model, tr, steps=20, lr=0.1, batch_size=8, validate=prefer_init, eval_every=5)
    assert len(calls) == 5 and fit["best_step"] == 0  # steps 0, 5, 10, 15, 20
    assert all(torch.equal(v, init[k]) for k, v in model.calibration.state_dict().items())
    rising = iter(range(100))
    fit = train_adaptation(model, tr, steps=20, lr=0.1, batch_size=8, validate=lambda: float(next(rising)),
                           eval_every=5)
    assert fit["best_step"] == 20  # rising scores: the last calibration is kept, and it moved
    assert not all(torch.equal(v, init[k]) for k, v in model.calibration.state_dict().items())


# -- KG reader and query generation --------------------------------------------------------------------------
def test_reader_ids_and_malformed_lines(tmp_path: Path) -> None:
    folder = write_kg(tmp_path / "kg")
    kg = load_kg(folder)
    assert kg.entities == sorted(kg.entities) and len(kg.train) == 42 and kg.train.shape[1] == 3
    (folder / "valid.txt").write_text("e1\tr0\te2\n\ne3\tr1\n")
    with pytest.raises(PeftkitError, match=r"valid\.txt:3: expected head<TAB>relation<TAB>tail"):
        load_kg(folder)
    (folder / "valid.txt").unlink()
    with pytest.raises(PeftkitError, match="no valid file"):
        load_kg(folder)
    with pytest.raises(PeftkitError, match="not found"):
        load_kg(tmp_path / "nowhere")


@pytest.mark.skipif(not (packaged_dir("nations") if __import__("importlib").util.find_spec("pykeen") else Path(
    "/nonexistent")).is_dir(), reason="pykeen's data files are not installed")
def test_packaged_nations_sizes() -> None:
    kg = load_kg("nations")
    assert (kg.num_entities, kg.num_relations, len(kg.train), len(kg.valid), len(kg.test)) == (14, 55, 1592, 199, 201)


def brute_answers(triples: set[tuple[int, int, int]], n: int, qtype: str, q: tuple[int, ...]) -> set[int]:
    """Answers by checking every (variable, answer) assignment against the raw triple set."""
    e = lambda h, r, t: (h, r, t) in triples  # noqa: E731
    holds = {"1p": lambda y, v, w: e(q[0], q[1], y), "2p": lambda y, v, w: e(q[0], q[1], v) and e(v, q[2], y),
             "3p": lambda y, v, w: e(q[0], q[1], v) and e(v, q[2], w) and e(w, q[3], y),
             "2i": lambda y, v, w: e(q[0], q[1], y) and e(q[2], q[3], y),
             "3i": lambda y, v, w: e(q[0], q[1], y) and e(q[2], q[3], y) and e(q[4], q[5], y),
             "ip": lambda y, v, w: e(q[0], q[1], v) and e(q[2], q[3], v) and e(v, q[4], y),
             "pi": lambda y, v, w: e(q[0], q[1], v) and e(v, q[2], y) and e(q[3], q[4], y),
             "2u": lambda y, v, w: e(q[0], q[1], y) or e(q[2], q[3], y),
             "up": lambda y, v, w: (e(q[0], q[1], v) or e(q[2], q[3], v)) and e(v, q[4], y)}[qtype]
    return {y for y in range(n) if any(holds(y, v, w) for v, w in itertools.product(range(n), repeat=2))}


@pytest.mark.parametrize("qtype", QUERY_TYPES)
def test_generated_queries_follow_the_filtered_protocol(qtype: str, tmp_path: Path) -> None:
    kg = load_kg(write_kg(tmp_path / "kg", n_ent=8, n=90, seed=3))
    sets = {s: split_queries(kg, s, (qtype,), 15, 0)[qtype] for s in ("train", "test")}
    full = {tuple(t) for s in ("train", "valid", "test") for t in getattr(kg, s).tolist()}
    old = {tuple(t) for s in ("train", "valid") for t in getattr(kg, s).tolist()}
    train = {tuple(t) for t in kg.train.tolist()}
    tr, te = sets["train"], sets["test"]
    assert len(te) > 0 and len(tr) > 0 and te.queries.shape[1] == len(LAYOUT[qtype])
    for q, hard, easy in zip(te.queries.tolist(), te.hard, te.easy, strict=True):
        easy_ref = brute_answers(old, 8, qtype, tuple(q))
        assert set(easy) == easy_ref and set(hard) == brute_answers(full, 8, qtype, tuple(q)) - easy_ref
        assert hard  # at least one answer not reachable in train + valid
    for q, hard, easy in zip(tr.queries.tolist(), tr.hard, tr.easy, strict=True):
        assert not easy and set(hard) == brute_answers(train, 8, qtype, tuple(q))
    assert len({tuple(q) for q in te.queries.tolist()}) == len(te)  # distinct
    again = split_queries(kg, "test", (qtype,), 15, 0)[qtype]
    assert torch.equal(again.queries, te.queries) and again.hard == te.hard


def test_answers_symbolic_2u_and_up_by_hand() -> None:
    g = Graph(torch.tensor([[0, 0, 1], [2, 1, 3], [1, 2, 4], [3, 2, 5]]))
    assert answers(g, "2u", (0, 0, 2, 1)) == {1, 3}
    assert answers(g, "up", (0, 0, 2, 1, 2)) == {4, 5}
    assert answers(g, "2i", (0, 0, 2, 1)) == set()
    assert len(generate(g, "3p", 5, 0)) == 0  # no path of length 3: nothing, no error
