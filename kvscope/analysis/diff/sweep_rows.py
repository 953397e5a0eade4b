"""A sweep file's rows for `kvscope diff` (rows.py's table): its points matched by their keys, each quantity once per
point, and once over every point both sides hold.

A sweep row is one configuration's summary (medians, quartiles), not its samples, so a point's row has one value a
side and its verdict cannot say more than the two numbers do. The row `all points <column>` pools the points: each
point both sides hold (and neither ran out of memory) is one paired sample, B's value over A's, and the interval is
the signed-rank interval of their typical ratio (stats.paired_interval): "across the sweep, B's decode step is 3%
to 6% slower". Points are the configurations of one sweep, measured once each; they say how a change moves the
sweep as a whole, not how sure one point is.

Keys: `seq_len` and `batch`, and the `engine` where a side holds several engines' rows (two files of one engine
each, such as kvscope's sweep against transformers', match point by point whatever their engines).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.diff.rows import HIGHER, LOWER, frame
from kvscope.schema import ATTRIBUTION_CLASS_WORDS, KVSCOPE_ENGINE, is_oom

# (column, unit, better, phase), in the order rows are built; a column is compared where a side has a value in it
TIME_COLUMNS = (("decode_p50_ms_per_tok", "ms", LOWER, "decode"), ("prefill_p50_ms", "ms", LOWER, "prefill"),
                ("ttft_ms", "ms", LOWER, "prefill"), ("total_tok_s", "tok/s", HIGHER, ""),
                *((f"{p}_{w}", "ms", LOWER, p) for p in ("decode", "prefill")
                  for w in ("span_ms", "busy_ms", *(f"{c}_ms" for c in ATTRIBUTION_CLASS_WORDS))))
EFFICIENCY_COLUMNS = (("decode_mbu", "fraction", HIGHER, "decode"), ("prefill_mfu", "fraction", HIGHER, "prefill"),
                      ("decode_mbu_pct", "%", HIGHER, "decode"), ("prefill_mfu_pct", "%", HIGHER, "prefill"))
ALL_POINTS = "all points"
_SHARES = frozenset(c for c, *_ in EFFICIENCY_COLUMNS)


def point_keys(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Each row's point key in A and in B (see the module docstring)."""
    several = any(df["engine"].fillna(KVSCOPE_ENGINE).nunique() > 1 for df in (a, b) if "engine" in df.columns)
    return _keys(a, several), _keys(b, several)


def _keys(df: pd.DataFrame, with_engine: bool) -> pd.Series:
    key = "seq=" + df["seq_len"].astype(str) + " batch=" + df["batch"].astype(str)
    if with_engine:
        engine = df["engine"].fillna(KVSCOPE_ENGINE) if "engine" in df.columns else KVSCOPE_ENGINE
        key = key + " " + engine.astype(str)
    return key


def sweep_rows(df: pd.DataFrame, keys: pd.Series, columns: tuple[tuple[str, str, str, str], ...]) -> pd.DataFrame:
    """The rows of a sweep (module docstring) for `columns` that the file has: per point `<key> <column>` (one
    value), and `all points <column>` (one value per point, the point's key its replicate). A point flagged `oom`
    has no value (noted `oom`)."""
    oom = df["flag"].map(is_oom).to_numpy(bool) if "flag" in df.columns else np.zeros(len(df), bool)
    records: list[dict[str, Any]] = []
    for col, unit, better, phase in columns:
        if col not in df.columns:
            continue
        values = pd.to_numeric(df[col], errors="coerce").astype("float64").to_numpy()
        base = {"family": "point", "phase": phase, "metric": col, "unit": unit, "better": better}
        none = "no calibrated ceiling" if col in _SHARES else "no value"
        for key, v, flagged in zip(keys, values, oom, strict=True):
            value, note = (np.nan, "oom") if flagged else (v, "" if np.isfinite(v) else none)
            records.append({**base, "row": f"{key} {col}", "unit_id": 0, "value": value, "note": note})
            records.append({**base, "family": "points", "row": f"{ALL_POINTS} {col}", "unit_id": key,
                            "value": value, "note": note})
    return frame(records)
