"""Knowledge-graph readers: the Nations, Kinships and UMLS triples that ship inside the ``pykeen`` wheel (read as
files, pykeen is never imported) or any folder with ``train``/``valid``/``test`` files of tab-separated
``head<TAB>relation<TAB>tail`` lines (``.txt``, ``.tsv`` or no suffix).

Entity and relation ids are given in sorted-name order over all three splits, so a folder always maps to the same
ids. A malformed line (not three non-empty tab-separated fields) is an error naming ``file:line``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import PeftkitError

PACKAGED = ("nations", "kinships", "umls")
SPLITS = ("train", "valid", "test")
_SUFFIXES = (".txt", ".tsv", "")


@dataclass(frozen=True)
class KnowledgeGraph:
    """Triples as ``[n, 3]`` int64 tensors of (head, relation, tail) ids per split."""

    source: str
    entities: list[str]
    relations: list[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    def fingerprint(self) -> str:
        """A short hash of the ids and triples (tells a cached link predictor whether it fits this graph)."""
        h = hashlib.sha256("\n".join(self.entities + ["|"] + self.relations).encode())
        for split in (self.train, self.valid, self.test):
            h.update(split.numpy().tobytes())
        return h.hexdigest()[:16]


def packaged_dir(name: str) -> Path:
    """The folder of a KG shipped inside the installed ``pykeen`` package (located, not imported)."""
    spec = importlib.util.find_spec("pykeen")
    if spec is None or not spec.submodule_search_locations:
        raise PeftkitError(f"the {name!r} knowledge graph comes from the pykeen package's data files; install it "
                           "with 'pip install --no-deps pykeen' or pass a folder with train/valid/test files")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / name


def _split_file(folder: Path, split: str) -> Path:
    for suffix in _SUFFIXES:
        p = folder / f"{split}{suffix}"
        if p.is_file():
            return p
    raise PeftkitError(f"{folder}: no {split} file ({', '.join(split + s for s in _SUFFIXES if s)} or {split}); a "
                       "KG folder needs train, valid and test files of head<TAB>relation<TAB>tail lines")


def read_triples(path: Path) -> list[tuple[str, str, str]]:
    """The (head, relation, tail) names of one file; blank lines are skipped, anything else malformed is an error
    naming ``path:line``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PeftkitError(f"cannot read {path}: {e}") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != 3 or not all(fields):
            raise PeftkitError(f"{path}:{i}: expected head<TAB>relation<TAB>tail (3 non-empty tab-separated "
                               f"fields), got {len(fields)} field(s): {line[:80]!r}")
        out.append((fields[0], fields[1], fields[2]))
    if not out:
        raise PeftkitError(f"{path}: no triples")
    return out


def load_kg(spec: str | Path) -> KnowledgeGraph:
    """``nations`` / ``kinships`` / ``umls`` (pykeen's files) or a folder path with train/valid/test files."""
    name = str(spec)
    folder = packaged_dir(name.lower()) if name.lower() in PACKAGED else Path(name)
    if not folder.is_dir():
        raise PeftkitError(f"knowledge graph {name!r} not found: give one of {', '.join(PACKAGED)} or a folder "
                           "with train/valid/test files")
    named = {s: read_triples(_split_file(folder, s)) for s in SPLITS}
    entities = sorted({e for t in named.values() for h, _, x in t for e in (h, x)})
    relations = sorted({r for t in named.values() for _, r, _ in t})
    eid = {e: i for i, e in enumerate(entities)}
    rid = {r: i for i, r in enumerate(relations)}

    def ids(triples: list[tuple[str, str, str]]) -> torch.Tensor:
        return torch.tensor([(eid[h], rid[r], eid[t]) for h, r, t in triples], dtype=torch.long)

    source = name.lower() if name.lower() in PACKAGED else str(folder)
    return KnowledgeGraph(source, entities, relations, *(ids(named[s]) for s in SPLITS))
