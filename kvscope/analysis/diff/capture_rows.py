"""A capture's rows for `kvscope diff` (rows.py's table): its steps by index, its GPU time by kernel class and by
kernel name with the launch counts, one sample per repetition (clock: nsys, the GPU's own timestamps). Per
repetition:

- `prefill GPU span`, `prefill GPU busy`: the prefill range projected onto the GPU, first kernel start to last
  kernel end; the union of its kernels' intervals;
- `decode step GPU span`, `decode step GPU busy`: the median over the repetition's decode steps;
- `decode step N GPU span`: that step's span;
- `decode class gemm`, `prefill class attention`, ...: the class's time (kernels, copies, memsets) per step, summed
  over the repetition's steps of the phase and divided by their number; `count`: its launches per step;
- `decode kernel <name>`, ...: the same per kernel name (the demangled name nsys records).

A repetition that holds a class or kernel on one side and not in another repetition counts 0 there; a step without
GPU work has no span (NaN, noted `no GPU work`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.diff.rows import frame, time_rows
from kvscope.schema import NS_PER_MS

GPU_OPS = ("kernel", "memcpy", "memset")
PHASES = ("prefill", "decode")
NO_GPU_WORK = "no GPU work"
SPAN, BUSY = "GPU span", "GPU busy"


def capture_rows(steps: pd.DataFrame, kernels: pd.DataFrame) -> pd.DataFrame:
    """The rows of a capture (module docstring), one sample per repetition."""
    s = steps[steps["phase"].isin(PHASES).fillna(False) & steps["rep"].notna()].copy()
    s["span"] = pd.to_numeric(s["gpu_span_ms"], errors="coerce").astype("float64")
    s["busy"] = pd.to_numeric(s["gpu_busy_ms"], errors="coerce").astype("float64")
    s.loc[s["span"].isna(), "busy"] = np.nan  # no GPU work: neither a span nor a busy time
    records: list[dict[str, Any]] = []
    pre, dec = s[s["phase"] == "prefill"], s[s["phase"] == "decode"]
    for col, what in (("span", SPAN), ("busy", BUSY)):
        if len(pre):
            records += _noted(time_rows(pre.groupby("rep")[col].sum(min_count=1), "gpu steps", "prefill",
                                        row_of=f"prefill {what}"))
        if len(dec):
            records += _noted(time_rows(dec.groupby("rep")[col].median(), "gpu steps", "decode",
                                        row_of=f"decode step {what}"))
    if len(dec):
        by_step = dec.assign(row="decode step " + dec["step"].astype("Int64").astype(str) + f" {SPAN}")
        records += _noted(time_rows(by_step.groupby(["row", "rep"])["span"].sum(min_count=1), "gpu step", "decode"))
    records += _kernel_rows(s, kernels)
    return frame(records)


def _noted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in records:
        if not np.isfinite(r["value"]):
            r["note"] = NO_GPU_WORK
    return records


def _kernel_rows(steps: pd.DataFrame, kernels: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (phase, class) and (phase, kernel name): time and launches per step, per repetition (0 in a repetition
    of this capture that has none)."""
    n_steps = steps.groupby(["rep", "phase"]).size()
    if not len(kernels) or not len(n_steps):
        return []
    k = kernels[kernels["kind"].isin(GPU_OPS).fillna(False) & kernels["phase"].isin(PHASES).fillna(False)
                & kernels["rep"].notna()]
    k = k.assign(ms=k["dur_ns"].astype("float64") / NS_PER_MS, rep=k["rep"].astype("int64"),
                 kernel_class=k["kernel_class"].astype(str), name=k["name"].astype(str))
    records: list[dict[str, Any]] = []
    for key, family in (("kernel_class", "class"), ("name", "kernel")):
        g = k.groupby(["phase", key, "rep"], sort=False)["ms"].agg(["sum", "size"])
        for (phase, what), per_rep in g.groupby(level=[0, 1], sort=False):
            reps = n_steps.xs(phase, level="phase")
            per_rep = per_rep.droplevel([0, 1]).reindex(reps.index, fill_value=0)
            for rep, n in reps.items():
                records.append({"row": f"{phase} {family} {what}", "family": family, "phase": phase,
                                "metric": "time_ms", "unit": "ms", "better": "lower", "unit_id": int(rep),
                                "value": float(per_rep.loc[rep, "sum"]) / n,
                                "count": float(per_rep.loc[rep, "size"]) / n})
    return records
