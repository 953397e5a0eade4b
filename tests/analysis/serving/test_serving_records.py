"""Serve run and sweep folders read and checked: the hand-built load round-trips, and bad input is one line."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from serving_frames import META, batches, iterations, requests, sweep_rows, write_run, write_sweep

from kvscope.analysis.serving.records import is_serve_run, is_serve_sweep, read_serve_run, read_serve_sweep
from kvscope.errors import KvscopeError
from kvscope.io import write_parquet
from kvscope.schema import ITERATIONS_FILE, LEDGER_FILE, REQUESTS_FILE, SERVE_SWEEP_FILE


def test_round_trip(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run")
    assert is_serve_run(folder) and not is_serve_sweep(folder) and not is_serve_run(tmp_path)
    run = read_serve_run(folder)
    assert len(run.requests) == 4 and len(run.iterations) == 5 and len(run.batches) == 10 and len(run.ledger) == 2
    assert run.serve["policy"] == "chunked" and run.metadata["device"] == "cpu"
    assert list(run.requests.loc[0, "itl_ms"]) == [150.0, 120.0, 80.0]


def _one_line_error(folder: Path, match: str) -> None:
    with pytest.raises(KvscopeError, match=match) as e:
        read_serve_run(folder)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run")
    (folder / LEDGER_FILE).unlink()
    _one_line_error(folder, f"{LEDGER_FILE} is missing")
    _one_line_error(tmp_path / "absent", "is not a folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", f"not a kvscope serve run folder \\(no {REQUESTS_FILE}")


def test_missing_column(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run", iterations=iterations().drop(columns=["blocks_free"]))
    _one_line_error(folder, f"{ITERATIONS_FILE} lacks column\\(s\\) blocks_free")
    folder = write_run(tmp_path / "run2", requests=requests().drop(columns=["itl_ms", "e2e_ms"]))
    _one_line_error(folder, "lacks column\\(s\\) e2e_ms, itl_ms")


def test_empty_requests(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run", requests=requests().iloc[:0])
    _one_line_error(folder, f"{REQUESTS_FILE} has no rows")


def test_not_parquet(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run")
    (folder / ITERATIONS_FILE).write_text("iteration,kind\n")
    _one_line_error(folder, "truncated or not a Parquet file")
    (folder / ITERATIONS_FILE).write_bytes(b"")
    _one_line_error(folder, "is empty")


@pytest.mark.parametrize(("change", "match"), [
    (lambda r, i, b: (r.assign(status=["finished", "done", "finished", "refused"]), i, b),
     "column status holds 'done' in row 2; kvscope writes finished, cut, refused"),
    (lambda r, i, b: (r.assign(request_id=[1, 2, 2, 4]), i, b), "row 3 repeats request_id 2"),
    (lambda r, i, b: (r.assign(prompt_tokens=["8", "x", "4", "5"]), i, b), "column prompt_tokens holds 'x' in row 2"),
    (lambda r, i, b: (r.assign(generated_tokens=[4, -1, 2, 0]), i, b), "generated_tokens holds -1 in row 2"),
    (lambda r, i, b: (r, i.assign(dur_ms=[1.0, math.nan, 1.0, 1.0, 1.0]), b), "dur_ms holds nan in row 2"),
    (lambda r, i, b: (r, i.assign(kind=["prefill", "mixed", "mixed", "decode", "other"]), b), "holds 'other'"),
    (lambda r, i, b: (r, i, b.assign(iteration=[0, 1, 1, 2, 2, 2, 3, 3, 3, 9])),
     "row 10 names iteration 9, which iterations.parquet does not hold"),
    (lambda r, i, b: (r, i, b.assign(request_id=[1, 1, 2, 1, 2, 3, 1, 2, 3, 7])), "names request_id 7"),
    (lambda r, i, b: (r, i, pd.concat([b, b.iloc[[0]]])), "an iteration carries a request once"),
])
def test_bad_cells(tmp_path: Path, change, match: str) -> None:  # type: ignore[no-untyped-def]
    r, i, b = change(requests(), iterations(), batches())
    folder = write_run(tmp_path / "run", requests=r, iterations=i, batches=b)
    _one_line_error(folder, match)


def test_files_of_two_runs(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run")
    write_parquet(iterations(), folder / ITERATIONS_FILE, {**META, "created_utc": "2026-12-08T00:00:00"})
    _one_line_error(folder, "is not of the run of .*differ in created_utc")


def test_sweep(tmp_path: Path) -> None:
    table = pd.concat([sweep_rows("chunked", [1.0, 2.0], [10.0, 20.0], [1.0, 1.0]),
                       sweep_rows("prefill-first", [1.0, 2.0], [10.0, 30.0], [1.0, 0.5])], ignore_index=True)
    table.insert(3, "point", ["p00", "", "", ""])
    folder = write_sweep(tmp_path / "sweep", table)
    write_run(folder / "p00")  # named by the row's point column
    write_run(folder / "other", {**META, "serve": {**META["serve"], "policy": "prefill-first", "rps": 2.0}})
    sweep = read_serve_sweep(folder)
    assert is_serve_sweep(folder)
    assert sweep.table["folder"].tolist() == ["p00", "", "", "other"]  # the other by its metadata
    assert sweep.points == {0: folder / "p00", 3: folder / "other"}


def test_sweep_bad_input(tmp_path: Path) -> None:
    with pytest.raises(KvscopeError, match="not a kvscope serve sweep folder"):
        read_serve_sweep(tmp_path)
    folder = write_sweep(tmp_path / "s", sweep_rows("chunked", [1.0], [1.0], [1.0]).drop(columns=["rps"]))
    with pytest.raises(KvscopeError, match=f"{SERVE_SWEEP_FILE} lacks column\\(s\\) rps"):
        read_serve_sweep(folder)
    folder = write_sweep(tmp_path / "t", sweep_rows("fcfs", [1.0], [1.0], [1.0]))
    with pytest.raises(KvscopeError, match="column policy holds 'fcfs'"):
        read_serve_sweep(folder)
