"""The one-row summary of a served load (summary.parquet of `kvscope serve`, and each row of a serve sweep), computed
from the requests and iterations frames in memory (the run loop calls `serve_summary` before anything is written).

Column by column (`SERVE_SUMMARY_COLUMNS`, in this order):
- the settings, from `meta["serve"]`: `policy`, `rps` (requested; NaN in a closed loop), `concurrency` (requested;
  NaN in an open loop), `block_size`, `max_batch_tokens`, `preempt`, `slo_ttft_ms`, `slo_tpot_ms` (NaN: no SLO);
- `offered_rps`: the measured arrival rate, (arrivals - 1) / arrival span (first to last arrival: n arrivals span
  n - 1 gaps, so evenly spaced arrivals at rate r give r exactly); NaN with fewer than two arrivals;
- `requests`, `requests_finished`, `requests_cut`, `requests_refused` (schema.REQUEST_STATUSES);
- `duration_s`: first arrival to last finish (`finish_s` of any request); `arrival_span_s`; `drain_s`: last
  arrival to last finish;
- `requests_per_s` (finished over the duration), `prompt_tokens` (of the requests that produced a token),
  `output_tokens` (generated, every request), `output_tok_s`, `total_tok_s` ((prompt + output) over the duration);
- `goodput_rps`: finished requests meeting every SLO given (TTFT <= slo_ttft_ms, TPOT <= slo_tpot_ms; a request of
  one token has no TPOT and meets that one) over the duration; `goodput_fraction`: those over all requests (cut and
  refused ones miss); `goodput_requests`; all NaN when no SLO is given;
- latency, finished requests only, each with `_p50_ms`, `_p90_ms`, `_p99_ms` and the sample count `_n`: `ttft`,
  `tpot` ((e2e - ttft) / (generated - 1), requests of two tokens or more), `itl` (every inter-token gap, pooled),
  `e2e` (arrival to finish, queue included), `queue`. Percentiles are gated as the run summary's
  (`kvscope.analysis.summary.percentile`): p90 needs 10 samples, p99 100, else NaN;
- Little's law: `mean_in_system`, the exact time average of the requests in the system (arrival to finish; the
  step function integrated over first arrival .. last finish; requests with both times), `mean_time_in_system_s`
  (their mean finish - arrival), `little_predicted` (offered_rps x mean_time_in_system_s) and `little_ratio`
  (mean_in_system / little_predicted): over the whole run, so the ramp at the start (an empty system filling) and
  the drain after the last arrival pull it below 1 on a run not much longer than its latencies; and the same ratio
  over the steady window, from the first arrival plus the mean time in system to the last arrival
  (`little_steady_s`, its length): `little_steady_ratio`, the window's time-averaged requests in the system over
  (arrivals in the window, the last arrival left out as its end, / its length) x mean_time_in_system_s; NaN
  where the window is empty or holds fewer than two arrivals;
- from the iterations, time-weighted by `dur_ms`: `mean_running`, `mean_waiting`;
- `preemptions`, `preemptions_recompute`, `preemptions_swap` (the requests' counts summed);
- KV: `kv_blocks_peak` (max `blocks_used`), `kv_blocks_total` (max `blocks_used + blocks_free`: the pool),
  `kv_slot_use_frac` (token slots used over block slots held, time-weighted) and `kv_fragmentation_frac` (1 - it);
- the scheduler: `host_p50_ms`, `host_p99_ms` (host time per iteration), `host_share` (sum host_ms / sum (host_ms
  + dur_ms)); the GPU's idle gap between iterations: `gpu_gap_p50_ms`, `gpu_gap_p99_ms`, and over decode-only
  iterations `gpu_gap_decode_ratio` (sum gpu_gap_ms / sum dur_ms; NaN on the CPU);
- `iterations`, `iterations_prefill`, `iterations_decode`, `iterations_mixed`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.summary import percentile

SETTING_COLUMNS = ("policy", "rps", "concurrency", "offered_rps", "block_size", "max_batch_tokens", "preempt",
                   "slo_ttft_ms", "slo_tpot_ms")
LATENCY_NAMES = ("ttft", "tpot", "itl", "e2e", "queue")
LATENCY_PERCENTILES = (50, 90, 99)


def latency_columns(name: str) -> tuple[str, ...]:
    return (*(f"{name}_p{q}_ms" for q in LATENCY_PERCENTILES), f"{name}_n")


SERVE_SUMMARY_COLUMNS = (
    *SETTING_COLUMNS, "requests", "requests_finished", "requests_cut", "requests_refused", "duration_s",
    "arrival_span_s", "drain_s", "requests_per_s", "prompt_tokens", "output_tokens", "output_tok_s", "total_tok_s",
    "goodput_rps", "goodput_fraction", "goodput_requests", *(c for n in LATENCY_NAMES for c in latency_columns(n)),
    "mean_in_system", "mean_time_in_system_s", "little_predicted", "little_ratio", "little_steady_s",
    "little_steady_ratio", "mean_running", "mean_waiting",
    "preemptions", "preemptions_recompute", "preemptions_swap", "kv_blocks_peak", "kv_blocks_total",
    "kv_slot_use_frac", "kv_fragmentation_frac", "host_p50_ms", "host_p99_ms", "host_share", "gpu_gap_p50_ms",
    "gpu_gap_p99_ms", "gpu_gap_decode_ratio", "iterations", "iterations_prefill", "iterations_decode",
    "iterations_mixed")
_INT_COLUMNS = ("requests", "requests_finished", "requests_cut", "requests_refused", "prompt_tokens",
                "output_tokens", *(f"{n}_n" for n in LATENCY_NAMES), "preemptions", "preemptions_recompute",
                "preemptions_swap", "iterations", "iterations_prefill", "iterations_decode", "iterations_mixed")


def serve_settings(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `serve` entry of a run's metadata ({} where there is none)."""
    serve = (meta or {}).get("serve")
    return serve if isinstance(serve, Mapping) else {}


