"""The one exception type peftkit raises for bad input; the CLI prints its message as a single line."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class PeftkitError(ValueError):
    """A clear, user-facing error: bad config, bad target, bad file. Nothing was changed when it is raised."""


def did_you_mean(word: str, choices: Iterable[Any]) -> str:
    """``" (did you mean 'x'?)"`` naming the closest of ``choices`` to ``word`` (difflib), or ``""`` when none is
    close. Shared by every "unknown name" error: config fields, method names, target keywords."""
    import difflib

    names = [str(c) for c in choices]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if not close:  # spelling variants difflib scores low: case, '_' vs '-'
        norm = {n.lower().replace("-", "_"): n for n in names}
        hit = norm.get(word.lower().replace("-", "_"))
        close = [hit] if hit else []
    return f" (did you mean {close[0]!r}?)" if close else ""
