"""Fault injection on persistence (issue 18): killed and concurrent saves, saving over another adapter, tampered
adapter files. An adapter folder is one unit: whatever happens, a load gives exactly the old adapter, exactly the new
one, or a clean :class:`PeftkitError` — never a mix, never a silent cast or NaN."""

from __future__ import annotations

import inspect
import json
import math
import multiprocessing as mp
import os
import random
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit.core import io

CFG, WEIGHTS, INFO = io.CONFIG_NAME, io.WEIGHTS_NAME, "train_info.json"


class _Net(nn.Module):
    def __init__(self, width: int = 64, head: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _adapter(seed: int, alpha: float, width: int = 64, head: int = 64) -> nn.Module:
    """A LoRA adapter whose every tensor depends on ``seed`` (the head, in modules_to_save, makes the file big)."""
    torch.manual_seed(0)
    model = _Net(width, head)
    peftkit.adapt(model, peftkit.config("lora", target_modules=["fc1", "fc2"], r=8, alpha=alpha,
                                        modules_to_save=["head"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in peftkit.adapter_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g))
    return model


def _content(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peftkit.adapter_state_dict(model).items()}


def _which(d: Path, versions: dict[str, tuple[dict[str, torch.Tensor], float]], width: int = 64,
           head: int = 64) -> str:
    """Load ``d`` into a fresh base; the name of the version it is exactly (tensors, alpha and run info agree), or
    "error" for a clean PeftkitError. Anything else — a mix — fails the test."""
    torch.manual_seed(0)
    fresh = _Net(width, head)
    try:
        peftkit.load(fresh, d)
    except peftkit.PeftkitError:
        return "error"
    got = _content(fresh)
    alpha = peftkit.get_config(fresh, "default").alpha
    info = json.loads((d / INFO).read_text()) if (d / INFO).is_file() else {}
    for name, (tensors, a) in versions.items():
        if all(torch.equal(got[k], v) for k, v in tensors.items()):
            assert alpha == a, f"weights of {name} loaded with alpha {alpha} (mixed unit)"
            return name
    raise AssertionError(f"loaded a mix: alpha {alpha}, run info {info}")


def _save(model: nn.Module, d: str | Path, **kw: object) -> None:
    """``peftkit.save`` with the options this save takes (so these tests also run against older peftkit)."""
    accepted = inspect.signature(peftkit.save).parameters
    peftkit.save(model, d, **{k: v for k, v in kw.items() if k in accepted})


def _save_loop(d: str, models: list[nn.Module]) -> None:  # forked child: save A and B over each other, forever
    torch.set_num_threads(1)
    i = 0
    while True:
        _save(models[i % 2], d, overwrite=True, run_info={"which": "AB"[i % 2]})
        i += 1


def _versions(width: int = 64, head: int = 64) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
    return {"A": (_content(_adapter(1, 8.0, width, head)), 8.0), "B": (_content(_adapter(2, 64.0, width, head)), 64.0)}


def test_save_killed_at_random_instants_never_leaves_a_mixed_adapter(tmp_path: Path) -> None:
    """24 saves killed by SIGKILL at random instants (files of ~5 MB, so kills land inside writes and swaps): every
    load afterwards gives exactly A or B; the next save removes the dead saves' temp folders."""
    d = tmp_path / "adapter"
    versions = _versions(256, 1024)
    _save(_adapter(1, 8.0, 256, 1024), d, run_info={"which": "A"})
    models = [_adapter(1, 8.0, 256, 1024), _adapter(2, 64.0, 256, 1024)]
    ctx = mp.get_context("fork")
    rng = random.Random(0)
    seen: dict[str, int] = {}
    leftovers = 0
    for i in range(24):
        p = ctx.Process(target=_save_loop, args=(str(d), models), daemon=True)
        p.start()
        time.sleep(rng.uniform(0.005, 0.15))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        got = _which(d, versions, 256, 1024)
        seen[got] = seen.get(got, 0) + 1
        assert got in ("A", "B"), f"kill {i}: the folder is not loadable"
        leftovers += sum(n.startswith(".adapter.peftkit-") for n in os.listdir(tmp_path))
    _save(_adapter(2, 64.0, 256, 1024), d, overwrite=True)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".adapter.peftkit-")] == []
    assert sorted(os.listdir(d)) == [CFG, WEIGHTS]  # B saved without run info: A's train_info.json went too
    print(f"kills: {seen}, temp folders seen after the kills: {leftovers}")


