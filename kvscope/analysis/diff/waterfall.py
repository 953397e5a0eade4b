"""Where the step's time moved: A's step, plus each part's change (largest first), plus what the parts leave out,
makes B's step.

A capture's step is the decode step's GPU span (the prefill's where there is no decode step) and its parts are the
kernel classes (their time per step); what they leave out is the GPU's idle time inside the span and any overlap of
kernels. A run folder's step is its decode step (its prefill) and its parts are the ops summed over the layers at op
granularity, else the layers; what they leave out is the step's time outside them. Every number is a median of the
diff's table (`a`, `b`), so the parts add up to the total exactly only through the last line.
"""

from __future__ import annotations

import math

import pandas as pd

WATERFALL_COLUMNS = ("part", "a_ms", "b_ms", "delta_ms", "running_ms")
# (total row, part families in order of preference, what the parts leave out), per phase
_PLANS = {
    "decode": (("decode step GPU span", ("class",), "GPU idle in the span, and kernel overlap"),
               ("decode step", ("op total", "layer"), "the step outside its {what}")),
    "prefill": (("prefill GPU span", ("class",), "GPU idle in the span, and kernel overlap"),
                ("prefill", ("op total", "layer"), "the prefill outside its {what}")),
}
_WHAT = {"class": "kernel classes", "op total": "ops", "layer": "layers"}


def waterfall(table: pd.DataFrame) -> pd.DataFrame:
    """The waterfall of the first plan the diff's table holds (module docstring); an empty table (with the columns)
    when it holds none, as a sweep's does."""
    rows = table.set_index("row")
    for phase in ("decode", "prefill"):
        for total, families, rest in _PLANS[phase]:
            if total not in rows.index or not _finite(rows.loc[total, "a"], rows.loc[total, "b"]):
                continue
            for family in families:
                parts = table[(table["family"] == family) & (table["phase"] == phase)]
                parts = parts[[_finite(a, b) for a, b in zip(parts["a"], parts["b"], strict=True)]]
                if len(parts):
                    return _steps(rows.loc[total], parts, rest.format(what=_WHAT[family]))
    return pd.DataFrame(columns=list(WATERFALL_COLUMNS))


def _finite(*values: object) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(float(v)) for v in values)


def _steps(total: pd.Series, parts: pd.DataFrame, rest: str) -> pd.DataFrame:
    a0, b0 = float(total["a"]), float(total["b"])
    parts = parts.assign(delta=parts["b"] - parts["a"]).sort_values("delta", key=lambda s: -s.abs(), kind="stable")
    lines = [{"part": f"A: {total.name}", "a_ms": a0, "b_ms": math.nan, "delta_ms": math.nan, "running_ms": a0}]
    running = a0
    for p in parts.itertuples(index=False):
        running += p.delta
        lines.append({"part": p.row, "a_ms": p.a, "b_ms": p.b, "delta_ms": p.delta, "running_ms": running})
    left = (b0 - a0) - float(parts["delta"].sum())
    lines.append({"part": rest, "a_ms": math.nan, "b_ms": math.nan, "delta_ms": left, "running_ms": running + left})
    lines.append({"part": f"B: {total.name}", "a_ms": math.nan, "b_ms": b0, "delta_ms": b0 - a0, "running_ms": b0})
    return pd.DataFrame.from_records(lines, columns=list(WATERFALL_COLUMNS))
