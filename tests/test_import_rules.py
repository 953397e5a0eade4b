"""The import rules of the house: each package imports only the layers below it (`kvscope.schema` at the bottom, the
measuring layer between the engine and the commands), no two modules import each other (at module level or lazily
inside a function), the instruments and the engine import nothing of the analysis, and the analysis never imports
torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kvscope"
# rank of each top-level part of kvscope: a module may import its own package and any lower rank, nothing else
RANKS = {"schema": 0, "errors": 0, "io": 1, "argtypes": 1, "calibration_cache": 2, "model": 2, "kernels": 3,
         "analysis": 3, "profiler": 4, "engine": 5, "measure": 6, "commands": 7, "cli": 8, "__main__": 9, "__init__": 9,
         "api": 9}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every kvscope import in the file, at any depth (functions included); `from kvscope import
    __version__` (the package's version, importable from anywhere) is left out."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "kvscope"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kvscope":
            if node.module == "kvscope":  # `from kvscope import part`
                found += [(node.lineno, f"kvscope.{a.name}") for a in node.names if a.name != "__version__"]
            else:
                found.append((node.lineno, node.module))
    return found


def test_every_part_has_a_rank() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PKG.iterdir() if not p.name.startswith((".", "__pycache__"))
             and (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert parts <= set(RANKS), sorted(parts - set(RANKS))


def test_imports_go_only_downward() -> None:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mine = _part(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, target in _imports(path):
            theirs = _part(target)
            if theirs != mine and RANKS[theirs] >= RANKS[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {target} ({theirs})")
    assert bad == []


def _no_torch(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter in which `import torch` fails."""
    prelude = "import sys; sys.modules['torch'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def _module(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """Module -> the kvscope modules it imports (at any depth), each import resolved to a module file: `from
    kvscope.analysis.nsys import checks` is the module `kvscope.analysis.nsys.checks`."""
    known = {_module(p, pkg.parent) for p in pkg.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in pkg.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                         for a in node.names]
            found |= {n for n in names if n in known and n != "kvscope"}
        graph[_module(path, pkg.parent)] = found - {_module(path, pkg.parent)}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle a depth-first walk meets, each as the modules around it."""
    circles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                circles.append([*stack[stack.index(n):], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return circles


def test_no_two_modules_import_each_other() -> None:
    """No import circle of any length, lazy imports inside functions included."""
    assert _circles(_graph()) == []


def test_a_circle_is_seen(tmp_path: Path) -> None:
    """The circle check itself: two modules of a stand-in package that import each other, one lazily."""
    pkg = tmp_path / "kvscope"
    (pkg / "measure").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "measure" / "__init__.py").write_text("")
    (pkg / "measure" / "a.py").write_text("from kvscope.measure.b import x\n")
    (pkg / "measure" / "b.py").write_text("def x():\n    from kvscope.measure import a\n")
    (pkg / "measure" / "c.py").write_text("from kvscope.measure import a\n")
    graph = _graph(pkg)
    assert graph["kvscope.measure.a"] == {"kvscope.measure.b"}
    assert graph["kvscope.measure.b"] == {"kvscope.measure.a"}
    assert _circles(graph) == [["kvscope.measure.a", "kvscope.measure.b", "kvscope.measure.a"]]


@pytest.mark.parametrize("part", ["profiler", "engine", "model", "kernels"])
def test_instruments_and_engine_import_nothing_of_the_analysis(part: str) -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {target}" for p in sorted((PKG / part).rglob("*.py"))
           for line, target in _imports(p) if _part(target) == "analysis"]
    assert bad == []


def test_the_schema_imports_nothing_of_kvscope() -> None:
    assert _imports(PKG / "schema.py") == []


def test_the_analysis_imports_no_torch() -> None:
    modules = sorted(_module(p) for p in (PKG / "analysis").rglob("*.py"))
    assert {"kvscope.analysis.nsys.export", "kvscope.analysis.align.pipeline", "kvscope.analysis.report.build"} <= set(
        modules)
    done = _no_torch("".join(f"import {m}\n" for m in modules) + "import kvscope.model.config\nprint('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("argv", [
    ["kv-math", "--model", "qwen2.5-3b", "--batch-size", "8", "--seq", "4096", "--gpu-mem-gb", "80", "--json"],
    ["report", "tests/data/nsys/qwen25-05b-run", "--out", "{tmp}/rep"],
    ["align", "tests/data/nsys/tiny.sqlite", "--timings", "tests/data/nsys/tiny-run", "--out", "{tmp}/align"],
])
def test_commands_that_read_files_run_without_torch(argv: list[str], tmp_path: Path) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = _no_torch(f"from kvscope.cli import main\nraise SystemExit(main({argv!r}))")
    assert done.returncode == 0, done.stderr
