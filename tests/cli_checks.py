"""Shared checks of the hostile-input tests: a CLI call that must fail in one line, and folders that must be left
as they were."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvscope.cli import main


def fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, expect exit code 2 and exactly one line on stderr; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err.splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("kvscope: error: "), err
    return err[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary folders an atomic output folder might have left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
