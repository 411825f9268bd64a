"""Run a child process (``torchrun`` workers, a script killed on purpose) for a test: a failed start is retried once,
and a failure reports what the children wrote.

A multi-process test can fail for reasons that are not the code under test: on a loaded machine a gloo rendezvous
times out, or a worker aborts while its threads are torn down ("terminate called without an active exception",
SIGABRT). One retry absorbs that; a real bug fails both attempts, and the assertion message then carries the exit
status and the tail of stdout / stderr of each attempt.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

TAIL = 3000


def _tail(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-TAIL:]


def _report(i: int, cmd: Sequence[str], status: str, out: str | bytes | None, err: str | bytes | None) -> str:
    return (f"attempt {i}: {' '.join(map(str, cmd))[:300]}\n  {status}\n"
            f"--- stdout (tail) ---\n{_tail(out)}\n--- stderr (tail) ---\n{_tail(err)}")


def run_child(cmd: Sequence[str], *, env: dict[str, str], timeout: float = 300,
              ok: Callable[[subprocess.CompletedProcess[str]], bool] = lambda p: p.returncode == 0,
              clean: Sequence[Path] = (), attempts: int = 2) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; when ``ok(proc)`` is false (or it times out) remove the ``clean`` paths and run it once more.

    Returns the first successful :class:`subprocess.CompletedProcess`; raises ``AssertionError`` with every attempt's
    exit status, stdout and stderr when none succeeded.
    """
    reports = []
    for i in range(1, attempts + 1):
        for path in clean:
            shutil.rmtree(path, ignore_errors=True)
        try:
            proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            reports.append(_report(i, cmd, f"timed out after {timeout:g} s", e.stdout, e.stderr))
            continue
        if ok(proc):
            return proc
        reports.append(_report(i, cmd, f"exit status {proc.returncode}", proc.stdout, proc.stderr))
    raise AssertionError(f"child process failed {attempts} times:\n" + "\n".join(reports))
