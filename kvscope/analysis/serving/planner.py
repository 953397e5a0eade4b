"""The capacity planner's prediction set beside the served load's measurement.

The planner (`kvscope.analysis.capacity.plan_from_sweep`, `kvscope capacity`) predicts a sustainable request rate
from a static batch sweep: at the largest batch b meeting the SLOs (and fitting memory), rate = b / (TTFT + output x
TPOT) by Little's law, assuming a continuously refilled batch whose prefills do not stall the decode steps. Its rows
(`capacity.ROW_COLUMNS`: scenario, quantity, value, unit, source, note; a `kvscope capacity --out` CSV) give
`request_rate_per_s`, `max_batch_slo`, `ttft_ms`, `tpot_ms` per scenario.

The measured side is a serve sweep over `rps` (its rows: `serve_summary` per point): the highest measured rate whose
`goodput_fraction` >= `Slo.min_goodput` (0.9), and the rate where the goodput fraction crosses it, interpolated
linearly between the last point at or above it and the first below it after that (NaN where it never falls below
within the sweep, or is below from the first point).

`measured_over_planned` is the crossing (else the highest rate meeting the threshold) over the planned rate. `why`
names what separates them: that the measured rate is only a lower bound (the goodput never fell below the threshold
within the sweep), the planner's assumption, the measured prefill interference of the policy (its
with-prefill / decode-only ITL ratios from the interference table, where given), what the policy does with prompts
(chunked splits them into budget-sized chunks; prefill-first runs them whole ahead of decode steps), and an SLO of the
sweep other than the plan's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kvscope.analysis.inputs import error_reason
from kvscope.errors import KvscopeError

PLAN_COLUMNS = ("scenario", "quantity", "value", "unit", "source", "note")  # capacity.ROW_COLUMNS
PLANNER_COLUMNS = ("policy", "scenario", "planned_rate_per_s", "planned_batch", "planned_ttft_ms", "planned_tpot_ms",
                   "measured_max_rps", "measured_crossing_rps", "measured_over_planned", "slo_ttft_ms", "slo_tpot_ms",
                   "why")
AGREE_WITHIN = 0.10  # measured / planned within this of 1: they agree


@dataclass(frozen=True)
class Slo:
    """The latency targets (ms) the plan was made for, and the goodput fraction a rate must keep to be sustained."""

    ttft_ms: float
    tpot_ms: float
    min_goodput: float = 0.9


def read_plan(path: Path) -> pd.DataFrame:
    """A `kvscope capacity --out` CSV (its header PLAN_COLUMNS), or a one-line KvscopeError."""
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KvscopeError(f"cannot read {path} ({error_reason(exc)}): not a kvscope capacity table") from None
    if tuple(df.columns) != PLAN_COLUMNS:
        raise KvscopeError(f"{path} is not a kvscope capacity table (its header is not {','.join(PLAN_COLUMNS)})")
    return df


def is_plan_file(path: Path) -> bool:
    """Whether `path` is a CSV file whose first line is the capacity table's header."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            return f.readline(4096).rstrip(b"\r\n") == ",".join(PLAN_COLUMNS).encode()
    except OSError:
        return False


def _plan_value(plan: pd.DataFrame, scenario: str, quantity: str) -> float:
    hit = plan[(plan["scenario"] == scenario) & (plan["quantity"] == quantity)]
    return float(pd.to_numeric(hit["value"], errors="coerce").iloc[0]) if len(hit) else math.nan


def default_scenario(plan: pd.DataFrame) -> str | None:
    """The scenario a serve run matches: the first `paged` one in the run's own dtype (not fp8), else the first
    with a request rate."""
    scenarios = list(dict.fromkeys(plan["scenario"].astype(str)))
    paged = [s for s in scenarios if s.startswith("paged") and "fp8" not in s]
    rated = set(plan.loc[plan["quantity"] == "request_rate_per_s", "scenario"].astype(str))
    return paged[0] if paged else next((s for s in scenarios if s in rated), None)


def goodput_crossing(x: np.ndarray, fraction: np.ndarray, threshold: float) -> tuple[float, float]:
    """(the highest x whose fraction >= threshold, the x where the fraction first falls below it, interpolated
    between the point before and the point after); x ascending, NaN points left out."""
    ok = np.isfinite(x) & np.isfinite(fraction)
    x, f = x[ok], fraction[ok]
    meets = f >= threshold
    best = float(x[meets].max()) if meets.any() else math.nan
    crossing = math.nan
    for i in range(1, len(x)):
        if meets[i - 1] and not meets[i]:
            crossing = float(x[i - 1] + (threshold - f[i - 1]) * (x[i] - x[i - 1]) / (f[i] - f[i - 1]))
            break
    return best, crossing


def _interference_ratios(interference: pd.DataFrame | None, policy: str) -> tuple[float, float]:
    if interference is None or not len(interference):
        return math.nan, math.nan
    mine = interference[(interference["policy"] == policy) & (interference["iteration_class"] == "with-prefill")]
    p50 = pd.to_numeric(mine["itl_p50_ratio"], errors="coerce").median()
    p99 = pd.to_numeric(mine["itl_p99_ratio"], errors="coerce").median()
    return float(p50), float(p99)


