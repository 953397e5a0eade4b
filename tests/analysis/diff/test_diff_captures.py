"""`kvscope diff` of captures (kvscope/analysis/diff): an export against itself, an align folder with one kernel class
slowed on purpose (kernels.parquet and steps.parquet rewritten), a capture of six repetitions where intervals exist,
an empty capture, a truncated one, a `kvscope nsys` folder against a run folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from diff_fixtures import slowed_capture, synthetic_capture
from paths import DATA
from synthetic_export import sqlite_copy

from kvscope.analysis.align.pipeline import analyse, write
from kvscope.analysis.diff.compare import diff
from kvscope.analysis.diff.gate import parse_gate
from kvscope.analysis.nsys.export import load_export
from kvscope.errors import KvscopeError

TINY = DATA / "nsys" / "tiny.sqlite"
TINY_RUN = DATA / "nsys" / "tiny-run"
EMPTY = "B: its capture holds no GPU operation in its steps (an empty capture)"


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
    assert result.kind == "capture" and len(t) == 66
    assert set(t["verdict"]) == {"same"}
    assert set(t["family"]) == {"gpu steps", "gpu step", "class", "kernel"}
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
    moved = t["family"].isin(["gpu steps", "gpu step"]) & ~t["row"].str.endswith("busy")
    assert set(t.loc[gemm_rows | moved | t["row"].str.endswith("busy"), "verdict"]) == {"cannot tell"}
    assert set(t.loc[~(gemm_rows | moved | t["row"].str.endswith("busy")), "verdict"]) == {"same"}
    assert set(t.loc[gemm_rows, "reason"]) == {
        "too few samples: 2 and 2 repetitions (a 95% interval needs 4 and 4, or 3 and 5)"}
    for row in ("decode class gemm", "prefill class gemm"):
        line = _line(t, row)
        assert line["diff_pct"] == pytest.approx(50.0, abs=0.05)  # kernel times rounded to whole ns
        assert line["a_count"] == line["b_count"]  # as many launches
    w = result.waterfall
    assert w["part"].tolist()[:2] == ["A: decode step GPU span", "decode class gemm"]
    assert w["delta_ms"].iloc[1] == pytest.approx(_line(t, "decode class gemm")["diff"])
    assert (w["delta_ms"].iloc[2:-2] == 0).all()


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
        "prefill class norm", "decode class norm", "prefill kernel rms_norm_kernel", "decode kernel rms_norm_kernel"}
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
