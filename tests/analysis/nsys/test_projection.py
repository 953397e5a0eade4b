"""The NVTX-to-GPU projection: against nsys's own nvtx_gpu_proj_trace on real captures, and on synthetic edge
cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from paths import DATA
from synthetic_export import Synth

from kvscope.analysis.nsys.export import load_export
from kvscope.analysis.nsys.projection import project
from kvscope.errors import KvscopeError

DATA = DATA / "nsys"
FIXTURES = [("tiny", 165, 1869, 736), ("qwen25-05b", 1573, 17389, 7632)]


@pytest.mark.parametrize("fmt", ["sqlite", "parquetdir"])
@pytest.mark.parametrize(("name", "n_ranges", "n_calls", "n_ops"), FIXTURES)
def test_projection_equals_nsys_report(name: str, n_ranges: int, n_calls: int, n_ops: int, fmt: str) -> None:
    exp = load_export(DATA / f"{name}.{fmt}")
    assert (len(exp.ranges), len(exp.calls), len(exp.gpu_ops)) == (n_ranges, n_calls, n_ops)
    assert exp.nsys_version == "2025.3.2.0" and exp.schema_version == "3.20.3"
    ours = project(exp).ranges
    ref = pd.read_csv(DATA / f"{name}_nvtx_gpu_proj_trace.csv")
    ours = ours[ours["gpu_ops"] > 0]
    assert len(ours) == len(ref)
    m = ref.merge(ours, left_on="RangeId", right_on="range_id", how="inner", validate="one_to_one")
    assert len(m) == len(ref)
    assert ((m["domain"] + ":" + m["name"]) == m["Name"]).all()
    assert (m["gpu_start_ns"].astype("int64") == m["Projected Start (ns)"]).all()
    assert ((m["gpu_end_ns"] - m["gpu_start_ns"]).astype("int64") == m["Projected Duration (ns)"]).all()
    assert (m["start_ns"] == m["Orig Start (ns)"]).all()
    assert ((m["end_ns"] - m["start_ns"]) == m["Orig Duration (ns)"]).all()
    assert (m["gpu_ops"] == m["NumGPUOps"]).all()
    assert (m["level"] == m["Lvl"]).all()
    assert (m["num_child"] == m["NumChild"]).all()
    assert (m["parent_id"].fillna(-1).astype("int64") == m["ParentId"].fillna(-1).astype("int64")).all()
    assert (m["range_stack"] == m["RangeStack"]).all()
    assert (m["style"] == m["Style"]).all() and (m["pid"] == m["PID"]).all() and (m["tid"] == m["TID"]).all()


def _by_name(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("name")


def test_nested_ranges_two_threads_no_gpu_work(tmp_path: Path) -> None:
    s = Synth()
    s.domain(1, 1, 1, "kvscope")
    s.range(1, 1, 0, 1000, "outer", domain_id=1)
    s.range(1, 1, 100, 600, "mid", domain_id=1, registered=True)
    s.range(1, 1, 200, 300, "inner", domain_id=1)
    s.range(1, 1, 700, 800, "idle")  # default domain, no GPU work
    s.range(1, 2, 0, 1000, "other thread")
    s.launch(1, 1, 210, 220, corr=1, kernels=[(400, 450, 7)])
    s.launch(1, 1, 350, 360, corr=2, kernels=[(460, 500, 7)])
    s.launch(1, 1, 900, 910, corr=3, kernels=[(920, 930, 7)])
    s.launch(1, 2, 50, 60, corr=4, kernels=[(70, 80, 7)])
    r = _by_name(project(load_export(s.write(tmp_path / "x.sqlite"))).ranges)
    # nsys counts as children only ranges with GPU operations: `mid`, not `idle`
    assert r.loc["outer", ["gpu_ops", "level", "num_child", "gpu_busy_ns"]].tolist() == [3, 0, 1, 100]
    assert (r.loc["outer", "gpu_start_ns"], r.loc["outer", "gpu_end_ns"]) == (400, 930)
    assert r.loc["mid", ["gpu_ops", "level"]].tolist() == [2, 1]
    assert (r.loc["mid", "gpu_start_ns"], r.loc["mid", "gpu_end_ns"]) == (400, 500)
    assert r.loc["inner", ["gpu_ops", "level"]].tolist() == [1, 2]
    assert r.loc["inner", "parent_id"] == r.loc["mid", "range_id"]
    assert r.loc["inner", "range_stack"] == f":{r.loc['outer', 'range_id']}:{r.loc['mid', 'range_id']}:" \
                                            f"{r.loc['inner', 'range_id']}"
    assert r.loc["idle", "gpu_ops"] == 0 and pd.isna(r.loc["idle", "gpu_start_ns"])
    assert r.loc["idle", "domain"] == "" and r.loc["outer", "domain"] == "kvscope"
    assert r.loc["other thread", ["gpu_ops", "level", "gpu_busy_ns"]].tolist() == [1, 0, 10]


def test_start_end_ranges_and_cross_thread_end(tmp_path: Path) -> None:
    s = Synth()
    s.range(1, 1, 0, 100, "se", style=60)
    s.range(1, 1, 0, 100, "ends elsewhere", style=60, end_tid=2)
    s.launch(1, 1, 10, 20, corr=1, kernels=[(30, 40, 7)])
    r = _by_name(project(load_export(s.write(tmp_path / "x.sqlite"))).ranges)
    # nsys does not project a range that ended on another thread: kept, unprojected, with no GPU work
    assert r.loc["ends elsewhere", ["projected", "level", "gpu_ops", "style"]].tolist() == [False, -1, 0, "StartEnd"]
    assert pd.isna(r.loc["ends elsewhere", "parent_id"]) and pd.isna(r.loc["ends elsewhere", "gpu_start_ns"])
    assert r.loc["se", ["style", "gpu_ops", "projected", "level"]].tolist() == ["StartEnd", 1, True, 0]


def test_cuda_graph_replay_and_two_streams(tmp_path: Path) -> None:
    s = Synth()
    s.range(1, 1, 0, 1000, "step")
    # one cudaGraphLaunch, three kernel nodes (two overlap on two streams)
    s.launch(1, 1, 10, 20, corr=5, kernels=[(100, 200, 7), (150, 260, 8), (300, 310, 7)], name="cudaGraphLaunch",
             graph_nodes=True)
    exp = load_export(s.write(tmp_path / "x.sqlite"))
    proj = project(exp)
    r = _by_name(proj.ranges)
    assert r.loc["step", ["gpu_ops", "gpu_op_rows", "gpu_busy_ns"]].tolist() == [1, 3, 170]
    assert (r.loc["step", "gpu_start_ns"], r.loc["step", "gpu_end_ns"]) == (100, 310)
    assert (proj.op_range == r.loc["step", "range_id"]).all()
    assert exp.gpu_ops["graph_node_id"].tolist() == [100, 101, 102]


def test_two_processes_with_colliding_correlation_ids(tmp_path: Path) -> None:
    s = Synth()
    s.range(1, 1, 0, 100, "p1")
    s.range(2, 1, 0, 100, "p2")
    s.launch(1, 1, 10, 20, corr=7, kernels=[(30, 40, 7)])
    s.launch(2, 1, 10, 20, corr=7, kernels=[(50, 90, 7)])
    r = _by_name(project(load_export(s.write(tmp_path / "x.sqlite"))).ranges)
    assert (r.loc["p1", "gpu_start_ns"], r.loc["p1", "gpu_end_ns"], r.loc["p1", "gpu_ops"]) == (30, 40, 1)
    assert (r.loc["p2", "gpu_start_ns"], r.loc["p2", "gpu_end_ns"], r.loc["p2", "gpu_ops"]) == (50, 90, 1)
    assert (r.loc["p1", "pid"], r.loc["p2", "pid"]) == (1, 2)


def test_unclosed_range_and_duplicate_runtime_rows(tmp_path: Path) -> None:
    s = Synth()
    s.range(1, 1, 0, None, "never closed")
    s.range(1, 2, 50, 97, "latest range end")  # nsys ends an open range at the latest NVTX start or end
    s.launch(1, 1, 10, 20, corr=1, kernels=[(30, 40, 7)])
    s.runtime.append((11, 19, (1 << 48) | (1 << 24) | 1, 1, s.sid("cudaLaunchKernel_v7000")))  # old nested row
    s.launch(1, 1, 50, 60, corr=2, kernels=[(70, 95, 7)])
    exp = load_export(s.write(tmp_path / "x.sqlite"))
    assert len(exp.calls) == 2
    r = _by_name(project(exp).ranges)
    assert r.loc["never closed", "end_ns"] == 97 and not r.loc["never closed", "closed"]
    assert r.loc["never closed", "gpu_ops"] == 2


def test_call_sticking_out_of_a_range_is_not_enclosed(tmp_path: Path) -> None:
    s = Synth()
    s.range(1, 1, 0, 100, "r")
    s.launch(1, 1, 90, 120, corr=1, kernels=[(130, 140, 7)])
    r = _by_name(project(load_export(s.write(tmp_path / "x.sqlite"))).ranges)
    assert r.loc["r", "gpu_ops"] == 0


def test_missing_tables_and_not_an_export(tmp_path: Path) -> None:
    s = Synth(with_kernels=False)  # CUDA API calls but no GPU operation table: ranges with no GPU work
    s.range(1, 1, 0, 100, "r")
    exp = load_export(s.write(tmp_path / "nok.sqlite"))
    assert (len(exp.ranges), len(exp.gpu_ops)) == (1, 0)
    assert project(exp).ranges["gpu_ops"].tolist() == [0]
    s = Synth(with_nvtx=False)
    s.launch(1, 1, 10, 20, corr=1, kernels=[(30, 40, 7)])
    with pytest.raises(KvscopeError, match="no NVTX_EVENTS table"):
        load_export(s.write(tmp_path / "nonvtx.sqlite"))
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database at all, just text " * 20)
    with pytest.raises(KvscopeError, match="not an nsys export"):
        load_export(junk)
    with pytest.raises(KvscopeError, match="export not found"):
        load_export(tmp_path / "absent.sqlite")


def test_vectorised_block_search_matches_brute_force(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    s = Synth()
    t = 0
    for i in range(60):  # ranges with launches inside, on two threads
        tid = 1 + i % 2
        start = t
        s.range(1, tid, start, start + 500, f"r{i}")
        s.range(1, tid, start + 100, start + 300, f"c{i}")
        for j in range(int(rng.integers(0, 4))):
            cs = start + 50 + j * 100
            s.launch(1, tid, cs, cs + 20, corr=1000 * i + j, kernels=[(cs + 30, cs + 30 + int(rng.integers(1, 90)), 7)])
        t += 600
    exp = load_export(s.write(tmp_path / "x.sqlite"))
    r = project(exp).ranges
    calls, ops = exp.calls, exp.gpu_ops.merge(exp.calls[["corr", "global_tid", "start_ns", "end_ns"]]
                                               .rename(columns={"start_ns": "cs", "end_ns": "ce"}), on="corr")
    for row in r.itertuples():
        inside = ops[(ops.global_tid == row.global_tid) & (ops.cs >= row.start_ns) & (ops.ce <= row.end_ns)]
        assert row.gpu_ops == inside["corr"].nunique()
        if len(inside):
            assert (row.gpu_start_ns, row.gpu_end_ns) == (inside.start_ns.min(), inside.end_ns.max())
    assert len(calls) > 0
