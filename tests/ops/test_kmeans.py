"""peftkit.ops.kmeans against references: scikit-learn's KMeans with sample_weight (same seeds), the exhaustive
optimum of a small 1-D problem, and the greedy compensated assignment written out column by column."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from peftkit.ops.kmeans import compensated_codes, nearest, weighted_kmeans
from tolerance import assert_near


def _cost(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (w * (x - c.gather(1, codes)) ** 2).sum(1)


def test_nearest_picks_the_closest_sorted_centroid() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, generator=g, dtype=torch.float64)
    c = torch.randn(4, 6, generator=g, dtype=torch.float64).sort(dim=1).values
    brute = (x[:, :, None] - c[:, None, :]).abs().argmin(-1)
    assert torch.equal(nearest(x, c), brute)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_matches_sklearn_weighted_kmeans_from_the_same_seeds(k: int) -> None:
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(k)
    x = torch.cat([torch.randn(1, 200, generator=g, dtype=torch.float64) * s for s in (1.0, 3.0)], 0)
    w = torch.rand(2, 200, generator=g, dtype=torch.float64) + 0.1
    c, codes = weighted_kmeans(x, k, w, iters=300)
    assert torch.equal(codes, nearest(x, c)) and bool((c[:, 1:] >= c[:, :-1]).all())
    seeds, _ = weighted_kmeans(x, k, w, iters=0)  # the weighted-quantile seeds
    for row in range(2):
        km = KMeans(k, init=seeds[row].numpy()[:, None], n_init=1, max_iter=300, tol=0.0, algorithm="lloyd")
        km.fit(x[row].numpy()[:, None], sample_weight=w[row].numpy())
        ref = torch.from_numpy(np.sort(km.cluster_centers_[:, 0]))
        assert_near(c[row], ref, 200, scale=float(x[row].abs().max()))
        assert_near(_cost(x[row:row + 1], w[row:row + 1], c[row:row + 1], codes[row:row + 1]),
                    torch.tensor([km.inertia_], dtype=torch.float64), 200, scale=float(km.inertia_))


def test_reaches_the_exhaustive_optimum_on_separated_clusters() -> None:
    """Three well-separated weighted clusters: the optimum (found by trying every split of the sorted values into
    three runs) is what Lloyd converges to."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(6, generator=g) * 0.1 + m for m in (-5.0, 0.0, 4.0)]).double()[None]
    w = (torch.rand(1, 18, generator=g) + 0.5).double()
    xs, order = x.sort(1)
    ws = w.gather(1, order)
    best = None
    for i, j in itertools.combinations(range(1, 18), 2):
        parts = [(xs[0, a:b], ws[0, a:b]) for a, b in ((0, i), (i, j), (j, 18))]
        cost = sum(float((pw * (px - (pw * px).sum() / pw.sum()) ** 2).sum()) for px, pw in parts)
        best = cost if best is None else min(best, cost)
    c, codes = weighted_kmeans(x, 3, w)
    assert abs(float(_cost(x, w, c, codes)[0]) - best) <= 1e-9 * max(best, 1.0)


def test_unweighted_is_weight_one() -> None:
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    a = weighted_kmeans(x, 4)
    b = weighted_kmeans(x, 4, torch.ones_like(x))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_compensated_codes_follow_the_greedy_recursion() -> None:
    g = torch.Generator().manual_seed(5)
    d_out, d_in, groups, k = 3, 8, 2, 4
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    tables = torch.randn(d_out, groups, k, generator=g, dtype=torch.float64).sort(-1).values
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(a @ a.t() + d_in * torch.eye(d_in, dtype=torch.float64)),
                              upper=True)
    codes = compensated_codes(w, tables, u)
    ref = torch.empty(d_out, d_in, dtype=torch.long)  # the recursion written out, one weight at a time
    work = w.clone()
    for j in range(d_in):
        for r in range(d_out):
            t = tables[r, j // (d_in // groups)]
            ref[r, j] = int((work[r, j] - t).abs().argmin())
            err = (work[r, j] - t[ref[r, j]]) / u[j, j]
            work[r, j + 1:] -= err * u[j, j + 1:]
    assert torch.equal(codes, ref)