def setting_number(serve: Mapping[str, Any], key: str) -> float:
    """A numeric setting as a float; NaN where absent, null or not a number."""
    v = serve.get(key)
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _floats(df: pd.DataFrame, col: str) -> np.ndarray:
    return pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64, na_value=np.nan)


def finished(requests: pd.DataFrame) -> pd.DataFrame:
    return requests[(requests["status"].astype("string") == "finished").fillna(False).to_numpy(bool)]


def tpot_samples(requests: pd.DataFrame) -> np.ndarray:
    """(e2e - ttft) / (generated - 1) of every finished request of two generated tokens or more."""
    done = finished(requests)
    gen = _floats(done, "generated_tokens")
    ok = gen >= 2
    return ((_floats(done, "e2e_ms") - _floats(done, "ttft_ms"))[ok] / (gen[ok] - 1))


def _as_list(cell: object) -> list[Any]:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return []
    return list(cell)  # type: ignore[call-overload]


def itl_samples(requests: pd.DataFrame) -> np.ndarray:
    """Every inter-token gap (ms) of the finished requests, pooled."""
    gaps = [g for cell in finished(requests)["itl_ms"] for g in _as_list(cell)]
    return np.asarray(gaps, dtype=np.float64)


def percentile_row(name: str, samples: np.ndarray) -> dict[str, float | int]:
    """`<name>_p50_ms`, `_p90_ms`, `_p99_ms` (gated) and `<name>_n` (finite samples)."""
    arr = np.asarray(samples, dtype=np.float64)
    row: dict[str, float | int] = {f"{name}_p{q}_ms": percentile(arr, q) for q in LATENCY_PERCENTILES}
    row[f"{name}_n"] = int(np.isfinite(arr).sum())
    return row


