"""The package layout: imports flow one way (pipeline, then trainer, then evalsuite) and never in a circle,
counting the imports inside functions and under TYPE_CHECKING too."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pipeline", "trainer", "evalsuite")


def modules() -> dict[str, Path]:
    return {f"{stage}.{path.stem}": path for stage in STAGES for path in sorted((ROOT / stage).glob("*.py"))}


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules that `path` imports anywhere in it (`from pkg import mod` names mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, known) - {name} for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path from its first module (in sorted order) back to it."""
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    found.append(path)
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return found


def test_circles_finds_a_circle_and_only_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_later_stage():
    upward = [(name, other) for name, others in import_graph().items() for other in others
              if STAGES.index(other.split(".")[0]) > STAGES.index(name.split(".")[0])]
    assert upward == []


def test_no_import_circles():
    assert circles(import_graph()) == []
