"""`kvscope align`'s trace.json: a Kineto-shaped Chrome/Perfetto trace (analysis/align/trace_export.py), checked event
by event and loaded by HolisticTraceAnalysis, whose kernel breakdown must equal kvscope's kernels table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from paths import DATA

from kvscope.analysis.align.trace_export import kineto_trace, kineto_trace_text, trace_op_names, write_trace
from kvscope.analysis.nsys.export import load_export
from kvscope.analysis.nsys.projection import project
from kvscope.cli import main

OWN = DATA / "nsys" / "qwen25-05b.sqlite"
FOREIGN = DATA / "foreign"


def _inputs(export: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    exp = load_export(export)
    return project(exp).ranges, exp.gpu_ops, exp.calls


def _by_cat(trace: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in trace["traceEvents"]:
        out.setdefault(e.get("cat", e["ph"]), []).append(e)
    return out


def test_events_of_a_kvscope_export() -> None:
    ranges, ops, calls = _inputs(OWN)
    trace = kineto_trace(ranges, ops, calls, {"export": "x"})
    cats = _by_cat(trace)
    assert len(cats["user_annotation"]) == len(ranges) == 1573
    gpu = cats["kernel"] + cats["gpu_memcpy"] + cats["gpu_memset"]
    assert (len(cats["kernel"]), len(cats["gpu_memcpy"]), len(cats["gpu_memset"])) == (7406, 18, 208)
    assert all(e["tid"] == e["args"]["stream"] and e["pid"] == e["args"]["device"] for e in gpu)
    # every GPU op has its launch call (same correlation id, on a CPU thread) and one arrow from it
    launches = {e["args"]["correlation"]: e for e in cats["cuda_runtime"] + cats.get("cuda_driver", [])}
    assert {e["args"]["correlation"] for e in gpu} == set(launches)
    flows = cats["ac2g"]
    starts = {e["id"]: e for e in flows if e["ph"] == "s"}
    ends = {e["id"]: e for e in flows if e["ph"] == "f"}
    assert len(starts) == len(ends) == len(gpu) and all(e["bp"] == "e" for e in ends.values())
    first = min(gpu, key=lambda e: e["ts"])
    arrow = next(i for i, e in ends.items() if e["ts"] == first["ts"] and e["tid"] == first["tid"])
    call = launches[first["args"]["correlation"]]
    assert (starts[arrow]["pid"], starts[arrow]["tid"], starts[arrow]["ts"]) == (call["pid"], call["tid"], call["ts"])
    # times: microseconds with the nanosecond digits, durations from integer ns
    dur_ns = (ops["end_ns"] - ops["start_ns"]).to_numpy()
    assert sorted(round(e["dur"] * 1000) for e in gpu) == sorted(dur_ns.tolist())
    assert trace["otherData"]["kvscope"] == {"export": "x"}
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert "GPU 0" in names


def test_rank_on_the_first_line_as_hta_scans_for_it() -> None:
    ranges, ops, calls = _inputs(OWN)
    text = kineto_trace_text(ranges, ops, calls, rank=3)
    assert re.search(r'"rank":\s+(\d+)', text.splitlines()[0])[1] == "3"
    assert json.loads(text)["distributedInfo"]["rank"] == 3


def test_correlation_ids_unique_across_processes() -> None:
    ranges, ops, calls = _inputs(FOREIGN / "multiproc.sqlite")
    assert ops.drop_duplicates(["pid", "corr"])["corr"].duplicated().any()  # nsys's ids collide here
    trace = kineto_trace(ranges, ops, calls)
    cats = _by_cat(trace)
    gpu = cats["kernel"] + cats.get("gpu_memcpy", []) + cats.get("gpu_memset", [])
    launch = cats["cuda_runtime"] + cats.get("cuda_driver", [])
    assert len({e["args"]["correlation"] for e in launch}) == len(launch)
    by_corr = {e["args"]["correlation"]: e for e in launch}
    assert all(by_corr[e["args"]["correlation"]]["args"]["nsys_correlation"] == e["args"]["nsys_correlation"]
               for e in gpu)
    pids = {e["pid"] for e in cats["user_annotation"]}
    assert len(pids) == 2 and pids == set(ranges["pid"].tolist())
    streams = {e["tid"] for e in gpu}
    assert len(streams) >= 2  # one track per (process, stream)


def test_export_without_calls_has_no_arrows_and_truncation_is_said() -> None:
    ranges, ops, calls = _inputs(OWN)
    trace = kineto_trace(ranges, ops, None)
    assert "ac2g" not in _by_cat(trace) and "cuda_runtime" not in _by_cat(trace)
    cut = kineto_trace(ranges, ops, calls, max_gpu_ops=100)
    cats = _by_cat(cut)
    assert len(cats["kernel"]) + len(cats.get("gpu_memcpy", [])) + len(cats.get("gpu_memset", [])) == 100
    assert cut["otherData"]["kvscope"]["truncated"] == {"gpu_ops_total": len(ops), "gpu_ops_written": 100}
    with pytest.raises(ValueError, match="max_gpu_ops"):
        kineto_trace(ranges, ops, calls, max_gpu_ops=-1)


def test_memory_operations_named_as_kineto_names_them() -> None:
    ops = pd.DataFrame({"kind": ["kernel", "memcpy", "memset"], "name": ["gemm", "[CUDA memcpy]", None]})
    assert trace_op_names(ops).tolist() == ["gemm", "Memcpy [CUDA memcpy]", "Memset "]


def test_align_writes_the_trace(tmp_path: Path) -> None:
    out = tmp_path / "al"
    assert main(["align", str(OWN), "--out", str(out)]) == 0
    trace = json.loads((out / "trace.json").read_text())
    kernels = pd.read_parquet(out / "kernels.parquet")
    gpu = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    assert len(gpu) == len(kernels)
    assert main(["align", str(OWN), "--out", str(out)]) == 0  # a previous output with its trace is replaced


def _hta_breakdown(folder: Path, monkeypatch: pytest.MonkeyPatch) -> pd.DataFrame:
    """HTA's per-kernel-name breakdown of the one trace in `folder` (every kernel by name, memory ones included),
    with HTA's rounding of ns timestamps to whole µs off."""
    monkeypatch.setenv("HTA_DISABLE_NS_ROUNDING", "1")
    from hta.trace_analysis import TraceAnalysis

    analysis = TraceAnalysis(trace_dir=str(folder))
    _, kernels = analysis.get_gpu_kernel_breakdown(visualize=False, duration_ratio=1.0, num_kernels=10**9,
                                                   include_memory_kernels=True)
    return kernels.groupby("name")["sum (us)"].sum()


