"""The import graph of ``src/peftkit`` follows DESIGN.md's arrows (read with ``ast``, nothing imported).

Layers, top to bottom (a module may import its own layer's package and any layer below, never one above):

    cli → catalog / bench / export → tasks → continual → train → heads → methods → data → models → core / ops / quant

``bench`` sits above ``tasks``: it is a command over the task registry (it reads the classification task's defaults
and runs ``peftkit train`` in child processes); ``catalog`` (``peftkit methods``) reads the method and head
registries; ``export`` (``peftkit export``) loads an adapter into its base model. ``continual`` (continual-learning
methods and the task-sequence protocol) runs the training loop of ``train``, so it sits above it. ``heads`` build on
methods (CREMA's per-modality LoRA). ``data`` (readers) may use ``models`` (where the
packaged files are, the inputs a packaged model expects); both sit under the training code and over the core.
Inside the bottom layer, ``core`` may import nothing from ``quant``, ``train``, ``methods``;
``quant`` registers its host kind with the core. No module imports a private name (``_x``) of another package, and
there are no import circles between packages or inside ``core``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "peftkit"

#: package -> layer (higher may import lower); the top-level modules count as their own package
LAYERS = {
    "__main__": 11, "__init__": 10, "compose": 10, "cli": 9, "bench": 8, "catalog": 8, "export": 8, "tasks": 7,
    "continual": 6.5,
    "train": 6, "heads": 5.5, "methods": 5, "data": 4, "models": 3, "vision": 3.5,  # vision: the old path
    "core": 1, "ops": 1, "quant": 1,
}
#: within the bottom layer: who may import whom (ops imports nothing of peftkit: pure maths, which the core may use —
#: compose's task-vector merges; quant builds on the core)
BOTTOM = {"core": {"ops"}, "ops": set(), "quant": {"core"}}

#: arrows that still point the wrong way, each with its reason; to be emptied
ALLOWED: dict[tuple[str, str], str] = {
    # the registry finds the methods by importing the methods package (each file registers itself; no method is
    # named): plugin discovery, not a dependency of the core on a method
    ("core", "methods"): "core.registry._load_all imports peftkit.methods to discover the registered methods",
    # the old import path: peftkit.train.continual re-exports peftkit.continual (which moved out of train)
    ("train", "continual"): "train/continual.py is the re-export alias of the old path peftkit.train.continual",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_only_lines(tree: ast.AST) -> set[int]:
    """Lines of the imports inside ``if TYPE_CHECKING:`` blocks (never executed: no runtime arrow)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {n.lineno for b in node.body for n in ast.walk(b) if isinstance(n, ast.Import | ast.ImportFrom)}
    return out


def _imports(path: Path, runtime_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every import in ``path``, relative imports resolved
    (``runtime_only``: without the ``TYPE_CHECKING`` ones)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_only_lines(tree) if runtime_only else set()
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names], node.lineno))
    return out


def _package(module: str) -> str | None:
    """``peftkit.core.model`` -> ``core``; ``peftkit.cli`` -> ``cli``; ``peftkit`` -> ``__init__``; else None."""
    parts = module.split(".")
    if parts[0] != "peftkit":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _graph(runtime_only: bool = False) -> list[tuple[str, str, str, list[str], int]]:
    """(importer module, its package, imported module, names, line) for every peftkit-internal import."""
    edges = []
    for path in sorted(SRC.rglob("*.py")):
        me = _module_name(path)
        for mod, names, line in _imports(path, runtime_only):
            if _package(mod) is not None:
                edges.append((me, _package(me), mod, names, line))
    return edges


def _allowed(src: str, dst: str) -> bool:
    if src == dst:
        return True
    ls, ld = LAYERS[src], LAYERS[dst]
    if ls == ld == 1:
        return dst in BOTTOM[src]
    return ls > ld


def test_every_package_has_a_layer() -> None:
    pkgs = {_package(_module_name(p)) for p in SRC.rglob("*.py")}
    assert pkgs <= set(LAYERS), f"give these a layer in LAYERS: {sorted(pkgs - set(LAYERS))}"


def test_arrows_point_down() -> None:
    bad = []
    for me, src, mod, _, line in _graph():
        dst = _package(mod)
        if mod == "peftkit":
            continue  # `import peftkit`: the public API, re-exports of the core (lazy, inside functions)
        if not _allowed(src, dst) and (src, dst) not in ALLOWED:
            bad.append(f"{me}:{line} imports {mod} ({src} -> {dst})")
    assert not bad, "arrows pointing up or sideways:\n" + "\n".join(bad)


def test_allow_list_is_still_needed() -> None:
    used = {(src, _package(mod)) for _, src, mod, _, _ in _graph()}
    stale = [k for k in ALLOWED if k not in used]
    assert not stale, f"remove these from ALLOWED, they no longer occur: {stale}"


def test_no_private_names_across_packages() -> None:
    bad = []
    for me, src, mod, names, line in _graph():
        dst = _package(mod)
        if dst == src:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        private += [p for p in mod.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
        if private:
            bad.append(f"{me}:{line} imports {private} from {mod}")
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_circles_between_packages() -> None:
    g: dict[str, set[str]] = defaultdict(set)
    for _, src, mod, _, _ in _graph(runtime_only=True):
        dst = _package(mod)
        if dst != src and dst != "__init__" and (src, dst) not in ALLOWED:
            g[src].add(dst)
    assert _cycles(g) == []


@pytest.mark.parametrize("package", ["core", "tasks", "models"])
def test_no_circles_inside(package: str) -> None:
    g: dict[str, set[str]] = defaultdict(set)
    for me, src, mod, names, _ in _graph(runtime_only=True):
        if src != package or _package(mod) != package:
            continue
        targets = {mod}
        # `from . import x` / `from .pkg import mod`: the imported names may be submodules
        targets |= {f"{mod}.{n}" for n in names if (SRC.parent / f"{mod}.{n}".replace(".", "/")).with_suffix(
            ".py").exists()}
        for t in targets:
            if t != me:
                g[me].add(t)
    assert _cycles(g) == [], f"import circles inside {package}"


def test_the_checker_sees_an_upward_arrow() -> None:
    """The graph reader resolves relative imports (a check that could not fail would prove nothing)."""
    edges = {(src, _package(mod)) for _, src, mod, _, _ in _graph()}
    assert ("tasks", "core") in edges and ("cli", "tasks") in edges
    assert not _allowed("core", "methods") and not _allowed("core", "quant") and _allowed("quant", "core")
    assert not _allowed("ops", "core") and not _allowed("core", "continual") and _allowed("continual", "train")
