"""The package layers (docs/ARCHITECTURE.md): each package imports only itself and the layers below.

    schemas  <-  captioner, trainer  <-  pipeline  <-  jobs  <-  densecurate (the CLI)

Inside ``pipeline`` the rooms are layered too:

    sources  <-  store  <-  core  <-  stages        density, grounding  <-  stages, report

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


# What each room of ``pipeline`` may import of the other rooms (and of the modules at its top level).
PIPELINE_ROOMS: dict[str, set[str]] = {
    "sources": set(),  # reading inputs: nothing of the dataset root
    "store": {"sources"},  # the dataset root on disk: never the runner, a stage or a report
    "core": {"store", "sources"},  # the stage protocol, the runner and Ray: never a stage
    "density": set(),  # nouns and Table-1 figures: pure functions
    "grounding": set(),  # grounding figures from embeddings: pure functions
    "report": {"store", "density", "grounding"},  # what a user reads: never Ray, never a stage
    "stages": {"core", "store", "sources", "density", "grounding", "key_sample"},  # never a report
}
# Rooms that never import Ray (a report or a query must not start a cluster).
WITHOUT_RAY = {"sources", "store", "density", "grounding", "report"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute imports; the project uses no relative ones)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module or "")
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports."""
    return {name for name in _all_imports(path) if name.split(".")[0] in ALLOWED}


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


def room_of(module: str) -> str | None:
    """The room of a ``pipeline`` module (``pipeline.store.catalog`` -> ``store``); None outside ``pipeline``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def room_violations(graph: dict[str, set[str]]) -> list[str]:
    """The imports between rooms of ``pipeline`` that ``PIPELINE_ROOMS`` does not allow."""
    return [
        f"{module} imports {target}"
        for module, targets in graph.items()
        if (room := room_of(module)) in PIPELINE_ROOMS
        for target in targets
        if (other := room_of(target)) not in (None, room) and other not in PIPELINE_ROOMS[room]
    ]


def test_every_room_of_pipeline_imports_only_what_it_may():
    assert room_violations(import_graph()) == []


def test_reports_queries_and_the_store_never_import_ray():
    wrong = [
        str(path.relative_to(REPO))
        for room in WITHOUT_RAY
        for path in (REPO / "pipeline" / room).rglob("*.py")
        if any(name.split(".")[0] == "ray" for name in _all_imports(path))
    ]
    assert wrong == []


def test_pipeline_keeps_few_modules_at_its_top():
    assert {p.name for p in (REPO / "pipeline").glob("*.py")} == {"__init__.py", "key_sample.py", "sample_data.py"}
    assert set(PIPELINE_ROOMS) == {p.parent.name for p in (REPO / "pipeline").glob("*/__init__.py")}


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = import_graph()
    assert "pipeline.core.runner" in graph["pipeline.stages.shard"]  # `from pipeline.core.runner import run_stage`
    assert "jobs.steps" in graph["densecurate.commands"]  # an import inside a function counts
    assert room_violations({"pipeline.report.console": {"pipeline.core.runner"}}) == [
        "pipeline.report.console imports pipeline.core.runner"
    ]
    assert room_violations({"pipeline.stages.score": {"pipeline.report.console", "schemas.layout"}}) == [
        "pipeline.stages.score imports pipeline.report.console"
    ]
