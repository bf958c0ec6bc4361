"""The runtime stays readable by the measures the style guide sets (../shared/design/STYLE.md):
in ``apla_rt``, no module past 600 lines, no class past 250, no function past 60, and none with
more than 8 parameters besides ``self``/``cls`` (click commands aside: their options are their
parameters)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE, MAX_CLASS, MAX_FUNCTION, MAX_PARAMETERS = 600, 250, 60, 8


def _is_click_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
               and d.func.attr in ("command", "group") for d in node.decorator_list)


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    count = len([n for n in names if n not in ("self", "cls")])
    return count + (a.vararg is not None) + (a.kwarg is not None)


def shape_problems(folder: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(root)
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE:
            problems.append(f"{rel}: {len(text.splitlines())} lines (module > {MAX_MODULE})")
        for node in ast.walk(ast.parse(text, str(path))):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
            if isinstance(node, ast.ClassDef) and lines > MAX_CLASS:
                problems.append(f"{rel}:{node.lineno} class {node.name}: {lines} lines (> {MAX_CLASS})")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if lines > MAX_FUNCTION:
                    problems.append(f"{rel}:{node.lineno} {node.name}: {lines} lines (> {MAX_FUNCTION})")
                if _parameters(node) > MAX_PARAMETERS and not _is_click_command(node):
                    problems.append(f"{rel}:{node.lineno} {node.name}: {_parameters(node)} parameters "
                                    f"(> {MAX_PARAMETERS})")
    return problems


def test_the_runtime_keeps_its_shape():
    problems = shape_problems(ROOT / "apla_rt")
    assert not problems, "\n".join(problems)


def test_the_shape_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION + 1))
    (tmp_path / "m.py").write_text(f"def f(a, b, c, d, e, f, g, h, i):\n{body}\n")
    found = shape_problems(tmp_path, tmp_path)
    assert any("lines (> 60)" in p for p in found) and any("9 parameters" in p for p in found)
