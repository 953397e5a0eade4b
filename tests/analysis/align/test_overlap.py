"""Overlap of consecutive kernels of one stream (kvscope.analysis.align.overlap): on the real captures (qwen2.5-0.5b
on an H100, kvscope's eager loop; transformers' loop and a two-process program from tests/data/foreign), where no
pair overlaps, checked against the export's raw GPU rows read straight from SQLite and against the steps table; on
a small hand-made table whose overlaps, touches and gaps are written out; and on nothing captured."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import numpy as np
import pandas as pd
import pytest
from paths import DATA

from kvscope.analysis.align.overlap import (
    PAIR_COLUMNS,
    STEP_COLUMNS,
    overlap_finding,
    step_overlap,
    stream_overlaps,
)
from kvscope.analysis.align.pipeline import analyse
from kvscope.errors import KvscopeError

NSYS = DATA / "nsys"
FOREIGN = DATA / "foreign"
_GPU_TABLES = {"kernel": "CUPTI_ACTIVITY_KIND_KERNEL", "memset": "CUPTI_ACTIVITY_KIND_MEMSET",
               "memcpy": "CUPTI_ACTIVITY_KIND_MEMCPY"}


@pytest.fixture(scope="module")
def qwen():
    res = analyse(NSYS / "qwen25-05b.sqlite", NSYS / "qwen25-05b-run")
    pairs = stream_overlaps(res.kernels)
    return res, pairs, step_overlap(res.kernels, pairs)


def _raw_ops(path) -> pd.DataFrame:
    """Every GPU operation of an export straight from its SQLite tables (no kvscope reader; an absent table holds
    none)."""
    with closing(sqlite3.connect(path)) as con:
        present = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        frames = [pd.read_sql_query(f"SELECT start, end, deviceId, streamId, globalPid, correlationId FROM {table}",
                                    con).assign(kind=kind) for kind, table in _GPU_TABLES.items() if table in present]
    ops = pd.concat(frames, ignore_index=True)
    return ops.sort_values(["globalPid", "deviceId", "streamId", "start", "end", "correlationId"], kind="stable")


def _raw_pairs(ops: pd.DataFrame) -> pd.DataFrame:
    """Consecutive operations of one stream, from the raw rows: gap and whether both are kernels."""
    rows = []
    for _, g in ops.groupby(["globalPid", "deviceId", "streamId"]):
        start, end, kind = g["start"].to_numpy(), g["end"].to_numpy(), g["kind"].to_numpy()
        rows.append(pd.DataFrame({"gap": start[1:] - end[:-1],
                                  "kernel_pair": (kind[1:] == "kernel") & (kind[:-1] == "kernel")}))
    return pd.concat(rows, ignore_index=True)


def test_qwen_pairs_match_the_raw_rows(qwen) -> None:
    res, pairs, _ = qwen
    ops = _raw_ops(NSYS / "qwen25-05b.sqlite")
    raw = _raw_pairs(ops)
    assert len(ops) == len(res.kernels) == 7632  # 7406 kernels, 208 memsets, 18 memcpys, all on one stream
    assert len(pairs) == len(raw) == 7632 - 1
    assert int(pairs["kernel_pair"].sum()) == int(raw["kernel_pair"].sum()) == 7184
    assert pairs["gap_ns"].tolist() == raw["gap"].tolist()
    assert int(pairs["gap_ns"].clip(lower=0).sum()) == int(raw["gap"].clip(lower=0).sum())
    assert int(pairs["gap_ns"].min()) == 32  # the closest two operations came: 32 ns apart, never overlapping
    assert (pairs["overlap_ns"] == 0).all()
    assert pairs["prev_end_ns"].le(pairs["next_start_ns"]).all()
    assert list(pairs.columns) == list(PAIR_COLUMNS)


def test_qwen_no_step_overlaps(qwen) -> None:
    res, pairs, steps = qwen
    assert list(steps.columns) == list(STEP_COLUMNS)
    assert len(steps) == 8  # 2 reps x (prefill + 3 decode steps)
    assert steps["phase"].tolist() == ["prefill", "decode", "decode", "decode"] * 2
    assert steps["step"].tolist() == [0, 1, 2, 3] * 2 and steps["rep"].tolist() == [0] * 4 + [1] * 4
    assert (steps["kernel_pairs"] == 898).all()  # 8 x 898 = every kernel pair of the export: none across steps
    assert int(steps["kernel_pairs"].sum()) == int(pairs["kernel_pair"].sum())
    assert steps["ops"].tolist() == [952, 953, 953, 953] * 2
    assert steps["kernels"].tolist() == [925, 926, 926, 926] * 2
    assert (steps["overlapped_pairs"] == 0).all() and (steps["overlap_ns"] == 0).all()
    assert (steps["overlap_fraction"] == 0.0).all()
    # one stream, no overlap: the span is the operations' time plus the idle gaps, and steps.parquet agrees
    s = res.steps.reset_index(drop=True)
    assert steps["gpu_span_ns"].tolist() == (s["gpu_span_ms"].astype(float) * 1e6).round().astype(int).tolist()
    assert steps["idle_gap_ns"].tolist() == (s["gpu_idle_ms"].astype(float) * 1e6).round().astype(int).tolist()
    assert steps["idle_gap_ns"].tolist() == [45659224, 38327716, 39426987, 38992520,
                                             35412210, 24646810, 22186285, 22865903]
    k = res.kernels.dropna(subset=["step"])
    busy = k.groupby(["rep", "phase", "step"], sort=False)["dur_ns"].sum().to_numpy()
    assert (steps["gpu_span_ns"].to_numpy() - busy == steps["idle_gap_ns"].to_numpy()).all()


def test_qwen_finding(qwen) -> None:
    _, pairs, steps = qwen
    assert overlap_finding(pairs, steps) == (
        "no consecutive kernels of one stream overlapped in 8 steps (0 of 7,184 pairs; programmatic dependent "
        "launch, if requested, did not take effect)")


def test_foreign_exports_have_no_overlap() -> None:
    hf = analyse(FOREIGN / "hf.sqlite", phase_map="decode=^generate").kernels
    pairs = stream_overlaps(hf)
    steps = step_overlap(hf, pairs)
    assert len(pairs) == 1409 - 1 and int(pairs["kernel_pair"].sum()) == 1282
    assert steps["step"].tolist() == [1, 2] and steps["kernel_pairs"].tolist() == [509, 509]
    assert steps["run"].isna().all() and steps["rep"].isna().all()  # a phase map labels no run or rep
    assert (pairs["overlap_ns"] == 0).all()
    # two processes, each with its own stream 7: pairs never cross processes
    multi = analyse(FOREIGN / "multiproc.sqlite").kernels
    mp = stream_overlaps(multi)
    raw = _raw_pairs(_raw_ops(FOREIGN / "multiproc.sqlite"))
    assert len(mp) == len(raw) == 27 - 2
    assert mp["gap_ns"].tolist() == raw["gap"].tolist()
    assert step_overlap(multi, mp).empty
    assert overlap_finding(mp, step_overlap(multi, mp)) == (
        "no consecutive kernels of one stream overlapped (0 of 15 pairs; programmatic dependent launch, if "
        "requested, did not take effect)")


US = 1000  # the synthetic table's times in µs, written as ns


def _synthetic() -> pd.DataFrame:
    """Two streams of one GPU interleaved, and a third stream id 7 on another GPU; a memset between two kernels."""
    rows = [  # name, kind, device, stream, start, end, step
        ("a1", "kernel", 0, 7, 0, 100, 1),
        ("a2", "kernel", 0, 7, 90, 200, 1),     # starts 10 before a1 ends: overlap 10
        ("a3", "kernel", 0, 7, 200, 300, 1),    # starts as a2 ends: touching, not overlapping
        ("m", "memset", 0, 7, 310, 320, 1),     # gap 10 (idle)
        ("a5", "kernel", 0, 7, 318, 400, 1),    # 2 inside the memset: not a kernel pair, not counted
        ("a6", "kernel", 0, 7, 390, 500, 2),    # overlaps a5 by 10, across steps 1 and 2
        ("a7", "kernel", 0, 7, 520, 600, 2),    # gap 20
        ("b1", "kernel", 0, 9, 50, 150, 1),
        ("b2", "kernel", 0, 9, 140, 160, 1),    # overlap 10
        ("b3", "kernel", 0, 9, 175, 180, 1),    # gap 15
        ("c1", "kernel", 1, 7, 95, 105, 1),     # same stream id, other GPU: pairs with nothing
    ]
    df = pd.DataFrame(rows, columns=["name", "kind", "device", "stream", "start_ns", "end_ns", "step"])
    df["start_ns"] *= US
    df["end_ns"] *= US
    df["pid"] = 11
    df["corr"] = np.arange(len(df))
    df["kernel_class"] = np.where(df["kind"] == "kernel", "gemm", "copy/memset")
    df["run"], df["rep"], df["phase"] = "run bs=1 seq=8 gen=2", 0, "decode"
    df["dur_ns"] = df["end_ns"] - df["start_ns"]
    return df.sample(frac=1.0, random_state=3).set_axis(range(100, 100 + len(df)))  # any order, any index


def test_synthetic_pairs() -> None:
    p = stream_overlaps(_synthetic())
    got = {(r.prev_name, r.next_name): (r.gap_ns // US, r.overlap_ns // US, r.kernel_pair, r.in_step, r.step)
           for r in p.itertuples()}
    assert got == {
        ("a1", "a2"): (-10, 10, True, True, 1),
        ("a2", "a3"): (0, 0, True, True, 1),
        ("a3", "m"): (10, 0, False, True, 1),
        ("m", "a5"): (-2, 2, False, True, 1),
        ("a5", "a6"): (-10, 10, True, False, pd.NA),
        ("a6", "a7"): (20, 0, True, True, 2),
        ("b1", "b2"): (-10, 10, True, True, 1),
        ("b2", "b3"): (15, 0, True, True, 1),
    }
    assert p["stream"].tolist() == [7] * 6 + [9] * 2 and (p["device"] == 0).all()
    row = p[p["prev_name"] == "a3"].iloc[0]
    assert (row["prev_kind"], row["next_kind"], row["prev_class"], row["next_class"]) == (
        "kernel", "memset", "gemm", "copy/memset")


def test_synthetic_steps_and_finding() -> None:
    k = _synthetic()
    s = step_overlap(k)
    assert s["step"].tolist() == [1, 2]
    one, two = s.iloc[0], s.iloc[1]
    assert (one["ops"], one["kernels"], one["kernel_pairs"], one["overlapped_pairs"]) == (9, 8, 4, 2)
    assert (one["overlap_ns"], one["max_overlap_ns"], one["idle_gap_ns"]) == (20 * US, 10 * US, 25 * US)
    assert (one["gpu_start_ns"], one["gpu_end_ns"], one["gpu_span_ns"]) == (0, 400 * US, 400 * US)
    assert one["overlap_fraction"] == pytest.approx(20 / 400)
    assert (two["ops"], two["kernels"], two["kernel_pairs"], two["overlapped_pairs"]) == (2, 2, 1, 0)
    assert (two["overlap_ns"], two["idle_gap_ns"], two["gpu_span_ns"]) == (0, 20 * US, 210 * US)
    # 3 overlapping kernel pairs of 6: two in step 1 and the one across steps; median over the steps of 20 and 0 us
    assert overlap_finding(stream_overlaps(k), s) == (
        "3 of 6 pairs of consecutive kernels on one stream overlapped (1 of 2 steps with overlap), median 10.0 us "
        "of overlap per step")


def test_unlabelled_kernels() -> None:
    k = _synthetic().drop(columns=["run", "rep", "phase", "step", "kind", "kernel_class", "corr"])
    p = stream_overlaps(k)  # without `kind` every row is a kernel: the memset's two pairs become kernel pairs
    assert p["kernel_pair"].all() and not p["in_step"].any() and p["step"].isna().all()
    assert p["prev_class"].isna().all() and p["prev_corr"].isna().all()
    s = step_overlap(k, p)
    assert s.empty and list(s.columns) == list(STEP_COLUMNS)
    assert overlap_finding(p, s) == ("4 of 8 pairs of consecutive kernels on one stream overlapped, 32.0 us in all "
                                     "(no labelled steps)")


def test_nothing_captured(qwen) -> None:
    for kernels in (qwen[0].kernels.iloc[:0], analyse(FOREIGN / "nokernels.sqlite").kernels):
        assert kernels.empty
        p = stream_overlaps(kernels)
        s = step_overlap(kernels, p)
        assert p.empty and list(p.columns) == list(PAIR_COLUMNS)
        assert s.empty and list(s.columns) == list(STEP_COLUMNS)
        assert p["gap_ns"].dtype == "int64" and s["overlap_fraction"].dtype == "float64"
        assert overlap_finding(p, s) == ("no two consecutive kernels of one stream were captured: their overlap "
                                         "cannot be judged")
    one = _synthetic().query("name == 'c1'")  # one kernel: a step, but no pair
    s = step_overlap(one)
    assert s[["ops", "kernels", "kernel_pairs", "idle_gap_ns", "gpu_span_ns"]].iloc[0].tolist() == [1, 1, 0, 0,
                                                                                                  10 * US]
    assert overlap_finding(stream_overlaps(one), s).startswith("no two consecutive kernels")


def test_missing_columns_are_refused() -> None:
    with pytest.raises(KvscopeError, match="lacks the columns device, stream"):
        stream_overlaps(pd.DataFrame({"start_ns": [0], "end_ns": [1], "pid": [1]}))
    with pytest.raises(KvscopeError, match="lacks the column end_ns "):
        step_overlap(pd.DataFrame({"start_ns": [0], "pid": [1], "device": [0], "stream": [7]}))
