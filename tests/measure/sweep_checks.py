"""What the hostile tests of `kvscope sweep` share (`test_sweep_hostile.py`, `test_sweep_resume_hostile.py`): the
sweep they run, its error line, the files they copy and edit by hand."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kvscope.analysis.sweep_file import read_sweep
from kvscope.cli import main

BASE = ["sweep", "--model", "tiny", "--device", "cpu", "--gen-tokens", "3", "--warmup", "0", "--reps", "2"]
SUFFIXES = [".csv", ".parquet"]


def sweep_cli(out: Path | str, seqs: str = "8,16", batches: str = "1,2", *extra: str, model: str = "tiny") -> int:
    argv = [*BASE, "--seq", seqs, "--batch-sizes", batches, "--out", str(out), *extra]
    argv[argv.index("--model") + 1] = model
    return main(argv)


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line on stderr (log lines may come before it); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("kvscope: error:")]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def only_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line, which must be all stderr holds (a refusal before any work)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvscope: error: "), err
    return lines[0]


def log_text(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def pairs_of(out: Path) -> list[tuple[int, int]]:
    df = read_sweep(out)
    return list(zip(df["seq_len"].tolist(), df["batch"].tolist(), strict=True))


def made_sweeps(folder: Path) -> dict[str, bytes]:
    """A finished sweep of seq 8,16 x batch 1,2, once per format (copied by the tests that need one)."""
    files = {}
    for suffix in SUFFIXES:
        out = folder / f"s{suffix}"
        assert sweep_cli(out) == 0
        files[suffix] = out.read_bytes()
    return files


def copy_made(made: dict[str, bytes], folder: Path, suffix: str) -> Path:
    out = folder / f"s{suffix}"
    out.write_bytes(made[suffix])
    return out


def csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def write_csv_rows(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def edit_csv(path: Path, column: str, value: str, rows: list[int] | None = None) -> None:
    """Set `column` to `value` in the given data rows (0-based), or in all of them."""
    table = csv_rows(path)
    i = table[0].index(column)
    for n, row in enumerate(table[1:]):
        if rows is None or n in rows:
            row[i] = value
    write_csv_rows(path, table)


def edit_meta(path: Path, edit: Callable[[dict], object]) -> None:
    """Change the kvscope metadata of a Parquet file in place (the rows stay as they are)."""
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    doc = json.loads(meta[b"kvscope"])
    edit(doc)
    meta[b"kvscope"] = json.dumps(doc).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)
