"""``peftkit.core.io`` on systems without ``fcntl``: it imports everywhere, and its locks (the one-writer-per-run
:class:`RunLock`, the save's folder locks) use ``msvcrt`` on Windows and an ``O_EXCL`` lock file where neither
exists. Simulated here by hiding ``fcntl`` (and providing a stand-in ``msvcrt``) while a fresh copy of the module is
imported."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import peftkit.core.io as real_io
from peftkit.core.errors import PeftkitError


def _fake_msvcrt() -> types.ModuleType:
    """``msvcrt.locking`` semantics (a non-blocking exclusive lock; OSError EACCES when held elsewhere), built on the
    real flock so that two opens in one process conflict as two Windows handles do."""
    m = types.ModuleType("msvcrt")
    m.LK_UNLCK, m.LK_LOCK, m.LK_NBLCK, m.LK_RLCK, m.LK_NBRLCK = 0, 1, 2, 3, 4
    m.calls = []

    def locking(fd: int, mode: int, nbytes: int) -> None:
        m.calls.append((mode, nbytes))
        if mode == m.LK_UNLCK:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EACCES, "Permission denied") from None

    m.locking = locking
    return m


def _import_io(monkeypatch: pytest.MonkeyPatch, msvcrt: types.ModuleType | None) -> types.ModuleType:
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    monkeypatch.setitem(sys.modules, "msvcrt", msvcrt)
    spec = importlib.util.spec_from_file_location("peftkit.core._io_without_fcntl", real_io.__file__)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)  # must not raise
    return mod


@pytest.fixture(params=["msvcrt", "o_excl"])
def io(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    return _import_io(monkeypatch, _fake_msvcrt() if request.param == "msvcrt" else None)


def test_imports_without_fcntl(io: types.ModuleType) -> None:
    assert io.fcntl is None
    assert hasattr(io, "RunLock") and hasattr(io, "write_unit")


def test_run_lock_is_exclusive_and_released(io: types.ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = io.RunLock(out, "peftkit train")
    lock_file = tmp_path / ".run.peftkit-lock"
    assert lock_file.read_text().strip() == str(os.getpid())
    with pytest.raises(PeftkitError, match=rf"in use by another peftkit train \(pid {os.getpid()}\)"):
        io.RunLock(out, "peftkit train")
    first.release()
    assert not lock_file.exists()
    second = io.RunLock(out, "peftkit train")  # free again
    second.release()
    first.release()  # twice: harmless


def test_msvcrt_backend_uses_msvcrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _fake_msvcrt()
    io = _import_io(monkeypatch, fake)
    lock = io.RunLock(tmp_path / "run")
    assert fake.calls and fake.calls[0][0] == fake.LK_NBLCK
    lock.release()


def test_stale_o_excl_lock_of_a_dead_process_is_taken_over(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    io = _import_io(monkeypatch, None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (tmp_path / ".run.peftkit-lock").write_text(dead.stdout)  # a crashed run's lock file
    lock = io.RunLock(tmp_path / "run")
    assert (tmp_path / ".run.peftkit-lock").read_text().strip() == str(os.getpid())
    lock.release()


def test_save_swaps_the_unit_and_leaves_no_lock_files(io: types.ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "adapter"
    io.write_unit(d, {io.CONFIG_NAME: b'{"a": 1}', io.WEIGHTS_NAME: b"old"})
    (d / "notes.txt").write_text("kept")
    io.write_unit(d, {io.CONFIG_NAME: b'{"a": 2}', io.WEIGHTS_NAME: b"new"})  # replaces an existing unit
    assert (d / io.CONFIG_NAME).read_bytes() == b'{"a": 2}' and (d / io.WEIGHTS_NAME).read_bytes() == b"new"
    assert (d / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders, no lock files


def test_a_live_saves_temp_folder_is_not_cleaned(io: types.ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "adapter"
    tmp = tmp_path / f".adapter{io._TMP_TAG}live"
    tmp.mkdir()
    held = io._lock_dir(tmp)  # a save in progress holds its temp folder
    io.clean_leftovers(d)
    assert tmp.is_dir()
    held.release()
    io.clean_leftovers(d)  # now a dead save's leftover
    assert not tmp.exists()
