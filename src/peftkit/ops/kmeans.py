"""Codebooks for 1-D values: nearest sorted centroid, weighted 1-D k-means (Lloyd on prefix sums), and the
GPTQ-like error-compensated assignment to per-group tables. Used by SketchTune (:mod:`peftkit.methods.sketchtune`);
tested against scikit-learn's ``KMeans`` with ``sample_weight`` and a brute-force optimum."""

from __future__ import annotations

import torch


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of each group's sorted ``centroids`` (G, k) for every value of ``x`` (G, n)."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), x.contiguous())


@torch.no_grad()
def weighted_kmeans(
    x: torch.Tensor, k: int, weight: torch.Tensor | None = None, iters: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of every row of ``x`` (G, n) with ``k`` centroids, minimising Σ ω·(x − c)² with the per-value
    weights ``weight`` (broadcast to x; None: all 1). Seeds: the weighted quantiles (m + ½)/k; then Lloyd (nearest
    centroid, weighted mean; an empty cluster keeps its centroid) until the assignment stops changing. In 1-D the
    clusters are runs of the sorted values, so each Lloyd step only locates the k − 1 midpoints in the sorted row and
    takes the cluster sums from prefix sums (float64): O(G·k·log n) a step. Returns the centroids (G, k), sorted, and
    the codes (G, n), long."""
    w = torch.ones_like(x) if weight is None else weight.to(x.dtype).expand_as(x)
    xs, order = x.sort(dim=1)
    ws = w.gather(1, order).double()
    zero = ws.new_zeros(x.shape[0], 1)
    mass_sum = torch.cat([zero, ws.cumsum(1)], 1)  # prefix sums: entry p is the sum over the p smallest values
    total_sum = torch.cat([zero, (ws * xs.double()).cumsum(1)], 1)
    levels = (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) / k
    pos = torch.searchsorted(mass_sum[:, 1:].contiguous(), (levels[None, :] * mass_sum[:, -1:]).contiguous())
    c = xs.gather(1, pos.clamp_(max=x.shape[1] - 1))
    ends = c.new_full((x.shape[0], 1), x.shape[1], dtype=torch.long)
    bounds = None
    for _ in range(iters):
        mids = (c[:, 1:] + c[:, :-1]) / 2  # a value equal to a midpoint joins the lower cluster, as in nearest()
        new = torch.cat([torch.zeros_like(ends), torch.searchsorted(xs, mids.contiguous(), right=True), ends], 1)
        if bounds is not None and torch.equal(new, bounds):
            break
        bounds = new
        mass = mass_sum.gather(1, bounds[:, 1:]) - mass_sum.gather(1, bounds[:, :-1])
        total = total_sum.gather(1, bounds[:, 1:]) - total_sum.gather(1, bounds[:, :-1])
        c = torch.where(mass > 0, total / mass.clamp_min(1e-300), c.double()).to(x.dtype).sort(dim=1).values
    return c, nearest(x, c)


@torch.no_grad()
def compensated_codes(w: torch.Tensor, tables: torch.Tensor, hinv_chol: torch.Tensor) -> torch.Tensor:
    """GPTQ-like greedy assignment: column by column, each weight takes its group's nearest table entry and the
    rounding error e = (w − q)/U[j,j] is spread onto the later columns, W[:, j+1:] −= e·U[j, j+1:] (U: upper Cholesky
    factor of H⁻¹). ``w`` (d_out, d_in), ``tables`` (d_out, G, k) sorted per group. Returns the codes (d_out, d_in)."""
    w = w.double().clone()
    tab, u = tables.double(), hinv_chol.double()
    d_out, d_in = w.shape
    n = d_in // tab.shape[1]
    codes = torch.empty(d_out, d_in, dtype=torch.long, device=w.device)
    for j in range(d_in):
        t = tab[:, j // n]
        c = nearest(w[:, j:j + 1], t).squeeze(1)
        codes[:, j] = c
        err = (w[:, j] - t.gather(1, c[:, None]).squeeze(1)) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    return codes
