"""The "why" of a served load: sentences computed from its summary row, its iterations and its interference table
(and of a serve sweep, from its rows), each with the numbers it used (`Finding`, as `kvscope.analysis.explain`), or
what it lacks.

Run findings (`explain_run`):
- `littles_law`: whether the measured mean number of requests in the system matches arrival rate x mean time in
  the system within `LITTLE_TOLERANCE`; when it does not, the drain after the last arrival says why (a queue that
  outlived the arrivals: the load was not in a steady state);
- `prefill_interference`: whether iterations carrying prefill tokens set the tail of the inter-token gaps (more than
  `TAIL_DOMINANCE` of the gaps at or above the pooled ITL p99 came from them), with the ratio of their ITL to the
  decode-only iterations';
- `kv_limit`: of the iterations after which requests waited, the share in which each limit held the head of the
  queue back: KV memory (fewer free blocks than its prompt needs), the token budget, the sequence cap, swapped
  requests coming back first; the limit of most of them (`MEMORY_BOUND_SHARE`) is named;
- `preemptions`: how many, by mode, per finished request;
- `scheduler_host`: the scheduler's host share of the iteration time (host-bound above `HOST_SHARE_FLAG`) and the
  GPU's gap between decode-only iterations.

Sweep findings (`explain_sweep`): `knee` per policy: along the load axis (`rps`, else `concurrency`), the last point
whose TTFT (p99, else p90, else p50: the first with a value at every point) stays within `KNEE_FACTOR` of the
lightest load's, and the point after it, with the completed rate against the offered one there (`knee_points`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.explain import Finding
from kvscope.analysis.serving.summary import serve_settings, setting_number

LITTLE_TOLERANCE = 0.05  # |ratio - 1| within this: Little's law holds
TAIL_DOMINANCE = 0.5  # share of the gaps at or above the ITL p99 from with-prefill iterations: above it they dominate
HOST_SHARE_FLAG = 0.10  # scheduler host time over (host + iteration) above which the loop is host-bound
MEMORY_BOUND_SHARE = 0.5  # share of the waiting iterations held back by one limit from which it is named
KNEE_FACTOR = 2.0  # a TTFT more than this many times the lightest load's is past the knee
KNEE_METRICS = ("ttft_p99_ms", "ttft_p90_ms", "ttft_p50_ms")
RUN_FINDING_COLUMNS = ("finding", "sentence", "values", "missing")
SWEEP_FINDING_COLUMNS = ("policy", "finding", "sentence", "values", "missing")
KNEE_COLUMNS = ("policy", "axis", "metric", "base_x", "base_value", "knee_x", "knee_value", "next_x", "next_value",
                "next_offered_rps", "next_requests_per_s")


def _num(row: Mapping[str, Any], key: str) -> float:
    v = row.get(key, math.nan)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%" if abs(x) >= 0.1 else f"{x * 100:.1f}%"


def _ms(x: float) -> str:
    return f"{x:,.2f} ms" if x < 100 else f"{x:,.0f} ms"


def little_finding(row: Mapping[str, Any]) -> Finding:
    name = "littles_law"
    ratio, l_meas, l_pred = (_num(row, k) for k in ("little_ratio", "mean_in_system", "little_predicted"))
    if not math.isfinite(ratio):
        return Finding(name, missing="needs two arrivals or more and finished requests (little_ratio is NaN)")
    vals: dict[str, float | int | str] = {"mean_in_system": l_meas, "little_predicted": l_pred, "little_ratio": ratio,
                                          "offered_rps": _num(row, "offered_rps"),
                                          "mean_time_in_system_s": _num(row, "mean_time_in_system_s")}
    head = (f"measured mean requests in the system {l_meas:,.2f} against arrival rate x mean time in the system "
            f"{_num(row, 'offered_rps'):,.2f}/s x {_num(row, 'mean_time_in_system_s'):,.3f} s = {l_pred:,.2f} "
            f"(ratio {ratio:.3f})")
    if abs(ratio - 1) <= LITTLE_TOLERANCE:
        return Finding(name, f"Little's law holds within {LITTLE_TOLERANCE:.0%}: {head}; the load was in a steady "
                             "state and its latencies can be read as the system's.", vals)
    drain, duration = _num(row, "drain_s"), _num(row, "duration_s")
    steady, window = _num(row, "little_steady_ratio"), _num(row, "little_steady_s")
    vals.update({"drain_s": drain, "duration_s": duration, "little_steady_ratio": steady, "little_steady_s": window})
    if math.isfinite(steady) and abs(steady - 1) <= LITTLE_TOLERANCE:
        return Finding(name, f"Little's law holds within {LITTLE_TOLERANCE:.0%} over the steady window "
                             f"({window:,.2f} s from the first arrival plus the mean time in the system to the last "
                             f"arrival: ratio {steady:.3f}), not over the whole run: {head}; the ramp and the "
                             f"{drain:,.2f} s drain are a large part of a run this short.", vals)
    why = (f"the run spent {drain:,.2f} s ({_pct(drain / duration)} of its {duration:,.2f} s) draining after the last "
           "arrival: a queue outlived the arrivals, the load was not in a steady state (overloaded, or too short for "
           "its latency)") if ratio < 1 and duration > 0 else (
           "more requests stayed in the system than the arrival rate and latencies explain (bursty arrivals, or "
           "requests cut or refused whose time is not in the mean)")
    return Finding(name, f"Little's law does not hold within {LITTLE_TOLERANCE:.0%}: {head}; {why}.", vals)


def interference_finding(interf: pd.DataFrame | None, row: Mapping[str, Any]) -> Finding:
    """From the interference table (`kvscope.analysis.serving.interference`): whether the gaps that span an iteration
    with prefill tokens set the ITL tail (their share of the gaps at or above the pooled p99)."""
    name = "prefill_interference"
    if interf is None or not len(interf):
        return Finding(name, missing="needs the interference table (batches.parquet and token_iterations)")
    by = interf.set_index("iteration_class")
    if not {"decode-only", "with-prefill"} <= set(by.index):
        return Finding(name, missing="needs the decode-only and with-prefill rows of the interference table")
    dec, mix = by.loc["decode-only"], by.loc["with-prefill"]
    if not (dec["itl_n"] > 0 and mix["itl_n"] > 0):
        return Finding(name, missing="needs inter-token gaps both with and without a prefill in them")
    gaps = float(dec["itl_n"] + mix["itl_n"])
    vals: dict[str, float | int | str] = {
        "policy": str(interf["policy"].iloc[0]), "itl_p50_ratio": float(mix["itl_p50_ratio"]),
        "itl_p99_ratio": float(mix["itl_p99_ratio"]), "with_prefill_gap_share": float(mix["itl_n"]) / gaps,
        "itl_tail_share": float(mix["itl_tail_share"]), "itl_p99_ms": _num(row, "itl_p99_ms")}
    ratios = (f"such gaps are {vals['itl_p50_ratio']:.2f}x the others at p50"
              + (f" and {vals['itl_p99_ratio']:.2f}x at p99" if math.isfinite(float(vals["itl_p99_ratio"])) else ""))
    spans = f"span an iteration with prefill tokens ({_pct(float(vals['with_prefill_gap_share']))} of all gaps)"
    share = float(vals["itl_tail_share"])
    if not math.isfinite(share):
        return Finding(name, f"Under {vals['policy']} the inter-token gaps that {spans}: {ratios}; too few gaps (p99 "
                             "needs 100) to say what sets the tail.", vals)
    verdict = "dominates" if share > TAIL_DOMINANCE else "does not dominate"
    return Finding(name, f"Prefill interference {verdict} the inter-token tail under {vals['policy']}: {_pct(share)} "
                         f"of the gaps at or above the ITL p99 ({_ms(float(vals['itl_p99_ms']))}) {spans}; "
                         f"{ratios}.", vals)


def waiting_heads(iterations: pd.DataFrame, requests: pd.DataFrame | None) -> np.ndarray:
    """The prompt tokens of the request at the head of the queue after each iteration was planned: the earliest
    arrival not yet admitted at the iteration's start (NaN where none is known, or without `requests`)."""
    out = np.full(len(iterations), math.nan)
    if requests is None or not len(requests):
        return out
    arrival = pd.to_numeric(requests["arrival_s"], errors="coerce").to_numpy(np.float64)
    admitted = pd.to_numeric(requests["admitted_s"], errors="coerce").to_numpy(np.float64)
    prompt = pd.to_numeric(requests["prompt_tokens"], errors="coerce").to_numpy(np.float64)
    served = (requests["status"].astype("string") != "refused").fillna(True).to_numpy(bool)
    order = np.argsort(arrival, kind="stable")
    arrival, admitted, prompt, served = arrival[order], admitted[order], prompt[order], served[order]
    starts = pd.to_numeric(iterations["start_s"], errors="coerce").to_numpy(np.float64)
    for i, s in enumerate(starts):
        queued = served & (arrival <= s) & ~(admitted <= s)
        hit = np.flatnonzero(queued)
        if len(hit):
            out[i] = prompt[hit[0]]
    return out


