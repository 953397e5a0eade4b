"""The one-row summary of a run (summary.parquet) from its timings and the plain numbers the run measured beside them.

Torch-free: the run passes in what needs torch (the device's name, the allocator's peaks, the KV cache's bytes, the
dtype's size) as `RunFacts`. Every column, with its unit and clock, is documented in docs/architecture.md
("summary.parquet"). Percentiles are gated: a median or quartile needs one sample, p90 ten, p99 a hundred
(`PERCENTILE_MIN_SAMPLES`); with fewer the column is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.roofline import roofline
from kvscope.model.config import ModelArgs, kv_bytes_per_token  # torch-free
from kvscope.schema import HOST_CLOCK, Ceilings

# fewest samples for a percentile to be reported (else NaN): a p99 of 5 samples is their maximum, not a p99
PERCENTILE_MIN_SAMPLES = {90: 10, 99: 100}
# interquartile range over median (%) above which a phase is flagged as spread (host-bound: launches, drift)
SPREAD_FLAG_PCT = 10.0
_INT_COLUMNS = ("seq_len", "batch", "gen_tokens", "decode_steps", "reps", "warmup", "kv_cache_bytes",
                "kv_alloc_bytes", "kv_predicted_bytes", "weights_bytes", "ttft_samples", "prefill_gpu_samples",
                "tpot_samples")

Samples = pd.Series | list[float] | np.ndarray


@dataclass(frozen=True)
class HostClock:
    """Per-repetition host-clock times: `ttft_ms` from the call that starts the prefill to its first tokens on the
    host, `decode_ms` of the decode phase (synchronised at both ends)."""

    ttft_ms: list[float]
    decode_ms: list[float]


@dataclass(frozen=True)
class RunFacts:
    """What the summary says besides the timings: what ran, how it was shaped, and what the run measured."""

    run_id: str
    model: str  # the model's name
    args: ModelArgs
    dtype: str  # float32 | bfloat16 | float16
    itemsize: int  # bytes per element of the dtype (weights and KV cache)
    attn: str
    granularity: str
    device: str  # the GPU's name, or "cpu"
    events_clock: str  # the clock of the timed regions: schema.CUDA_CLOCK on a GPU, HOST_CLOCK on a CPU
    cuda_graphs: bool
    kernels: bool
    batch: int
    seq_len: int
    gen_tokens: int
    reps: int
    warmup: int
    host: HostClock
    peak_allocated_mib: float  # torch allocator peaks over the measured repetitions (NaN on a CPU)
    peak_reserved_mib: float
    kv_cache_bytes: int  # the cache tensor
    kv_alloc_bytes: int  # the allocator's growth when it was made
    ready_s: float
    ceilings: Ceilings | None  # the GPU's calibrated ceilings, None when not calibrated (or on a CPU)


def percentile(values: Samples, q: float) -> float:
    """The q-th percentile of the finite values, or NaN when there are too few of them for it (p90 needs 10
    samples, p99 100: PERCENTILE_MIN_SAMPLES); medians and quartiles need one."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    need = max((n for p, n in PERCENTILE_MIN_SAMPLES.items() if q >= p), default=1)
    return float(np.percentile(arr, q)) if arr.size >= need else math.nan


def spread(values: Samples) -> dict[str, float | bool]:
    """Quartiles, interquartile range over the median (%), and whether that exceeds SPREAD_FLAG_PCT."""
    q1, q2, q3 = (percentile(values, q) for q in (25, 50, 75))
    iqr_pct = (q3 - q1) / q2 * 100 if q2 > 0 else math.nan
    return {"q1": q1, "median": q2, "q3": q3, "iqr_pct": iqr_pct, "wide": bool(iqr_pct > SPREAD_FLAG_PCT)}


def _dispersion(prefix: str, values: Samples) -> dict[str, Any]:
    """`<prefix>_q1_ms`, `_q3_ms`, `_p90_ms`, `_p99_ms`, `_iqr_pct`, `_samples` of one set of samples."""
    arr = np.asarray(values, dtype=np.float64)
    sp = spread(arr)
    return {f"{prefix}_q1_ms": sp["q1"], f"{prefix}_q3_ms": sp["q3"], f"{prefix}_p90_ms": percentile(arr, 90),
            f"{prefix}_p99_ms": percentile(arr, 99), f"{prefix}_iqr_pct": sp["iqr_pct"],
            f"{prefix}_samples": int(np.isfinite(arr).sum())}


@dataclass(frozen=True)
class _Latencies:
    """The samples behind the latency columns, on the clock `clock` says."""

    clock: str
    prefill: np.ndarray  # per repetition: the prefill's timed region, or the host TTFT when nothing is timed
    prefill_events: np.ndarray  # per repetition: the prefill's timed region (empty when nothing is timed)
    steps: np.ndarray  # per decode step (per repetition when nothing is timed)
    reps: np.ndarray  # per repetition: prefill + decode
    step_sums: pd.Series  # per repetition: the events' sum of its decode steps
    host_ttft: np.ndarray
    host_decode: np.ndarray


