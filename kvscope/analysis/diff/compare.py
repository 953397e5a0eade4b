"""`kvscope diff A B`: read both sides (sources.py), build each side's rows (run_rows, capture_rows, sweep_rows,
serve_rows), match
and judge them (verdicts.py), the waterfall (waterfall.py); write diff.parquet and diff.md into a folder written whole
or not at all.

A and B must be like measurements: of one kind (sources.comparable), and of one model, dtype and shape; a
difference there is refused in one line, unless `allow_different`, which keeps every row with its two numbers and
the verdict "cannot tell" (the reason names the difference). Devices may differ: times then compare as times (the
reason says the devices), and the share of each side's calibrated ceiling (MBU, MFU) is compared as well, or
"cannot tell" where a side has no ceiling.

Order of the table: the largest changes first (time rows by |B - A| in ms, then the others by |change| in %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from kvscope.analysis.diff.capture_rows import capture_rows
from kvscope.analysis.diff.gate import Gate, GateOutcome, combined, evaluate
from kvscope.analysis.diff.rows import SAMPLE_COLUMNS
from kvscope.analysis.diff.run_rows import efficiency_rows, run_rows
from kvscope.analysis.diff.serve_rows import HEADLINE_ROW as SERVE_HEADLINE_ROW
from kvscope.analysis.diff.serve_rows import serve_rows
from kvscope.analysis.diff.sources import (
    CAPTURE,
    RUN,
    SERVE,
    SWEEP,
    Side,
    comparable,
    identity_differences,
    read_side,
    setting_differences,
)
from kvscope.analysis.diff.sweep_rows import EFFICIENCY_COLUMNS, TIME_COLUMNS, point_keys, sweep_rows
from kvscope.analysis.diff.verdicts import Context, judge_rows
from kvscope.analysis.diff.waterfall import waterfall
from kvscope.errors import KvscopeError

DEFAULT_THRESHOLD_PCT = 2.0
MAX_THRESHOLD_PCT = 100.0
# the rows a gate reads when it names none, in order: the first the diff holds
HEADLINE_ROWS = ("decode step", "decode step GPU span", "all points decode_p50_ms_per_tok", "prefill",
                 "prefill GPU span", "all points prefill_p50_ms", SERVE_HEADLINE_ROW)
# families shown first on the terminal (the step, the phases, the whole repetition, the sweep's pooled rows)
HEADLINE_FAMILIES = ("steps", "phase", "rep", "host", "gpu steps", "points", "efficiency", "request", "load")


@dataclass(frozen=True)
class DiffResult:
    """A diff: the two sides as compared, the table (verdicts.DIFF_COLUMNS, largest changes first), the waterfall
    (waterfall.WATERFALL_COLUMNS), the band, and notes (settings that differ, devices, capture problems)."""

    a: Side
    b: Side
    table: pd.DataFrame
    waterfall: pd.DataFrame
    threshold_pct: float
    notes: list[str] = field(default_factory=list)
    gates: list[GateOutcome] = field(default_factory=list)  # the answers of the gates asked (`with_gates`)

    @property
    def kind(self) -> str:
        return self.a.kind

    @property
    def exit_code(self) -> int:
        """The gates' exit code (gate.combined), 0 without gates."""
        return combined(self.gates) if self.gates else 0

    def headline_row(self) -> str | None:
        """The row a gate reads when it names none: the first of HEADLINE_ROWS the table holds."""
        rows = set(self.table["row"])
        return next((r for r in HEADLINE_ROWS if r in rows), None)

    def gate(self, gate: Gate) -> GateOutcome:
        return evaluate(gate, self.table, self.headline_row())

    def with_gates(self, gates: list[Gate]) -> DiffResult:
        """This diff with the answers of `gates` (a row the diff lacks is a one-line error)."""
        return replace(self, gates=[self.gate(g) for g in gates])


