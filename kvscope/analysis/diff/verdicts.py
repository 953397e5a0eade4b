"""`kvscope diff`'s verdicts: each row both sides' samples, A, B, the difference, a 95% interval of B / A, and one of
`faster`, `slower`, `same` or `cannot tell`, with the reason.

With the band ±t (`threshold_pct`, 2% by default): `same` when the whole interval lies inside it, `slower` or
`faster` when the whole interval lies beyond it (for a time, B above A is slower; for a rate or a share of a
ceiling, below), `cannot tell` otherwise, and always when there is no interval to judge by: A and B different
measurements (another model, dtype or shape), a row one side does not hold, a capture that is empty or truncated, a
step without GPU work, a point that ran out of memory, a share of a ceiling with none calibrated, a sweep point's
or a served load's summary's single value, too few samples, or a time of zero. Two sides holding the very same
samples are `same` without an interval (nothing was measured twice: the one measurement is compared with itself).

The interval (stats.py) is exact for small samples and distribution-free. Its error rate is per row: over the
hundreds of rows of a capture some will miss by chance, which is why a gate (`gate.py`) names its one row.

Columns of the table (`DIFF_COLUMNS`):

| column | what |
| --- | --- |
| `row`, `family`, `phase`, `metric`, `unit`, `better` | the row (rows.py) |
| `a`, `b` | the median of each side's samples (paired rows: over the points both hold) |
| `diff`, `diff_pct` | b - a in the row's unit, and (b / a - 1) * 100 |
| `ci_low_pct`, `ci_high_pct` | the 95% interval of B / A, in % change (NaN without one) |
| `ci_level` | the interval's exact coverage (>= 0.95; rank statistics are discrete) |
| `a_samples`, `b_samples` | the samples each side holds (repetitions; points) |
| `a_count`, `b_count` | launches per step (kernel and class rows) |
| `verdict`, `reason` | `faster`, `slower`, `same` or `cannot tell`, and why |
| `threshold_pct` | the band's half-width t |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.diff.rows import HIGHER
from kvscope.analysis.diff.stats import Interval, paired_interval, ratio_interval

FASTER, SLOWER, SAME, CANNOT_TELL = "faster", "slower", "same", "cannot tell"
DIFF_COLUMNS = ("row", "family", "phase", "metric", "unit", "better", "a", "b", "diff", "diff_pct", "ci_low_pct",
                "ci_high_pct", "ci_level", "a_samples", "b_samples", "a_count", "b_count", "verdict", "reason",
                "threshold_pct")
CAPTURE_FAMILIES = ("gpu steps", "gpu step", "class", "kernel")
ZERO_ONLY_FAMILIES = ("class", "kernel")  # rows whose absence on a side means no time there (no launch)


@dataclass(frozen=True)
class Context:
    """What concerns every row: `different` (identity differences: every row cannot tell), `problems` (a capture's
    problem by side label), `devices` (both devices, when they differ), the band's half-width."""

    threshold_pct: float
    different: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    devices: tuple[str, str] | None = None
    unit: str = "repetitions"  # what a sample is: a run's repetition, or a whole run (folders of run folders)


