"""`kvscope diff --fail-if slower:3%[:ROW]`: a gate on one row of a diff, for CI.

The gate reads the row's 95% interval of B / A as a slowdown (for a time, B / A - 1; for a rate or a share of a
ceiling, A / B - 1, so that "slower" always means worse) and answers with an exit code:

- 1: the slowdown is beyond the threshold with confidence (the whole interval lies above it);
- 0: it is not (the whole interval lies at or below it: the same, faster, or slower by less);
- 2: it cannot tell, with the reason: the interval straddles the threshold (run more repetitions, or accept a wider
  threshold), or the row has no interval (too few samples, a different model or shape, an empty or truncated
  capture, a range without GPU work, devices without ceilings).

ROW is a row of the diff by its name (`decode step`, `prefill`, `decode L00.attn`, `decode class gemm`, `all points
decode_p50_ms_per_tok`); without one, the diff's headline row (`compare.headline_row`: the decode step where there
is one). Several gates: 1 if any fails, else 2 if any cannot tell, else 0.

Expected false alarms: where A and B are the same code on the same machine and the threshold exceeds the noise
between two runs, the interval lies above the threshold in at most 2.5% of diffs (one side of a 95% interval); runs
that drift apart by more than the threshold (a busy or throttled host) raise that rate, which
`benchmarks/diff_gate_rates.py` measures (docs/diff.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pandas as pd

from kvscope.analysis.diff.rows import HIGHER
from kvscope.errors import KvscopeError

PASS, FAIL, CANNOT_TELL = 0, 1, 2
DIRECTIONS = ("slower",)
_SPEC = re.compile(r"^(?P<dir>[a-z]+):(?P<pct>[^:%]+)%?(?::(?P<row>.+))?$")
MAX_PCT = 1000.0
_ROWS_SHOWN = 8  # row names listed when a gate names one the diff lacks


@dataclass(frozen=True)
class Gate:
    """One `--fail-if`: slower by more than `pct` percent, on `row` (None: the headline row)."""

    text: str
    direction: str
    pct: float
    row: str | None


@dataclass(frozen=True)
class GateOutcome:
    """A gate's answer: `code` (PASS, FAIL, CANNOT_TELL), the row it read, and one line saying why."""

    gate: Gate
    row: str
    code: int
    message: str


def parse_gate(text: str) -> Gate:
    """`slower:3%`, `slower:3`, `slower:2.5%:decode class gemm`; anything else is a one-line error."""
    m = _SPEC.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise KvscopeError(f"--fail-if {text!r}: expected slower:PCT or slower:PCT:ROW, e.g. slower:3% or "
                           "'slower:5%:decode class gemm'")
    if m["dir"] not in DIRECTIONS:
        raise KvscopeError(f"--fail-if {text!r}: {m['dir']!r} is not a direction ({', '.join(DIRECTIONS)})")
    try:
        pct = float(m["pct"])
    except ValueError:
        raise KvscopeError(f"--fail-if {text!r}: {m['pct']!r} is not a percentage") from None
    if not (math.isfinite(pct) and 0 <= pct <= MAX_PCT):
        raise KvscopeError(f"--fail-if {text!r}: the threshold must be from 0 to {MAX_PCT:g}%, got {m['pct']}")
    row = m["row"].strip() if m["row"] else None
    return Gate(text.strip(), m["dir"], pct, row or None)


def evaluate(gate: Gate, table: pd.DataFrame, headline: str | None) -> GateOutcome:
    """The gate's answer on the diff `table` (see the module docstring)."""
    name = gate.row or headline
    if name is None:
        raise KvscopeError(f"--fail-if {gate.text}: the diff has no headline row; name one (slower:PCT:ROW)")
    hits = table[table["row"] == name]
    if not len(hits):
        shown = ", ".join(repr(r) for r in table["row"].head(_ROWS_SHOWN))
        raise KvscopeError(f"--fail-if {gate.text}: the diff has no row {name!r} (its first rows: {shown})")
    line = hits.iloc[0]
    lo, hi = float(line["ci_low_pct"]), float(line["ci_high_pct"])
    where = f"gate {gate.direction}:{gate.pct:g}% on {name!r}"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return GateOutcome(gate, name, CANNOT_TELL, f"{where}: cannot tell: {line['reason']}")
    if line["better"] == HIGHER:  # a rate: a slowdown is B below A
        lo, hi = _slowdown(hi), _slowdown(lo)
    shown = f"slower by {lo:+.1f}% to {hi:+.1f}% (95% interval)"
    if lo > gate.pct:
        return GateOutcome(gate, name, FAIL, f"{where}: failed: B is {shown}, beyond {gate.pct:g}%")
    if hi <= gate.pct:
        return GateOutcome(gate, name, PASS, f"{where}: passed: B is {shown}, not beyond {gate.pct:g}%")
    return GateOutcome(gate, name, CANNOT_TELL, f"{where}: cannot tell: B is {shown}, which straddles {gate.pct:g}% "
                                                "(more samples narrow it)")


def _slowdown(rate_change_pct: float) -> float:
    """A rate's change (B / A - 1, %) as the time's: A / B - 1 (%)."""
    ratio = 1.0 + rate_change_pct / 100.0
    return (1.0 / ratio - 1.0) * 100.0 if ratio > 0 else math.inf


def combined(outcomes: list[GateOutcome]) -> int:
    """The exit code of several gates: FAIL if any failed, else CANNOT_TELL if any could not tell, else PASS."""
    codes = {o.code for o in outcomes}
    return FAIL if FAIL in codes else CANNOT_TELL if CANNOT_TELL in codes else PASS
