"""The packages' modules import each other in one direction only: no module of ``apla_rt`` or
``export`` reaches itself through its imports, counting the imports inside functions (a lazy
import hides a cycle, it does not remove it). The sampling loop (``apla_rt.pipeline``) sits
below the API that uses it (``apla_rt.api``), which sits below the one-call entry points
(``apla_rt.oneshot``); the TensorRT validation plan (``export.trt_plan``) below the builder;
``apla_ui`` above every other package, imported by none."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (anywhere in its file)."""
    folder = ROOT / package
    names = {p.stem for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module is None:  # from . import x, y
                    found |= {a.name for a in node.names if a.name in names}
                elif node.level == 1 and node.module:
                    found.add(node.module.split(".")[0])
                elif node.level == 0 and node.module and node.module.split(".")[0] == package:
                    parts = node.module.split(".")
                    if len(parts) > 1:
                        found.add(parts[1])
                    else:
                        found |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package and len(parts) > 1:
                        found.add(parts[1])
        graph[path.stem] = {m for m in found if m in names and m != path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


@pytest.mark.parametrize("package", ["apla_rt", "export", "apla_train", "apla_eval", "apla_ui"])
def test_no_import_cycle(package):
    cycle = find_cycle(module_imports(package))
    assert cycle is None, f"{package} modules import each other in a cycle: {' -> '.join(cycle)}"


def test_the_loop_sits_below_the_api():
    graph = module_imports("apla_rt")
    assert "api" in graph["oneshot"] and "pipeline" in graph["api"]
    assert not {"api", "oneshot"} & graph["pipeline"]
    assert "trt_plan" in module_imports("export")["trt"]


def test_nothing_imports_the_ui():
    """``apla_ui`` sits above every other package: it may use them, none of them uses it."""
    found = []
    for package in ("apla_rt", "export", "apla_train", "apla_eval", "benchmarks", "tools"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                         else [])
                if any(n.split(".")[0] == "apla_ui" for n in names):
                    found.append(str(path.relative_to(ROOT)))
    assert not found, f"these import apla_ui, which sits above them: {found}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