def judge_rows(rows_a: pd.DataFrame, rows_b: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """One line per row either side holds (A's order, then B's own rows), with the columns of DIFF_COLUMNS."""
    ga = {name: g for name, g in rows_a.groupby("row", sort=False)}
    gb = {name: g for name, g in rows_b.groupby("row", sort=False)}
    names = list(dict.fromkeys([*ga, *gb]))
    lines = [_judge(name, ga.get(name), gb.get(name), ctx) for name in names]
    return pd.DataFrame.from_records(lines, columns=list(DIFF_COLUMNS))


def _judge(name: str, a: pd.DataFrame | None, b: pd.DataFrame | None, ctx: Context) -> dict[str, Any]:
    first = a if a is not None else b
    assert first is not None
    meta = first.iloc[0]
    line: dict[str, Any] = {"row": name, **{k: meta[k] for k in ("family", "phase", "metric", "unit", "better")},
                            "threshold_pct": ctx.threshold_pct}
    paired = meta["family"] == "points"
    va, vb = _values(a, b, paired)
    line.update(_summary(va, vb, a, b, meta["family"]))
    reason = _abstain(name, a, b, va, vb, ctx, meta["family"])
    if reason is not None:
        return {**line, "ci_low_pct": math.nan, "ci_high_pct": math.nan, "ci_level": math.nan,
                "verdict": CANNOT_TELL, "reason": reason}
    if _identical(va, vb):
        return {**line, "ci_low_pct": 0.0, "ci_high_pct": 0.0, "ci_level": math.nan, "verdict": SAME,
                "reason": "identical samples on both sides"}
    iv = paired_interval(va, vb) if paired else ratio_interval(va, vb)
    if iv is None:
        return {**line, "ci_low_pct": math.nan, "ci_high_pct": math.nan, "ci_level": math.nan,
                "verdict": CANNOT_TELL, "reason": _too_few(va.size, vb.size, paired, ctx.unit)}
    verdict, reason = _verdict(iv, meta["better"], ctx.threshold_pct)
    if paired:
        reason += _left_out(a, b, va.size)
    if ctx.devices is not None and meta["unit"] == "ms":
        reason += f" (different devices: {ctx.devices[0]} vs {ctx.devices[1]})"
    return {**line, "ci_low_pct": _pct(iv.low), "ci_high_pct": _pct(iv.high), "ci_level": iv.level,
            "verdict": verdict, "reason": reason}


def _values(a: pd.DataFrame | None, b: pd.DataFrame | None, paired: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each side's samples (paired: the replicates both sides hold with a value, in the same order)."""
    if paired and a is not None and b is not None:
        both = a.set_index("unit_id")["value"].to_frame("a").join(b.set_index("unit_id")["value"].rename("b"),
                                                                  how="inner")
        both = both[np.isfinite(both["a"]) & np.isfinite(both["b"])]
        return both["a"].to_numpy(np.float64), both["b"].to_numpy(np.float64)
    empty = np.array([], dtype=np.float64)
    return (a["value"].to_numpy(np.float64) if a is not None else empty,
            b["value"].to_numpy(np.float64) if b is not None else empty)


def _summary(va: np.ndarray, vb: np.ndarray, a: pd.DataFrame | None, b: pd.DataFrame | None, family: str
             ) -> dict[str, Any]:
    """a, b (medians; 0 for a class or kernel a side does not launch), diff, diff_pct, samples, counts."""
    zero = family in ZERO_ONLY_FAMILIES
    ma = _median(va) if a is not None else (0.0 if zero else math.nan)
    mb = _median(vb) if b is not None else (0.0 if zero else math.nan)
    ca = _median(a["count"].to_numpy(np.float64)) if a is not None else (0.0 if zero else math.nan)
    cb = _median(b["count"].to_numpy(np.float64)) if b is not None else (0.0 if zero else math.nan)
    diff = mb - ma
    pct = (mb / ma - 1.0) * 100.0 if np.isfinite(ma) and np.isfinite(mb) and ma > 0 else math.nan
    return {"a": ma, "b": mb, "diff": diff, "diff_pct": pct, "a_samples": int(np.isfinite(va).sum()),
            "b_samples": int(np.isfinite(vb).sum()), "a_count": ca, "b_count": cb}


def _median(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def _abstain(name: str, a: pd.DataFrame | None, b: pd.DataFrame | None, va: np.ndarray, vb: np.ndarray,
             ctx: Context, family: str) -> str | None:
    """Why this row gets no interval, or None: in the order of the module docstring."""
    if ctx.different:
        return f"different {', '.join(ctx.different)}"
    if a is None or b is None:
        present, absent = ("A", "B") if b is None else ("B", "A")
        what = "launches none" if family in ZERO_ONLY_FAMILIES else "does not hold it"
        return f"only in {present} ({absent} {what})"
    if family in CAPTURE_FAMILIES:
        for label in ("A", "B"):
            if label in ctx.problems:
                return f"{label}: {ctx.problems[label]}"
    for label, side in (("A", a), ("B", b)):
        missing = side[~np.isfinite(side["value"].to_numpy(np.float64))]
        # pooled points: those without a value are left out (_left_out), unless that leaves none
        if len(missing) and (family != "points" or not va.size):
            return _missing_reason(label, missing, ctx)
    if family == "points" and not va.size:
        return "no point on both sides"
    if family == "point" and not np.array_equal(va, vb):  # the same value twice is the same (one measurement)
        return ("one value a side: a sweep file keeps a point's medians, not its samples (the all points rows "
                "pool the points)")
    if family == "load" and not np.array_equal(va, vb):
        return ("one value a side: a served load's summary is one number (the request and iteration rows hold the "
                "samples)")
    if _identical(va, vb):
        return None  # identical samples are the same, zeros included (a single stream's kernel overlap: 0 and 0)
    for label, v in (("A", va), ("B", vb)):
        if v.size and (v <= 0).any():
            return f"a time of 0 in {label} (launched in some repetitions only?)" if family in ZERO_ONLY_FAMILIES \
                else f"a value of 0 in {label}: no ratio"
    return None


def _identical(va: np.ndarray, vb: np.ndarray) -> bool:
    """Both sides hold the very same samples (in any order): the one measurement compared with itself."""
    return bool(va.size) and np.array_equal(np.sort(va), np.sort(vb))


def _missing_reason(label: str, missing: pd.DataFrame, ctx: Context) -> str:
    note = str(missing["note"].iloc[0])
    if note == "no calibrated ceiling":
        devices = f" ({ctx.devices[0]} vs {ctx.devices[1]})" if ctx.devices else ""
        return f"different devices{devices} without ceilings: {label} has no calibrated ceiling (kvscope calibrate)"
    if note == "oom":
        return f"ran out of memory in {label}"
    if note == "no GPU work":
        return f"{label} has no GPU work in the range"
    return f"{label} has no value"


def _left_out(a: pd.DataFrame | None, b: pd.DataFrame | None, pairs: int) -> str:
    """What a pooled row left out: the points one side lacks or holds without a value (out of memory)."""
    ids = set(a["unit_id"] if a is not None else ()) | set(b["unit_id"] if b is not None else ())
    return f"; {len(ids) - pairs} of {len(ids)} points left out (on one side only, or without a value)" \
        if len(ids) > pairs else ""


def _too_few(n: int, m: int, paired: bool, unit: str) -> str:
    if paired:
        return f"too few samples: {n} points both sides hold (a 95% interval needs 6)"
    return f"too few samples: {n} and {m} {unit} (a 95% interval needs 4 and 4, or 3 and 5)"


def _pct(ratio: float) -> float:
    return (ratio - 1.0) * 100.0


def _verdict(iv: Interval, better: str, t: float) -> tuple[str, str]:
    """The verdict of an interval against the band ±t (module docstring), and its reason."""
    lo, hi = _pct(iv.low), _pct(iv.high)
    shown = f"the 95% interval {lo:+.1f}% to {hi:+.1f}%"
    up, down = (FASTER, SLOWER) if better == HIGHER else (SLOWER, FASTER)
    if lo > t:
        return up, f"{shown} lies above +{t:g}%"
    if hi < -t:
        return down, f"{shown} lies below -{t:g}%"
    if lo >= -t and hi <= t:
        return SAME, f"{shown} lies inside ±{t:g}%"
    return CANNOT_TELL, f"intervals overlap: {shown} crosses the ±{t:g}% band"
