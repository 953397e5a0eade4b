"""`kvscope report` on a serve run folder and a serve sweep folder: the sections, tables that parse, the plots they
name, the capacity plan set beside the sweep, and bad input in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from serving_frames import META, capacity_plan, sweep_rows, write_run, write_sweep

from kvscope.analysis.report.build import make_report
from kvscope.cli import main
from kvscope.errors import KvscopeError


def _tables(md: str) -> list[list[list[str]]]:
    tables, cur = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            assert line.endswith("|"), line
            cur.append([c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])])
        elif cur:
            tables.append(cur)
            cur = []
    for t in tables:
        assert len(t) >= 3 and len({len(r) for r in t}) == 1, t
    return tables


def _images(out: Path, md: str) -> list[str]:
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    for n in names:
        assert (out / n).is_file() and (out / n).stat().st_size > 1000
    return names


def test_run_report(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run")
    out = tmp_path / "rep"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for title in ("# kvscope serve run: chunked, 10 requests/s offered", "## Summary", "## Latency (finished requests)",
                  "## Memory ledger", "## Prefill interference on decode tokens", "## GPU time per request",
                  "## Timeline", "## Why"):
        assert title in md, title
    tables = _tables(md)
    latency = next(t for t in tables if t[0][0] == "quantity" and t[2][0] == "TTFT")
    assert latency[0] == ["quantity", "p50_ms", "p90_ms", "p99_ms", "n"] and latency[2][1] == "150.000"
    assert set(_images(out, md)) == {"serve_latency_cdf.png", "serve_timeline.png"}
    assert "Little's law does not hold" in md and "500.0 ms assigned over 3 requests" in md


def test_run_report_without_model_facts(tmp_path: Path) -> None:
    meta = {**META, "serve": {k: v for k, v in META["serve"].items() if k != "weights_bytes"}}
    folder = write_run(tmp_path / "run", meta)
    report = make_report(folder, tmp_path / "rep")
    md = report.read_text()
    assert "## GPU time per request" not in md and "no GPU cost per request: the run's metadata lacks" in md


def _sweep(tmp_path: Path) -> Path:
    table = pd.concat([sweep_rows("chunked", [1.0, 2.0, 4.0], [100.0, 150.0, 900.0], [1.0, 0.95, 0.5]),
                       sweep_rows("prefill-first", [1.0, 2.0, 4.0], [100.0, 400.0, 2000.0], [1.0, 0.8, 0.1])],
                      ignore_index=True)
    table.insert(3, "point", [f"p{i:02d}" for i in range(len(table))])
    folder = write_sweep(tmp_path / "sweep", table)
    for i, row in table.iterrows():
        write_run(folder / row["point"], {**META, "serve": {**META["serve"], "policy": row["policy"],
                                                            "rps": row["rps"]}})
        if i == 5:
            (folder / row["point"] / "memory.parquet").unlink()  # a damaged point: noted, left out
    return folder


def test_sweep_report(tmp_path: Path) -> None:
    folder = _sweep(tmp_path)
    out = tmp_path / "rep"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for title in ("# kvscope serve sweep: chunked, prefill-first over rps", "## Results", "## Against the load",
                  "## Prefill interference per policy", "## Why"):
        assert title in md, title
    assert "## Capacity planner vs measured" not in md
    assert set(_images(out, md)) == {"serve_ttft_vs_rps.png", "serve_tpot_vs_rps.png", "serve_goodput_vs_rps.png"}
    assert "Under chunked the knee lies between 2 and 4 rps" in md
    assert "Under prefill-first the knee lies between 1 and 2 rps" in md
    assert "point 6 (p05) left out of the interference" in md
    interf = next(t for t in _tables(md) if t[0][:2] == ["policy", "rps"] and "iteration_class" in t[0])
    assert len(interf) == 2 + 2 * 5  # five points read, two classes each


def test_sweep_report_with_plan(tmp_path: Path) -> None:
    folder = _sweep(tmp_path)
    plan = tmp_path / "plan.csv"
    capacity_plan().to_csv(plan, index=False)
    out = tmp_path / "rep"
    assert main(["report", str(folder), "--compare", str(plan), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Capacity planner vs measured" in md and "the planner assumes prefills do not stall" in md
    table = next(t for t in _tables(md) if t[0][:2] == ["policy", "scenario"])
    assert table[2][:3] == ["chunked", "paged bfloat16 KV", "4"]
    # a plan inside the sweep folder is found by itself
    capacity_plan().to_csv(folder / "capacity.csv", index=False)
    md = make_report(folder, tmp_path / "rep2").read_text()
    assert "## Capacity planner vs measured" in md and "capacity.csv" in md


def test_serve_report_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _sweep(tmp_path)
    other = tmp_path / "x.csv"
    other.write_text("a,b\n1,2\n")
    assert main(["report", str(folder), "--compare", str(other), "--out", str(tmp_path / "o")]) == 2
    assert "is not a kvscope capacity table" in capsys.readouterr().err
    assert main(["report", str(folder / "p00"), "--compare", str(other), "--out", str(tmp_path / "o")]) == 2
    assert "is a serve run folder" in capsys.readouterr().err
    (folder / "p01" / "batches.parquet").unlink()
    assert main(["report", str(folder / "p01"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "batches.parquet is missing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(KvscopeError, match="--compare: not found"):
        make_report(folder, tmp_path / "o", tmp_path / "absent.csv")


def test_nsys_serve_folder(tmp_path: Path) -> None:
    """A `kvscope nsys -- serve` folder: the run in run/, the per-iteration kernel classes beside it."""
    write_run(tmp_path / "cap" / "run")
    kc = pd.DataFrame({"iteration": [0, 1, 2, 3, 4] * 2, "class": ["attention"] * 5 + ["gemm"] * 5,
                       "kernels": 3, "ms": [1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0]})
    kc.to_parquet(tmp_path / "cap" / "iteration_kernels.parquet")
    md = make_report(tmp_path / "cap", tmp_path / "rep").read_text()
    assert "# kvscope serve run: chunked" in md and "source `nsys`" in md and "165.0 ms assigned" in md
