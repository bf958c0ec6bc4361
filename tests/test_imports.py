"""The packages' modules import each other in one direction only, counting the imports inside
functions (a lazy import hides a cycle, it does not remove it):

* no module of ``apla_rt``, ``export``, ``apla_train`` or ``apla_eval`` reaches itself through
  its imports;
* ``apla_rt``'s subpackages are layers, and a module imports only from its own layer or the
  layers below it (``RT_LAYERS``, bottom first; docs/architecture.md draws them);
* in ``export``, the TensorRT validation plan (``trt_plan``) sits below the builder;
* ``apla_ui`` sits above every other package, imported by none."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# apla_rt's layers, bottom first: a module's layer is its subpackage, or its own name for the
# modules at the top of the package.
RT_LAYERS = ("errors", "sampling", "folder", "media", "backends", "engine", "api", "tune", "service",
             "serve", "cli")


def module_name(package: str, path: Path) -> str:
    """``apla_rt/backends/ort.py`` -> ``backends.ort``; a subpackage's ``__init__`` -> its name."""
    parts = list(path.relative_to(ROOT / package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def _resolve(package: str, here: str, is_init: bool, node: ast.ImportFrom) -> list[str]:
    """The dotted names (within ``package``) an ``import from`` names: its module, and each
    imported name as a submodule (``from . import x``)."""
    if node.level == 0:
        if not node.module or node.module.split(".")[0] != package:
            return []
        base = node.module.split(".")[1:]
    else:
        current = here.split(".") if here != "__init__" else []
        pkg = current if is_init else current[:-1]
        base = pkg[:len(pkg) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    names = [".".join(base)] if base else []
    names += [".".join(base + [a.name]) for a in node.names]
    return names


def module_imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (anywhere in its file)."""
    folder = ROOT / package
    paths = {module_name(package, p): p for p in folder.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                found |= set(_resolve(package, name, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package and len(parts) > 1:
                        found.add(".".join(parts[1:]))
        graph[name] = {m for m in found if m in paths and m != name}
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
    graph = module_imports(package)
    # a subpackage's __init__ re-exports its modules; importing it is importing them
    graph = {m: deps for m, deps in graph.items() if m != "__init__"}
    cycle = find_cycle(graph)
    assert cycle is None, f"{package} modules import each other in a cycle: {' -> '.join(cycle)}"


def layer_of(module: str) -> int:
    return RT_LAYERS.index(module.split(".")[0])


def test_the_runtime_imports_only_downwards():
    graph = module_imports("apla_rt")
    modules = [m for m in graph if m != "__init__"]
    unplaced = sorted(m for m in modules if m.split(".")[0] not in RT_LAYERS)
    assert not unplaced, f"apla_rt modules outside every layer of RT_LAYERS: {unplaced}"
    upward = sorted(f"{m} -> {d}" for m in modules for d in graph[m]
                    if d != "__init__" and layer_of(d) > layer_of(m))
    assert not upward, f"apla_rt modules import a layer above their own: {upward}"


def test_the_layer_check_sees_an_upward_import():
    """The checks above read real imports: the sampling loop's engine uses the backends, and
    the backends module tree is where the checks would flag an import of the engine."""
    graph = module_imports("apla_rt")
    assert "backends.runners" in graph["engine"]
    assert layer_of("engine") > layer_of("backends.runners")
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
