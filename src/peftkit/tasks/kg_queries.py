"""``peftkit train --task kg-queries`` and ``peftkit eval`` of its output: CQD vs CQD^A complex query answering.

``peftkit train --task kg-queries --kg nations`` (also ``kinships``, ``umls`` — the triples in the ``pykeen`` wheel —
or a folder with train/valid/test TSV files) trains a ComplEx link predictor with N3 on the train split (or loads the
one cached in ``--output`` when the graph and its settings match), reports its filtered link-prediction MRR,
generates complex queries of the nine types (filtered-answer protocol, :mod:`peftkit.data.kg_queries`), trains the
CQD^A calibration on a few 2p training queries with the predictor frozen, and prints MRR and Hits@1/3/10 on the test
queries per type for CQD vs CQD^A, for the product and the Gödel t-norm. ``results.json`` and ``train_info.json``
hold the numbers; ``peftkit eval --adapter DIR`` rebuilds the queries and reproduces them.

``--rank`` is ComplEx's rank, ``--steps`` / ``--lr`` / ``--batch-size`` the CQD^A training; ``--opt KEY=VALUE`` sets
the rest (:data:`OPTS`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError, did_you_mean
from . import Task, register_task
from .options import parse_opts
from .run import set_threads

TASK = "kg-queries"
DEFAULTS = {"steps": 300, "lr": 1e-2, "batch_size": 64, "rank": 100}
# --opt keys: ComplEx (epochs, lr, N3 weight, batch), CQD (beam k, t-norms), CQD^A (adapt inputs, training queries,
# training query type), the test queries per type. adapt "p" (α, β from the predicate embedding) by measurement:
# mean test MRR over the nine types, product t-norm, 3 seeds — Nations CQD 0.705 → p 0.718 / spo 0.709, UMLS 0.722 →
# p 0.729 / spo 0.722 (the object-side projection learns a per-entity bias from the 2p answers that costs 1p; the
# validation check then keeps the init); benchmarks/results/cqd/
OPTS: dict[str, Any] = {"kge_epochs": 50, "kge_lr": 0.1, "reg": 1e-2, "kge_batch": 128, "k": 5, "t_norms": "prod,min",
                        "adapt": "p", "train_queries": 500, "train_type": "2p", "test_queries": 200,
                        "valid_queries": 50, "eval_every": 50}
_NOT_HERE = (("data", "--data (use --kg)"), ("model", "--model"), ("quantize", "--quantize"), ("alpha", "--alpha"),
             ("targets", "--targets"), ("max_length", "--max-length"), ("density_loss", "--density-loss"),
             ("epochs", "--epochs"), ("head_lr", "--head-lr"), ("eval_size", "--eval-size"), ("resume", "--resume"))
FILES = ("complex.safetensors", "complex.json", "results.json", "train_info.json")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kg", metavar="NAME|DIR", help="kg-queries: nations, kinships, umls (pykeen's files) or a "
                                                         "folder with train/valid/test TSV triples (default nations)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    for dest, flag in _NOT_HERE:
        if getattr(args, dest, None) is not None:
            raise PeftkitError(f"{flag} does not apply to --task {TASK}")
    if getattr(args, "method", "lora") not in ("lora", "cqda", "calibration"):
        raise PeftkitError(f"--task {TASK} trains CQD^A's calibration over a frozen ComplEx; --method does not apply")
    if getattr(args, "precision", "fp32") != "fp32" or getattr(args, "grad_accum", 1) != 1:
        raise PeftkitError(f"--precision and --grad-accum do not apply to --task {TASK} (float64 query answering)")
    opts = parse_opts(args.opt or [])
    for key in opts:
        if key not in OPTS:
            raise PeftkitError(f"--opt {key}: not a {TASK} setting{did_you_mean(key, OPTS)}; known: {', '.join(OPTS)}")
    s = {**OPTS, **opts}
    for key in ("kge_epochs", "kge_batch", "k", "train_queries", "test_queries", "eval_every"):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
            raise PeftkitError(f"--opt {key} must be a positive integer, got {s[key]!r}")
    if not isinstance(s["valid_queries"], int) or isinstance(s["valid_queries"], bool) or s["valid_queries"] < 0:
        raise PeftkitError(f"--opt valid_queries must be an integer >= 0 (0: no validation), got "
                           f"{s['valid_queries']!r}")
    for key in ("kge_lr", "reg"):
        if not isinstance(s[key], int | float) or s[key] < 0 or (key == "kge_lr" and s[key] == 0):
            raise PeftkitError(f"--opt {key} must be a {'positive' if key == 'kge_lr' else 'non-negative'} number, "
                               f"got {s[key]!r}")
    s["t_norms"] = [t.strip() for t in str(s["t_norms"]).split(",") if t.strip()]
    if not s["t_norms"] or set(s["t_norms"]) - {"prod", "min"}:
        raise PeftkitError(f"--opt t_norms must list prod and/or min (comma-separated), got {opts.get('t_norms')!r}")
    from ..data.kg_queries import QUERY_TYPES

    if s["train_type"] not in QUERY_TYPES:
        raise PeftkitError(f"--opt train_type must be one of {', '.join(QUERY_TYPES)}, got {s['train_type']!r}")
    s["adapt"] = str(s["adapt"])
    if not s["adapt"] or set(s["adapt"]) - set("spo") or len(set(s["adapt"])) != len(s["adapt"]):
        raise PeftkitError(f"--opt adapt must be a non-empty subset of 'spo' (the embeddings α, β are computed from), "
                           f"got {s['adapt']!r}")
    s.update(kg=args.kg or "nations", rank=args.rank or DEFAULTS["rank"], steps=args.steps or DEFAULTS["steps"],
             lr=args.lr or DEFAULTS["lr"], batch_size=args.batch_size or DEFAULTS["batch_size"], seed=args.seed,
             split_seed=args.split_seed)
    return s


def _output(args: argparse.Namespace) -> Path:
    out = Path(args.output) if args.output else Path("runs") / f"kg-queries-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise PeftkitError(f"output {out} exists and is not a folder")
    ours = (out / "complex.json").is_file()  # a kg-queries run: its cached ComplEx is reused, its results replaced
    if out.is_dir() and any(out.iterdir()) and not ours and not args.overwrite:
        raise PeftkitError(f"output {out} already exists and is not empty; choose another --output or --overwrite")
    return out


def _kge_key(kg: Any, s: dict[str, Any]) -> dict[str, Any]:
    return {"kg": kg.fingerprint(), **{k: s[k] for k in ("rank", "kge_epochs", "kge_lr", "reg", "kge_batch", "seed")}}


def _predictor(kg: Any, s: dict[str, Any], out: Path, progress: bool, may_train: bool = True) -> tuple[Any, str]:
    """ComplEx trained on the train split, or loaded from ``out`` when its key matches."""
    import torch
    from safetensors.torch import load_file, save

    from ..core.io import atomic_write_bytes, read_json, write_json
    from ..heads.complex_kge import ComplEx, train_complex

    torch.manual_seed(s["seed"])
    model = ComplEx(kg.num_entities, kg.num_relations, s["rank"])
    key = _kge_key(kg, s)
    cached = out / "complex.safetensors"
    if cached.is_file() and (out / "complex.json").is_file() and read_json(out / "complex.json") == key:
        model.load_state_dict(load_file(cached))
        return model, f"loaded from {cached}"
    if not may_train:
        raise PeftkitError(f"{out} holds no ComplEx trained with these settings (complex.safetensors + complex.json)")
    from tqdm.auto import tqdm

    bar = tqdm(total=s["kge_epochs"], desc="ComplEx", unit="epoch", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    train_complex(model, kg.train, epochs=s["kge_epochs"], batch_size=s["kge_batch"], lr=s["kge_lr"],
                  reg_weight=s["reg"], seed=s["seed"],
                  on_epoch=lambda e, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
    bar.close()
    atomic_write_bytes(cached, save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))
    write_json(out / "complex.json", key)
    return model, f"trained, {s['kge_epochs']} epochs in {time.perf_counter() - t0:.1f} s"


def _table(kind: str, k: int, base: dict[str, Any], adapted: dict[str, Any]) -> str:
    rows = [f"t-norm {kind}, beam k={k}, filtered test queries", "type queries |   CQD: MRR    H@1    H@3   H@10 | "
            "CQD^A: MRR    H@1    H@3   H@10"]
    for q, b in base.items():
        rows.append(f"{q:<4} {int(b['n']):>7} |      " + " ".join(f"{b[m]:6.3f}" for m in _M) + " |        "
                    + " ".join(f"{adapted[q][m]:6.3f}" for m in _M))
    return "\n".join(rows)


_M = ("mrr", "hits@1", "hits@3", "hits@10")


def _mean_mrr(r: dict[str, Any]) -> float:
    return sum(v["mrr"] for v in r.values()) / max(1, len(r))


def _run(kg: Any, s: dict[str, Any], predictor: Any, out: Path, *, train: bool, progress: bool) -> dict[str, Any]:
    """Evaluate CQD and (trained now, or loaded from ``out``) CQD^A per t-norm on the test queries."""
    import torch
    from safetensors.torch import load_file, save

    from ..core.io import atomic_write_bytes
    from ..data.kg_queries import QUERY_TYPES, split_queries
    from ..heads.cqd import CQD, adapter_parameters, evaluate, train_adaptation

    predictor = predictor.double()
    test = split_queries(kg, "test", QUERY_TYPES, s["test_queries"], s["split_seed"])
    train_q = split_queries(kg, "train", (s["train_type"],), s["train_queries"], s["split_seed"])[s["train_type"]]
    valid = split_queries(kg, "valid", QUERY_TYPES, s["valid_queries"], s["split_seed"]) \
        if s["valid_queries"] and train else {}
    results: dict[str, Any] = {}
    for kind in s["t_norms"]:
        base = evaluate(CQD(predictor, k=s["k"], tnorm=kind), test)
        torch.manual_seed(s["seed"])
        adapted = CQD(predictor, k=s["k"], tnorm=kind, adapt=s["adapt"]).double()
        path = out / f"cqda-{kind}.safetensors"
        if train:
            from tqdm.auto import tqdm

            bar = tqdm(total=s["steps"], desc=f"CQD^A {kind}", unit="step", disable=not progress, dynamic_ncols=True)
            fit = train_adaptation(
                adapted, train_q, steps=s["steps"], lr=s["lr"], batch_size=s["batch_size"], seed=s["seed"],
                on_step=lambda i, loss, bar=bar: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
                validate=(lambda m=adapted: _mean_mrr(evaluate(m, valid))) if valid else None,
                eval_every=s["eval_every"])
            bar.close()
            if valid:
                print(f"CQD^A {kind}: kept step {int(fit['best_step'])} of {s['steps']} (mean validation MRR "
                      f"{fit['best_score']:.4f} over the nine types, {s['valid_queries']} queries each)")
            state = {k: v.detach().contiguous() for k, v in adapted.calibration.state_dict().items()}  # type: ignore
            atomic_write_bytes(path, save(state))
        else:
            if not path.is_file():
                raise PeftkitError(f"{path} is missing; run 'peftkit train --task {TASK}' into this folder again")
            adapted.calibration.load_state_dict(load_file(path))  # type: ignore[union-attr]
        after = evaluate(adapted, test)
        print(_table(kind, s["k"], base, after))
        print(f"  mean MRR over types: CQD {_mean_mrr(base):.4f} → CQD^A {_mean_mrr(after):.4f} "
              f"({adapter_parameters(adapted):,} adapter parameters)")
        results[kind] = {"cqd": base, "cqda": after, "adapter_parameters": adapter_parameters(adapted)}
        if train and valid:
            results[kind]["best_step"] = int(fit["best_step"])
    return {"train_queries": len(train_q), "test_queries": {q: len(v) for q, v in test.items()}, "t_norms": results}


def _threads(n: int | None) -> Any:
    """``--threads``, default 1 (tiny tensors: one thread is the fastest); the caller's count comes back after."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope() -> Any:
        before = torch.get_num_threads()
        set_threads(n or 1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return scope()


def train(args: argparse.Namespace) -> int:
    s = _settings(args)
    out = _output(args)
    with _threads(args.threads):
        return _train(args, s, out)


def _train(args: argparse.Namespace, s: dict[str, Any], out: Path) -> int:
    from ..core.io import write_json
    from ..data.kg import load_kg
    from ..heads.complex_kge import link_prediction

    kg = load_kg(s["kg"])
    t0 = time.perf_counter()
    print(f"knowledge graph: {kg.source} — {kg.num_entities} entities, {kg.num_relations} relations, "
          f"{len(kg.train):,}/{len(kg.valid):,}/{len(kg.test):,} train/valid/test triples")
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    predictor, how = _predictor(kg, s, out, progress)
    lp = link_prediction(predictor, kg.test, [kg.train, kg.valid, kg.test])
    print(f"ComplEx rank {s['rank']} ({how}): filtered link prediction on test — MRR {lp['mrr']:.4f}, "
          f"Hits@1 {lp['hits@1']:.3f}, Hits@3 {lp['hits@3']:.3f}, Hits@10 {lp['hits@10']:.3f}")
    res = _run(kg, s, predictor, out, train=True, progress=progress)
    res.update(kg=kg.source, link_prediction=lp, settings=s, wall_s=round(time.perf_counter() - t0, 1))
    write_json(out / "results.json", res)
    write_json(out / "train_info.json", {"task": TASK, "kg": kg.source, "kg_fingerprint": kg.fingerprint(),
                                         "settings": s, "results": res["t_norms"], "link_prediction": lp})
    print(f"saved to {out} ({res['wall_s']} s)")
    return 0


def evaluate(args: argparse.Namespace, info: dict[str, Any]) -> int:
    """Rebuild the test queries, reload ComplEx and the CQD^A calibrations, and compare with the recorded MRRs."""
    if getattr(args, "data", None) is not None:
        raise PeftkitError(f"--data does not apply to a {TASK} run (its graph is recorded in train_info.json)")
    adapter = Path(args.adapter)
    for key in ("kg", "kg_fingerprint", "settings", "results"):
        if key not in info:
            raise PeftkitError(f"{adapter / 'train_info.json'} lacks {key!r}")
    with _threads(args.threads):
        return _evaluate(adapter, info)


def _evaluate(adapter: Path, info: dict[str, Any]) -> int:
    from ..data.kg import load_kg

    s = info["settings"]
    kg = load_kg(info["kg"])
    if kg.fingerprint() != info["kg_fingerprint"]:
        raise PeftkitError(f"the knowledge graph {info['kg']} changed since training (its triples differ)")
    predictor, _ = _predictor(kg, s, adapter, progress=False, may_train=False)
    res = _run(kg, s, predictor, adapter, train=False, progress=False)
    worst = max(abs(res["t_norms"][t][m][q]["mrr"] - info["results"][t][m][q]["mrr"])
                for t in res["t_norms"] for m in ("cqd", "cqda") for q in res["t_norms"][t][m])
    verdict = "reproduced" if worst < 1e-6 else f"differs by up to {worst:.2e} in MRR"
    print(f"recorded in train_info.json: {verdict}")
    if worst >= 1e-3:
        raise PeftkitError(f"the recorded results were not reproduced (MRR differs by {worst:.4f})")
    return 0


register_task(Task(TASK, "kg-queries: CQD vs CQD^A complex query answering over a ComplEx link predictor "
                         "(--kg nations|kinships|umls|DIR)", DEFAULTS, train, evaluate, add_flags=add_flags,
                   own_flags=(("kg", "--kg"),), order=6))
