"""A run folder's rows for `kvscope diff` (rows.py's table): its timed regions matched by level and name, steps by
index, one sample per repetition. Per repetition:

- `rep`: the repetition's region (prefill + decode);
- `prefill`, `decode`: the phase's region;
- `decode step`: the median of the repetition's `decode step N` regions (the step time a user sees);
- `decode step N`: that step's region;
- `prefill L00`, `decode L00`, `decode lm_head`, `decode L00.attn`, ...: the layer or op region (decode: the median
  over the repetition's steps);
- `decode attn (all layers)`, ...: per step, the op's regions summed over the layers; then the median over the steps;
- `ttft (host clock)`, `decode phase (host clock)`: the host clock's time to first token and decode phase (the run's
  metadata);
- `decode MBU`, `prefill MFU`: with devices that differ, the share of the calibrated ceiling (`efficiency_rows`).

Region times are the run's own clock (CUDA events on a GPU, the host clock around each region on a CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.diff.rows import HIGHER, frame, time_rows
from kvscope.analysis.inputs import RunFiles

DECODE_STEP = "decode step"
PREFILL = "prefill"
HOST_ROWS = (("host_ttft_ms", "ttft (host clock)", "prefill"), ("host_decode_ms", "decode phase (host clock)",
                                                                  "decode"))
# (summary column, row, the time row its per-repetition samples follow, phase)
EFFICIENCY = (("decode_mbu", "decode MBU", DECODE_STEP, "decode"), ("prefill_mfu", "prefill MFU", PREFILL, "prefill"))


def run_rows(run: RunFiles) -> pd.DataFrame:
    """The rows of a run folder (module docstring), one sample per repetition."""
    t = run.timings.copy()
    if "rep" not in t.columns:
        t["rep"] = 0
    if "step" not in t.columns:
        t["step"] = pd.NA
    t = t[t["rep"].notna()]
    records: list[dict[str, Any]] = []
    records += time_rows(t[t["level"] == "rep"].groupby("rep")["dur_ms"].sum(), "rep", row_of="rep")
    phases = t[t["level"] == "phase"]
    for phase, g in phases.groupby("phase", sort=False):
        records += time_rows(g.groupby("rep")["dur_ms"].sum(), "phase", str(phase), row_of=str(phase))
    steps = t[t["level"] == "step"]
    if len(steps):
        records += time_rows(steps.groupby("rep")["dur_ms"].median(), "steps", "decode", row_of=DECODE_STEP)
        by_step = steps.assign(row=DECODE_STEP + " " + steps["step"].astype("Int64").astype(str))
        records += time_rows(by_step.groupby(["row", "rep"])["dur_ms"].sum(), "step", "decode")
    records += _layer_rows(t)
    records += _host_rows(run)
    return frame(records)


def _layer_rows(t: pd.DataFrame) -> list[dict[str, Any]]:
    """Layer and op regions by (phase, name), and each op summed over the layers; per repetition the median over
    its steps (a prefill has one)."""
    records: list[dict[str, Any]] = []
    parts = t[t["level"].isin(["layer", "op"])]
    for (level, phase), g in parts.groupby(["level", "phase"], sort=False):
        g = g.assign(row=f"{phase} " + g["name"].astype(str), step=g["step"].fillna(0))
        per_step = g.groupby(["row", "rep", "step"])["dur_ms"].sum()
        records += time_rows(per_step.groupby(level=["row", "rep"]).median(), str(level), str(phase))
        if level == "op" and "op" in g.columns:
            ops = g.assign(row=f"{phase} " + g["op"].astype(str) + " (all layers)")
            total = ops.groupby(["row", "rep", "step"])["dur_ms"].sum()
            records += time_rows(total.groupby(level=["row", "rep"]).median(), "op total", str(phase))
    return records


def _host_rows(run: RunFiles) -> list[dict[str, Any]]:
    """The host clock's TTFT and decode phase per repetition, from the run's metadata (where it has them, one per
    repetition)."""
    meta = run.metadata or {}
    reps = int(run.summary.iloc[0]["reps"])
    records: list[dict[str, Any]] = []
    for key, row, phase in HOST_ROWS:
        values = meta.get(key)
        if not isinstance(values, list) or len(values) != reps:
            continue
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        records += time_rows(pd.Series(arr, index=range(reps)), "host", phase, row_of=row)
    return records


def efficiency_rows(run: RunFiles, rows: pd.DataFrame) -> pd.DataFrame:
    """The share of the GPU's calibrated ceiling (the summary's `decode_mbu`, `prefill_mfu`), per repetition: the
    summary's median share scaled by the median step time over the repetition's (bytes and FLOPs per step are one
    run's constants, so the share goes as 1 / time). NaN samples where the run has no calibrated ceiling."""
    summary = run.summary.iloc[0]
    records: list[dict[str, Any]] = []
    for col, row, source, phase in EFFICIENCY:
        times = rows.loc[rows["row"] == source].set_index("unit_id")["value"]
        if not len(times):
            continue
        share = float(summary[col]) if col in summary.index and pd.notna(summary[col]) else np.nan
        med = float(np.median(times.to_numpy()))
        for uid, v in times.items():
            records.append({"row": row, "family": "efficiency", "phase": phase, "metric": col, "unit": "fraction",
                            "better": HIGHER, "unit_id": uid, "value": share * med / v if v > 0 else np.nan,
                            "note": "" if np.isfinite(share) else "no calibrated ceiling"})
    return frame(records)
