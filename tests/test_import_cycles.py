"""No module under ``src/coin`` imports, directly or lazily, a module that imports it back.

The graph is built statically with :mod:`ast`, so nothing is imported. Every ``import`` and
``from ... import`` statement counts wherever it sits: module level, inside functions (deferred
imports), inside ``try`` blocks and inside ``if TYPE_CHECKING:`` blocks. Counting TYPE_CHECKING-only
imports is the stricter choice: a type-only back-reference still means the two modules know about
each other, and the layering rule ("results are a leaf, the renderer imports results, the gate
imports the renderer") should hold for type checkers as well as for the interpreter.

Edges:

* ``import coin.a.b`` -> ``coin.a.b``.
* ``from coin.a import b`` -> ``coin.a.b`` when ``b`` is a submodule, otherwise ``coin.a``.
* relative imports are resolved against the importing module's package (a package's
  ``__init__`` is its own package), then treated as above.
* a package ``__init__`` that re-exports from its submodules has edges to them like any module.

The implicit import of parent packages (``import coin.a.b`` also runs ``coin/a/__init__.py``) is
*not* an edge: otherwise every package whose ``__init__`` re-exports a submodule would be a cycle
by construction. Only imports of ``coin`` modules are graphed.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT_PACKAGE = "coin"


def module_index(src: Path, root: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``src/root``."""
    out: dict[str, Path] = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, *([target] if target else [])])


def imports_of(module: str, path: Path, modules: dict[str, Path], root: str) -> set[str]:
    """The ``root.*`` modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {name for name in found if name in modules and (name == root or name.startswith(root + "."))}


def import_graph(src: Path, root: str) -> dict[str, set[str]]:
    modules = module_index(src, root)
    return {name: imports_of(name, path, modules, root) - {name} for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles as closed module chains, e.g. ``[a, b, a]``.

    Tarjan's algorithm finds the strongly connected components; inside each, a breadth-first search
    gives the shortest chain from every member back to itself (duplicates of the same ring dropped),
    so the message names concrete import paths rather than just the set of entangled modules.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for comp in sorted(components):
        members = set(comp)
        for start in comp:
            chain = _shortest_cycle(graph, members, start)
            ring = chain[:-1]
            key = min(tuple(ring[i:] + ring[:i]) for i in range(len(ring)))
            if key not in seen:
                seen.add(key)
                cycles.append(chain)
    return cycles


def _shortest_cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """Breadth-first search inside one component for the shortest chain ``start -> ... -> start``."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt: list[str] = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    chain = [v]
                    while chain[0] != start:
                        chain.insert(0, parent[chain[0]])
                    return [*chain, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def test_no_import_cycles_in_src() -> None:
    graph = import_graph(SRC, ROOT_PACKAGE)
    assert len(graph) > 20, "module walk found too few modules; is SRC right?"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/coin:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_walker_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    """The walker itself: deferred, TYPE_CHECKING, relative and ``from pkg import submodule`` imports
    are all edges, and a cycle made only of them is reported as a module chain."""
    pkg = tmp_path / "pkgx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkgx.a import thing\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\nthing = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import C\n"
    )
    (pkg / "c.py").write_text("from pkgx import a\nimport os\n")
    graph = import_graph(tmp_path, "pkgx")
    assert graph == {
        "pkgx": {"pkgx.a"},
        "pkgx.a": {"pkgx.sub.b"},
        "pkgx.sub": set(),
        "pkgx.sub.b": {"pkgx.c"},
        "pkgx.c": {"pkgx.a"},
    }
    assert find_cycles(graph) == [["pkgx.a", "pkgx.sub.b", "pkgx.c", "pkgx.a"]]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycles(import_graph(tmp_path, "pkgx")) == []
