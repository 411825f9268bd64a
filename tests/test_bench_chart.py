"""The method plot (peftkit.bench.chart): labels placed without overlap on the real results, the Pareto front on a
hand example, colours by family, one default-rate run per method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba
from matplotlib.text import Annotation, Text

from peftkit.bench import chart
from peftkit.core.registry import FAMILIES

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "methods.json"


def _real() -> tuple[list[dict], dict]:
    data = json.loads(RESULTS.read_text())
    return data["rows"], data["settings"]


def _row(method: str, params: int, acc: float, lr: float | None = None, **kw) -> dict:
    return {"method": method, "trainable_params": params, "accuracy_after": acc, **({"lr": lr} if lr else {}), **kw}


def test_label_boxes_do_not_overlap_each_other_or_points_on_the_real_results() -> None:
    rows, settings = _real()
    fig = chart.figure(rows, majority=settings.get("majority_accuracy"), lr=settings.get("lr"))
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    anns = [c for c in ax.get_children() if isinstance(c, Annotation)]
    plotted, _ = chart.default_rate_rows(rows, settings.get("lr"))
    assert sorted(a.get_text() for a in anns) == sorted(r["method"] for r in plotted) and len(anns) > 20
    boxes = [Text.get_window_extent(a, renderer) for a in anns]  # the text alone, not its leader line
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1, anns[i].get_text()
        for j in range(i + 1, len(boxes)):
            assert not a.overlaps(boxes[j]), (anns[i].get_text(), anns[j].get_text())
    centres = ax.transData.transform([(r["trainable_params"], r["accuracy_after"]) for r in plotted])
    for (x, y), r in zip(centres, plotted):  # no label covers a point's centre
        assert not any(b.x0 <= x <= b.x1 and b.y0 <= y <= b.y1 for b in boxes), r["method"]


def test_pareto_front_on_a_hand_example() -> None:
    pts = [(10, 0.5), (20, 0.7), (30, 0.6), (40, 0.9), (40, 0.8), (5, 0.4), (20, 0.7), (50, 0.9)]
    # (30, .6) is beaten by (20, .7); (40, .8) by (40, .9); (50, .9) by (40, .9); the two (20, .7) tie: both stay
    assert chart.pareto_front(pts) == [5, 0, 1, 6, 3]
    assert chart.pareto_front([]) == [] and chart.pareto_front([(3, 0.2)]) == [0]


def test_points_are_coloured_by_their_family() -> None:
    rows, settings = _real()
    plotted, _ = chart.default_rate_rows(rows, settings.get("lr"))
    colours = chart.family_colours()
    assert len({colours[f] for f in FAMILIES}) == len(FAMILIES)  # one colour per family
    fig = chart.figure(rows, lr=settings.get("lr"))
    seen = set()
    for coll in fig.axes[0].collections:
        fam = coll.get_label()
        if fam not in FAMILIES:
            continue
        seen.add(fam)
        assert tuple(coll.get_facecolor()[0]) == pytest.approx(to_rgba(colours[fam]))
        want = {(r["trainable_params"], r["accuracy_after"]) for r in plotted if chart.family(r["method"]) == fam}
        assert {tuple(p) for p in coll.get_offsets().tolist()} == {(float(x), float(y)) for x, y in want}
    assert seen == {chart.family(r["method"]) for r in plotted} and len(seen) >= 5
    assert chart.family("randlora") == "reparameterized" and chart.family("dylora/full") == "procedure"


def test_each_method_is_drawn_from_its_default_rate_run() -> None:
    rows = [_row("lora", 100, 0.81, 2e-3), _row("randlora", 50, 0.58, 2e-3),  # RandLoRA's default is 2e-4
            _row("randlora", 50, 0.805, 2e-4), _row("dylora/full", 100, 0.8, 2e-3),
            {"method": "ia3", "error": "boom"}, _row("kron", 40, 0.79)]  # no recorded rate: taken as default
    kept, left_out = chart.default_rate_rows(rows)
    assert [(r["method"], r["accuracy_after"]) for r in kept] == [("lora", 0.81), ("randlora", 0.805), ("kron", 0.79)]
    assert left_out == ["dylora/full", "ia3"]
    kept, left_out = chart.default_rate_rows(rows[:2])  # only the collapsed run: RandLoRA is left out, and named
    assert [r["method"] for r in kept] == ["lora"] and left_out == ["randlora"]
    kept, _ = chart.default_rate_rows([_row("lora", 100, 0.7, 1e-4), _row("ia3", 10, 0.6, 1e-4)], lr=1e-4)
    assert len(kept) == 2  # `peftkit bench --lr`: every method's run is at that rate


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [_row("lora", 100, 0.81, 2e-3), _row("dora", 110, 0.82, 2e-3), _row("ia3", 10, 0.7, 1e-2)]
    path = chart.plot(rows, tmp_path / "m.png", "title", majority=0.5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "m.png.tmp").exists()
