"""Where a sweep point's GPU time goes, from its Nsight Systems capture: the attribution columns of `kvscope sweep
--nsys`.

Input: an aligned export (`report_align.analyse`) of one point, whose prefill and decode steps are NVTX ranges named
`prefill` and `decode step N`: kvscope's own loop (NVTX domain `kvscope`, CUDA graphs traced per node), or another
engine that opens the same names in any domain (they are then labelled by `STEP_PHASE_MAP`). Per prefill and per
decode step:

- span: the range projected onto the GPU (first kernel start to last kernel end); busy: the union of its kernels'
  intervals; kernels: GPU operations launched inside it (kernels, copies, memsets);
- time by kernel class (kernel_classes.py): the summed duration of the step's operations of each class.

Each column is the median over the captured steps (decode: every `decode step N` of every repetition; prefill: every
prefill), taken column by column. `idle_pct` is 100 * (1 - busy / span) of those medians; `launch_bound` is
`idle_pct >= LAUNCH_BOUND_IDLE_PCT`. Bytes and FLOPs come from roofline.py: a decode step at the mean context of the
captured steps (`decode_cost`: weights + the KV cache read, and the new position written), a prefill of `seq` tokens
per sequence (`prefill_cost`: weights + the KV cache written; matmul and causal attention FLOPs). Rates divide by the
GPU span; MBU and MFU compare them with the GPU's calibrated copy bandwidth and bf16 matmul rate (NaN without a
calibration, and MFU also NaN for a dtype other than bfloat16 or float16). A phase with no captured step has NaN
everywhere (and `launch_bound` NA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kvscope.analysis.align.kernel_classes import CLASSES, COPY
from kvscope.analysis.align.phase_map import parse_phase_map
from kvscope.analysis.align.pipeline import AlignResult, analyse
from kvscope.analysis.nsys.export import NsysExport
from kvscope.analysis.roofline import decode_cost, prefill_cost
from kvscope.schema import (
    ATTRIBUTION_COLUMNS,
    BYTES_PER_GB,
    FLOPS_PER_TFLOP,
    MS_PER_S,
    NAME_PATTERNS,
    NS_PER_MS,
    NSYS_REPORT_COLUMN,
    Ceilings,
    attribution_phase_columns,
)

if TYPE_CHECKING:  # for annotations only, as in roofline.py
    from kvscope.model.config import ModelArgs

# a phase is launch-bound when its GPU idles for at least this share of its span: the kernels wait for the host
LAUNCH_BOUND_IDLE_PCT = 30.0
# kernel class -> the column word (`copy/memset` is `copy`)
CLASS_COLUMNS = {c: ("copy" if c == COPY else c) for c in CLASSES}
PREFIXES = ("decode", "prefill")
# another engine's ranges named as kvscope names them, in any NVTX domain
STEP_PHASE_MAP = parse_phase_map({"prefill": r"^prefill$", "step": r"^decode step (\d+)$"})
# the dtypes MFU is measured against the bf16 matmul ceiling for
MATMUL_DTYPES = ("bfloat16", "float16")
_RUN_PATTERN = dict(NAME_PATTERNS)["run"]


# the columns `attribution` returns, in their order: schema's without `nsys_report`
ATTRIBUTION_VALUES = tuple(c for c in ATTRIBUTION_COLUMNS if c != NSYS_REPORT_COLUMN)


@dataclass(frozen=True)
class PointFacts:
    """What the bytes and FLOPs of one sweep point need: the model, its shape, the byte width of the weights and of
    the KV cache, the dtype's name and the GPU's calibrated ceilings (None when never calibrated)."""

    args: ModelArgs
    batch: int
    seq: int
    itemsize: int
    dtype: str
    ceilings: Ceilings | None = None


def run_keys(result: AlignResult) -> list[tuple[int, int, int]]:
    """(batch, seq, gen) of every `run bs=B seq=S gen=G` range of the export, in start order: which sweep point a
    capture holds."""
    names = result.ranges.sort_values("start_ns", kind="stable")["name"].dropna().astype(str)
    out = []
    for name in names:
        m = _RUN_PATTERN.match(name)
        if m is not None:
            out.append((int(m[1]), int(m[2]), int(m[3])))
    return list(dict.fromkeys(out))


def aligned(export: str | Path | NsysExport) -> AlignResult:
    """The export aligned (`report_align.analyse`) with its prefill and decode steps labelled: by kvscope's names in
    its NVTX domain, or, for another engine whose ranges have the same names in another domain, by
    `STEP_PHASE_MAP`."""
    result = analyse(export)
    if result.steps is not None and len(result.steps):
        return result
    return analyse(result.export, phase_map=STEP_PHASE_MAP)


def step_table(result: AlignResult) -> pd.DataFrame:
    """One row per prefill and decode step: phase, step, span_ms, busy_ms, kernels, and `<class>_ms` per kernel class
    (CLASS_COLUMNS' words). Empty when the export has no labelled steps."""
    words = list(CLASS_COLUMNS.values())
    cols = ["range_id", "phase", "step", "span_ms", "busy_ms", "kernels", *(f"{w}_ms" for w in words)]
    steps = result.steps
    if steps is None or not len(steps):
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    is_step = ((steps["phase"] == "prefill") | steps["name"].astype(str).str.match(r"^decode step \d+$")).fillna(False)
    steps = steps[is_step.to_numpy(bool)]
    step_ids = steps["range_id"].to_numpy(np.int64)
    k = result.kernels
    owner = _enclosing(result.ranges, k["region_id"].fillna(-1).to_numpy(np.int64), step_ids)
    word = k["kernel_class"].map(CLASS_COLUMNS).fillna(CLASS_COLUMNS[CLASSES[-1]])
    dur = k["dur_ns"].to_numpy(np.float64)
    sums = pd.DataFrame({"range_id": owner, "word": word.to_numpy(), "dur_ns": dur})
    sums = sums[sums["range_id"] >= 0]
    by_class = sums.pivot_table(index="range_id", columns="word", values="dur_ns", aggfunc="sum", fill_value=0.0)
    by_class = by_class.reindex(index=step_ids, columns=words, fill_value=0.0).fillna(0.0) / NS_PER_MS
    out = pd.DataFrame({
        "range_id": step_ids,
        "phase": steps["phase"].astype(str).to_numpy(),
        "step": steps["step"].to_numpy(),
        "span_ms": steps["gpu_span_ms"].astype("float64").to_numpy(),
        "busy_ms": steps["gpu_busy_ms"].astype("float64").to_numpy(),
        "kernels": steps["kernels"].astype("float64").to_numpy(),
    })
    for w in words:
        out[f"{w}_ms"] = by_class[w].to_numpy(np.float64)
    return out.reset_index(drop=True)


def _enclosing(ranges: pd.DataFrame, region: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per entry of `region` (a range id, -1 for none): the nearest range among `targets` that is it or encloses
    it (following `parent_id`), -1 when none does."""
    parent = pd.Series(ranges["parent_id"].fillna(-1).to_numpy(np.int64), index=ranges["range_id"].to_numpy(np.int64))
    target = set(targets.tolist())
    found: dict[int, int] = {}
    for rid in np.unique(region):
        cur, hit = int(rid), -1
        while cur >= 0:
            if cur in target:
                hit = cur
                break
            cur = int(parent.get(cur, -1))
        found[int(rid)] = hit
    return np.array([found[int(r)] for r in region], dtype=np.int64) if len(region) else np.empty(0, np.int64)


def attribution(result: AlignResult, facts: PointFacts) -> dict[str, Any]:
    """The attribution columns (ATTRIBUTION_VALUES) of one point's aligned capture (see the module docstring)."""
    table = step_table(result)
    out: dict[str, Any] = {}
    decode = table[table["phase"] == "decode"]
    prefill = table[table["phase"] == "prefill"]
    # bytes are linear in the context: the mean over the steps is the bytes at their mean context
    dec_bytes = float(np.mean([decode_cost(facts.args, facts.batch, facts.seq + int(s), facts.itemsize,
                                           facts.itemsize)[0] for s in decode["step"]])) if len(decode) else math.nan
    pre_bytes, pre_flops = prefill_cost(facts.args, facts.batch, facts.seq, facts.itemsize, facts.itemsize)
    copy_gb_s = facts.ceilings.copy_gb_s if facts.ceilings and facts.ceilings.copy_gb_s > 0 else math.nan
    out.update(_phase("decode", decode, dec_bytes, copy_gb_s))
    out.update(_phase("prefill", prefill, float(pre_bytes) if len(prefill) else math.nan, copy_gb_s))
    span_s = out["prefill_span_ms"] / MS_PER_S
    tflop_s = pre_flops / span_s / FLOPS_PER_TFLOP if span_s > 0 else math.nan
    peak = facts.ceilings.bf16_tflop_s if facts.ceilings and facts.dtype in MATMUL_DTYPES else math.nan
    out["prefill_flops"] = float(pre_flops) if len(prefill) else math.nan
    out["prefill_span_tflop_s"] = tflop_s
    out["prefill_mfu_pct"] = 100 * tflop_s / peak if peak > 0 else math.nan
    return {c: out[c] for c in ATTRIBUTION_VALUES}


def _phase(prefix: str, rows: pd.DataFrame, moved: float, copy_gb_s: float) -> dict[str, Any]:
    """One phase's columns from its step rows: medians, idle share, launch-bound, bytes and rates."""
    if not len(rows):
        values: dict[str, Any] = dict.fromkeys(attribution_phase_columns(prefix), math.nan)
        values[f"{prefix}_launch_bound"] = pd.NA
        return values
    med = rows.drop(columns=["range_id", "phase", "step"]).median()
    span, busy = float(med["span_ms"]), float(med["busy_ms"])
    idle = 100 * (1 - busy / span) if span > 0 else math.nan
    gb_s = moved / (span / MS_PER_S) / BYTES_PER_GB if span > 0 else math.nan
    values = {f"{prefix}_span_ms": span, f"{prefix}_busy_ms": busy, f"{prefix}_idle_pct": idle,
              f"{prefix}_kernels": float(med["kernels"])}
    for w in CLASS_COLUMNS.values():
        values[f"{prefix}_{w}_ms"] = float(med[f"{w}_ms"])
    values[f"{prefix}_launch_bound"] = bool(idle >= LAUNCH_BOUND_IDLE_PCT) if not math.isnan(idle) else pd.NA
    values[f"{prefix}_bytes"] = moved
    values[f"{prefix}_span_gb_s"] = gb_s
    values[f"{prefix}_mbu_pct"] = 100 * gb_s / copy_gb_s if copy_gb_s > 0 else math.nan
    return values
