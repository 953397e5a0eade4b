"""The records of a served load read and checked (`kvscope serve` writes them; the analysis only reads them).

A serve run folder holds requests.parquet (one row per request), iterations.parquet (one row per scheduler
iteration), batches.parquet (one row per request an iteration carried) and memory.parquet (the memory ledger), with
the run's metadata under the Parquet schema key `kvscope` (`meta["serve"]`: policy, rps, concurrency, block size,
token budget, preemption mode, SLOs, ...). A serve sweep folder holds serve_sweep.parquet (one summary row per point,
`policy`, `rps`, `concurrency` first) and one run folder per point.

Every problem is a one-line `KvscopeError` naming the path: a file missing, empty or not Parquet, a missing column,
text where numbers belong, a request or an iteration twice, a status or kind kvscope does not write, a batch row of
an iteration or a request the other files do not hold, a file of another run (`inputs.check_same_run`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.inputs import (
    check_same_run,
    file_metadata,
    read_parquet,
    require_columns,
    require_numbers,
    require_rows,
    shown_value,
)
from kvscope.errors import KvscopeError
from kvscope.schema import (
    BATCH_COLUMNS,
    BATCHES_FILE,
    ITERATION_COLUMNS,
    ITERATIONS_FILE,
    LEDGER_COLUMNS,
    LEDGER_FILE,
    NSYS_RUN_SUBFOLDER,
    POLICIES,
    REQUEST_COLUMNS,
    REQUEST_STATUSES,
    REQUESTS_FILE,
    SERVE_SWEEP_FILE,
)

ITERATION_KINDS = ("prefill", "decode", "mixed")  # iterations.parquet `kind`
BATCH_KINDS = ("prefill", "decode")  # batches.parquet `kind`: what a request put into an iteration
REQUEST_NUMBERS = ("arrival_s", "admitted_s", "first_token_s", "finish_s", "queue_ms", "ttft_ms", "tpot_ms", "e2e_ms",
                   "prompt_tokens", "output_tokens", "generated_tokens", "preemptions", "preempt_recompute",
                   "preempt_swap")
REQUEST_COUNTS = ("prompt_tokens", "output_tokens", "generated_tokens", "preemptions", "preempt_recompute",
                  "preempt_swap")
ITERATION_NUMBERS = tuple(c for c in ITERATION_COLUMNS if c != "kind")
ITERATION_COUNTS = ("iteration", "prefill_tokens", "prefill_seqs", "decode_seqs", "tokens", "context_tokens",
                    "running", "waiting", "swapped", "blocks_used", "blocks_free", "token_slots_used",
                    "block_slots_held", "preempted")
BATCH_NUMBERS = ("iteration", "tokens", "context_len")
SWEEP_KEY_COLUMNS = ("policy", "rps", "concurrency")  # the first columns of a serve sweep's rows
WHAT_RUN = "a kvscope serve run file"
WHAT_SWEEP = "a kvscope serve sweep file"
POINT_COLUMN = "point"  # a serve sweep row's run folder, by name (`kvscope serve` writes it)
POINT_FOLDER_COLUMN = "folder"  # added by read_serve_sweep: the point's run folder (its name), "" where none


@dataclass(frozen=True)
class ServeRun:
    """A serve run folder read and checked (`read_serve_run`): its four tables (number columns as numbers) and the
    run's metadata (requests.parquet's `kvscope` metadata; {} where it has none)."""

    path: Path
    requests: pd.DataFrame
    iterations: pd.DataFrame
    batches: pd.DataFrame
    ledger: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def serve(self) -> dict[str, Any]:
        """The metadata's `serve` entry (policy, rps, concurrency, block_size, ...); {} where there is none."""
        entry = self.metadata.get("serve")
        return entry if isinstance(entry, dict) else {}


@dataclass(frozen=True)
class ServeSweep:
    """A serve sweep folder read (`read_serve_sweep`): its rows (SERVE_SWEEP_FILE, with POINT_FOLDER_COLUMN added)
    and the run folder of each row where one was found."""

    path: Path
    table: pd.DataFrame
    points: dict[int, Path] = field(default_factory=dict)  # row position -> the point's run folder
    metadata: dict[str, Any] = field(default_factory=dict)


def is_serve_run(folder: Path) -> bool:
    """Whether `folder` is a serve run folder (it holds requests.parquet)."""
    return folder.is_dir() and (folder / REQUESTS_FILE).is_file()


