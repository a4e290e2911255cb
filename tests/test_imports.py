"""The import graph of align/ and rewards/, read from the source with `ast` (nothing is imported): no module may
import itself through others (top-level or function-level imports alike), and the reward library is a leaf that
imports nothing from align."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "rewards")


def _modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name; a package is named by its `__init__`."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` (or its nearest enclosing project module) refers to; None outside the project."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports anywhere in its file (any depth: top level, functions, branches)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if _resolve(origin, modules) is None:
                continue
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                target = sub if sub in modules else _resolve(origin, modules)  # a submodule, else a name in origin
                found.add(target)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Each strongly connected component of more than one module (Tarjan), sorted, with the shortest cycle through
    its first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for comp in components:
        start = min(comp)
        paths = {start: [start]}
        queue = [start]
        cycle = None
        while queue and cycle is None:  # shortest path start -> ... -> start inside the component
            v = queue.pop(0)
            for w in sorted(graph[v] & comp):
                if w == start:
                    cycle = paths[v] + [start]
                    break
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        cycles.append((sorted(comp), cycle))
    return cycles


def test_graph_reads_the_project():
    graph = import_graph()
    assert "align.model.fastpaths" in graph and "rewards.registry" in graph and "align.grpo" in graph
    assert "align.rollout.protocol" in graph["align.rollout"]  # `from .protocol import ...` in a package __init__


def test_no_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(f"{' -> '.join(c)} (modules in the circle: {', '.join(comp)})"
                                                     for comp, c in cycles)


def test_rewards_imports_nothing_from_align():
    graph = import_graph()
    bad = {m: sorted(t for t in targets if t.split(".")[0] == "align")
           for m, targets in graph.items() if m.split(".")[0] == "rewards"}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"rewards/ imports from align: {bad}"
