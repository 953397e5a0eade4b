"""Reports: files present and non-empty, Markdown tables that parse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from paths import DATA

from kvscope.cli import main

DATA = DATA / "nsys"


def _tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells; raises if a table is malformed."""
    tables, cur = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            assert line.endswith("|"), line
            cur.append([c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])])
        elif cur:
            tables.append(cur)
            cur = []
    for t in tables:
        assert len(t) >= 3, t
        assert all(re.fullmatch(r"-{3,}", c) for c in t[1]), t[1]
        assert len({len(r) for r in t}) == 1, t
    return tables


def test_sweep_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "seq.csv"
    assert main(["sweep", "--model", "tiny", "--device", "cpu", "--seq", "8,16,32", "--batch-sizes", "1,2",
                 "--gen-tokens", "3", "--warmup", "0", "--reps", "2", "--out", str(sweep)]) == 0
    out = tmp_path / "rep"
    assert main(["report", str(sweep), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    for x in ("seq_len", "batch"):
        for y in ("prefill_ms_per_tok", "prefill_tok_s", "decode_p50_ms_per_tok", "decode_tok_s"):
            assert f"{y}_vs_{x}.png" in names
    assert "kv_measured_vs_predicted.png" in names and "report.md" in names
    assert all((out / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    md = (out / "report.md").read_text()
    tables = _tables(md)
    assert tables[0][0][:2] == ["seq_len", "batch"] and len(tables[0]) == 2 + 6
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / img).is_file()


def test_run_report_with_align_results(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(["report", str(DATA / "qwen25-05b-run"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Decode step by layer" in md and (out / "decode_layers.png").stat().st_size > 1000
    assert len(_tables(md)) >= 3


def test_report_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "absent.csv")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["report", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not a kvscope sweep file" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert "not a kvscope run folder" in capsys.readouterr().err