def _latencies(t: pd.DataFrame, facts: RunFacts) -> _Latencies:
    """With --granularity none no region is timed: the classic columns then take the host clock, synchronised per
    phase; otherwise the timed regions (CUDA events, or the host clock around each region on a CPU)."""
    prefill_ev = t.loc[t["level"] == "phase"].loc[lambda d: d["phase"] == "prefill", "dur_ms"].to_numpy()
    steps_ev = t.loc[t["level"] == "step", "dur_ms"].to_numpy()
    reps_ev = t.loc[t["level"] == "rep", "dur_ms"].to_numpy()
    step_sums = t.loc[t["level"] == "step"].groupby("rep")["dur_ms"].sum()
    host_ttft = np.asarray(facts.host.ttft_ms, dtype=np.float64)
    host_decode = np.asarray(facts.host.decode_ms, dtype=np.float64)
    g = facts.gen_tokens
    host_steps = host_decode / (g - 1) if g > 1 else np.array([], dtype=np.float64)
    if facts.granularity == "none":
        return _Latencies(HOST_CLOCK, host_ttft, prefill_ev, host_steps, host_ttft + host_decode, step_sums,
                          host_ttft, host_decode)
    return _Latencies(facts.events_clock, prefill_ev, prefill_ev, steps_ev, reps_ev, step_sums, host_ttft,
                      host_decode)


def _host_vs_events_gap(lat: _Latencies) -> float:
    """The largest gap (%) between a repetition's host-clock decode phase and its decode steps' events."""
    if not len(lat.step_sums):
        return math.nan
    host = pd.Series(lat.host_decode, index=range(len(lat.host_decode)), dtype="float64")
    return ((host - lat.step_sums.reindex(host.index).astype("float64")).abs() / host * 100).max()


def summary_row(t: pd.DataFrame, facts: RunFacts) -> pd.DataFrame:
    """One row from the run's timings frame (timings.parquet) and `facts`."""
    b, s, g = facts.batch, facts.seq_len, facts.gen_tokens
    lat = _latencies(t, facts)
    prefill_p50, decode_p50 = percentile(lat.prefill, 50), percentile(lat.steps, 50)
    rep_p50 = percentile(lat.reps, 50)
    ttft_sp, tpot_sp = spread(lat.host_ttft), spread(lat.steps)
    row: dict[str, Any] = {
        "seq_len": s, "batch": b,
        "prefill_p50_ms": prefill_p50,
        "prefill_ms_per_tok": prefill_p50 / (b * s),
        "prefill_tok_s": b * s / (prefill_p50 / 1e3),
        "decode_p50_ms_per_tok": decode_p50,
        "decode_tok_s": b / (decode_p50 / 1e3),
        "total_tok_s": b * (s + g) / (rep_p50 / 1e3),
        "vram_reserved_mb": facts.peak_reserved_mib,  # the classic name (MiB), fixed by the published sweep schema
        "flag": "",
        "vram_reserved_mib": facts.peak_reserved_mib,  # the same value under its documented name
        "run_id": facts.run_id, "model": facts.model, "dtype": facts.dtype, "attn": facts.attn,
        "granularity": facts.granularity, "device": facts.device,
        "cuda_graphs": facts.cuda_graphs, "kernels": facts.kernels,
        "gen_tokens": g, "decode_steps": g - 1, "reps": facts.reps, "warmup": facts.warmup,
        "clock": lat.clock,
        "ttft_ms": ttft_sp["median"], **_dispersion("ttft", lat.host_ttft),
        "prefill_gpu_ms": percentile(lat.prefill_events, 50), **_dispersion("prefill_gpu", lat.prefill_events),
        "tpot_p50_ms": decode_p50, **_dispersion("tpot", lat.steps),
        "spread_flag": ",".join(name for name, sp in (("ttft", ttft_sp), ("tpot", tpot_sp)) if sp["wide"]),
        "rep_p50_ms": rep_p50,
        "decode_host_p50_ms": percentile(lat.host_decode, 50),
        "decode_events_p50_ms": percentile(lat.step_sums, 50),
        "decode_host_vs_events_max_pct": _host_vs_events_gap(lat),
        "peak_allocated_mib": facts.peak_allocated_mib, "peak_reserved_mib": facts.peak_reserved_mib,
        "kv_cache_bytes": facts.kv_cache_bytes, "kv_alloc_bytes": facts.kv_alloc_bytes,
        "kv_predicted_bytes": kv_bytes_per_token(facts.args, facts.itemsize) * b * (s + g),
        "weights_bytes": facts.args.param_count() * facts.itemsize, "ready_s": facts.ready_s,
        **roofline_columns(t, facts.args, facts.itemsize, facts.ceilings),
    }
    df = pd.DataFrame([row])
    for col in _INT_COLUMNS:
        df[col] = df[col].astype("int64")
    return df


def roofline_columns(t: pd.DataFrame, args: ModelArgs, itemsize: int, ceilings: Ceilings | None
                     ) -> dict[str, float]:
    """decode_mbu / prefill_mfu: medians against the GPU's calibrated ceilings (NaN without them); the achieved
    decode GB/s and prefill TFLOP/s."""
    nan = {"decode_mbu": math.nan, "prefill_mfu": math.nan, "decode_gb_s": math.nan, "prefill_tflop_s": math.nan}
    timed = t[t["level"].isin(["phase", "step"])]
    if not len(timed):
        return nan
    r = roofline(timed, args, itemsize, itemsize, ceilings)
    dec, pre = r[r["phase"] == "decode"], r[r["phase"] == "prefill"]
    return {"decode_mbu": percentile(dec["mbu"], 50) if ceilings else math.nan,
            "prefill_mfu": percentile(pre["mfu"], 50) if ceilings else math.nan,
            "decode_gb_s": percentile(dec["achieved_gb_s"], 50),
            "prefill_tflop_s": percentile(pre["achieved_tflop_s"], 50)}

