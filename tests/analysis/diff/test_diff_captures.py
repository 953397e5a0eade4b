"""`kvscope diff` of captures (kvscope/analysis/diff): an export against itself, an align folder with one kernel class
slowed on purpose (kernels.parquet and steps.parquet rewritten), a capture of six repetitions where intervals exist,
an empty capture, a truncated one, a `kvscope nsys` folder against a run folder; the waterfall's parts (classes, GPU
idle, kernel overlap) adding up to the step."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from diff_fixtures import slowed_capture, synthetic_capture
from paths import DATA
from synthetic_export import sqlite_copy

from kvscope.analysis.align.pipeline import analyse, write
from kvscope.analysis.diff.capture_rows import capture_rows
from kvscope.analysis.diff.compare import diff
from kvscope.analysis.diff.gate import parse_gate
from kvscope.analysis.diff.output import markdown
from kvscope.analysis.diff.waterfall import MEDIANS_APART, unaccounted_share
from kvscope.analysis.nsys.export import load_export
from kvscope.errors import KvscopeError

TINY = DATA / "nsys" / "tiny.sqlite"
TINY_RUN = DATA / "nsys" / "tiny-run"
EMPTY = "B: its capture holds no GPU operation in its steps (an empty capture)"
OVERLAP_LINE = "minus decode step kernel overlap (counted twice by the classes)"


def _line(table: pd.DataFrame, row: str) -> pd.Series:
    hits = table[table["row"] == row]
    assert len(hits) == 1, row
    return hits.iloc[0]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kvscope align tiny.sqlite`'s folder (no run folder beside it)."""
    out = tmp_path_factory.mktemp("align") / "tiny"
    write(analyse(TINY), out, {})
    return out


@pytest.fixture(scope="module")
def nsys_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `kvscope nsys` output folder: the align tables of tiny.sqlite and the run folder it captured as run/."""
    out = tmp_path_factory.mktemp("nsys") / "tiny"
    write(analyse(TINY, TINY_RUN), out, {})
    shutil.copytree(TINY_RUN, out / "run")
    return out


def test_an_export_against_itself() -> None:
    result = diff(TINY, TINY)
    t = result.table
    assert result.kind == "capture" and len(t) == 70
    assert set(t["verdict"]) == {"same"}
    # one stream, one kernel at a time: no overlap; 0 ms against the same 0 ms is the same, not "no ratio"
    overlap = t["row"].isin(["prefill kernel overlap", "decode step kernel overlap"])
    assert (t.loc[overlap, "a"] == 0).all() and set(t.loc[overlap, "reason"]) == {"identical samples on both sides"}
    assert set(t["family"]) == {"gpu steps", "gpu step", "class", "kernel"}
    assert math.isnan(unaccounted_share(result.waterfall))  # no change to account for
    gemm = _line(t, "decode class gemm")
    assert (gemm["a"], gemm["a_count"]) == pytest.approx((0.019680, 9.0))  # 9 gemm launches per decode step
    assert result.headline_row() == "decode step GPU span"


def test_one_kernel_class_slowed_on_purpose(aligned: Path, tmp_path: Path) -> None:
    """Every gemm kernel 1.5x as long: the gemm rows move by half their time and nothing else moves but the steps
    around them; with the capture's 2 repetitions no row gets a verdict but `same` for the untouched ones."""
    slow = slowed_capture(aligned, tmp_path / "slow", "gemm", 1.5)
    result = diff(aligned, slow)
    t = result.table
    gemm_rows = t["row"].str.contains("gemm") | t["row"].str.contains("nvjet")
    idle = t["row"].isin(["prefill GPU idle", "decode step GPU idle"])
    overlap = t["row"].isin(["prefill kernel overlap", "decode step kernel overlap"])
    moved = t["family"].isin(["gpu steps", "gpu step"]) & ~idle & ~overlap
    assert set(t.loc[gemm_rows | moved, "verdict"]) == {"cannot tell"}
    assert set(t.loc[~(gemm_rows | moved), "verdict"]) == {"same"}  # the idle and overlap rows too: unchanged
    assert set(t.loc[overlap, "reason"]) == {"identical samples on both sides"}  # one stream: 0 ms on both sides
    assert set(t.loc[gemm_rows, "reason"]) == {
        "too few samples: 2 and 2 repetitions (a 95% interval needs 4 and 4, or 3 and 5)"}
    for row in ("decode class gemm", "prefill class gemm"):
        line = _line(t, row)
        assert line["diff_pct"] == pytest.approx(50.0, abs=0.05)  # kernel times rounded to whole ns
        assert line["a_count"] == line["b_count"]  # as many launches
    w = result.waterfall
    assert w["part"].tolist()[:2] == ["A: decode step GPU span", "decode class gemm"]
    assert {"decode step GPU idle", OVERLAP_LINE} <= set(w["part"])
    assert w["delta_ms"].iloc[1] == pytest.approx(_line(t, "decode class gemm")["diff"])
    assert (w["delta_ms"].iloc[2:-2] == 0).all()  # the other classes, the idle time and the overlap unchanged
    assert w["part"].iloc[-2] == MEDIANS_APART and unaccounted_share(w) < 0.02
    assert w["delta_ms"].iloc[-2] == pytest.approx(0.0, abs=1e-9)  # 2 repetitions: each median is a mean
    assert w["running_ms"].iloc[-1] == _line(t, "decode step GPU span")["b"]
    assert ("The parts account for the step's change within 0.0% (leftover +0.0000 ms of +0.0098 ms)."
            in markdown(result))