def _limits(iterations: pd.DataFrame, meta: Mapping[str, Any] | None, requests: pd.DataFrame | None
            ) -> dict[str, np.ndarray]:
    """For every iteration, whether each limit held the head of the queue back (see kv_limit_finding)."""
    serve = serve_settings(meta)
    col = {c: pd.to_numeric(iterations[c], errors="coerce").to_numpy(np.float64)
           for c in ("blocks_free", "tokens", "prefill_tokens", "running", "swapped")}
    block, budget, seqs = (setting_number(serve, k) for k in ("block_size", "max_batch_tokens", "max_seqs"))
    head = waiting_heads(iterations, requests)
    need = np.where(np.isfinite(head), head, 1.0)  # tokens the head must be admitted with
    whole = serve.get("policy") == "prefill-first"
    blocks_needed = np.ceil(need / block) if block > 0 else np.ones_like(need)
    with np.errstate(invalid="ignore"):
        budget_full = ((col["prefill_tokens"] > 0) & (col["tokens"] + need > budget) if whole
                       else col["tokens"] >= budget)
        return {"memory": col["blocks_free"] < blocks_needed, "budget": budget_full & (budget > 0),
                "max_seqs": (col["running"] >= seqs) & (seqs > 0), "swapped": col["swapped"] > 0}


