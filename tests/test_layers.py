"""The house rules: each package imports only the layers below it, and the analysis never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kvscope"
# rank of each top-level part of kvscope: a module may import its own package and any lower rank, nothing else
RANKS = {"errors": 0, "io": 1, "argtypes": 1, "model": 2, "kernels": 3, "analysis": 3, "profiler": 4, "engine": 5,
         "commands": 6, "cli": 7, "__main__": 8, "__init__": 8, "api": 8}


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


def test_the_analysis_imports_no_torch() -> None:
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (PKG / "analysis").glob("*.py"))
    assert "kvscope.analysis.schema" in modules
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