def test_six_repetitions_give_verdicts(tmp_path: Path) -> None:
    """A capture of 6 repetitions against the same with gemm kernels 1.3x: gemm and the spans slower, the norm
    kernel the same, and the gates say so."""
    a = synthetic_capture(tmp_path / "a.sqlite", 6)
    b = synthetic_capture(tmp_path / "b.sqlite", 6, gemm_factor=1.3)
    result = diff(a, b)
    t = result.table
    verdicts = dict(zip(t["row"], t["verdict"], strict=True))
    assert {r for r, v in verdicts.items() if v == "slower"} == {
        "prefill GPU span", "prefill GPU busy", "decode step GPU span", "decode step GPU busy",
        "decode step 1 GPU span", "decode step 2 GPU span", "prefill class gemm", "decode class gemm",
        "prefill kernel nvjet_sm90_gemm", "decode kernel nvjet_sm90_gemm"}
    assert {r for r, v in verdicts.items() if v == "same"} == {
        "prefill class norm", "decode class norm", "prefill kernel rms_norm_kernel", "decode kernel rms_norm_kernel",
        "prefill GPU idle", "decode step GPU idle", "prefill kernel overlap", "decode step kernel overlap"}
    gemm = _line(t, "decode class gemm")
    assert gemm["diff_pct"] == pytest.approx(30.0, abs=0.01) and gemm["ci_low_pct"] > 2
    assert gemm["ci_level"] == pytest.approx(1 - 2 * 19 / 924)  # 6 and 6: P(U <= 5) = 19 / C(12, 6)
    assert result.gate(parse_gate("slower:3%")).code == 1
    assert result.gate(parse_gate("slower:3%:decode class norm")).code == 0


def test_an_empty_capture_cannot_tell(tmp_path: Path) -> None:
    """The tiny capture with every GPU operation removed: its steps hold no GPU work; every row says why, and a gate
    cannot tell (exit 2)."""
    empty = sqlite_copy(TINY, tmp_path / "empty.sqlite", "DELETE FROM CUPTI_ACTIVITY_KIND_KERNEL",
                        "DELETE FROM CUPTI_ACTIVITY_KIND_MEMCPY", "DELETE FROM CUPTI_ACTIVITY_KIND_MEMSET")
    result = diff(TINY, empty)
    t = result.table
    assert set(t["verdict"]) == {"cannot tell"}
    assert set(t.loc[t["family"].isin(["gpu steps", "gpu step"]), "reason"]) == {EMPTY}
    assert set(t.loc[t["family"].isin(["class", "kernel"]), "reason"]) == {"only in A (B launches none)"}
    assert result.notes == [f"{EMPTY}: its capture's rows cannot tell"]
    outcome = result.gate(parse_gate("slower:3%"))
    assert (outcome.code, outcome.row) == (2, "decode step GPU span")
    assert outcome.message == f"gate slower:3% on 'decode step GPU span': cannot tell: {EMPTY}"


