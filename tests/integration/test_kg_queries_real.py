"""``peftkit train --task kg-queries`` on the real Nations graph (pykeen's data files): ComplEx reaches a filtered
link-prediction MRR well above chance and CQD^A, trained on 2p queries with ComplEx frozen, does not fall behind CQD
on the mean over the nine query types (a short budget: 20 ComplEx epochs, 150 CQD^A steps)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from peftkit.cli import main

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("pykeen") is None, reason="needs pykeen's data files")]


def test_nations_cqd_vs_cqda(tmp_path: Path) -> None:
    out = tmp_path / "nations"
    rc = main(["train", "--task", "kg-queries", "--kg", "nations", "--output", str(out), "--no-progress",
               "--steps", "150", "--opt", "kge_epochs=20", "--opt", "test_queries=100", "--opt", "t_norms=prod"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["link_prediction"]["mrr"] > 0.6  # 14 entities: a random ranking scores about 0.25
    block = res["t_norms"]["prod"]
    assert set(block["cqd"]) == {"1p", "2p", "3p", "2i", "3i", "ip", "pi", "2u", "up"}
    mean = {who: sum(r["mrr"] for r in block[who].values()) / 9 for who in ("cqd", "cqda")}
    assert mean["cqd"] > 0.55 and mean["cqda"] > mean["cqd"] - 0.01
