"""Where the step's time moved: A's step, plus each part's change (largest first), plus what the parts leave out,
makes B's step.

A capture's step is the decode step's GPU span (the prefill's where there is no decode step) and its parts are
measured: the kernel classes (their time per step), plus the GPU's idle time inside the span, minus the kernel
overlap (time two GPU operations ran at once, which the classes count twice). Per repetition these add up to the
span exactly (capture_rows.py), so what they leave out is only what taking medians over repetitions leaves: the
total and each part are medians of their own, and a median of sums is not the sum of medians (with one or two
repetitions a side, where the median is the mean, nothing). The overlap's line shows its times negated (`a_ms`,
`b_ms`), so that on every line the change is B - A and the parts' A times add up to A's step.

A run folder's step is its decode step (its prefill) and its parts are the ops summed over the layers at op
granularity, else the layers; what they leave out is the step's time outside them.

Every number is a median of the diff's table (`a`, `b`). `unaccounted_share` says how much of the step's change
the parts leave out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from kvscope.analysis.diff.capture_rows import IDLE, OVERLAP, SPAN, step_row

WATERFALL_COLUMNS = ("part", "a_ms", "b_ms", "delta_ms", "running_ms")
MEDIANS_APART = "medians over repetitions (parts and total are medians apart)"
OVERLAP_PART = "minus {row} (counted twice by the classes)"
# a leftover within this share of the step is the float rounding of adding the parts up, shown as 0 (for a 1 ms step
# 1e-12 ms, a millionth of the 1 ns a capture's times are measured in)
FLOAT_NOISE_REL = 1e-12


@dataclass(frozen=True)
class _Plan:
    """A step's total row, its part families in order of preference, measured rows added to the parts (row, sign),
    and what the parts leave out (`{what}`: the family's parts)."""

    total: str
    families: tuple[str, ...]
    rest: str
    extra: tuple[tuple[str, int], ...] = ()


def _capture_plan(phase: str) -> _Plan:
    return _Plan(step_row(phase, SPAN), ("class",), MEDIANS_APART,
                 ((step_row(phase, IDLE), 1), (step_row(phase, OVERLAP), -1)))


_PLANS = {
    "decode": (_capture_plan("decode"), _Plan("decode step", ("op total", "layer"), "the step outside its {what}")),
    "prefill": (_capture_plan("prefill"), _Plan("prefill", ("op total", "layer"), "the prefill outside its {what}")),
}
_WHAT = {"class": "kernel classes", "op total": "ops", "layer": "layers"}


def waterfall(table: pd.DataFrame) -> pd.DataFrame:
    """The waterfall of the first plan the diff's table holds (module docstring); an empty table (with the columns)
    when it holds none, as a sweep's does."""
    rows = table.set_index("row")
    for phase in ("decode", "prefill"):
        for plan in _PLANS[phase]:
            if plan.total not in rows.index or not _finite(rows.loc[plan.total, "a"], rows.loc[plan.total, "b"]):
                continue
            for family in plan.families:
                parts = table[(table["family"] == family) & (table["phase"] == phase)]
                parts = parts[[_finite(a, b) for a, b in zip(parts["a"], parts["b"], strict=True)]]
                if len(parts):
                    lines = pd.DataFrame({"part": parts["row"], "a": parts["a"].astype("float64"),
                                          "b": parts["b"].astype("float64")})
                    extra = _extra(rows, plan.extra)
                    if len(extra):
                        lines = pd.concat([lines, extra], ignore_index=True)
                    return _steps(rows.loc[plan.total], lines, plan.rest.format(what=_WHAT[family]))
    return pd.DataFrame(columns=list(WATERFALL_COLUMNS))


def unaccounted_share(w: pd.DataFrame) -> float:
    """|what the parts leave out| / |B - A| of a waterfall (its last two lines): 0 when the parts account for the
    whole change; NaN without a waterfall or when B's step equals A's (no change to account for)."""
    if len(w) < 2:
        return math.nan
    left, change = float(w["delta_ms"].iloc[-2]), float(w["delta_ms"].iloc[-1])
    if not (math.isfinite(left) and math.isfinite(change)) or change == 0:
        return math.nan
    return abs(left) / abs(change)


def _extra(rows: pd.DataFrame, extra: tuple[tuple[str, int], ...]) -> pd.DataFrame:
    """The plan's measured rows as parts, times their sign (a row the table lacks, or holds without a number on a
    side, is left to the last line)."""
    lines = []
    for row, sign in extra:
        if row in rows.index and _finite(rows.loc[row, "a"], rows.loc[row, "b"]):
            lines.append({"part": row if sign > 0 else OVERLAP_PART.format(row=row),
                          "a": sign * float(rows.loc[row, "a"]) + 0.0, "b": sign * float(rows.loc[row, "b"]) + 0.0})
    return pd.DataFrame.from_records(lines, columns=["part", "a", "b"])


def _finite(*values: object) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(float(v)) for v in values)


def _steps(total: pd.Series, parts: pd.DataFrame, rest: str) -> pd.DataFrame:
    """The waterfall's lines: A's step, each part (largest change first) with the running total, the leftover,
    B's step."""
    a0, b0 = float(total["a"]), float(total["b"])
    parts = parts.assign(delta=parts["b"] - parts["a"]).sort_values("delta", key=lambda s: -s.abs(), kind="stable")
    lines = [{"part": f"A: {total.name}", "a_ms": a0, "b_ms": math.nan, "delta_ms": math.nan, "running_ms": a0}]
    running = a0
    for p in parts.itertuples(index=False):
        running += p.delta
        lines.append({"part": p.part, "a_ms": p.a, "b_ms": p.b, "delta_ms": p.delta, "running_ms": running})
    left = (b0 - a0) - float(parts["delta"].sum())
    if abs(left) <= FLOAT_NOISE_REL * max(abs(a0), abs(b0)):
        left = 0.0  # the rounding of summing the parts in floats, not time the parts leave out
    lines.append({"part": rest, "a_ms": math.nan, "b_ms": math.nan, "delta_ms": left, "running_ms": running + left})
    lines.append({"part": f"B: {total.name}", "a_ms": math.nan, "b_ms": b0, "delta_ms": b0 - a0, "running_ms": b0})
    return pd.DataFrame.from_records(lines, columns=list(WATERFALL_COLUMNS))