def check_threshold(value: object, name: str = "--threshold") -> float:
    """The band's half-width in %: a number above 0 and below MAX_THRESHOLD_PCT."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 < value < MAX_THRESHOLD_PCT:
        raise KvscopeError(f"{name} must be a percentage above 0 and below {MAX_THRESHOLD_PCT:g}, got {value!r}")
    return float(value)


def diff(a: Path, b: Path, threshold_pct: float = DEFAULT_THRESHOLD_PCT, allow_different: bool = False
         ) -> DiffResult:
    """The diff of A and B (module docstring). Raises KvscopeError for input that is not two like measurements."""
    threshold_pct = check_threshold(threshold_pct)
    side_a, side_b = comparable(read_side(a, "A"), read_side(b, "B"))
    different = identity_differences(side_a, side_b)
    if different and not allow_different:
        what = ("served loads of one model, dtype and load" if side_a.kind == SERVE
                else "runs of one model, dtype and shape")
        raise KvscopeError(f"A {a} and B {b} are different measurements: {', '.join(different)}; kvscope diff "
                           f"compares {what} (--allow-different shows them side by side, every verdict 'cannot "
                           "tell')")
    devices = _devices(side_a, side_b)
    rows_a, rows_b = _rows(side_a, side_b, devices is not None)
    problems = {s.label: s.problem for s in (side_a, side_b) if s.problem and s.kind == CAPTURE}
    unit = "runs" if by_run(side_a, side_b) else "samples" if side_a.kind == SERVE else "repetitions"
    table = order_rows(judge_rows(rows_a, rows_b, Context(threshold_pct, different, problems, devices, unit)))
    return DiffResult(side_a, side_b, table, waterfall(table), threshold_pct,
                      _notes(side_a, side_b, devices, problems))


def _devices(a: Side, b: Side) -> tuple[str, str] | None:
    if a.device is not None and b.device is not None and a.device != b.device:
        return a.device, b.device
    return None


def _rows(a: Side, b: Side, cross_device: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each side's rows for its kind (a capture's run rows too where both sides hold their run)."""
    if a.kind == SWEEP:
        assert a.sweep is not None and b.sweep is not None
        columns = TIME_COLUMNS + (EFFICIENCY_COLUMNS if cross_device else ())
        ka, kb = point_keys(a.sweep, b.sweep)
        return sweep_rows(a.sweep, ka, columns), sweep_rows(b.sweep, kb, columns)
    if a.kind == SERVE:
        assert a.serve is not None and b.serve is not None
        return serve_rows(a.serve), serve_rows(b.serve)
    if by_run(a, b):
        return _run_level(a, cross_device), _run_level(b, cross_device)
    out = []
    for side in (a, b):
        parts = []
        if side.kind == CAPTURE:
            assert side.steps is not None and side.kernels is not None
            parts.append(capture_rows(side.steps, side.kernels))
        if side.run is not None and (a.kind == RUN or (a.run is not None and b.run is not None)):
            runs = run_rows(side.run)
            parts += [runs, efficiency_rows(side.run, runs)] if cross_device else [runs]
        out.append(pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(SAMPLE_COLUMNS)))
    return out[0], out[1]


def by_run(a: Side, b: Side) -> bool:
    """Whether the runs are the samples: a side is a folder of run folders (each run then one sample, the median of
    its repetitions' samples; a single run folder on the other side counts as one run)."""
    return a.kind == RUN and (len(a.runs) > 1 or len(b.runs) > 1)


def _run_level(side: Side, cross_device: bool) -> pd.DataFrame:
    """Each run's rows collapsed to one sample per row: the median over its repetitions (unit_id: the run's
    number)."""
    parts = []
    for i, run in enumerate(side.runs):
        rows = run_rows(run)
        if cross_device:
            rows = pd.concat([rows, efficiency_rows(run, rows)], ignore_index=True)
        first = rows.groupby("row", sort=False).first()
        median = rows.groupby("row", sort=False)[["value", "count"]].median()
        one = first.drop(columns=["value", "count", "unit_id"]).join(median).reset_index()
        parts.append(one.assign(unit_id=i)[list(SAMPLE_COLUMNS)])
    return pd.concat(parts, ignore_index=True)


def order_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The largest changes first: time rows (ms) by |diff| descending, then the others by |diff_pct| descending;
    rows without a number last, each group in its original order."""
    is_ms = table["unit"] == "ms"
    size = table["diff"].abs().where(is_ms, table["diff_pct"].abs())
    key = pd.DataFrame({"group": (~is_ms).astype(int) + size.isna().astype(int) * 2, "size": -size.fillna(0)})
    order = key.sort_values(["group", "size"], kind="stable").index
    return table.loc[order].reset_index(drop=True)


def _notes(a: Side, b: Side, devices: tuple[str, str] | None, problems: dict[str, str]) -> list[str]:
    notes = []
    changed = setting_differences(a, b)
    if changed:
        notes.append(f"settings that differ: {', '.join(changed)}")
    if devices is not None:
        notes.append(f"different devices ({devices[0]} vs {devices[1]}): times compare as times; MBU and MFU compare "
                     "each side's share of its own calibrated ceiling")
    for label, problem in problems.items():
        notes.append(f"{label}: {problem}: its capture's rows cannot tell")
    return notes


def headline(result: DiffResult) -> pd.DataFrame:
    """The rows shown first: the headline families, in the table's order."""
    return result.table[result.table["family"].isin(HEADLINE_FAMILIES)]


def describe(side: Side) -> str:
    """One line saying what a side is: its path, kind, model, dtype, shape and device, where known."""
    ident = side.identity
    shape = (f"batch {ident['batch']}, seq {ident['seq_len']}, gen {ident['gen_tokens']}"
             if ident.get("batch") is not None else None)
    if side.kind == SERVE:
        loop = f"rps {ident['rps']}" if ident.get("rps") is not None else f"concurrency {ident.get('concurrency')}"
        shape = (f"{side.settings.get('policy', '?')}, {loop}, prompt {ident.get('prompt_len')}, output "
                 f"{ident.get('output_len')}")
    kind = f"{len(side.runs)} run folders" if len(side.runs) > 1 else side.kind
    parts: list[Any] = [kind, ident.get("model"), ident.get("dtype"), shape, side.device]
    return f"{side.label} {side.path} ({', '.join(str(p) for p in parts if p)})"
