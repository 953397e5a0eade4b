"""A capture's rows for `kvscope diff` (rows.py's table): its steps by index, its GPU time by kernel class and by
kernel name with the launch counts, one sample per repetition (clock: nsys, the GPU's own timestamps). Per
repetition and phase, each a mean per step (the prefill: per prefill, normally one a repetition):

- `prefill GPU span`, `decode step GPU span`: the step range projected onto the GPU, first kernel start to last
  kernel end;
- `prefill GPU busy`, `decode step GPU busy`: the union of its GPU operations' intervals;
- `prefill GPU idle`, `decode step GPU idle`: span - busy, the GPU's idle time inside the step's span (lower is
  better: a host-bound loop leaves the GPU waiting for launches);
- `prefill kernel overlap`, `decode step kernel overlap`: the step's GPU operations' summed times (kernels, copies,
  memsets, as the class rows count them) - busy, the time two operations ran at once, which the class rows count
  twice. Higher is better: it is taken off the step (the same work in a shorter span). Negative where the busy time
  holds GPU work the classes do not count (a CUDA graph traced whole rather than by its kernels);
- `decode step N GPU span`: that step's span;
- `decode class gemm`, `prefill class attention`, ...: the class's time (kernels, copies, memsets) per step, summed
  over the repetition's steps of the phase and divided by their number; `count`: its launches per step;
- `decode kernel <name>`, ...: the same per kernel name (the demangled name nsys records).

The span, busy time and the classes are all means over the same steps so that the parts add up: per repetition
span = busy + idle and busy = (sum of the class rows) - overlap, so span = classes + idle - overlap (the waterfall,
waterfall.py). A median over the steps would break that sum (a median of sums is not the sum of medians). For the
same reason the classes count a step's own operations only (those of a decode step, of the prefill): not the copies
between decode steps (the sampled token to the host), which fall in no step's span. Idle and overlap are rounded
to whole ns (every time of a capture is one), so that a step changed only in its kernels' times shows them
unchanged rather than moved by float noise.

A repetition that holds a class or kernel on one side and not in another repetition counts 0 there; a step without
GPU work counts 0 in its repetition's means (as in the class rows); a repetition whose steps of the phase have no
GPU work at all has no span, busy, idle or overlap (NaN, noted `no GPU work`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.diff.rows import HIGHER, LOWER, frame, time_rows
from kvscope.schema import NS_PER_MS

GPU_OPS = ("kernel", "memcpy", "memset")
PHASES = ("prefill", "decode")
NO_GPU_WORK = "no GPU work"
SPAN, BUSY, IDLE, OVERLAP = "GPU span", "GPU busy", "GPU idle", "kernel overlap"
FAMILY = "gpu steps"  # a step's GPU rows pooled per repetition (verdicts.CAPTURE_FAMILIES, a headline family)
_NO_STEP = -1  # the step key of an operation or step row without a step number


def step_row(phase: str, what: str) -> str:
    """The name of a phase's per-step row: `prefill GPU idle`, `decode step kernel overlap`."""
    return f"prefill {what}" if phase == "prefill" else f"decode step {what}"


def capture_rows(steps: pd.DataFrame, kernels: pd.DataFrame) -> pd.DataFrame:
    """The rows of a capture (module docstring), one sample per repetition."""
    s = steps[steps["phase"].isin(PHASES).fillna(False) & steps["rep"].notna()].copy()
    s["span"] = pd.to_numeric(s["gpu_span_ms"], errors="coerce").astype("float64")
    s["busy"] = pd.to_numeric(s["gpu_busy_ms"], errors="coerce").astype("float64")
    s.loc[s["span"].isna(), "busy"] = np.nan  # no GPU work: neither a span nor a busy time
    s["rep"] = s["rep"].astype("int64")
    ops = _step_ops(s, kernels)
    per_rep = _per_rep(s, ops)
    records: list[dict[str, Any]] = []
    for col, what, better in (("span", SPAN, LOWER), ("busy", BUSY, LOWER), ("idle", IDLE, LOWER),
                              ("overlap", OVERLAP, HIGHER)):
        for phase in PHASES:
            if phase not in per_rep.index.get_level_values("phase"):
                continue
            values = per_rep.xs(phase, level="phase")[col]
            rows = _noted(time_rows(values, FAMILY, phase, row_of=step_row(phase, what)))
            records += [{**r, "better": better} for r in rows]
    dec = s[s["phase"] == "decode"]
    if len(dec):
        by_step = dec.assign(row="decode step " + dec["step"].astype("Int64").astype(str) + f" {SPAN}")
        records += _noted(time_rows(by_step.groupby(["row", "rep"])["span"].sum(min_count=1), "gpu step", "decode"))
    records += _kernel_rows(s, ops)
    return frame(records)


