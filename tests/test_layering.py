"""The package layers (docs/ARCHITECTURE.md): each package imports only itself and the layers below.

    schemas  <-  captioner, trainer  <-  pipeline  <-  jobs  <-  densecurate (the CLI)

Every import counts, also one inside a function. No module may take part in an import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What each package may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "captioner": {"schemas"},
    "trainer": {"schemas"},
    "pipeline": {"schemas", "captioner", "trainer"},
    "jobs": {"schemas", "captioner", "trainer", "pipeline"},
    "densecurate": {"schemas", "captioner", "trainer", "pipeline", "jobs"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports (absolute imports; the project uses no relative ones)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module or "")
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ALLOWED}


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (names that are not modules map to their module)."""
    files = {_module_name(p): p for package in ALLOWED for p in (REPO / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in files:  # `from pkg.mod import func` -> pkg.mod
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_package_imports_only_lower_layers():
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if (pkg := target.split(".")[0]) != module.split(".")[0] and pkg not in ALLOWED[module.split(".")[0]]
    ]
    assert wrong == []


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = import_graph()
    assert "pipeline.runner" in graph["pipeline.shard_stage"]  # `from pipeline.runner import run_stage`
    assert "jobs.stages" in graph["densecurate.commands"]  # an import inside a function counts