def find_serve_run(source: Path) -> Path | None:
    """The serve run folder of `source`: `source` itself, or the `run/` of a `kvscope nsys -- serve` output folder;
    None when neither is one."""
    for candidate in (source, source / NSYS_RUN_SUBFOLDER):
        if is_serve_run(candidate):
            return candidate
    return None


def is_serve_sweep(folder: Path) -> bool:
    """Whether `folder` is a serve sweep folder (it holds serve_sweep.parquet)."""
    return folder.is_dir() and (folder / SERVE_SWEEP_FILE).is_file()


def _first_bad(mask: np.ndarray) -> int | None:
    hit = np.flatnonzero(mask)
    return int(hit[0]) if len(hit) else None


def _no_negative(df: pd.DataFrame, raw: pd.DataFrame, label: Path | str, columns: tuple[str, ...]) -> None:
    """Counts are whole numbers >= 0 where present (missing cells allowed)."""
    for col in columns:
        v = df[col].to_numpy(np.float64, na_value=np.nan)
        present = ~np.isnan(v)
        bad = present & (~np.isfinite(v) | (v < 0))
        bad[present & ~bad] = v[present & ~bad] != np.trunc(v[present & ~bad])
        i = _first_bad(bad)
        if i is not None:
            raise KvscopeError(f"{label}: column {col} holds {shown_value(raw[col].iloc[i])} in row {i + 1}; it "
                               "takes whole numbers >= 0")


def _once(df: pd.DataFrame, label: Path | str, key: list[str], what: str) -> None:
    repeated = df.duplicated(key, keep="first").to_numpy(bool)
    i = _first_bad(repeated)
    if i is not None:
        shown = ", ".join(f"{k} {shown_value(df[k].iloc[i])}" for k in key)
        raise KvscopeError(f"{label}: row {i + 1} repeats {shown}: {what}")


def _known(df: pd.DataFrame, label: Path | str, col: str, allowed: tuple[str, ...]) -> None:
    text = df[col].astype("string")
    bad = ~text.isin(list(allowed)).fillna(False).to_numpy(bool)
    i = _first_bad(bad)
    if i is not None:
        raise KvscopeError(f"{label}: column {col} holds {shown_value(df[col].iloc[i])} in row {i + 1}; kvscope "
                           f"writes {', '.join(allowed)}")


def checked_requests(df: pd.DataFrame, label: Path | str) -> pd.DataFrame:
    """requests.parquet checked: its columns, a row at least, numbers as numbers, counts whole and >= 0, each
    request once, statuses kvscope writes."""
    require_columns(df, label, REQUEST_COLUMNS, WHAT_RUN)
    require_rows(df, label)
    out = require_numbers(df, label, REQUEST_NUMBERS, WHAT_RUN)
    _no_negative(out, df, label, REQUEST_COUNTS)
    _once(out, label, ["request_id"], "a request is one row")
    _known(out, label, "status", REQUEST_STATUSES)
    return out


def checked_iterations(df: pd.DataFrame, label: Path | str) -> pd.DataFrame:
    """iterations.parquet checked (it may have no rows: a load whose requests were all refused)."""
    require_columns(df, label, ITERATION_COLUMNS, WHAT_RUN)
    out = require_numbers(df, label, ITERATION_NUMBERS, WHAT_RUN)
    _no_negative(out, df, label, ITERATION_COUNTS)
    dur = out["dur_ms"].to_numpy(np.float64, na_value=np.nan)
    i = _first_bad(~np.isfinite(dur) | (dur < 0))
    if i is not None:
        raise KvscopeError(f"{label}: column dur_ms holds {shown_value(df['dur_ms'].iloc[i])} in row {i + 1}; a "
                           "duration is a finite number >= 0")
    _once(out, label, ["iteration"], "an iteration is one row")
    _known(out, label, "kind", ITERATION_KINDS)
    return out.sort_values("iteration", kind="stable").reset_index(drop=True)


def checked_batches(df: pd.DataFrame, label: Path | str) -> pd.DataFrame:
    require_columns(df, label, BATCH_COLUMNS, WHAT_RUN)
    out = require_numbers(df, label, BATCH_NUMBERS, WHAT_RUN)
    _no_negative(out, df, label, BATCH_NUMBERS)
    _once(out, label, ["iteration", "request_id"], "an iteration carries a request once")
    _known(out, label, "kind", BATCH_KINDS)
    return out


