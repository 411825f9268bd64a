"""``peftkit train --task kg-queries`` / ``peftkit eval`` on a tiny knowledge graph written by the test: the run writes
the per-type table for CQD and CQD^A under both t-norms, caches ComplEx in its output folder (a second run loads
it), and ``eval`` rebuilds the queries and reproduces the recorded numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from peftkit.cli import main

sys.path.insert(0, str(Path(__file__).parent / "heads"))
from test_cqd import write_kg  # noqa: E402

TYPES = ["1p", "2p", "3p", "2i", "3i", "ip", "pi", "2u", "up"]
SMALL = ["--rank", "6", "--steps", "8", "--batch-size", "8", "--opt", "kge_epochs=8", "--opt", "test_queries=12",
         "--opt", "train_queries=16", "--opt", "valid_queries=0", "--no-progress"]


def test_cli_trains_caches_and_eval_reproduces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kg = write_kg(tmp_path / "kg", n_ent=10, n=90, seed=1)
    out = tmp_path / "run"
    assert main(["train", "--task", "kg-queries", "--kg", str(kg), "--output", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    assert "10 entities, 3 relations" in text and "ComplEx rank 6 (trained, 8 epochs" in text
    assert "t-norm prod, beam k=5" in text and "t-norm min, beam k=5" in text
    res = json.loads((out / "results.json").read_text())
    for kind in ("prod", "min"):
        block = res["t_norms"][kind]
        assert block["adapter_parameters"] == 2 * 2 * 6 + 2  # default adapt=p: Linear(e_p → α, β), e_p of 2·rank
        for who in ("cqd", "cqda"):
            assert set(block[who]) <= set(TYPES) and "1p" in block[who] and "2p" in block[who]
            for r in block[who].values():
                assert 0 < r["mrr"] <= 1 and r["hits@1"] <= r["hits@3"] <= r["hits@10"] <= 1 and r["n"] >= 1
        # adapt=p: α, β are per query, so one atom's ranking (1p) is unchanged while 1 + α > 0
        assert block["cqd"]["1p"] == block["cqda"]["1p"]
        trained = load_file(out / f"cqda-{kind}.safetensors")  # and the calibration did train: its init is ~1e-3
        assert max(float(t.abs().max()) for t in trained.values()) > 1e-2
    info = json.loads((out / "train_info.json").read_text())
    assert info["task"] == "kg-queries" and info["results"] == res["t_norms"]
    assert {"complex.safetensors", "cqda-prod.safetensors", "cqda-min.safetensors"} <= {p.name for p in out.iterdir()}

    assert main(["eval", "--adapter", str(out)]) == 0
    assert "recorded in train_info.json: reproduced" in capsys.readouterr().out

    # a second run into the same folder reuses the cached ComplEx (same graph, same settings) and gives the same
    # numbers; other settings retrain it
    assert main(["train", "--task", "kg-queries", "--kg", str(kg), "--output", str(out), *SMALL]) == 0
    assert "ComplEx rank 6 (loaded from" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["t_norms"] == res["t_norms"]
    assert main(["train", "--task", "kg-queries", "--kg", str(kg), "--output", str(out), *SMALL, "--seed", "1"]) == 0
    assert "ComplEx rank 6 (trained" in capsys.readouterr().out