_LIMIT_WORDS = {"memory": "KV memory (too few free blocks for the next request)",
                "budget": "the token budget (max_batch_tokens)", "max_seqs": "the sequence cap (max_seqs)",
                "swapped": "swapped requests coming back first"}


def kv_limit_finding(iterations: pd.DataFrame, meta: Mapping[str, Any] | None,
                     requests: pd.DataFrame | None = None) -> Finding:
    """Of the iterations after which requests waited, the share held back by each limit: KV memory (the free blocks
    fewer than the head of the queue's prompt needs; without `requests`, no block free), the token budget (under
    prefill-first the head's whole prompt does not fit what the iteration left of it; under chunked, the budget is
    used up), the sequence cap, swapped requests (they come back first)."""
    name = "kv_limit"
    if not len(iterations):
        return Finding(name, missing="needs iterations")
    wait = pd.to_numeric(iterations["waiting"], errors="coerce").fillna(0).to_numpy(np.float64) > 0
    n, n_wait = len(iterations), int(wait.sum())
    vals: dict[str, float | int | str] = {"iterations": n, "iterations_waiting": n_wait}
    if n_wait == 0:
        return Finding(name, f"No request waited in any of the {n:,} iterations: neither KV memory nor the token "
                             "budget limited concurrency.", vals)
    shares = {k: float(v[wait].mean()) for k, v in _limits(iterations, meta, requests).items()}
    free = pd.to_numeric(iterations["blocks_free"], errors="coerce").to_numpy(np.float64)[wait]
    vals.update({f"{k}_share": v for k, v in shares.items()} | {"median_blocks_free": float(np.nanmedian(free))})
    said = ", ".join(f"{_LIMIT_WORDS[k].split(' (')[0]} in {_pct(v)}" for k, v in shares.items() if v > 0)
    head = (f"Requests waited after {n_wait:,} of {n:,} iterations (median {vals['median_blocks_free']:,.0f} KV blocks "
            f"free then); what held the head of the queue back: {said or 'none of the limits'}")
    top = max(shares, key=lambda k: shares[k])
    if shares[top] >= MEMORY_BOUND_SHARE:
        verdict = f"{_LIMIT_WORDS[top]} limited concurrency"
        if top != "memory":
            verdict += ", not KV memory" if shares["memory"] < MEMORY_BOUND_SHARE else ", and KV memory too"
    else:
        verdict = "no one limit held the queue back most of the time"
    return Finding(name, f"{head}: {verdict}.", vals)


