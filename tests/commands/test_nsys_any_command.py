"""`kvscope nsys -- python3 tests/data/foreign/programs.py plain` as run on the lent H200 (2026-12-01): the export it
made (`kvscope-nsys-plain.sqlite`), nsys's own `nsys stats -r nvtx_gpu_proj_trace,nvtx_gpu_proj_sum` of that export
(the reference), and the `ranges.parquet` kvscope wrote there. kvscope's projection equals nsys's range for range."""

from __future__ import annotations

import pandas as pd
from paths import DATA

from kvscope.analysis.align.pipeline import analyse

DATA = DATA / "foreign"
NAME = "kvscope-nsys-plain"


def test_projection_equals_nsys_stats_range_for_range() -> None:
    ref = pd.read_csv(DATA / f"{NAME}_nvtx_gpu_proj_trace.csv")
    ours = analyse(DATA / f"{NAME}.sqlite").ranges
    assert len(ours) == 8 and len(ref) == 7  # `across threads` has no GPU work: nsys lists only ranges with some
    ours = ours[ours["gpu_ops"] > 0]
    m = ref.merge(ours, left_on="RangeId", right_on="range_id", how="inner", validate="one_to_one")
    assert len(m) == len(ref) == len(ours) == 7
    assert ((m["domain"] + ":" + m["name"]) == m["Name"]).all()
    assert (m["gpu_start_ns"].astype("int64") == m["Projected Start (ns)"]).all()
    assert ((m["gpu_end_ns"] - m["gpu_start_ns"]).astype("int64") == m["Projected Duration (ns)"]).all()
    assert (m["start_ns"] == m["Orig Start (ns)"]).all()
    assert ((m["end_ns"] - m["start_ns"]) == m["Orig Duration (ns)"]).all()
    assert (m["gpu_ops"] == m["NumGPUOps"]).all() and (m["level"] == m["Lvl"]).all()
    assert (m["pid"] == m["PID"]).all() and (m["tid"] == m["TID"]).all() and (m["style"] == m["Style"]).all()
    assert m.set_index("Name")["NumGPUOps"].to_dict() == {
        ":main": 18, ":main iter 0": 5, ":main iter 1": 5, ":main iter 2": 5, ":worker iter 0": 5,
        ":worker iter 1": 5, "myengine:named op": 2}


def test_the_table_written_on_the_device_is_the_one_made_here() -> None:
    keys = ["range_id", "name", "domain", "pid", "tid", "start_ns", "end_ns", "gpu_start_ns", "gpu_end_ns", "gpu_ops"]
    device = pd.read_parquet(DATA / f"{NAME}_ranges.parquet")[keys].sort_values("range_id").reset_index(drop=True)
    here = analyse(DATA / f"{NAME}.sqlite").ranges[keys].sort_values("range_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(device, here, check_dtype=False)