def test_concurrent_save_and_load_never_mix(tmp_path: Path) -> None:
    """One process saves A and B over each other as fast as it can; 100 loads in this process each give A or B."""
    d = tmp_path / "adapter"
    versions = _versions(128, 512)
    models = [_adapter(1, 8.0, 128, 512), _adapter(2, 64.0, 128, 512)]
    peftkit.save(models[0], d)
    p = mp.get_context("fork").Process(target=_save_loop, args=(str(d), models), daemon=True)
    p.start()
    try:
        got = [_which(d, versions, 128, 512) for _ in range(100)]
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    assert "error" not in got and set(got) <= {"A", "B"}
    assert len(set(got)) == 2, f"the writer never swapped during the loads: {set(got)}"


def test_a_save_that_died_mid_swap_is_recovered(tmp_path: Path) -> None:
    """The crash states of the no-exchange fallback: old folder set aside, new one not yet in place. Loading waits
    briefly then fails cleanly (never a mix); the next save puts the old folder back first, then replaces it."""
    d = tmp_path / "adapter"
    a, b = _adapter(1, 8.0), _adapter(2, 64.0)
    peftkit.save(a, d)
    os.rename(d, tmp_path / ".adapter.peftkit-old-x1")
    (tmp_path / ".adapter.peftkit-tmp-x1").mkdir()
    (tmp_path / ".adapter.peftkit-tmp-x1" / CFG).write_text("{}")  # a half-written new unit
    assert _which(d, _versions()) == "error"
    io.clean_leftovers(d)
    assert _which(d, _versions()) == "A"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    # older peftkit's per-file temp files are ignored by loads and removed by the next save
    (d / ".adapter_model.safetensors.abc.tmp").write_bytes(b"\0" * 1000)
    assert _which(d, _versions()) == "A"
    peftkit.save(b, d, overwrite=True)
    assert sorted(os.listdir(d)) == [CFG, WEIGHTS]


def test_saving_over_another_adapter_needs_overwrite_and_replaces_the_whole_unit(tmp_path: Path) -> None:
    d = tmp_path / "adapter"
    a, b = _adapter(1, 8.0), _adapter(2, 64.0)
    peftkit.save(a, d, run_info={"run": "a"})
    (d / "notes.txt").write_text("mine")
    peftkit.save(a, d, run_info={"run": "a2"})  # the same adapter again (a trainer re-saving its output): fine
    before = {n: (d / n).read_bytes() for n in (CFG, WEIGHTS, INFO)}
    with pytest.raises(peftkit.PeftkitError, match="already holds another adapter.*overwrite=True"):
        peftkit.save(b, d)
    assert {n: (d / n).read_bytes() for n in (CFG, WEIGHTS, INFO)} == before
    peftkit.save(b, d, overwrite=True)
    assert sorted(os.listdir(d)) == [CFG, WEIGHTS, "notes.txt"], "the old run's train_info.json survived"
    assert _which(d, _versions()) == "B"
    # an adapter loaded from the folder is the same adapter: saving it back needs no overwrite
    torch.manual_seed(0)
    fresh = _Net()
    peftkit.load(fresh, d)
    peftkit.save(fresh, d)
    peftkit.save(fresh, d, format="hf", overwrite=True)  # the PEFT format goes through the same unit write
    assert _which(d, _versions()) == "B"


def test_non_finite_adapters_are_refused_on_save_and_load(tmp_path: Path) -> None:
    a = _adapter(1, 8.0)
    with torch.no_grad():
        a.fc1.adapters["default"].lora_B[0, 0] = float("nan")
    for fmt in ("peftkit", "hf"):
        with pytest.raises(peftkit.PeftkitError, match=r"tensor '[^']*lora_B[^']*' holds 1 NaN/inf"):
            peftkit.save(a, tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()
    peftkit.save(a, tmp_path / "nan", allow_nonfinite=True)
    torch.manual_seed(0)
    fresh = _Net()
    with pytest.raises(peftkit.PeftkitError, match=r"tensor 'adapter\.fc1\.lora_B' holds 1 NaN/inf"):
        peftkit.load(fresh, tmp_path / "nan")
    assert peftkit.adapter_names(fresh) == []
    peftkit.load(fresh, tmp_path / "nan", allow_nonfinite=True)  # forensics
    assert torch.isnan(fresh.fc1.adapters["default"].lora_B[0, 0])


def _strip_checksums(d: Path, version: int = 1) -> None:
    """Rewrite the adapter the way another tool (or older peftkit) would: no checksums, format_version 1."""
    save_file(load_file(str(d / WEIGHTS)), str(d / WEIGHTS))
    cfg = json.loads((d / CFG).read_text())
    (d / CFG).write_text(json.dumps({**cfg, "format_version": version}))


def _edit_config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / CFG).read_text())
    for k, v in changes.items():
        if k in cfg:
            cfg[k] = v
        else:
            cfg["config"][k] = v
    (d / CFG).write_text(json.dumps(cfg))  # json writes NaN as the bare token NaN, as the fault round did


