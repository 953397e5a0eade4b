"""What `kvscope diff` compares, as one long table per side: one line per (row, replicate), the replicate being the
unit of replication (a repetition of a run or capture; a configuration of a sweep).

A row is one quantity both sides may hold, named as `--fail-if` names it (`decode step`, `prefill`,
`decode L00.attn`, `decode class gemm`, `all points decode_p50_ms_per_tok`). Columns of a side's table:

- `row`: the row's name;
- `family`: what kind of row: `rep`, `phase`, `steps` (a decode step, steps pooled per repetition), `step` (decode
  step N), `layer`, `op`, `op total` (an op summed over the layers), `host` (the host clock), `efficiency` (a share
  of a calibrated ceiling), `gpu steps`, `gpu step`, `class`, `kernel` (a capture's), `point`, `points` (a sweep's);
- `phase`: prefill, decode, or empty;
- `metric`, `unit`, `better`: the quantity (`time_ms`, or a sweep column's name), its unit, and whether `lower` or
  `higher` is better;
- `unit_id`: the replicate: a repetition's number, or a sweep point's key;
- `value`: the replicate's value (NaN where it has none: a step without GPU work, a point out of memory);
- `count`: a kernel or class row's launches per step (NaN for other rows);
- `note`: why a value is missing, where known (`no GPU work`, `oom`, `no calibrated ceiling`).

Within a repetition a decode step's rows are pooled over its steps (a run folder's by their median; a capture's by
their mean, so that its classes, idle time and overlap add up to its step: capture_rows.py): steps within one
repetition are not independent (they share its warm caches, clocks and host state), repetitions are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

SAMPLE_COLUMNS = ("row", "family", "phase", "metric", "unit", "better", "unit_id", "value", "count", "note")
LOWER, HIGHER = "lower", "higher"
TIME_MS = "time_ms"


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Records as a side's table, every column present (count NaN and note empty unless given)."""
    df = pd.DataFrame.from_records(records, columns=list(SAMPLE_COLUMNS))
    df["value"] = df["value"].astype("float64")
    df["count"] = df["count"].astype("float64")
    for col in ("note", "phase"):
        text = df[col].astype(object)
        df[col] = text.where(text.notna(), "")
    return df


def time_rows(values: pd.Series, family: str, phase: str = "", row_of: Any = None) -> list[dict[str, Any]]:
    """Records of time rows from `values` indexed by (row, unit_id) (or by unit_id alone, `row_of` then the row's
    name)."""
    out = []
    for key, v in values.items():
        row, uid = (row_of, key) if row_of is not None else key
        out.append({"row": row, "family": family, "phase": phase, "metric": TIME_MS, "unit": "ms", "better": LOWER,
                    "unit_id": _plain(uid), "value": float(v) if pd.notna(v) else np.nan})
    return out


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