def preemption_finding(row: Mapping[str, Any]) -> Finding:
    name = "preemptions"
    total, rec, swap = (_num(row, k) for k in ("preemptions", "preemptions_recompute", "preemptions_swap"))
    if not math.isfinite(total):
        return Finding(name, missing="needs the preemption counts")
    done = _num(row, "requests_finished")
    vals: dict[str, float | int | str] = {"preemptions": total, "recompute": rec, "swap": swap}
    if total == 0:
        return Finding(name, "No request was preempted: the KV pool held every admitted request to its end.", vals)
    per = total / done if done > 0 else math.nan
    vals["per_finished_request"] = per
    return Finding(name, f"{total:,.0f} preemptions ({rec:,.0f} by recompute, {swap:,.0f} by swap; {per:,.2f} per "
                         "finished request): the KV pool ran out of blocks for the running requests, and each "
                         "preempted request paid again for its prefill (recompute) or its copies (swap).", vals)


def scheduler_finding(row: Mapping[str, Any]) -> Finding:
    name = "scheduler_host"
    share = _num(row, "host_share")
    if not math.isfinite(share):
        return Finding(name, missing="needs host_ms of the iterations")
    vals: dict[str, float | int | str] = {"host_share": share, "host_p50_ms": _num(row, "host_p50_ms"),
                                          "host_p99_ms": _num(row, "host_p99_ms"),
                                          "gpu_gap_decode_ratio": _num(row, "gpu_gap_decode_ratio")}
    verdict = ("the loop is host-bound: the GPU waits for the plan" if share > HOST_SHARE_FLAG else
               "small against the iterations")
    sentence = (f"The scheduler's host time is {_pct(share)} of host + iteration time (median "
                f"{_ms(float(vals['host_p50_ms']))} per iteration): {verdict}")
    gap = float(vals["gpu_gap_decode_ratio"])
    if math.isfinite(gap):
        sentence += f"; between decode-only iterations the GPU idles {_pct(gap)} of their duration"
    return Finding(name, sentence + ".", vals)


def explain_run(summary: pd.DataFrame, iterations: pd.DataFrame, interference: pd.DataFrame | None,
                meta: Mapping[str, Any] | None, requests: pd.DataFrame | None = None) -> pd.DataFrame:
    """The run's findings (see the module docstring), columns RUN_FINDING_COLUMNS; `requests` tells the
    `kv_limit` finding the prompt at the head of the queue."""
    row = summary.iloc[0].to_dict()
    found = [little_finding(row), interference_finding(interference, row), kv_limit_finding(iterations, meta, requests),
             preemption_finding(row), scheduler_finding(row)]
    return pd.DataFrame([(f.finding, f.sentence, f.values, f.missing) for f in found],
                        columns=list(RUN_FINDING_COLUMNS))


def load_axis(sweep: pd.DataFrame) -> str:
    """The sweep's load axis: `rps` where any row has one, else `concurrency`."""
    rps = pd.to_numeric(sweep["rps"], errors="coerce") if "rps" in sweep.columns else pd.Series(dtype=float)
    return "rps" if rps.notna().any() else "concurrency"


def _knee_metric(rows: pd.DataFrame) -> str | None:
    for m in KNEE_METRICS:
        if m in rows.columns and pd.to_numeric(rows[m], errors="coerce").notna().all():
            return m
    return None


