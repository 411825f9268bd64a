"""CrossTune few-shot on Rotten Tomatoes: a label-description cross-attention head vs a linear probe, both on the
same cached features of a frozen all-MiniLM-L6-v2 (computed once under no_grad; the encoder never sees a gradient).

Label descriptions: "a negative, rotten review" / "a positive, fresh review" (mean-pooled token features). For each
seed, k ∈ {16, 32, 64} examples per class are drawn from the training part; accuracy is measured on a fixed held-out
set (``--eval-size`` reviews). The linear probe is L2-regularised logistic regression on mean-pooled features
(LBFGS), the usual black-box baseline.

    python benchmarks/crosstune_fewshot.py --threads 2          # writes benchmarks/results/crosstune_fewshot.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from peftkit.data import load_data, split_indices
from peftkit.heads.crosstune import CrossAttentionLabelHead, cache_features, hf_encoder, predict, train_head
from peftkit.models import resolve_model_dir

DESCRIPTIONS = ["a negative, rotten review", "a positive, fresh review"]


def linear_probe(x: torch.Tensor, y: torch.Tensor, wd: float = 1e-3) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shots", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "crosstune_fewshot.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    from transformers import AutoModel, AutoTokenizer

    mdir = str(resolve_model_dir(None))
    tok = AutoTokenizer.from_pretrained(mdir, local_files_only=True)
    enc = AutoModel.from_pretrained(mdir, local_files_only=True).eval().requires_grad_(False)
    encode = hf_encoder(enc, tok, args.max_length)

    data = load_data("rotten_tomatoes")
    train_idx, eval_idx = split_indices(len(data), args.eval_size, seed=0)
    y_all = torch.tensor(data.labels)
    pools = {c: [i for i in train_idx if data.labels[i] == c] for c in (0, 1)}
    kmax = max(args.shots)
    picked: dict[int, list[list[int]]] = {}  # seed -> per class the first kmax of a shuffle (nested subsets)
    need: set[int] = set(eval_idx)
    for s in range(args.seeds):
        g = torch.Generator().manual_seed(100 + s)
        picked[s] = [[pools[c][int(j)] for j in torch.randperm(len(pools[c]), generator=g)[:kmax]] for c in (0, 1)]
        need.update(i for per in picked[s] for i in per)
    order = sorted(need)
    pos = {i: p for p, i in enumerate(order)}
    feats = cache_features(encode, [data.texts[i] for i in order], batch_size=64)
    labels = cache_features(encode, DESCRIPTIONS).pooled()
    t_cache = time.perf_counter() - t0
    ev = feats.subset([pos[i] for i in eval_idx])
    ev_pooled, y_ev = ev.pooled(), y_all[eval_idx]
    zero_shot = float(((F.normalize(ev_pooled, dim=-1) @ F.normalize(labels, dim=-1).T).argmax(-1) == y_ev)
                      .float().mean())

    rows = []
    for k in args.shots:
        ct, lp = [], []
        for s in range(args.seeds):
            idx = [i for per in picked[s] for i in per[:k]]
            tr = feats.subset([pos[i] for i in idx])
            y = y_all[idx]
            torch.manual_seed(s)
            head = train_head(CrossAttentionLabelHead(labels.shape[1], n_heads=4, dropout=0.1), tr, y, labels,
                              epochs=args.epochs, lr=1e-3, batch_size=16, seed=s)
            ct.append(float((predict(head, ev, labels).argmax(-1) == y_ev).float().mean()))
            probe = linear_probe(tr.pooled(), y)
            with torch.no_grad():
                lp.append(float((probe(ev_pooled).argmax(-1) == y_ev).float().mean()))
        row = {"shots_per_class": k, "crosstune_acc": ct, "linear_probe_acc": lp,
               "crosstune_mean": statistics.mean(ct), "linear_probe_mean": statistics.mean(lp)}
        rows.append(row)
        print(f"k={k:3d}/class  CrossTune {row['crosstune_mean']:.3f} {[round(a, 3) for a in ct]}   "
              f"linear probe {row['linear_probe_mean']:.3f} {[round(a, 3) for a in lp]}", flush=True)
    result = {"model": "all-MiniLM-L6-v2 (frozen, cached features)", "eval_size": args.eval_size,
              "seeds": args.seeds, "epochs": args.epochs, "max_length": args.max_length,
              "label_descriptions": DESCRIPTIONS, "zero_shot_description_cosine_acc": zero_shot,
              "rows": rows, "seconds_caching": round(t_cache, 1),
              "seconds_total": round(time.perf_counter() - t0, 1), "threads": args.threads}
    print(f"zero-shot (cosine to the descriptions) {zero_shot:.3f}; caching {t_cache:.0f}s, total "
          f"{result['seconds_total']:.0f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