def _kvscope_totals(kernels: pd.DataFrame) -> pd.Series:
    dur_us = (kernels["end_ns"] - kernels["start_ns"]).to_numpy(np.int64) / 1e3
    return pd.Series(dur_us).groupby(trace_op_names(kernels).to_numpy()).sum()


@pytest.mark.filterwarnings("ignore::Warning")  # HTA 0.5's own pandas deprecations
def test_hta_loads_aligns_trace_and_its_kernel_totals_equal_kvscopes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("hta", reason="HolisticTraceAnalysis is not installed (pip install -e '.[dev]')")
    out = tmp_path / "al"
    assert main(["align", str(OWN), "--out", str(out)]) == 0
    only = tmp_path / "trace"  # HTA reads every .json in its folder
    only.mkdir()
    (only / "trace.json").write_bytes((out / "trace.json").read_bytes())
    hta = _hta_breakdown(only, monkeypatch)
    mine = _kvscope_totals(pd.read_parquet(out / "kernels.parquet"))
    assert len(mine) == 35 and sorted(hta.index) == sorted(mine.index)
    assert hta.sum() == pytest.approx(mine.sum(), abs=1e-6)
    assert np.allclose(hta.reindex(mine.index).to_numpy(), mine.to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::Warning")
@pytest.mark.parametrize("name", ["multiproc", "hf", "plain"])
def test_hta_on_foreign_exports(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("hta", reason="HolisticTraceAnalysis is not installed (pip install -e '.[dev]')")
    ranges, ops, calls = _inputs(FOREIGN / f"{name}.sqlite")
    write_trace(tmp_path / "trace.json", ranges, ops, calls)
    hta = _hta_breakdown(tmp_path, monkeypatch)
    mine = _kvscope_totals(ops)
    assert sorted(hta.index) == sorted(mine.index)
    assert np.allclose(hta.reindex(mine.index).to_numpy(), mine.to_numpy(), rtol=0, atol=1e-6)
