"""A fresh install that works: every third-party import of kvscope is declared in pyproject.toml, and CI runs the
README's test command in a fresh virtual environment."""

from __future__ import annotations

import ast
import os
import re
import stat
import sys
import tomllib

from paths import ROOT

# import name -> distribution name where they differ
_DISTRIBUTION = {"pynvml": "nvidia-ml-py", "yaml": "pyyaml"}


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for path in (ROOT / "kvscope").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in stdlib and n not in ("kvscope", "__future__")}


def test_every_runtime_import_is_declared() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in deps}
    imported = _third_party_imports()
    assert "matplotlib" in imported  # the report's plots: the import that was missing
    missing = sorted(n for n in imported if _DISTRIBUTION.get(n, n).lower() not in declared)
    assert missing == [], f"imported by kvscope but not declared in pyproject.toml: {missing}"


def test_ci_runs_the_readme_test_command_in_a_fresh_venv() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    test_cmd = next(line for line in readme if "pytest" in line and line.startswith("./scripts/setup.sh"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    body = [line for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert body[-1] == test_cmd  # exactly the README's command, last
    venv = next(i for i, line in enumerate(body) if "-m venv" in line)
    assert "--system-site-packages" not in body[venv]
    activate = next(i for i, line in enumerate(body) if "bin/activate" in line)
    assert venv < activate < len(body) - 1
    assert os.stat(ROOT / ".ci" / "run").st_mode & stat.S_IXUSR