def _why(policy: str, ratio: float, interference: tuple[float, float], slo_note: str, lower_bound: bool) -> str:
    parts = []
    if lower_bound:
        parts.append("the goodput stays at or above the threshold up to the largest point: the measured rate is a "
                     "lower bound")
    if not math.isfinite(ratio):
        parts.append("no measured rate to compare")
    elif abs(ratio - 1) <= AGREE_WITHIN:
        parts.append(f"they agree within {AGREE_WITHIN:.0%}")
    elif ratio < 1:
        parts.append("the planner assumes prefills do not stall the decode steps")
    else:
        parts.append("the plan's TTFT is a static batch of prompts prefilled together, which overstates the TTFT "
                     "of requests arriving spread out")
    p50, p99 = interference
    if math.isfinite(p50):
        parts.append(f"measured interference: decode tokens of iterations with prefill have {p50:.2f}x the "
                     "decode-only ITL at p50" + (f", {p99:.2f}x at p99" if math.isfinite(p99) else ""))
    if policy == "chunked":
        parts.append("chunked prefill splits prompts into budget-sized chunks: shorter stalls over more iterations")
    elif policy == "prefill-first":
        parts.append("prefill-first runs whole prompts ahead of the decode steps: every running request stalls for "
                     "a whole prefill")
    if slo_note:
        parts.append(slo_note)
    return "; ".join(parts)


def _slo_note(rows: pd.DataFrame, slo: Slo) -> str:
    for col, target in (("slo_ttft_ms", slo.ttft_ms), ("slo_tpot_ms", slo.tpot_ms)):
        if col not in rows.columns:
            return "the sweep does not record its SLO"
        got = pd.to_numeric(rows[col], errors="coerce").to_numpy(np.float64)
        if not np.all(got == target):
            shown = ", ".join(sorted({f"{v:g}" for v in got}))
            return f"the sweep's goodput was measured against {col} {shown}, the plan's target is {target:g}"
    return ""


def planner_vs_measured(plan_rows: pd.DataFrame, sweep: pd.DataFrame, slo: Slo,
                        interference: pd.DataFrame | None = None, scenario: str | None = None) -> pd.DataFrame:
    """One row per policy of `sweep` (PLANNER_COLUMNS; see the module docstring): the plan's rate for `scenario`
    (default `default_scenario`) beside the measured sustainable rate."""
    missing = [c for c in PLAN_COLUMNS[:3] if c not in plan_rows.columns]
    if missing:
        raise KvscopeError(f"the capacity plan lacks column(s) {', '.join(missing)}")
    for c in ("policy", "rps"):
        if c not in sweep.columns:
            raise KvscopeError(f"the serve sweep lacks column {c}")
    scenario = scenario or default_scenario(plan_rows)
    if scenario is None:
        raise KvscopeError("the capacity plan holds no scenario with a request rate")
    planned = {q: _plan_value(plan_rows, scenario, q) for q in ("request_rate_per_s", "max_batch_slo", "ttft_ms",
                                                                "tpot_ms")}
    out = []
    for policy, rows in sweep.groupby("policy", sort=False):
        x = pd.to_numeric(rows["rps"], errors="coerce")
        if "offered_rps" in rows.columns:
            x = x.fillna(pd.to_numeric(rows["offered_rps"], errors="coerce"))
        order = np.argsort(x.to_numpy(np.float64), kind="stable")
        rows, xs = rows.iloc[order], x.to_numpy(np.float64)[order]
        if "goodput_fraction" in rows.columns:
            frac = pd.to_numeric(rows["goodput_fraction"], errors="coerce").to_numpy(np.float64)
            best, crossing = goodput_crossing(xs, frac, slo.min_goodput)
        else:
            best = crossing = math.nan
        measured = crossing if math.isfinite(crossing) else best
        rate = planned["request_rate_per_s"]
        ratio = measured / rate if rate > 0 and math.isfinite(measured) else math.nan
        note = _slo_note(rows, slo) if "goodput_fraction" in rows.columns else "the sweep has no goodput_fraction"
        out.append({"policy": policy, "scenario": scenario, "planned_rate_per_s": rate,
                    "planned_batch": planned["max_batch_slo"], "planned_ttft_ms": planned["ttft_ms"],
                    "planned_tpot_ms": planned["tpot_ms"], "measured_max_rps": best,
                    "measured_crossing_rps": crossing, "measured_over_planned": ratio, "slo_ttft_ms": slo.ttft_ms,
                    "slo_tpot_ms": slo.tpot_ms,
                    "why": _why(str(policy), ratio, _interference_ratios(interference, str(policy)), note,
                                lower_bound=math.isfinite(best) and best == np.nanmax(xs))})
    return pd.DataFrame(out, columns=list(PLANNER_COLUMNS))
