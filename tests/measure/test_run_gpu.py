"""`kvscope run` on the GPU (marked `gpu`): files, NVML samples, and CUDA-event decode steps against a synchronised
host clock around the whole decode phase."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kvscope.engine.plan import RunSpec
from kvscope.io import read_metadata
from kvscope.measure.run import execute

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("batch", "granularity"), [(1, "phase"), (16, "phase"), (1, "layer")])
def test_event_sum_matches_host_clock(tmp_path: Path, batch: int, granularity: str) -> None:
    res = execute(RunSpec(model="qwen2.5-3b", batch_size=batch, seq=512, gen_tokens=64, warmup=2, reps=5,
                          granularity=granularity, out=str(tmp_path / "run")))
    s = res.summary.iloc[0]
    print(f"bs={batch} {granularity}: decode host p50 {s['decode_host_p50_ms']:.3f} ms, event sum p50 "
          f"{s['decode_events_p50_ms']:.3f} ms, max gap {s['decode_host_vs_events_max_pct']:.3f}%, "
          f"TPOT p50 {s['tpot_p50_ms']:.3f} ms, TTFT {s['ttft_ms']:.3f} ms [{s['ttft_q1_ms']:.3f}, "
          f"{s['ttft_q3_ms']:.3f}], prefill events {s['prefill_gpu_ms']:.3f} ms")
    assert s["decode_host_vs_events_max_pct"] < 2.0
    assert sorted(p.name for p in res.out_dir.iterdir()) == ["nvml.parquet", "summary.parquet", "timings.parquet",
                                                             "trace.json"]
    nvml = pd.read_parquet(res.out_dir / "nvml.parquet")
    assert len(nvml) > 0 and nvml["t_ms"].is_monotonic_increasing
    meta = read_metadata(res.out_dir / "timings.parquet")
    assert meta["clock"] == "cuda" and meta["device"].startswith("NVIDIA")
    assert meta["nvml"]["process"] == "child" and meta["nvml"]["mode"] in ("buffered", "polled"), meta["nvml"]
    assert s["clock"] == "cuda" and s["ttft_samples"] == 5 and s["tpot_samples"] == 5 * 63
    assert s["ttft_ms"] >= 0.99 * s["prefill_gpu_ms"]  # the host waits at least the prefill's GPU span
    assert s["peak_reserved_mib"] > 0 and s["kv_alloc_bytes"] >= s["kv_cache_bytes"]


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("granularity", ["layer", "op"])
def test_graph_mode_times_layers_and_ops(tmp_path: Path, granularity: str, kernels: bool) -> None:
    """Graphs on at layer/op granularity: a row per layer (and op) per decode step, read from the timestamps the
    kernels write inside the replayed graphs (kernels on) or from event-record nodes (kernels off); per step, layer
    times sum to no more than the step, and each step's layers lie inside it."""
    res = execute(RunSpec(model="qwen2.5-0.5b", seq=64, gen_tokens=9, warmup=1, reps=2, granularity=granularity,
                          kernels=kernels, out=str(tmp_path / "run")))
    assert res.metadata["cuda_graphs"] is True
    assert res.metadata["graph_region_timing"] == ("stamps" if kernels else "events")
    t = res.timings
    steps = t[t["level"] == "step"]
    layers = t[(t["level"] == "layer") & (t["phase"] == "decode") & t["layer"].notna()]
    assert len(steps) == 2 * 8
    assert len(layers) == len(steps) * 24  # qwen2.5-0.5b: 24 layers
    assert (layers["dur_ms"] > 0).all()
    per_step = layers.groupby(["rep", "step"])["dur_ms"].sum()
    step_ms = steps.set_index(["rep", "step"])["dur_ms"]
    assert (per_step <= step_ms.loc[per_step.index] * 1.0001).all()
    first = layers.groupby(["rep", "step"])["start_ms"].min()
    starts = steps.set_index(["rep", "step"])["start_ms"].loc[first.index]
    assert ((first - starts).abs() < 0.5).all()  # the step's layers start where the step starts (within 0.5 ms)
    if granularity == "op":
        ops = t[(t["level"] == "op") & (t["phase"] == "decode")]
        # kernels on: RoPE and the cache write are one kernel, one `rope` op
        assert len(ops) == len(steps) * 24 * (6 if kernels else 7)
        assert (ops["dur_ms"] > 0).all()
