"""Reports: files present and non-empty, Markdown tables that parse, the spread of TTFT and TPOT in the run report's
table, sweep plots that hold the data they show."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.image import imread
from paths import DATA
from tiny_run import tiny_run

from kvscope.analysis.report.build import FIGURE_DPI, FIGURE_SIZE_IN, sweep_report
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


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sweep on the CPU: seq 8, 16, 32 by batch 1, 2."""
    out = tmp_path_factory.mktemp("sweep") / "seq.csv"
    assert main(["sweep", "--model", "tiny", "--device", "cpu", "--seq", "8,16,32", "--batch-sizes", "1,2",
                 "--gen-tokens", "3", "--warmup", "0", "--reps", "2", "--out", str(out)]) == 0
    return out


def test_sweep_report(sweep: Path, tmp_path: Path) -> None:
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


def test_run_report_shows_the_spread_of_ttft_and_tpot(tmp_path: Path) -> None:
    s, _ = tiny_run(tmp_path, "--reps", "12", "--granularity", "phase")
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| TTFT") or line.startswith("| TPOT")]
    assert len(rows) == 2
    ttft = [c.strip() for c in rows[0].strip("|").split("|")]
    assert ttft[1] == "host"
    assert ttft[2:5] == [f"{s['ttft_ms']:,.3f}", f"{s['ttft_q1_ms']:,.3f}", f"{s['ttft_q3_ms']:,.3f}"]
    assert ttft[6] == f"{s['ttft_p90_ms']:,.3f}" and ttft[7] == "" and ttft[8] == "12"  # 12 samples: p90, no p99
    tpot = [c.strip() for c in rows[1].strip("|").split("|")]
    assert tpot[2] == f"{s['tpot_p50_ms']:,.3f}" and tpot[8] == f"{12 * 3}"
    assert ("is spread" in md) is bool(s["spread_flag"])


def test_sweep_plots_hold_the_data_they_show(sweep: Path, tmp_path: Path) -> None:
    df = pd.read_csv(sweep)
    rep = sweep_report(sweep)
    for y in ("decode_tok_s", "prefill_ms_per_tok"):
        ax = rep.figures[f"{y}_vs_seq_len.png"].axes[0]
        assert len(ax.lines) == 2  # one line per batch size
        for line, (batch, g) in zip(ax.lines, df.groupby("batch"), strict=True):
            g = g.sort_values("seq_len")
            assert line.get_label() == f"batch {batch}"
            assert list(line.get_xdata()) == g["seq_len"].tolist()
            assert list(line.get_ydata()) == pytest.approx(g[y].tolist(), rel=1e-12)
        lo, hi = ax.get_ylim()
        assert lo <= df[y].min() and hi >= df[y].max()
    md = rep.markdown()
    assert "## Spread of TTFT (host clock) and TPOT" in md
    assert main(["report", str(sweep), "--out", str(tmp_path / "rep")]) == 0
    png = imread(tmp_path / "rep" / "decode_tok_s_vs_seq_len.png")
    assert png.shape[:2] == (round(FIGURE_SIZE_IN[1] * FIGURE_DPI), round(FIGURE_SIZE_IN[0] * FIGURE_DPI))
    assert float(png[..., :3].std()) > 0.01  # not a blank canvas