def test_a_truncated_capture_cannot_tell(tmp_path: Path) -> None:
    """The tiny capture cut where repetition 1's second decode step starts (every range, call and GPU operation
    from there on removed): that repetition holds 1 of the 3 decode steps."""
    ranges = load_export(TINY).ranges
    cut = int(ranges.loc[ranges["name"] == "decode step 2", "start_ns"].sort_values().iloc[1])
    tables = ("NVTX_EVENTS", "CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_MEMCPY",
              "CUPTI_ACTIVITY_KIND_MEMSET", "CUPTI_ACTIVITY_KIND_RUNTIME")
    cut_export = sqlite_copy(TINY, tmp_path / "cut.sqlite", *(f"DELETE FROM {t} WHERE start >= {cut}" for t in tables))
    t = diff(TINY, cut_export).table
    reason = "B: its repetition 1 holds 1 of 3 decode steps (a truncated capture)"
    assert set(t["verdict"]) == {"cannot tell"}
    assert set(t.loc[t["row"].isin(["decode step GPU span", "decode class gemm"]), "reason"]) == {reason}
    assert _line(t, "decode step 3 GPU span")["b_samples"] == 1


def test_a_truncated_file_is_one_line(tmp_path: Path) -> None:
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(TINY.read_bytes()[:100_000])
    with pytest.raises(KvscopeError) as err:
        diff(TINY, cut)
    assert "\n" not in str(err.value) and str(cut) in str(err.value)


def test_a_capture_with_fewer_repetitions_than_its_run(nsys_folder: Path, tmp_path: Path) -> None:
    """A `kvscope nsys` folder whose steps and kernels keep repetition 0 only: truncated against its run's 2."""
    cut = tmp_path / "cut"
    shutil.copytree(nsys_folder, cut)
    for name in ("steps.parquet", "kernels.parquet"):
        df = pd.read_parquet(cut / name)
        df[df["rep"] == 0].to_parquet(cut / name)
    t = diff(nsys_folder, cut).table
    gpu = t[t["family"].isin(["gpu steps", "class"])]
    assert set(gpu["reason"]) == {"B: its capture holds 1 of the run's 2 repetitions (a truncated capture)"}
    assert set(t.loc[t["family"] == "steps", "verdict"]) == {"same"}  # the run's own rows are whole


def test_an_nsys_folder_against_its_own_run_folder(nsys_folder: Path) -> None:
    """A capture holding its run compares with a run folder through that run (its region rows)."""
    result = diff(nsys_folder, TINY_RUN)
    assert result.kind == "run folder"
    assert set(result.table["family"]) <= {"rep", "phase", "steps", "step", "layer", "host"}
    assert set(result.table["verdict"]) == {"same"}
    both = diff(nsys_folder, nsys_folder).table  # both hold their run: the run's rows and the capture's
    assert {"decode step", "decode step GPU span", "decode class gemm"} <= set(both["row"])


def test_a_capture_against_a_run_without_its_folder_is_refused() -> None:
    with pytest.raises(KvscopeError, match=r"is a capture without its run folder and B .* a run folder: kvscope "
                                           r"diff compares two run folders, two captures or two sweep files$"):
        diff(TINY, TINY_RUN)


def test_kernel_counts_per_step(aligned: Path) -> None:
    """Launch counts per step come from kernels.parquet: prefill's gemm launches over its 2 prefills."""
    k = pd.read_parquet(aligned / "kernels.parquet")
    gemm = k[(k["kernel_class"].astype(str) == "gemm") & (k["phase"] == "prefill")]
    t = diff(aligned, aligned).table
    assert _line(t, "prefill class gemm")["a_count"] == len(gemm) / 2
    assert np.isclose(_line(t, "prefill class gemm")["a"], gemm.groupby("rep")["dur_ns"].sum().median() / 1e6)


