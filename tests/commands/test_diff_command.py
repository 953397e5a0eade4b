"""`kvscope diff` on the command line and `kvscope.diff` in the API: the tables, `--out` (diff.parquet, diff.md),
`--json`, the gate's exit codes (0 passed, 1 slower beyond the threshold, 2 cannot tell, with its one line on
stderr), bad input in one line with exit code 2, and no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from cli_checks import fail, leftovers, snapshot
from paths import DATA, ROOT, TESTS
from synthetic_export import sqlite_copy

import kvscope
from kvscope.analysis.diff.verdicts import DIFF_COLUMNS
from kvscope.cli import main
from kvscope.errors import KvscopeError
from kvscope.io import read_metadata

sys.path.insert(0, str(TESTS / "analysis" / "diff"))
from diff_fixtures import CPU_A, CPU_B, slowed_run

TINY, TINY_RUN, QWEN_RUN = DATA / "nsys" / "tiny.sqlite", DATA / "nsys" / "tiny-run", DATA / "nsys" / "qwen25-05b-run"
SWEEP = ROOT / "docs" / "sweeps" / "qwen2.5-3b-batch.csv"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["diff", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_run_against_itself_passes_the_gate(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run([str(CPU_A), str(CPU_A), "--fail-if", "slower:3%"], capsys)
    assert (code, err) == (0, "")
    assert "headline (same within ±2%)" in out and "largest changes (20 of 57 rows)" in out
    assert out.splitlines()[-1] == ("diff: gate slower:3% on 'decode step': passed: B is slower by +0.0% to +0.0% "
                                    "(95% interval), not beyond 3%")


def test_json_is_the_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run([str(CPU_A), str(CPU_B), "--json", "--fail-if", "slower:3%", "--top", "0"], capsys)
    payload = json.loads(out.splitlines()[-1])
    assert code == 0 and payload["exit"] == 0  # the decode step's interval, -16.5% to +2.3%, stays below 3%
    assert (payload["kind"], payload["threshold_pct"], payload["headline_row"]) == ("run folder", 2.0, "decode step")
    assert len(payload["rows"]) == 63 and list(payload["rows"][0]) == list(DIFF_COLUMNS)
    (gate,) = payload["gates"]
    assert (gate["gate"], gate["row"], gate["exit"]) == ("slower:3%", "decode step", 0)
    assert "largest changes" not in out  # --top 0


def test_out_writes_the_table_and_the_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slow = slowed_run(CPU_A, tmp_path / "slow", 1.5, op="mlp")
    out = tmp_path / "d"
    code, text, err = _run([str(CPU_A), str(slow), "--out", str(out), "--fail-if", "slower:3%:decode mlp (all layers)"],
                           capsys)
    assert code == 1
    assert err == ("diff: gate slower:3% on 'decode mlp (all layers)': failed: B is slower by +27.3% to +76.8% (95% "
                   "interval), beyond 3%\n")
    assert f"diff: {out} (diff.parquet, diff.md)" in text
    assert sorted(p.name for p in out.iterdir()) == ["diff.md", "diff.parquet"]
    table = pd.read_parquet(out / "diff.parquet")
    assert list(table.columns) == list(DIFF_COLUMNS) and len(table) == 63
    meta = read_metadata(out / "diff.parquet")
    assert (meta["a"], meta["b"], meta["kind"], meta["threshold_pct"]) == (str(CPU_A), str(slow), "run folder", 2.0)
    md = (out / "diff.md").read_text()
    assert md.startswith("## kvscope diff\n")
    assert "### Where the step's time moved" in md and "| decode mlp (all layers) |" in md
    waterfall = md.split("### Where the step's time moved")[1].split("\n### ")[0]
    assert "+########################" in waterfall  # the largest move, the whole bar
    # again into the same folder: replaced whole
    assert main(["diff", str(CPU_A), str(CPU_A), "--out", str(out)]) == 0
    assert pd.read_parquet(out / "diff.parquet")["verdict"].unique().tolist() == ["same"]
    assert leftovers(tmp_path) == []


def test_the_gates_cannot_tell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An interval across the threshold, a capture against an empty one, a run of 2 repetitions: exit 2, the
    reason in one line on stderr, the table on stdout."""
    slow = slowed_run(CPU_A, tmp_path / "slow", 1.5, op="mlp")
    code, out, err = _run([str(CPU_A), str(slow), "--fail-if", "slower:3%"], capsys)
    assert code == 2 and "headline" in out
    assert err == ("diff: gate slower:3% on 'decode step': cannot tell: B is slower by +0.1% to +22.6% (95% "
                   "interval), which straddles 3% (more samples narrow it)\n")
    empty = sqlite_copy(TINY, tmp_path / "empty.sqlite", "DELETE FROM CUPTI_ACTIVITY_KIND_KERNEL",
                        "DELETE FROM CUPTI_ACTIVITY_KIND_MEMCPY", "DELETE FROM CUPTI_ACTIVITY_KIND_MEMSET")
    code, out, err = _run([str(TINY), str(empty), "--fail-if", "slower:3%"], capsys)
    assert code == 2 and "note: B: its capture holds no GPU operation" in out
    assert err == ("diff: gate slower:3% on 'decode step GPU span': cannot tell: B: its capture holds no GPU "
                   "operation in its steps (an empty capture)\n")
    code, _, err = _run([str(TINY_RUN), str(slowed_run(TINY_RUN, tmp_path / "s2", 2.0)), "--fail-if", "slower:3%"],
                        capsys)
    assert code == 2 and err == ("diff: gate slower:3% on 'decode step': cannot tell: too few samples: 2 and 2 "
                                 "repetitions (a 95% interval needs 4 and 4, or 3 and 5)\n")