def in_system(arrival_s: np.ndarray, finish_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The step function of the requests in the system: (times, count from each time to the next), the requests
    given by their arrival and finish (finite pairs only). The last count is 0."""
    ok = np.isfinite(arrival_s) & np.isfinite(finish_s)
    times = np.concatenate([arrival_s[ok], finish_s[ok]])
    deltas = np.concatenate([np.ones(int(ok.sum())), -np.ones(int(ok.sum()))])
    order = np.lexsort((deltas, times))  # at one instant the leaving requests first
    return times[order], np.cumsum(deltas[order])


def time_average(times: np.ndarray, counts: np.ndarray, start: float, end: float) -> float:
    """The exact time average over [start, end] of the step function (counts[i] from times[i] to times[i + 1])."""
    if not (end > start) or not len(times):
        return math.nan
    edges = np.clip(np.append(times, end), start, end)
    return float(np.sum(counts * np.diff(edges)) / (end - start))


def _span(requests: pd.DataFrame) -> dict[str, float]:
    arrival, finish = _floats(requests, "arrival_s"), _floats(requests, "finish_s")
    a, f = arrival[np.isfinite(arrival)], finish[np.isfinite(finish)]
    first, last_arrival = (float(a.min()), float(a.max())) if len(a) else (math.nan, math.nan)
    last_finish = float(f.max()) if len(f) else math.nan
    span = last_arrival - first
    return {"first_s": first, "last_finish_s": last_finish, "duration_s": last_finish - first,
            "arrival_span_s": span, "drain_s": last_finish - last_arrival,
            "offered_rps": (len(a) - 1) / span if len(a) >= 2 and span > 0 else math.nan}


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.nan


def _little(requests: pd.DataFrame, span: dict[str, float]) -> dict[str, float]:
    arrival, finish = _floats(requests, "arrival_s"), _floats(requests, "finish_s")
    ok = np.isfinite(arrival) & np.isfinite(finish)
    times, counts = in_system(arrival, finish)
    mean_l = time_average(times, counts, span["first_s"], span["last_finish_s"])
    w = float(np.mean(finish[ok] - arrival[ok])) if ok.any() else math.nan
    predicted = span["offered_rps"] * w
    start, end = span["first_s"] + w, span["first_s"] + span["arrival_span_s"]  # the steady window
    length, steady = end - start, math.nan
    arrived = int(np.count_nonzero((arrival >= start) & (arrival < end))) if length > 0 else 0  # [start, end)
    if arrived >= 2:
        steady = time_average(times, counts, start, end) / (arrived / length * w)
    return {"mean_in_system": mean_l, "mean_time_in_system_s": w, "little_predicted": predicted,
            "little_ratio": mean_l / predicted if predicted > 0 else math.nan,
            "little_steady_s": length if length > 0 else math.nan, "little_steady_ratio": steady}


def _goodput(requests: pd.DataFrame, serve: Mapping[str, Any], duration_s: float) -> dict[str, float]:
    slo_ttft, slo_tpot = setting_number(serve, "slo_ttft_ms"), setting_number(serve, "slo_tpot_ms")
    if math.isnan(slo_ttft) and math.isnan(slo_tpot):
        return {"goodput_rps": math.nan, "goodput_fraction": math.nan, "goodput_requests": math.nan}
    done = finished(requests)
    meets = np.ones(len(done), dtype=bool)
    if not math.isnan(slo_ttft):
        meets &= _floats(done, "ttft_ms") <= slo_ttft
    if not math.isnan(slo_tpot):
        gen = _floats(done, "generated_tokens")
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = (_floats(done, "e2e_ms") - _floats(done, "ttft_ms")) / (gen - 1)
        meets &= (gen < 2) | (tpot <= slo_tpot)
    good = int(meets.sum())
    return {"goodput_rps": _rate(good, duration_s), "goodput_fraction": good / len(requests) if len(requests) else
            math.nan,
            "goodput_requests": float(good)}


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    ok = np.isfinite(values) & np.isfinite(weights)
    w = weights[ok]
    if not ok.any():
        return math.nan
    if not w.sum() > 0:
        return float(np.mean(values[ok]))
    return float(np.sum(values[ok] * w) / w.sum())


def _ratio_of_sums(num: np.ndarray, den: np.ndarray) -> float:
    ok = np.isfinite(num) & np.isfinite(den)
    total = float(den[ok].sum())
    return float(num[ok].sum()) / total if total > 0 else math.nan


def iteration_columns(iterations: pd.DataFrame) -> dict[str, float | int]:
    """The columns computed from iterations.parquet (see the module docstring); NaN / 0 without iterations."""
    it = iterations
    dur, host, gap = _floats(it, "dur_ms"), _floats(it, "host_ms"), _floats(it, "gpu_gap_ms")
    kind = it["kind"].astype("string").fillna("")
    decode = (kind == "decode").to_numpy(bool)
    used, held = _floats(it, "token_slots_used"), _floats(it, "block_slots_held")
    blocks, free = _floats(it, "blocks_used"), _floats(it, "blocks_free")
    slot_use = _ratio_of_sums(used * dur, held * dur) if np.nansum(dur) > 0 else _ratio_of_sums(used, held)
    return {
        "mean_running": _weighted_mean(_floats(it, "running"), dur),
        "mean_waiting": _weighted_mean(_floats(it, "waiting"), dur),
        "kv_blocks_peak": float(np.nanmax(blocks)) if np.isfinite(blocks).any() else math.nan,
        "kv_blocks_total": float(np.nanmax(blocks + free)) if np.isfinite(blocks + free).any() else math.nan,
        "kv_slot_use_frac": slot_use, "kv_fragmentation_frac": 1 - slot_use,
        "host_p50_ms": percentile(host, 50), "host_p99_ms": percentile(host, 99),
        "host_share": _ratio_of_sums(host, host + dur),
        "gpu_gap_p50_ms": percentile(gap, 50), "gpu_gap_p99_ms": percentile(gap, 99),
        "gpu_gap_decode_ratio": _ratio_of_sums(gap[decode & np.isfinite(gap)], dur[decode & np.isfinite(gap)]),
        "iterations": len(it), **{f"iterations_{k}": int((kind == k).sum()) for k in ("prefill", "decode", "mixed")},
    }


def serve_summary(requests: pd.DataFrame, iterations: pd.DataFrame, meta: Mapping[str, Any] | None) -> pd.DataFrame:
    """The one summary row of a served load (columns SERVE_SUMMARY_COLUMNS, see the module docstring) from the
    requests and iterations frames (columns of schema.REQUEST_COLUMNS and ITERATION_COLUMNS) and the run's metadata.
    Works on empty frames (NaN and zeros)."""
    serve = serve_settings(meta)
    status = requests["status"].astype("string").fillna("")
    span = _span(requests)
    done = finished(requests)
    gen = _floats(requests, "generated_tokens")
    produced = np.nan_to_num(gen) > 0
    prompt = int(np.nansum(_floats(requests, "prompt_tokens")[produced]))
    output = int(np.nansum(gen))
    duration = span["duration_s"]
    row: dict[str, Any] = {
        **{k: serve.get(k) if k in ("policy", "preempt") else setting_number(serve, k)
           for k in SETTING_COLUMNS if k != "offered_rps"},
        "offered_rps": span["offered_rps"], "requests": len(requests),
        **{f"requests_{s}": int((status == s).sum()) for s in ("finished", "cut", "refused")},
        "duration_s": duration, "arrival_span_s": span["arrival_span_s"], "drain_s": span["drain_s"],
        "requests_per_s": _rate(len(done), duration), "prompt_tokens": prompt, "output_tokens": output,
        "output_tok_s": _rate(output, duration), "total_tok_s": _rate(prompt + output, duration),
        **_goodput(requests, serve, duration),
        **percentile_row("ttft", _floats(done, "ttft_ms")), **percentile_row("tpot", tpot_samples(requests)),
        **percentile_row("itl", itl_samples(requests)), **percentile_row("e2e", _floats(done, "e2e_ms")),
        **percentile_row("queue", _floats(done, "queue_ms")),
        **_little(requests, span),
        **{f"preemptions{k}": int(np.nansum(_floats(requests, c))) for k, c in (
            ("", "preemptions"), ("_recompute", "preempt_recompute"), ("_swap", "preempt_swap"))},
        **iteration_columns(iterations),
    }
    df = pd.DataFrame([row], columns=list(SERVE_SUMMARY_COLUMNS))
    for col in _INT_COLUMNS:
        df[col] = df[col].astype("int64")
    df["policy"] = df["policy"].astype(object)
    df["preempt"] = df["preempt"].astype(object)
    return df