def _references(batches: pd.DataFrame, iterations: pd.DataFrame, requests: pd.DataFrame, label: Path) -> None:
    """Every batch row names an iteration of iterations.parquet and a request of requests.parquet."""
    for col, other, name in (("iteration", iterations, ITERATIONS_FILE), ("request_id", requests, REQUESTS_FILE)):
        bad = ~batches[col].isin(other[col]).to_numpy(bool)
        i = _first_bad(bad)
        if i is not None:
            raise KvscopeError(f"{label}: row {i + 1} names {col} {shown_value(batches[col].iloc[i])}, which "
                               f"{name} does not hold (files of two runs?)")


def read_serve_run(folder: Path) -> ServeRun:
    """The serve run folder `folder` read and checked (see the module docstring); the error names the path."""
    if not folder.is_dir():
        raise KvscopeError(f"{folder} is not a folder")
    if not (folder / REQUESTS_FILE).exists():
        raise KvscopeError(f"{folder} is not a kvscope serve run folder (no {REQUESTS_FILE} in it)")
    names = (REQUESTS_FILE, ITERATIONS_FILE, BATCHES_FILE, LEDGER_FILE)
    files = {name: read_parquet(folder / name) for name in names}
    requests = checked_requests(files[REQUESTS_FILE], folder / REQUESTS_FILE)
    iterations = checked_iterations(files[ITERATIONS_FILE], folder / ITERATIONS_FILE)
    batches = checked_batches(files[BATCHES_FILE], folder / BATCHES_FILE)
    ledger = files[LEDGER_FILE]
    require_columns(ledger, folder / LEDGER_FILE, LEDGER_COLUMNS, WHAT_RUN)
    ledger = require_numbers(ledger, folder / LEDGER_FILE, ("bytes",), WHAT_RUN)
    _references(batches, iterations, requests, folder / BATCHES_FILE)
    meta = check_same_run(folder, files) or {}
    return ServeRun(folder, requests, iterations, batches, ledger, meta)


def _same(a: object, b: object) -> bool:
    """Two settings alike: equal, or both missing (None / NaN); numbers compared as floats."""
    missing = [x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA for x in (a, b)]
    if all(missing):
        return True
    if any(missing):
        return False
    try:
        return float(a) == float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(a) == str(b)


def _point_folders(folder: Path, table: pd.DataFrame) -> dict[int, Path]:
    """Each row's run folder: the subfolder its `point` column names (what `kvscope serve` writes), else the
    subfolder whose metadata's `serve` entry has the row's policy, rps and concurrency (the first by name)."""
    found: dict[int, Path] = {}
    if POINT_COLUMN in table.columns:
        for i, name in enumerate(table[POINT_COLUMN]):
            if isinstance(name, str) and name and Path(name).name == name and is_serve_run(folder / name):
                found[i] = folder / name
    taken = set(found.values())
    for sub in sorted(p for p in folder.iterdir() if is_serve_run(p) and p not in taken):
        meta = file_metadata(sub / REQUESTS_FILE) or {}
        serve = meta.get("serve") if isinstance(meta.get("serve"), dict) else {}
        for i, row in enumerate(table.itertuples(index=False)):
            if i not in found and all(_same(serve.get(k), getattr(row, k)) for k in SWEEP_KEY_COLUMNS):
                found[i] = sub
                break
    return found


def read_serve_sweep(folder: Path) -> ServeSweep:
    """The serve sweep folder `folder`: its rows (the key columns checked, rps and concurrency as numbers) and each
    row's run folder where a subfolder's metadata matches it (POINT_FOLDER_COLUMN names it)."""
    if not folder.is_dir():
        raise KvscopeError(f"{folder} is not a folder")
    path = folder / SERVE_SWEEP_FILE
    if not path.exists():
        raise KvscopeError(f"{folder} is not a kvscope serve sweep folder (no {SERVE_SWEEP_FILE} in it)")
    table = read_parquet(path)
    require_columns(table, path, SWEEP_KEY_COLUMNS, WHAT_SWEEP)
    require_rows(table, path)
    table = require_numbers(table, path, ("rps", "concurrency"), WHAT_SWEEP).reset_index(drop=True)
    _known(table, path, "policy", POLICIES)
    points = _point_folders(folder, table)
    table[POINT_FOLDER_COLUMN] = [points[i].name if i in points else "" for i in range(len(table))]
    return ServeSweep(folder, table, points, file_metadata(path) or {})
