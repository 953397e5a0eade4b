"""`kvscope align` on exports of programs kvscope did not write (tests/data/foreign: plain torch with NVTX on two
threads and a named domain, two processes, transformers' generate, and one without any CUDA data), checked against
nsys's own `nvtx_gpu_proj_trace` and `nvtx_gpu_proj_sum` reports of the same exports, range for range.

Why the start/end range `across threads` of `plain` is absent from nsys's projection: nsys projects a range (push/pop
or start/end alike) only with the CUDA API calls of the thread that started it (its query joins the runtime rows on
`globalTid`), considers only ranges with no `endGlobalTid` (ended where they started), and lists only ranges with
at least one GPU operation. `across threads` was started and ended on the main thread, which made no CUDA call while
it was open (it sat in `worker.join()`); the worker thread's kernels inside its span belong to the worker's own
ranges. So it projects to nothing, and kvscope keeps it in ranges.parquet with zero GPU operations.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from paths import DATA
from synthetic_export import Synth

from kvscope.analysis.align.phase_map import parse_phase_map
from kvscope.analysis.align.pipeline import AlignResult, analyse
from kvscope.analysis.nsys.filters import parse_time_ns
from kvscope.cli import main
from kvscope.errors import KvscopeError

DATA = DATA / "foreign"
PROJECTED = ("plain", "multiproc", "hf")
# GPU operations per (process, kind), every range of the export, those with GPU work
KERNELS = {
    "plain": {(871, "kernel"): 25, (871, "memset"): 5},
    "multiproc": {(1093, "kernel"): 9, (1093, "memset"): 2, (1094, "kernel"): 13, (1094, "memset"): 3},
    "hf": {(1211, "kernel"): 1324, (1211, "memcpy"): 79, (1211, "memset"): 6},
    "nokernels": {},
}
RANGES = {"plain": (8, 7), "multiproc": (5, 5), "hf": (5, 5), "nokernels": (3, 0)}
_CACHE: dict[tuple[str, str], AlignResult] = {}


def result(name: str, fmt: str = "sqlite") -> AlignResult:
    if (name, fmt) not in _CACHE:
        _CACHE[(name, fmt)] = analyse(DATA / f"{name}.{fmt}")
    return _CACHE[(name, fmt)]


@pytest.mark.parametrize("fmt", ["sqlite", "parquetdir"])
@pytest.mark.parametrize("name", PROJECTED)
def test_projection_equals_nsys_trace(name: str, fmt: str) -> None:
    ref = pd.read_csv(DATA / f"{name}_nvtx_gpu_proj_trace.csv")
    ours = result(name, fmt).ranges
    assert (len(ours), int((ours["gpu_ops"] > 0).sum())) == RANGES[name]
    ours = ours[ours["gpu_ops"] > 0]
    m = ref.merge(ours, left_on="RangeId", right_on="range_id", how="inner", validate="one_to_one")
    assert len(m) == len(ref) == len(ours)
    assert ((m["domain"] + ":" + m["name"]) == m["Name"]).all()
    assert (m["gpu_start_ns"].astype("int64") == m["Projected Start (ns)"]).all()
    assert ((m["gpu_end_ns"] - m["gpu_start_ns"]).astype("int64") == m["Projected Duration (ns)"]).all()
    assert (m["start_ns"] == m["Orig Start (ns)"]).all()
    assert ((m["end_ns"] - m["start_ns"]) == m["Orig Duration (ns)"]).all()
    assert (m["style"] == m["Style"]).all() and (m["pid"] == m["PID"]).all() and (m["tid"] == m["TID"]).all()
    assert (m["gpu_ops"] == m["NumGPUOps"]).all() and (m["level"] == m["Lvl"]).all()
    assert (m["num_child"] == m["NumChild"]).all() and (m["range_stack"] == m["RangeStack"]).all()
    assert (m["parent_id"].fillna(-1).astype("int64") == m["ParentId"].fillna(-1).astype("int64")).all()


@pytest.mark.parametrize("name", PROJECTED)
def test_summary_equals_nsys_sum(name: str) -> None:
    ref = pd.read_csv(DATA / f"{name}_nvtx_gpu_proj_sum.csv")
    s = result(name).range_summary
    s = s[s["gpu_ranges"] > 0].assign(Range=lambda d: d["domain"] + ":" + d["name"])
    assert s["pid"].nunique() * len(ref) >= len(s) == len(ref)  # names are unique per process in these exports
    m = ref.merge(s, on="Range", validate="one_to_one")
    assert len(m) == len(ref)
    exact = {"Style": "style", "Total Proj Time (ns)": "proj_total_ns", "Total Range Time (ns)": "range_total_ns",
             "Range Instances": "gpu_ranges", "Proj Min (ns)": "proj_min_ns", "Proj Max (ns)": "proj_max_ns",
             "Proj Med (ns)": "proj_median_ns", "Total GPU Ops": "gpu_ops", "Avg GPU Ops": "gpu_ops_mean"}
    for theirs, mine in exact.items():
        assert (m[theirs] == m[mine]).all(), theirs
    # nsys prints these to one decimal
    for theirs, mine in {"Proj Avg (ns)": "proj_mean_ns", "Proj StdDev (ns)": "proj_std_ns",
                         "Avg Range Lvl": "level_mean", "Avg Num Child": "num_child_mean"}.items():
        assert (m[theirs] == m[mine].round(1)).all(), theirs
    # nsys orders by total projected time, as range_summary does
    assert s["Range"].tolist() == ref["Range"].tolist()


@pytest.mark.parametrize("name", [*PROJECTED, "nokernels"])
def test_kernels_per_process(name: str) -> None:
    k = result(name).kernels
    assert k.groupby(["pid", "kind"]).size().to_dict() == KERNELS[name]
    for col in ("range_id", "range_name", "range_domain", "stream", "graph_node_id", "short_name", "demangled_name",
                "kernel_class"):
        assert col in k.columns
    kernels = k[k["kind"] == "kernel"]
    assert kernels["short_name"].notna().all() and kernels["demangled_name"].notna().all()
    assert (kernels["name"] == kernels["demangled_name"]).all()


def test_innermost_range_from_any_domain() -> None:
    k = result("hf").kernels
    # 2 of each generate's 547 operations run inside cub's own CCCL ranges, which are innermost
    assert k["range_id"].fillna(-1).value_counts().to_dict() == {3: 545, 5: 545, -1: 313, 2: 2, 4: 2, 6: 2}
    assert set(k.loc[k["range_domain"] == "CCCL", "range_name"]) == {"cub::DeviceScan::InclusiveScan"}
    p = result("plain").kernels
    assert p.loc[p["range_domain"] == "myengine", "range_name"].tolist() == ["named op"] * 2
    assert (p.loc[p["range_name"] == "worker iter 0", "range_id"] == 6).sum() == 5


def test_start_end_range_across_threads() -> None:
    """See the module docstring: projected on its own thread only, where nothing was launched."""
    r = result("plain").ranges.set_index("name")
    row = r.loc["across threads"]
    assert (row["style"], row["gpu_ops"], row["tid"], row["level"], row["parent_id"]) == ("StartEnd", 0, 871, 1, 1)
    assert "across threads" not in pd.read_csv(DATA / "plain_nvtx_gpu_proj_trace.csv")["Name"].str[1:].tolist()
    k = result("plain").kernels
    inside = k[(k["start_ns"] >= row["start_ns"]) & (k["range_domain"] == "")]
    worker = inside["range_name"].str.startswith("worker").sum()
    assert worker == 10  # the worker's operations during its span: attributed to the worker's ranges
    # nsys counts only children with GPU work: `main` has 4 (3 iterations, `named op`), not 5
    assert r.loc["main", "num_child"] == 4


def test_no_kernels_is_not_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = result("nokernels")
    assert res.ranges["gpu_ops"].tolist() == [0, 0, 0] and res.ranges["gpu_start_ns"].isna().all()
    assert len(res.kernels) == 0 and res.regions is None and res.steps is None and res.classes is None
    assert res.range_summary["ranges"].tolist() == [1, 1, 1]
    assert res.skipped == ("skipped align.parquet, steps.parquet, kernel_classes.parquet: no ranges in the NVTX "
                           "domain 'kvscope' (not a kvscope run); --phase-map labels another engine's ranges")
    out = tmp_path / "o"
    assert main(["align", str(DATA / "nokernels.sqlite"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("skipped") == 1 and f"align: {res.skipped}\n" in text
    written = {p.name for p in out.iterdir()}
    assert {"kernels.parquet", "range_summary.parquet", "ranges.parquet"} <= written
    assert not written & {"align.parquet", "steps.parquet", "kernel_classes.parquet"}
    assert len(pd.read_parquet(out / "kernels.parquet")) == 0
    assert len(pd.read_parquet(out / "ranges.parquet")) == 3


@pytest.mark.parametrize("name", [*PROJECTED, "nokernels"])
def test_parquetdir_and_sqlite_give_identical_tables(name: str) -> None:
    a, b = result(name), result(name, "parquetdir")
    for table in ("ranges", "kernels", "range_summary"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table), check_dtype=False, obj=table)


def test_filters() -> None:
    plain = DATA / "plain.sqlite"
    assert analyse(plain, domain="myengine").ranges["name"].tolist() == ["named op"]
    assert len(analyse(plain, domain="").ranges) == 7
    named = analyse(plain, domain="myengine").kernels
    assert len(named) == 30 and named["range_name"].value_counts().to_dict() == {"named op": 2}
    assert analyse(plain, range_re=r"^worker").ranges["range_id"].tolist() == [6, 7]
    by_time = analyse(plain, start_ns=4_376_000_000, end_ns=4_378_000_000)
    assert sorted(by_time.ranges["range_id"]) == [1, 5, 6, 7]
    # the worker's tensor made before its first range, worker iter 0's five operations, three of worker iter 1's
    assert by_time.kernels["range_name"].fillna("").value_counts().to_dict() == {"worker iter 0": 5,
                                                                                 "worker iter 1": 3, "": 1}
    assert parse_time_ns("4.376s") == 4_376_000_000 and parse_time_ns("4376000000") == 4_376_000_000
    multi = analyse(DATA / "multiproc.sqlite", pid=1094)
    assert multi.ranges["name"].tolist() == ["rank1 iter 0", "rank1 iter 1", "rank1 iter 2"]
    assert len(multi.kernels) == 16 and (multi.kernels["pid"] == 1094).all()
    assert multi.range_summary["pid"].unique().tolist() == [1094]


def test_phase_map_gives_a_step_table() -> None:
    res = analyse(DATA / "hf.sqlite", phase_map="decode=^generate")
    s = res.steps
    assert s[["name", "phase", "step", "gpu_ops", "kernels"]].values.tolist() == [
        ["generate 0", "decode", 1, 547, 545 + 2], ["generate 1", "decode", 2, 547, 545 + 2]]
    assert (s["gpu_busy_ms"] < s["gpu_span_ms"]).all() and s["launch_bound"].all()
    c = res.classes.groupby("phase")["ops"].sum().to_dict()
    assert c == {"decode": 2 * 547, "outside": 1409 - 2 * 547}
    assert res.regions is None and res.skipped == ("skipped align.parquet: no ranges in the NVTX domain 'kvscope' "
                                                   "(not a kvscope run)")
    missed = analyse(DATA / "hf.sqlite", phase_map="decode=^nothing")
    assert missed.steps is None and missed.skipped.endswith("(not a kvscope run); --phase-map matched no range")
    # a step key with a number group, inside mapped phases
    res = analyse(DATA / "plain.sqlite", phase_map=r"prefill=^main$,step=iter (\d+)")
    s = res.steps.set_index("name")
    assert s.loc["main iter 2", ["phase", "step"]].tolist() == ["prefill", 2]
    assert s.loc["worker iter 1", ["phase", "step"]].tolist() == ["decode", 1]  # outside any labelled phase
    assert s.loc["main", ["phase", "step"]].tolist() == ["prefill", 0]


@pytest.mark.parametrize(("argv", "message"), [
    (["--phase-map", "bogus=x"], "--phase-map: unknown key 'bogus' (keys: prefill, decode, step, layer)"),
    (["--phase-map", "decode=("], "--phase-map: decode='(' is not a regular expression"),
    (["--phase-map", "decode"], "--phase-map: 'decode' is not KEY=RE"),
    (["--phase-map", "decode=a,decode=b"], "--phase-map: decode given twice"),
    (["--range", "("], "--range: '(' is not a regular expression"),
    (["--start", "soon"], "--start must be nanoseconds (e.g. 1500000) or seconds with an s suffix (e.g. 1.5s)"),
    (["--end", "1.5ms"], "--end must be nanoseconds"),
    (["--start", "2s", "--end", "1s"], "--end (1000000000 ns) is before --start (2000000000 ns)"),
    (["--pid", "-3"], "--pid must be a non-negative integer, got -3"),
    (["--timings", str(DATA.parent / "nsys" / "tiny-run")], "--timings needs ranges in the NVTX domain 'kvscope'"),
])
def test_bad_values_are_one_line(argv: list[str], message: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["align", str(DATA / "hf.sqlite"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_phase_map_spelling() -> None:
    pm = parse_phase_map(r"decode=^gen(erate|eration){1,2},step=x")
    assert pm.keys == ("decode", "step") and pm.patterns[0][1].pattern == "^gen(erate|eration){1,2}"
    with pytest.raises(KvscopeError, match="unknown key"):
        parse_phase_map({"warmup": "x"})


def test_user_kernel_classes(tmp_path: Path) -> None:
    rules = tmp_path / "classes.toml"
    rules.write_text('[[rule]]\nclass = "communication"\npattern = "xmma_gemm"\n')
    k = analyse(DATA / "plain.sqlite", classes=rules).kernels
    assert (k.loc[k["name"].str.contains("xmma_gemm"), "kernel_class"] == "communication").all()
    assert (k["kernel_class"] == "communication").sum() == 10 and not (k["kernel_class"] == "gemm").any()


def test_range_ended_on_another_thread_is_kept_unprojected(tmp_path: Path) -> None:
    s = Synth()
    s.range(1, 1, 0, 100, "handoff", style=60, end_tid=2)  # started on thread 1, ended on thread 2
    s.range(1, 1, 0, 100, "local", style=60)
    s.launch(1, 1, 10, 20, corr=1, kernels=[(30, 40, 7)])
    res = analyse(s.write(tmp_path / "x.sqlite"))
    r = res.ranges.set_index("name")
    assert r.loc["handoff", ["projected", "gpu_ops", "level"]].tolist() == [False, 0, -1]
    assert r.loc["local", ["projected", "gpu_ops", "level"]].tolist() == [True, 1, 0]
    assert res.kernels["range_name"].tolist() == ["local"]
    assert res.range_summary.set_index("name").loc["handoff", ["ranges", "gpu_ranges"]].tolist() == [1, 0]


def test_cli_flags_reach_the_analysis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert main(["align", str(DATA / "plain.parquetdir"), "--out", str(out), "--domain", "", "--range", "iter",
                 "--start", "4.376s", "--end", "4378000000", "--pid", "871"]) == 0
    capsys.readouterr()
    assert pd.read_parquet(out / "ranges.parquet")["name"].tolist() == ["worker iter 0", "worker iter 1"]
    assert len(pd.read_parquet(out / "kernels.parquet")) == 9
    out2 = tmp_path / "o2"
    assert main(["align", str(DATA / "hf.sqlite"), "--out", str(out2), "--phase-map", "decode=^generate"]) == 0
    text = capsys.readouterr().out
    assert "align: skipped align.parquet: no ranges in the NVTX domain 'kvscope' (not a kvscope run)\n" in text
    steps = pd.read_parquet(out2 / "steps.parquet")
    assert steps["name"].tolist() == ["generate 0", "generate 1"] and steps["gpu_ops"].tolist() == [547, 547]
    classes = pd.read_parquet(out2 / "kernel_classes.parquet")
    assert int(classes.loc[classes["phase"] == "decode", "ops"].sum()) == 2 * 547