def test_without_a_gate_the_exit_code_is_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run([str(CPU_A), str(CPU_B)], capsys)[0] == 0
    assert _run([str(SWEEP), str(SWEEP)], capsys)[0] == 0


@pytest.mark.parametrize(("argv", "line"), [
    ([str(TINY_RUN), str(SWEEP)], f"A {TINY_RUN} is a run folder and B {SWEEP} a sweep file: kvscope diff compares "
                                  "two run folders, two captures or two sweep files"),
    ([str(TINY_RUN), "nope"], "B nope is missing"),
    ([str(TINY_RUN), str(QWEN_RUN)], f"A {TINY_RUN} and B {QWEN_RUN} are different measurements: model (tiny vs "
                                     "qwen2.5-0.5b); kvscope diff compares runs of one model, dtype and shape "
                                     "(--allow-different shows them side by side, every verdict 'cannot tell')"),
    ([str(TINY_RUN), str(DATA / "kernel_names.tsv")],
     f"B {DATA / 'kernel_names.tsv'} is not a run folder, an align or nsys folder, an nsys export (.sqlite, "
     ".nsys-rep) or a sweep file (.csv, .parquet)"),
    ([str(TINY_RUN), str(DATA / "foreign")], f"B {DATA / 'foreign'} is not a run folder (no summary.parquet), a folder "
                                             "of run folders, an align or nsys folder (no steps.parquet) or an nsys "
                                             "export"),
    ([str(TINY_RUN), str(DATA / "nsys")], f"B {DATA / 'nsys'} holds runs of different measurements: qwen25-05b-run "
                                          "and tiny-run differ in model (qwen2.5-0.5b vs tiny); a folder of runs holds "
                                          "repeats of one run"),
    ([str(TINY_RUN), str(TINY_RUN), "--fail-if", "slower"], "--fail-if 'slower': expected slower:PCT or"),
    ([str(TINY_RUN), str(TINY_RUN), "--fail-if", "slower:3%:decode L99"],
     "--fail-if slower:3%:decode L99: the diff has no row 'decode L99'"),
    ([str(TINY_RUN), str(TINY_RUN), "--threshold", "0"], "--threshold must be a percentage above 0 and below 100, "
                                                         "got 0.0"),
    ([str(TINY_RUN), str(TINY_RUN), "--threshold", "x"], "diff: argument --threshold: "),
    ([str(TINY_RUN), str(TINY_RUN), "--top", "-1"], "--top must be >= 0, got -1"),
    ([str(TINY_RUN)], "diff: the following arguments are required: b"),
    ([str(TINY_RUN), str(TINY_RUN), "--out", str(TINY_RUN)], f"--out {TINY_RUN} already exists and holds other "
                                                             "files; give a new or empty folder"),
])
def test_bad_input_is_one_line(argv: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert fail(["diff", *argv], capsys).startswith(f"kvscope: error: {line}")


def test_a_truncated_export_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(TINY.read_bytes()[:100_000])
    assert str(cut) in fail(["diff", str(TINY), str(cut)], capsys)


def test_an_out_that_holds_an_input_is_refused_before_any_work(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    (out / "a").mkdir(parents=True)
    before = snapshot(tmp_path)
    line = fail(["diff", str(out / "a"), str(CPU_A), "--out", str(out)], capsys)
    assert line == f"kvscope: error: --out {out} already exists and holds other files; give a new or empty folder"
    assert snapshot(tmp_path) == before


def test_the_command_runs_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\nfrom kvscope.cli import main\n"
            f"raise SystemExit(main(['diff', {str(TINY)!r}, {str(TINY)!r}, '--fail-if', 'slower:3%']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_api(tmp_path: Path) -> None:
    result = kvscope.diff(str(CPU_A), CPU_A, fail_if="slower:3%")
    assert result.exit_code == 0 and result.gates[0].row == "decode step"
    assert list(result.table.columns) == list(DIFF_COLUMNS) and set(result.table["verdict"]) == {"same"}
    assert list(result.waterfall.columns) == ["part", "a_ms", "b_ms", "delta_ms", "running_ms"]
    slow = slowed_run(CPU_A, tmp_path / "slow", 1.5, op="mlp")
    several = kvscope.diff(CPU_A, slow, threshold=5, fail_if=["slower:3%", "slower:3%:decode mlp (all layers)"])
    assert [g.code for g in several.gates] == [2, 1] and several.exit_code == 1
    assert several.threshold_pct == 5.0
    for kwargs, message in (({"threshold": "2"}, "diff: threshold must be a percentage above 0 and below 100, "
                                                 "got '2'"),
                            ({"fail_if": 3}, "diff: fail_if must be a str, a list of str or None, got int"),
                            ({"allow_different": 1}, "diff: allow_different must be True or False, got int")):
        with pytest.raises(KvscopeError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
            kvscope.diff(CPU_A, CPU_A, **kwargs)
    with pytest.raises(KvscopeError, match=r"^diff: b must be a path \(str or os.PathLike\), got bytes$"):
        kvscope.diff(CPU_A, b"x")  # type: ignore[arg-type]
