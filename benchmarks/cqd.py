"""CQD vs CQD^A on the knowledge graphs shipped in pykeen's wheel: ``peftkit train --task kg-queries`` per graph and
seed (each run in its own process, its folder under ``--runs``), then one Markdown table per graph and t-norm of the
per-type test MRR and Hits@1/3/10 (mean ± std over seeds) and a JSON record.

    python benchmarks/cqd.py --kg nations umls --seeds 0 1 2 --adapt spo p [--runs DIR] [--out benchmarks/results/cqd]

The seed changes ComplEx's init and shuffling and the CQD^A training draws; the queries (``--split-seed``) stay the
same, so the spread is the models', not the test set's. Extra arguments after ``--`` go to ``peftkit train``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METRICS = ("mrr", "hits@1", "hits@3", "hits@10")
TYPES = ("1p", "2p", "3p", "2i", "3i", "ip", "pi", "2u", "up")


def run(kg: str, seed: int, runs: Path, extra: list[str]) -> dict[str, Any]:
    out = runs / f"{kg}-seed{seed}"
    cmd = [sys.executable, "-m", "peftkit", "train", "--task", "kg-queries", "--kg", kg, "--seed", str(seed),
           "--output", str(out), "--no-progress", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    res = json.loads((out / "results.json").read_text())
    res["process_wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def _ms(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(kg: str, results: list[dict[str, Any]]) -> str:
    first = results[0]
    lp = [r["link_prediction"]["mrr"] for r in results]
    s = first["settings"]
    lines = [f"### {kg}, adapt={s['adapt']}: CQD vs CQD^A (test queries, filtered; {len(results)} seed(s), "
             "mean ± std)", "",
             f"ComplEx rank {s['rank']}, {s['kge_epochs']} epochs, N3 {s['reg']}: filtered link-prediction test MRR "
             f"{_ms(lp)}. CQD^A: adapt={s['adapt']}, {first['train_queries']} {s['train_type']} training queries, "
             f"{s['steps']} steps, lr {s['lr']}, batch {s['batch_size']}; beam k={s['k']}; "
             f"wall per run {_ms([r['wall_s'] for r in results], 0)} s (2 shared cores).", ""]
    for kind, block in first["t_norms"].items():
        n_par = block["adapter_parameters"]
        lines += [f"t-norm **{kind}** ({n_par:,} CQD^A parameters)", "",
                  "| type | queries | CQD MRR | CQD^A MRR | CQD H@1 | CQD^A H@1 | CQD H@3 | CQD^A H@3 | CQD H@10 | "
                  "CQD^A H@10 |", "|---" * 10 + "|"]
        types = [t for t in TYPES if t in block["cqd"]]
        for q in [*types, "mean"]:
            cells = []
            for m in METRICS:
                for who in ("cqd", "cqda"):
                    vals = [statistics.mean(r["t_norms"][kind][who][t][m] for t in types) if q == "mean"
                            else r["t_norms"][kind][who][q][m] for r in results]
                    cells.append(_ms(vals))
            n = "" if q == "mean" else str(int(block["cqd"][q]["n"]))
            lines.append(f"| {q} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kg", nargs="+", default=["nations", "umls"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--runs", type=Path, default=Path("/tmp/cqd-runs"))
    p.add_argument("--adapt", nargs="+", default=["spo"], help="CQD^A variants (--opt adapt=...), one table each")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cqd")
    p.add_argument("--render", action="store_true", help="only rewrite the .md tables from the .json records")
    p.add_argument("extra", nargs="*", help="after --: more peftkit train arguments")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.render:
        for f in sorted(a.out.glob("*.json")):
            f.with_suffix(".md").write_text(table(f.stem.split("-")[0], json.loads(f.read_text())) + "\n")
        return 0
    record: dict[str, Any] = {}
    md = []
    for kg in a.kg:
        for adapt in a.adapt:  # the seed's ComplEx is trained once (the first variant) and reused from its folder
            results = [run(kg, seed, a.runs, ["--opt", f"adapt={adapt}", *a.extra]) for seed in a.seeds]
            record[f"{kg}-{adapt}"] = results
            md.append(table(kg, results))
            (a.out / f"{kg}-{adapt}.json").write_text(json.dumps(results, indent=1) + "\n")
            (a.out / f"{kg}-{adapt}.md").write_text(md[-1] + "\n")
            print(md[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
