"""Each request's share of the GPU: every iteration's GPU time shared out to the requests it carried.

An iteration's GPU time is split in two parts, each shared by its own key:
- attention, by each request's share of the iteration's `context_len` (the keys its attention read, its own new
  tokens included): attention's cost grows with the keys read;
- everything else (products, norms, elementwise, copies, ...), by each request's share of the iteration's `tokens`:
  the products' cost grows with the tokens they multiply.
(An iteration whose rows sum to 0 context or 0 tokens shares that part equally among its rows.)

Where the two parts come from, per iteration (`source`):
- `nsys`: the iteration's kernel time by class (a frame of `iteration`, `class` or `kernel_class`, `ms` or
  `time_ms`: the kernels projected onto each `iter N` range and classed by `kvscope.analysis.align.kernel_classes`),
  attention the class `attention`, the rest every other class; the iteration's GPU time is their sum;
- `model` (no nsys, or an iteration it did not capture): the iteration's `dur_ms`, split by the bytes it must read,
  as in a memory-bound step: attention's share is KV bytes / (KV bytes + weight bytes), with KV bytes =
  `kv_bytes_per_token` x the iteration's summed `context_len` and the weights read once (`meta["serve"]
  ["kv_bytes_per_token"]` and `["weights_bytes"]`). It ignores that a long prefill is compute-bound (its products
  then cost more than their bytes say), so it understates the non-attention part of prefill-heavy iterations.

Per request (REQUEST_COST_COLUMNS): `gpu_ms` = `attention_ms` + `other_ms` = `prefill_gpu_ms` + `decode_gpu_ms`
(by the kind of its row in each iteration), `iterations` it was carried by, `gpu_ms_per_output_token` (per
generated token), and its end-to-end latency split three ways: `own_gpu_share` (its gpu_ms / e2e_ms),
`others_gpu_share` (the rest of the GPU time of the iterations that carried it) and `idle_queue_share` (what is
left: queueing, preemption, host scheduling, GPU gaps). The requests' gpu_ms sum to the GPU time of the iterations
that carried any request (`DataFrame.attrs["assigned_ms"]`); iterations that carried none are left out
(`attrs["unassigned_ms"]`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.serving.summary import serve_settings, setting_number
from kvscope.errors import KvscopeError

ATTENTION_CLASS = "attention"
SOURCE_MODEL, SOURCE_NSYS = "model", "nsys"
ITERATION_COST_COLUMNS = ("iteration", "source", "gpu_ms", "attention_ms", "other_ms")
REQUEST_COST_COLUMNS = ("request_id", "source", "iterations", "gpu_ms", "prefill_gpu_ms", "decode_gpu_ms",
                        "attention_ms", "other_ms", "generated_tokens", "gpu_ms_per_output_token", "e2e_ms",
                        "own_gpu_share", "others_gpu_share", "idle_queue_share")
MODEL_KEYS = ("kv_bytes_per_token", "weights_bytes")


def _pick(df: pd.DataFrame, names: tuple[str, ...], what: str) -> str:
    for n in names:
        if n in df.columns:
            return n
    raise KvscopeError(f"the kernel classes per iteration lack a {' or '.join(names)} column ({what})")


def nsys_iteration_split(kernel_classes: pd.DataFrame) -> pd.DataFrame:
    """Per iteration of `kernel_classes` (iteration, class, ms): attention_ms, other_ms, gpu_ms, source `nsys`."""
    cls = _pick(kernel_classes, ("class", "kernel_class"), "the kernel class")
    ms = _pick(kernel_classes, ("ms", "time_ms"), "the kernel time in ms")
    _pick(kernel_classes, ("iteration",), "the iteration")
    t = pd.to_numeric(kernel_classes[ms], errors="coerce").fillna(0.0).to_numpy(np.float64)
    att = (kernel_classes[cls].astype("string").str.lower() == ATTENTION_CLASS).fillna(False).to_numpy(bool)
    frame = pd.DataFrame({"iteration": kernel_classes["iteration"].to_numpy(), "attention_ms": np.where(att, t, 0.0),
                          "other_ms": np.where(att, 0.0, t)})
    out = frame.groupby("iteration", sort=True, as_index=False)[["attention_ms", "other_ms"]].sum()
    out["gpu_ms"] = out["attention_ms"] + out["other_ms"]
    out["source"] = SOURCE_NSYS
    return out


def model_iteration_split(batches: pd.DataFrame, iterations: pd.DataFrame,
                          meta: Mapping[str, Any] | None) -> pd.DataFrame:
    """Per iteration: its dur_ms split by bytes (see the module docstring), source `model`."""
    serve = serve_settings(meta)
    per_token, weights = (setting_number(serve, k) for k in MODEL_KEYS)
    if not (per_token > 0 and weights > 0):
        missing = [k for k, v in zip(MODEL_KEYS, (per_token, weights), strict=True) if not v > 0]
        raise KvscopeError(f"the run's metadata lacks serve.{' and serve.'.join(missing)} (a positive number): the "
                           "GPU time cannot be split into attention and the rest without nsys kernel classes")
    ctx = batches.groupby("iteration")["context_len"].sum()
    dur = pd.Series(pd.to_numeric(iterations["dur_ms"], errors="coerce").to_numpy(np.float64),
                    index=iterations["iteration"].to_numpy())
    kv = per_token * ctx.reindex(dur.index).fillna(0.0).to_numpy(np.float64)
    frac = kv / (kv + weights)
    out = pd.DataFrame({"iteration": dur.index, "gpu_ms": dur.to_numpy(), "attention_ms": dur.to_numpy() * frac})
    out["other_ms"] = out["gpu_ms"] - out["attention_ms"]
    out["source"] = SOURCE_MODEL
    return out


def iteration_split(batches: pd.DataFrame, iterations: pd.DataFrame, kernel_classes: pd.DataFrame | None,
                    meta: Mapping[str, Any] | None) -> pd.DataFrame:
    """Every iteration that carried a request: its GPU time in attention and the rest, from nsys where
    `kernel_classes` has the iteration, else from the byte model. Columns ITERATION_COST_COLUMNS."""
    carried = iterations[iterations["iteration"].isin(batches["iteration"])]
    parts = []
    if kernel_classes is not None and len(kernel_classes):
        nsys = nsys_iteration_split(kernel_classes)
        nsys = nsys[nsys["iteration"].isin(carried["iteration"])]
        parts.append(nsys)
        carried = carried[~carried["iteration"].isin(nsys["iteration"])]
    if len(carried):
        parts.append(model_iteration_split(batches[batches["iteration"].isin(carried["iteration"])], carried, meta))
    if not parts:
        return pd.DataFrame(columns=list(ITERATION_COST_COLUMNS))
    return pd.concat(parts, ignore_index=True)[list(ITERATION_COST_COLUMNS)].sort_values("iteration")


def _shares(rows: pd.DataFrame, col: str) -> np.ndarray:
    """Each row's share of its iteration's `col` (equal shares where the iteration's sum is 0)."""
    v = pd.to_numeric(rows[col], errors="coerce").fillna(0.0).astype("float64")
    total = v.groupby(rows["iteration"]).transform("sum").to_numpy()
    count = v.groupby(rows["iteration"]).transform("size").to_numpy(np.float64)
    return np.where(total > 0, v.to_numpy() / np.where(total > 0, total, 1.0), 1.0 / count)


def row_costs(batches: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Every batch row of an iteration in `split` with its attention_ms, other_ms and gpu_ms."""
    rows = batches[batches["iteration"].isin(split["iteration"])].reset_index(drop=True)
    by_it = split.set_index("iteration")
    att = by_it["attention_ms"].reindex(rows["iteration"]).to_numpy(np.float64)
    other = by_it["other_ms"].reindex(rows["iteration"]).to_numpy(np.float64)
    out = rows[["iteration", "request_id", "kind"]].copy()
    out["attention_ms"] = att * _shares(rows, "context_len")
    out["other_ms"] = other * _shares(rows, "tokens")
    out["gpu_ms"] = out["attention_ms"] + out["other_ms"]
    out["iteration_gpu_ms"] = by_it["gpu_ms"].reindex(rows["iteration"]).to_numpy(np.float64)
    out["source"] = by_it["source"].reindex(rows["iteration"]).to_numpy()
    return out


def _source(values: pd.Series) -> str:
    found = sorted(set(values))
    return "+".join(s for s in (SOURCE_NSYS, SOURCE_MODEL) if s in found)


def request_gpu_cost(batches: pd.DataFrame, iterations: pd.DataFrame, kernel_classes: pd.DataFrame | None = None,
                     meta: Mapping[str, Any] | None = None, requests: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per request (REQUEST_COST_COLUMNS; see the module docstring): the GPU time of the iterations that
    carried it shared out to it. With `requests`, every request (those never carried with 0 ms) and the
    per-token and end-to-end columns; without, NaN there."""
    split = iteration_split(batches, iterations, kernel_classes, meta)
    rows = row_costs(batches, split)
    kinds = rows.assign(prefill_gpu_ms=np.where(rows["kind"] == "prefill", rows["gpu_ms"], 0.0),
                        decode_gpu_ms=np.where(rows["kind"] == "decode", rows["gpu_ms"], 0.0))
    g = kinds.groupby("request_id", sort=True)
    out = g[["gpu_ms", "prefill_gpu_ms", "decode_gpu_ms", "attention_ms", "other_ms", "iteration_gpu_ms"]].sum()
    out["iterations"] = g.size()
    out["source"] = g["source"].agg(_source)
    out = out.reset_index()
    if requests is not None:
        req = requests[["request_id", "generated_tokens", "e2e_ms"]]
        out = req.merge(out, on="request_id", how="left")
        for col in ("gpu_ms", "prefill_gpu_ms", "decode_gpu_ms", "attention_ms", "other_ms", "iteration_gpu_ms",
                    "iterations"):
            out[col] = out[col].fillna(0)
        out["source"] = out["source"].fillna("")
        gen = pd.to_numeric(out["generated_tokens"], errors="coerce").to_numpy(np.float64)
        e2e = pd.to_numeric(out["e2e_ms"], errors="coerce").to_numpy(np.float64)
    else:
        gen = e2e = np.full(len(out), math.nan)
        out["generated_tokens"], out["e2e_ms"] = gen, e2e
    gpu, batch = out["gpu_ms"].to_numpy(np.float64), out["iteration_gpu_ms"].to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["gpu_ms_per_output_token"] = np.where(gen > 0, gpu / gen, math.nan)
        ok = np.isfinite(e2e) & (e2e > 0)
        out["own_gpu_share"] = np.where(ok, gpu / e2e, math.nan)
        out["others_gpu_share"] = np.where(ok, (batch - gpu) / e2e, math.nan)
        out["idle_queue_share"] = np.where(ok, 1 - batch / e2e, math.nan)
    out["iterations"] = out["iterations"].astype("int64")
    out = out[list(REQUEST_COST_COLUMNS)]
    all_ms = pd.to_numeric(iterations["dur_ms"], errors="coerce").fillna(0.0)
    carried = iterations["iteration"].isin(split["iteration"]).to_numpy(bool)
    out.attrs["assigned_ms"] = float(split["gpu_ms"].sum()) if len(split) else 0.0
    out.attrs["unassigned_ms"] = float(all_ms[~carried].sum())
    return out
