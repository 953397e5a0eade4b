"""docs/api.md and the README's Python API example run as written: their ```python blocks, in order, in one
namespace, in a temporary folder that sees the repository's tests/data; the docs' assertions are in the blocks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _BLOCK.finditer(text)]


def _run_blocks(path: Path, blocks: list[tuple[int, str]], workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (workdir / "tests").mkdir()
    (workdir / "tests" / "data").symlink_to(ROOT / "tests" / "data")
    monkeypatch.chdir(workdir)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, code in blocks:
        # the file and line in a traceback are those of the Markdown
        exec(compile("\n" * (line - 1) + code, str(path.relative_to(ROOT)), "exec"), namespace)


def test_api_md_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ROOT / "docs" / "api.md"
    blocks = python_blocks(path)
    assert len(blocks) == 9
    assert sum(code.count("assert ") for _, code in blocks) >= 30  # the docs check what they show
    _run_blocks(path, blocks, tmp_path, monkeypatch)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny-cpu"]  # the failed run left nothing


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    blocks = [b for b in python_blocks(path) if b[1] in section]
    assert len(blocks) == 1 and 6 <= len(blocks[0][1].strip().splitlines()) <= 10
    assert "(docs/api.md)" in section
    _run_blocks(path, blocks, tmp_path, monkeypatch)
