"""The bench's plot: held-out accuracy against trainable parameters (log scale), one point per method.

Each method is drawn once, from its default-rate run — the row trained at the rate ``peftkit train`` picks for it
(:func:`~peftkit.bench.runner.run_lr`; variants ``method/label`` and rows at another rate, such as a collapsed run at
a borrowed rate, are left out and named under the plot). Points are coloured by the method's family (the registry's
:data:`~peftkit.core.registry.FAMILIES`), the accuracy-vs-parameters Pareto front (no other method is both smaller
and more accurate) is drawn as a step line, and the labels are placed by :func:`place_labels` so that no two label
boxes overlap and no label covers a point (a leader line joins a label set further out to its point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from ..core.registry import FAMILIES
from ..core.registry import get as get_method
from .options import base_method
from .runner import run_lr

MARKER_PX = 5.0  # half the box a point's marker covers, in pixels (obstacle for the labels)
RADII = (3, 8, 14, 22, 32, 45, 60, 80, 105, 135)  # label distances tried, in pixels, nearest first
AMBIGUOUS = 30.0  # cost (in px² of overlap) of a spot nearer another point than the label's own
DIRECTIONS = ((1, 0), (1, 1), (1, -1), (-1, 0), (-1, 1), (-1, -1), (0, 1), (0, -1))


def family(method: str) -> str:
    """The registered family of ``method`` (a variant ``method/label`` has its method's); ``"other"`` if unknown."""
    try:
        return get_method(base_method(method)).family
    except (KeyError, PeftkitError):
        return "other"


def family_colours() -> dict[str, str]:
    """Family -> matplotlib colour: the families in the registry's order take the tab10 cycle C0, C1, …"""
    out = {fam: f"C{i % 10}" for i, fam in enumerate(FAMILIES)}
    out["other"] = "0.4"
    return out


def default_rate_rows(rows: Sequence[dict[str, Any]], lr: float | None = None,
                      steps: int = 1) -> tuple[list[dict[str, Any]], list[str]]:
    """(the rows to plot, the methods left out). A row is plotted when it ran (no error, a parameter count), is not a
    variant, and was trained at the rate a bench run of its method uses now (``lr``: the bench's ``--lr``); a row
    without a recorded rate counts as such. One row per method: the last such."""
    keep: dict[str, dict[str, Any]] = {}
    seen: list[str] = []
    for r in rows:
        m = r["method"]
        if m not in seen:
            seen.append(m)
        if "error" in r or not r.get("trainable_params") or "/" in m:
            continue
        want = run_lr(m, lr, steps)
        if r.get("lr") is None or math.isclose(float(r["lr"]), want, rel_tol=1e-9):
            keep[m] = r
    return list(keep.values()), [m for m in seen if m not in keep]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (parameters, accuracy) points that no other point dominates — none has at most as many
    parameters and at least the accuracy, better in one — sorted by parameters."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Overlap area of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _nearer(box: tuple[float, float, float, float], pts: Sequence[tuple[float, float]], own: int) -> bool:
    """Whether the centre of a label box lies nearer another point than point ``own`` (the label would read as
    that point's)."""
    c = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return any(math.dist(c, q) < math.dist(c, pts[own]) for j, q in enumerate(pts) if j != own)


def _candidates(px: float, py: float, w: float, h: float) -> list[tuple[float, float, float, float, float]]:
    """(x0, y0, x1, y1, radius) label boxes around the point (px, py), nearest first."""
    out = []
    for r in RADII:
        for dx, dy in DIRECTIONS:
            x0 = px + r if dx > 0 else px - r - w if dx < 0 else px - w / 2
            y0 = py + 0.6 * r if dy > 0 else py - 0.6 * r - h if dy < 0 else py - h / 2
            out.append((x0, y0, x0 + w, y0 + h, r))
    return out


def place_labels(ax: Any, xy: Sequence[tuple[float, float]], labels: Sequence[str], fontsize: float = 8) -> list[Any]:
    """Annotate each data point ``xy[i]`` with ``labels[i]`` so that no two label boxes overlap, no label covers a
    point's marker and every label stays inside the axes: greedy, the most crowded points first, each label at the
    nearest free spot of :data:`RADII` × :data:`DIRECTIONS` (measured with the figure's renderer; the axes' limits
    and position must be final). A label that finds no free spot takes the one of least overlap; a leader line joins
    a label to its point when it sits far out or nearer to another point. Returns the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    pts = [tuple(ax.transData.transform(p)) for p in xy]
    frame = ax.get_window_extent(renderer)
    sizes = []
    for text in labels:
        t = ax.text(0, 0, text, fontsize=fontsize)
        bb = t.get_window_extent(renderer)
        t.remove()
        sizes.append((bb.width + 2, bb.height + 1))
    obstacles = [(x - MARKER_PX, y - MARKER_PX, x + MARKER_PX, y + MARKER_PX) for x, y in pts]
    crowd = [sum(math.dist(p, q) < 60 for q in pts) for p in pts]
    placed: list[tuple[float, float, float, float]] = []
    out: list[Any] = [None] * len(labels)
    for i in sorted(range(len(labels)), key=lambda i: (-crowd[i], pts[i][0])):
        (px, py), (w, h) = pts[i], sizes[i]
        best, best_cost = None, math.inf
        for box in _candidates(px, py, w, h):
            b = box[:4]
            outside = (max(0.0, frame.x0 - b[0]) + max(0.0, b[2] - frame.x1) + max(0.0, frame.y0 - b[1])
                       + max(0.0, b[3] - frame.y1))
            cost = sum(_overlap(b, o) for o in placed + obstacles) + 1e3 * outside + AMBIGUOUS * _nearer(b, pts, i)
            if cost < best_cost:
                best, best_cost = box, cost
            if cost == 0:
                break
        x0, y0, x1, y1, r = best
        placed.append((x0, y0, x1, y1))
        leader = r > 14 or _nearer((x0, y0, x1, y1), pts, i)  # far out, or nearer another point than its own
        arrow = {"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": 3} if leader else None
        out[i] = ax.annotate(labels[i], xy[i], xytext=(x0 + 1 - px, y0 - py), textcoords="offset pixels",
                             ha="left", va="bottom", fontsize=fontsize, arrowprops=arrow, zorder=4)
    return out


def figure(rows: Sequence[dict[str, Any]], title: str = "", majority: float | None = None, *,
           lr: float | None = None, steps: int = 1, reference: str = "lora") -> Any:
    """The plot as a matplotlib Figure (Agg canvas): the default-rate rows' points by family, the Pareto front, the
    placed labels, the reference's accuracy before training and (``majority``) the majority-label accuracy as
    lines; the methods left out are named under the axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok, left_out = default_rate_rows(rows, lr, steps)
    fig = Figure(figsize=(11, 7), dpi=120)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.08, right=0.72, bottom=0.13, top=0.93)
    ax = fig.add_subplot()
    colours = family_colours()
    for fam in colours:
        mine = [r for r in ok if family(r["method"]) == fam]
        if mine:
            ax.scatter([r["trainable_params"] for r in mine], [r["accuracy_after"] for r in mine], s=30,
                       color=colours[fam], label=fam, zorder=3, edgecolors="none")
    points = [(float(r["trainable_params"]), float(r["accuracy_after"])) for r in ok]
    front = pareto_front(points)
    if front:
        fx, fy = [points[i][0] for i in front], [points[i][1] for i in front]
        ax.step(fx, fy, where="post", color="0.25", linewidth=1, alpha=0.7, zorder=2, label="Pareto front")
        ax.scatter(fx, fy, s=70, facecolors="none", edgecolors="0.25", linewidths=0.8, zorder=2)
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.12)
    ref = next((r for r in ok if r["method"] == reference), None)
    lines = [(f"{reference} before training", ref.get("accuracy_before") if ref else None, ":", "grey"),
             ("majority label", majority, "--", "C2")]
    far = []  # reference lines far below the points: named under the plot rather than stretching the axis
    lo, hi = ax.get_ylim() if ok else (0.0, 1.0)
    for label, y, style, colour in lines:
        if y is None:
            continue
        if ok and not lo <= y <= hi:
            far.append(f"{label}: {y:.3f}")
        else:
            ax.axhline(y, color=colour, linestyle=style, linewidth=1, label=label)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="family", title_fontsize=8,
                  frameon=False)
    if not ok:
        ax.text(0.5, 0.5, "no method completed", transform=ax.transAxes, ha="center", va="center")
    else:
        ax.set_xlim(ax.get_xlim())  # final limits before the labels are measured in pixels
        ax.set_ylim(ax.get_ylim())
        place_labels(ax, points, [r["method"] for r in ok])
    notes = far + ([f"not plotted (no default-rate run, a variant, or failed): {', '.join(left_out)}"]
                   if left_out else [])
    if notes:
        fig.text(0.08, 0.015, "; ".join(notes), fontsize=7, color="0.35", wrap=True)
    return fig


def plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "", majority: float | None = None, *,
         lr: float | None = None, steps: int = 1) -> Path:
    """:func:`figure` written to ``path`` as a PNG (atomically)."""
    fig = figure(rows, title, majority, lr=lr, steps=steps)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path