def knee_points(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per policy with two load points or more: the knee (KNEE_COLUMNS; `next_x` NaN where no point passes
    KNEE_FACTOR times the lightest load's TTFT, `metric` empty where no TTFT has a value at every point)."""
    axis = load_axis(sweep)
    out = []
    for policy, g in sweep.groupby("policy", sort=False):
        g = g[pd.to_numeric(g[axis], errors="coerce").notna()].sort_values(axis)
        if len(g) < 2:
            continue
        metric = _knee_metric(g)
        x = pd.to_numeric(g[axis]).to_numpy(np.float64)
        rec = dict.fromkeys(KNEE_COLUMNS, math.nan) | {"policy": policy, "axis": axis, "metric": metric or ""}
        if metric is not None:
            y = pd.to_numeric(g[metric]).to_numpy(np.float64)
            over = np.flatnonzero(y > KNEE_FACTOR * y[0])
            k = int(over[0]) - 1 if len(over) else len(y) - 1
            rec.update(base_x=x[0], base_value=y[0], knee_x=x[max(k, 0)], knee_value=y[max(k, 0)])
            if len(over):
                j = int(over[0])
                rec.update(next_x=x[j], next_value=y[j],
                           next_offered_rps=_num(g.iloc[j].to_dict(), "offered_rps"),
                           next_requests_per_s=_num(g.iloc[j].to_dict(), "requests_per_s"))
        out.append(rec)
    return pd.DataFrame(out, columns=list(KNEE_COLUMNS))


def knee_finding(k: Mapping[str, Any]) -> Finding:
    name = "knee"
    if not k["metric"]:
        return Finding(name, missing=f"needs one of {', '.join(KNEE_METRICS)} at every point")
    unit = " rps" if k["axis"] == "rps" else " in flight"
    what = "TTFT " + str(k["metric"]).split("_")[1]
    vals = {c: (float(k[c]) if c not in ("policy", "axis", "metric") else str(k[c])) for c in KNEE_COLUMNS}
    if not math.isfinite(k["next_x"]):
        return Finding(name, f"Under {k['policy']} no knee within the sweep: {what} stays within {KNEE_FACTOR:g}x of "
                             f"its {k['base_x']:g}{unit} value ({_ms(k['base_value'])}) up to {k['knee_x']:g}{unit} "
                             f"({_ms(k['knee_value'])}).", vals)
    tail = ""
    if math.isfinite(k["next_offered_rps"]) and math.isfinite(k["next_requests_per_s"]) and k["next_offered_rps"] > 0:
        tail = (f", where {k['next_requests_per_s']:,.2f} requests/s complete against {k['next_offered_rps']:,.2f}/s "
                f"offered ({_pct(k['next_requests_per_s'] / k['next_offered_rps'])})")
    at_knee = (f"is {_ms(k['knee_value'])} at the lightest load, {k['knee_x']:g}{unit}," if k["knee_x"] == k["base_x"]
               else f"is {_ms(k['knee_value'])} at {k['knee_x']:g}{unit} (within {KNEE_FACTOR:g}x of "
                    f"{_ms(k['base_value'])} at {k['base_x']:g}{unit})")
    return Finding(name, f"Under {k['policy']} the knee lies between {k['knee_x']:g} and {k['next_x']:g}{unit}: {what} "
                         f"{at_knee} and {_ms(k['next_value'])} ({k['next_value'] / k['base_value']:.1f}x) at "
                         f"{k['next_x']:g}{unit}{tail}.", vals)


def explain_sweep(sweep: pd.DataFrame) -> pd.DataFrame:
    """The sweep's findings per policy (the knee), columns SWEEP_FINDING_COLUMNS."""
    rows = []
    for k in knee_points(sweep).to_dict("records"):
        f = knee_finding(k)
        rows.append((k["policy"], f.finding, f.sentence, f.values, f.missing))
    return pd.DataFrame(rows, columns=list(SWEEP_FINDING_COLUMNS))