def test_the_parts_add_up_with_one_repetition_a_side(tmp_path: Path) -> None:
    """One repetition a side (no medians to take): A's norm kernel starts 3 us after its gemm ends (3 us idle), B's
    gemm is 1.3x and its norm starts 2 us before the gemm ends, on a second stream (2 us overlap). The waterfall's
    measured parts make B's step from A's exactly: +6.082 us gemm, -3 us idle, -2 us overlap."""
    a = synthetic_capture(tmp_path / "a.sqlite", 1, norm_offset_ns=3_000)
    b = synthetic_capture(tmp_path / "b.sqlite", 1, gemm_factor=1.3, norm_offset_ns=-2_000)
    result = diff(a, b)
    w = result.waterfall
    assert w["part"].tolist() == ["A: decode step GPU span", "decode class gemm", "decode step GPU idle",
                                  OVERLAP_LINE, "decode class norm", MEDIANS_APART, "B: decode step GPU span"]
    assert w["delta_ms"].iloc[1:-1].tolist() == pytest.approx([0.006082, -0.003, -0.002, 0.0, 0.0], abs=1e-12)
    assert w["delta_ms"].iloc[-2] == pytest.approx(0.0, abs=1e-9)
    assert unaccounted_share(w) == pytest.approx(0.0, abs=1e-9)
    assert (w["a_ms"].iloc[3], w["b_ms"].iloc[3]) == (0.0, pytest.approx(-0.002))  # the overlap, negated
    assert w["a_ms"].iloc[1:-2].sum() == pytest.approx(w["running_ms"].iloc[0], abs=1e-12)  # A's parts make A
    assert (w["delta_ms"].iloc[-1], w["running_ms"].iloc[-1]) == pytest.approx((0.029424 - 0.028342, 0.029424))


def test_the_idle_row_by_hand() -> None:
    """tiny.sqlite's repetition 0 (steps.parquet): decode step spans 3.730587, 3.512634, 3.375064 ms, busy
    0.136896, 0.136801, 0.136320 ms; the prefill's span 5.25799 ms, busy 0.165057 ms."""
    x = analyse(TINY)
    rows = capture_rows(x.steps, x.kernels)
    rep0 = rows[rows["unit_id"] == 0].set_index("row")["value"]
    assert rep0["decode step GPU span"] == pytest.approx((3.730587 + 3.512634 + 3.375064) / 3, abs=1e-12)
    assert rep0["decode step GPU busy"] == pytest.approx((0.136896 + 0.136801 + 0.136320) / 3, abs=1e-12)
    assert rep0["decode step GPU idle"] == pytest.approx((3.593691 + 3.375833 + 3.238744) / 3, abs=1e-12)
    assert rep0["decode step GPU idle"] == pytest.approx(3.402756, abs=1e-12)
    assert rep0["prefill GPU idle"] == pytest.approx(5.25799 - 0.165057, abs=1e-12)
    assert (rep0["decode step kernel overlap"], rep0["prefill kernel overlap"]) == (0.0, 0.0)


@pytest.mark.parametrize("offset_ns", [None, 3_000, -2_000])
def test_per_repetition_the_parts_are_the_step(tmp_path: Path, offset_ns: int | None) -> None:
    """Every repetition and phase: span = busy + idle and busy = (sum of the class rows) - overlap. tiny.sqlite
    (None) holds a copy between decode steps in no step's span: the classes leave it out, or busy would miss it by
    1 us a step; the synthetic captures hold idle time (3 us) and overlap (2 us) in every step."""
    if offset_ns is None:
        x = analyse(TINY)
    else:
        x = analyse(synthetic_capture(tmp_path / "c.sqlite", 3, norm_offset_ns=offset_ns))
    rows = capture_rows(x.steps, x.kernels)
    reps = sorted(x.steps["rep"].dropna().astype(int).unique())
    for rep in reps:
        for phase, step in (("prefill", "prefill"), ("decode", "decode step")):
            mine = rows[(rows["unit_id"] == rep) & (rows["phase"] == phase)]
            v = mine.set_index("row")["value"]
            assert v[f"{step} GPU span"] == pytest.approx(v[f"{step} GPU busy"] + v[f"{step} GPU idle"], abs=1e-9)
            classes = mine.loc[mine["family"] == "class", "value"].sum()
            assert classes - v[f"{step} kernel overlap"] == pytest.approx(v[f"{step} GPU busy"], abs=1e-9)
            if offset_ns is not None:
                assert (v[f"{step} GPU idle"], v[f"{step} kernel overlap"]) == pytest.approx(
                    (max(offset_ns, 0) / 1e6, max(-offset_ns, 0) / 1e6), abs=1e-12)