def _step_ops(steps: pd.DataFrame, kernels: pd.DataFrame) -> pd.DataFrame:
    """The GPU operations (kernels, copies, memsets) of the steps: those whose (rep, phase, step) is a step's, with
    their time in ms."""
    if not len(kernels):
        return pd.DataFrame({"rep": pd.Series(dtype="int64"), "phase": pd.Series(dtype=object),
                             "kernel_class": pd.Series(dtype=object), "name": pd.Series(dtype=object),
                             "dur_ns": pd.Series(dtype="int64"), "ms": pd.Series(dtype="float64")})
    k = kernels[kernels["kind"].isin(GPU_OPS).fillna(False) & kernels["phase"].isin(PHASES).fillna(False)
                & kernels["rep"].notna()]
    k = k.assign(rep=k["rep"].astype("int64"), phase=k["phase"].astype(str),
                 kernel_class=k["kernel_class"].astype(str), name=k["name"].astype(str),
                 dur_ns=k["dur_ns"].astype("int64"), _step=_step_key(k["step"]))
    held = pd.MultiIndex.from_frame(steps.assign(phase=steps["phase"].astype(str), _step=_step_key(steps["step"]))
                                    [["rep", "phase", "_step"]])
    k = k[pd.MultiIndex.from_frame(k[["rep", "phase", "_step"]]).isin(held)]
    return k.assign(ms=k["dur_ns"].astype("float64") / NS_PER_MS).drop(columns="_step")


def _step_key(step: pd.Series) -> np.ndarray:
    return pd.to_numeric(step, errors="coerce").fillna(_NO_STEP).astype("int64").to_numpy()


def _per_rep(steps: pd.DataFrame, ops: pd.DataFrame) -> pd.DataFrame:
    """Per (rep, phase): span, busy, idle and overlap, each a mean per step (module docstring)."""
    g = steps.assign(idle_ns=(steps["span"] - steps["busy"]) * NS_PER_MS).groupby(["rep", "phase"])
    out = pd.DataFrame({"n": g.size(), "span": g["span"].sum(), "busy": g["busy"].sum(),
                        "idle_ns": g["idle_ns"].sum(), "worked": g["span"].count()})
    ops_ns = ops.groupby(["rep", "phase"])["dur_ns"].sum().reindex(out.index, fill_value=0).astype("float64")
    out["idle"] = np.rint(out["idle_ns"]) / NS_PER_MS / out["n"]
    out["overlap"] = np.rint(ops_ns - out["busy"] * NS_PER_MS) / NS_PER_MS / out["n"]
    out["span"] = out["span"] / out["n"]
    out["busy"] = out["busy"] / out["n"]
    cols = ["span", "busy", "idle", "overlap"]
    out.loc[out["worked"] == 0, cols] = np.nan  # no step of the phase has GPU work in this repetition
    return out[cols]


def _noted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in records:
        if not np.isfinite(r["value"]):
            r["note"] = NO_GPU_WORK
    return records


def _kernel_rows(steps: pd.DataFrame, ops: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (phase, class) and (phase, kernel name): time and launches per step, per repetition (0 in a repetition
    of this capture that has none)."""
    n_steps = steps.groupby(["rep", "phase"]).size()
    if not len(ops) or not len(n_steps):
        return []
    records: list[dict[str, Any]] = []
    for key, family in (("kernel_class", "class"), ("name", "kernel")):
        g = ops.groupby(["phase", key, "rep"], sort=False)["ms"].agg(["sum", "size"])
        for (phase, what), per_rep in g.groupby(level=[0, 1], sort=False):
            reps = n_steps.xs(phase, level="phase")
            per_rep = per_rep.droplevel([0, 1]).reindex(reps.index, fill_value=0)
            for rep, n in reps.items():
                records.append({"row": f"{phase} {family} {what}", "family": family, "phase": phase,
                                "metric": "time_ms", "unit": "ms", "better": "lower", "unit_id": int(rep),
                                "value": float(per_rep.loc[rep, "sum"]) / n,
                                "count": float(per_rep.loc[rep, "size"]) / n})
    return records