def _flip(d: Path, offset_from_end: int, bit: int) -> None:
    blob = bytearray((d / WEIGHTS).read_bytes())
    blob[len(blob) - offset_from_end] ^= 1 << bit
    (d / WEIGHTS).write_bytes(bytes(blob))


def _retype_first_f32(d: Path, new: bytes = b"I32") -> None:
    blob = (d / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = blob[8:8 + n].replace(b'"F32"', b'"' + new + b'"', 1)
    (d / WEIGHTS).write_bytes(blob[:8] + header + blob[8 + n:])


TAMPER = {
    # name: (damage, with checksums → message, without checksums → message)
    "nan_weight": (lambda d: _nan_in_file(d), "corrupted or truncated", r"tensor '.*' holds 1 NaN/inf"),
    "flipped_exponent_bit": (lambda d: _flip(d, 1, 6), "corrupted or truncated", None),
    "f32_to_i32_header": (lambda d: _retype_first_f32(d), "corrupted or truncated",
                          r"tensor '.*' is stored as int32 but this adapter holds float32"),
    "alpha_nan": (lambda d: _edit_config(d, alpha=math.nan), "does not belong with",
                  "alpha must be finite"),
    "alpha_inf": (lambda d: _edit_config(d, alpha=math.inf), "does not belong with",
                  "alpha must be finite"),
    "format_version_99": (lambda d: _edit_config(d, format_version=99), "does not belong with",
                          "format_version 99 is not one this peftkit reads"),
    "config_from_another_save": (lambda d: (d / CFG).write_bytes((d.parent / "other" / CFG).read_bytes()),
                                 "does not belong with", None),
    "train_info_from_another_save": (lambda d: (d / INFO).write_text('{"run": "other"}'), "does not belong with",
                                     None),
}


def _nan_in_file(d: Path) -> None:
    t = load_file(str(d / WEIGHTS))
    meta = io.weights_metadata((d / WEIGHTS).read_bytes())
    k = sorted(t)[0]
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")
    save_file(t, str(d / WEIGHTS), metadata=meta)


# every case with checksums (as peftkit writes), and without them (another tool's file) where a value check can see
# the damage at all (a flipped bit giving a plausible value, or a consistent pair, only checksums can see)
@pytest.mark.parametrize(("case", "checksums"), [(c, True) for c in sorted(TAMPER)]
                         + [(c, False) for c in sorted(TAMPER) if TAMPER[c][2] is not None])
def test_tampered_adapter_files_are_refused(tmp_path: Path, case: str, checksums: bool) -> None:
    damage, with_sums, without_sums = TAMPER[case]
    d = tmp_path / "adapter"
    peftkit.save(_adapter(1, 8.0), d, run_info={"run": "a"}, format="peftkit")
    peftkit.save(_adapter(2, 64.0), tmp_path / "other", run_info={"run": "b"}, format="peftkit")
    if not checksums:
        _strip_checksums(d)
    damage(d)
    torch.manual_seed(0)
    fresh = _Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(peftkit.PeftkitError, match=with_sums if checksums else without_sums):
        peftkit.load(fresh, d)
    assert peftkit.adapter_names(fresh) == []
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_saving_into_the_current_directory_or_through_a_symlink(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder swap must not strand the process in a deleted directory, nor replace a symlink by a folder."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    a = _adapter(1, 8.0)
    peftkit.save(a, ".")
    peftkit.save(a, ".")
    assert Path.cwd() == tmp_path / "here" and sorted(os.listdir(".")) == [CFG, WEIGHTS]
    (tmp_path / "link").symlink_to(tmp_path / "here")
    peftkit.save(a, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and _which(tmp_path / "link", _versions()) == "A"
