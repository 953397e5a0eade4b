"""`--json`: one JSON object on the last line of stdout, with the paths a command wrote and its key numbers.

Values are plain JSON: numpy and pandas scalars become Python numbers, a missing or non-finite number (NaN, NA,
inf) becomes null, paths become strings. Torch-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvscope.schema import NS_PER_MS

# the summary's key numbers that `kvscope run --json` and `kvscope sweep --json` report
RUN_KEY_COLUMNS = ("seq_len", "batch", "gen_tokens", "clock", "ttft_ms", "prefill_p50_ms", "prefill_tok_s",
                   "tpot_p50_ms", "decode_p50_ms_per_tok", "decode_tok_s", "total_tok_s", "peak_reserved_mib",
                   "spread_flag", "flag")


def plain(value: Any) -> Any:
    """`value` as plain JSON data (see the module docstring)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    return value if isinstance(value, str) else str(value)


def json_line(payload: Mapping[str, Any]) -> str:
    """One line of strict JSON (no NaN)."""
    return json.dumps(plain(payload), allow_nan=False, separators=(",", ":"))


def key_numbers(row: pd.Series, columns: Iterable[str] = RUN_KEY_COLUMNS) -> dict[str, Any]:
    """The columns of a summary row that it has, by name."""
    return {c: plain(row[c]) for c in columns if c in row.index}


def folder_files(folder: Path) -> list[str]:
    """The names of the files in `folder`, sorted."""
    return sorted(p.name for p in folder.iterdir())


def align_payload(out: Path, ranges: pd.DataFrame, kernels: pd.DataFrame) -> dict[str, Any]:
    """`kvscope align --json`: the output folder and its files, the counts of ranges and GPU operations, and the
    kernel time in all and by kernel class (ms)."""
    is_kernel = kernels["kind"] == "kernel" if "kind" in kernels else pd.Series(True, index=kernels.index)
    k = kernels.loc[is_kernel]
    by_class = (k.groupby("kernel_class", observed=True)["dur_ns"].sum() / NS_PER_MS).sort_values(ascending=False) \
        if "kernel_class" in k else pd.Series(dtype="float64")
    return {"out": out, "files": folder_files(out) if out.is_dir() else [], "ranges": len(ranges),
            "gpu_ops": len(kernels), "kernels": len(k), "kernel_time_ms": float(k["dur_ns"].sum()) / NS_PER_MS,
            "kernel_time_ms_by_class": {str(c): float(v) for c, v in by_class.items()}}
