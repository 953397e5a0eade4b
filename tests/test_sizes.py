"""The house's sizes: no module of kvscope over 600 lines, no function or method over 80 lines (docstring and
decorators included), so that each file can be read whole and each function at one sitting."""

from __future__ import annotations

import ast

from paths import ROOT

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def _sources() -> list:
    return sorted((ROOT / "kvscope").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))


def test_no_file_is_over_the_limit() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def test_no_function_is_over_the_limit() -> None:
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert long == {}
