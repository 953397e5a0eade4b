"""Prefill interference: how much slower a decode token comes out of an iteration that also carries prefill tokens.

Each decode token is seen two ways:
- `step`: the duration (`dur_ms`) of the iteration that produced it, one sample per decode row of batches.parquet
  (each running request's decode in an iteration);
- `itl`: its inter-token gap, matched through the request's `token_iterations`: output token k (k >= 1) was produced
  by iteration `token_iterations[k]`, token k - 1 by `token_iterations[k - 1]`, and the gap between them is
  `itl_ms[k - 1]`.

An iteration is `with-prefill` when its `prefill_tokens` > 0 (kind `prefill` or `mixed`), else `decode-only`; a
step sample takes the class of its iteration. A gap is `with-prefill` when any iteration it spans (after the one that
produced the earlier token, up to the later token's own) carried prefill tokens: under chunked prefill the later
token's iteration is mixed; under prefill-first the prefills run in iterations of their own, between two decode
iterations, and stall the decode tokens there (such iterations carry no decode token, so that policy's with-prefill
row has gaps but no step samples). The binned table bins a gap by the prefill tokens it spans.

`interference` (per policy, from `meta["serve"]["policy"]`, and iteration class; columns INTERFERENCE_COLUMNS):
`iterations` (of the class that carried decode tokens), `decode_tokens`, `step_p50_ms` .. `step_p99_ms`, `itl_n`,
`itl_p50_ms` .. `itl_p99_ms` (gated percentiles: p90 from 10 samples, p99 from 100), `mean_prefill_tokens` (over
those iterations), `itl_tail_share` (of the policy's gaps at or above its pooled ITL p99, the share in this class;
NaN below 100 gaps) and the policy's ratios with-prefill / decode-only `step_p50_ratio`, `step_p99_ratio`,
`itl_p50_ratio`, `itl_p99_ratio` (the same on both of its rows).

`interference_by_prefill`: the same samples binned by the prefill tokens of their iteration (PREFILL_BIN_EDGES: 0,
1-256, 257-1024, 1025-4096, 4097-16384, more), each bin's p50s also as a ratio to the bin without prefill.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.serving.summary import percentile_row, serve_settings
from kvscope.analysis.summary import percentile

DECODE_ONLY = "decode-only"
WITH_PREFILL = "with-prefill"
ITERATION_CLASSES = (DECODE_ONLY, WITH_PREFILL)
PREFILL_BIN_EDGES = (0, 256, 1024, 4096, 16384)  # bins: 0, 1-256, 257-1024, 1025-4096, 4097-16384, 16385 and more
_STATS = ("iterations", "decode_tokens", "step_p50_ms", "step_p90_ms", "step_p99_ms", "itl_n", "itl_p50_ms",
          "itl_p90_ms", "itl_p99_ms", "mean_prefill_tokens")
INTERFERENCE_COLUMNS = ("policy", "iteration_class", *_STATS, "itl_tail_share", "step_p50_ratio", "step_p99_ratio",
                        "itl_p50_ratio", "itl_p99_ratio")
BINNED_COLUMNS = ("policy", "prefill_bin", "bin_lo", "bin_hi", *_STATS, "step_p50_ratio", "itl_p50_ratio")


def _iteration_facts(iterations: pd.DataFrame) -> pd.DataFrame:
    it = pd.DataFrame({"iteration": iterations["iteration"].to_numpy(),
                       "dur_ms": pd.to_numeric(iterations["dur_ms"], errors="coerce").to_numpy(np.float64),
                       "prefill_tokens": pd.to_numeric(iterations["prefill_tokens"], errors="coerce")
                       .fillna(0).to_numpy(np.float64)})
    it["iteration_class"] = np.where(it["prefill_tokens"] > 0, WITH_PREFILL, DECODE_ONLY)
    return it


def step_samples(batches: pd.DataFrame, iterations: pd.DataFrame) -> pd.DataFrame:
    """One row per decode row of `batches`: iteration, request_id, tokens, step_ms (its iteration's dur_ms),
    prefill_tokens and iteration_class of that iteration."""
    dec = batches[(batches["kind"].astype("string") == "decode").fillna(False).to_numpy(bool)]
    dec = dec[["iteration", "request_id", "tokens"]]
    out = dec.merge(_iteration_facts(iterations), on="iteration", how="inner")
    return out.rename(columns={"dur_ms": "step_ms"})


def _cells(cell: object) -> list[Any]:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return []
    return list(cell)  # type: ignore[call-overload]


def itl_samples_by_iteration(requests: pd.DataFrame, iterations: pd.DataFrame) -> pd.DataFrame:
    """One row per inter-token gap: request_id, iteration (that produced the later token), itl_ms, prefill_tokens
    (summed over the iterations of the gap: after the one that produced the earlier token, up to the later token's)
    and iteration_class (with-prefill when that sum is > 0). Gaps whose later token's iteration is not in
    `iterations` are left out."""
    ids, prev, its, gaps = [], [], [], []
    for rid, token_its, itl in zip(requests["request_id"], requests["token_iterations"], requests["itl_ms"],
                                   strict=True):
        token_its, itl = _cells(token_its), _cells(itl)
        n = min(len(token_its) - 1, len(itl))
        ids += [rid] * max(n, 0)
        prev += token_its[:n]
        its += token_its[1:n + 1]
        gaps += itl[:n]
    facts = _iteration_facts(iterations).sort_values("iteration")
    known = facts["iteration"].to_numpy(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(facts["prefill_tokens"].to_numpy(np.float64))])

    def through(values: list[Any]) -> np.ndarray:  # prefill tokens of the iterations numbered <= each value
        return cum[np.searchsorted(known, np.asarray(values, dtype=np.float64), side="right")]

    prefill = through(its) - through(prev)
    raw = pd.DataFrame({"request_id": pd.Series(ids, dtype=requests["request_id"].dtype),
                        "iteration": pd.Series(its, dtype=iterations["iteration"].dtype),
                        "itl_ms": np.asarray(gaps, dtype=np.float64), "prefill_tokens": prefill})
    raw["iteration_class"] = np.where(prefill > 0, WITH_PREFILL, DECODE_ONLY)
    return raw[raw["iteration"].isin(facts["iteration"])].reset_index(drop=True)


def _stats(steps: pd.DataFrame, gaps: pd.DataFrame) -> dict[str, Any]:
    step = percentile_row("step", steps["step_ms"].to_numpy())
    per_iteration = steps.drop_duplicates("iteration")
    return {"iterations": len(per_iteration), "decode_tokens": int(steps["tokens"].sum()),
            **{k: step[k] for k in ("step_p50_ms", "step_p90_ms", "step_p99_ms")},
            **percentile_row("itl", gaps["itl_ms"].to_numpy()),
            "mean_prefill_tokens": float(per_iteration["prefill_tokens"].mean()) if len(per_iteration) else math.nan}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else math.nan


def interference(batches: pd.DataFrame, iterations: pd.DataFrame, requests: pd.DataFrame,
                 meta: Mapping[str, Any] | None) -> pd.DataFrame:
    """Decode-token latency in decode-only iterations against iterations with prefill tokens (see the module
    docstring): one row per iteration class, columns INTERFERENCE_COLUMNS."""
    policy = serve_settings(meta).get("policy")
    steps, gaps = step_samples(batches, iterations), itl_samples_by_iteration(requests, iterations)
    threshold = percentile(gaps["itl_ms"].to_numpy(), 99)
    tail = gaps["itl_ms"] >= threshold if not math.isnan(threshold) else pd.Series(False, index=gaps.index)
    rows = []
    for cls in ITERATION_CLASSES:
        s, g = steps[steps["iteration_class"] == cls], gaps[gaps["iteration_class"] == cls]
        share = float((tail & (gaps["iteration_class"] == cls)).sum() / tail.sum()) if tail.sum() else math.nan
        rows.append({"policy": policy, "iteration_class": cls, **_stats(s, g), "itl_tail_share": share})
    df = pd.DataFrame(rows)
    base, mixed = df.iloc[0], df.iloc[1]
    for what, q in (("step", 50), ("step", 99), ("itl", 50), ("itl", 99)):
        df[f"{what}_p{q}_ratio"] = _ratio(mixed[f"{what}_p{q}_ms"], base[f"{what}_p{q}_ms"])
    return df[list(INTERFERENCE_COLUMNS)]


def prefill_bins(prefill_tokens: np.ndarray) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """(the bin of each value, [(label, lo, hi)] of every bin): 0, then (edge_i, edge_i+1] in PREFILL_BIN_EDGES, then
    above the last edge (hi inf)."""
    bins = [("0", 0.0, 0.0)]
    for lo, hi in itertools.pairwise(PREFILL_BIN_EDGES):
        bins.append((f"{lo + 1}-{hi}", float(lo + 1), float(hi)))
    bins.append((f"{PREFILL_BIN_EDGES[-1] + 1}+", float(PREFILL_BIN_EDGES[-1] + 1), math.inf))
    which = np.searchsorted(np.asarray(PREFILL_BIN_EDGES, dtype=np.float64), prefill_tokens, side="left")
    which = np.where(prefill_tokens <= 0, 0, which)
    return which, bins


def interference_by_prefill(batches: pd.DataFrame, iterations: pd.DataFrame, requests: pd.DataFrame,
                            meta: Mapping[str, Any] | None) -> pd.DataFrame:
    """Decode-token latency by the prefill tokens of the iteration that produced it (see the module docstring):
    one row per bin holding samples, columns BINNED_COLUMNS."""
    policy = serve_settings(meta).get("policy")
    steps, gaps = step_samples(batches, iterations), itl_samples_by_iteration(requests, iterations)
    step_bin, bins = prefill_bins(steps["prefill_tokens"].to_numpy(np.float64))
    gap_bin, _ = prefill_bins(gaps["prefill_tokens"].to_numpy(np.float64))
    rows = []
    for i, (label, lo, hi) in enumerate(bins):
        s, g = steps[step_bin == i], gaps[gap_bin == i]
        if len(s) or len(g):
            rows.append({"policy": policy, "prefill_bin": label, "bin_lo": lo, "bin_hi": hi, **_stats(s, g)})
    df = pd.DataFrame(rows, columns=[c for c in BINNED_COLUMNS if not c.endswith("_ratio")])
    base = df[df["prefill_bin"] == "0"]
    for what in ("step", "itl"):
        ref = float(base[f"{what}_p50_ms"].iloc[0]) if len(base) else math.nan
        df[f"{what}_p50_ratio"] = [_ratio(v, ref) for v in df[f"{what}_p50_ms"]]
    return df[list(BINNED_COLUMNS)]
