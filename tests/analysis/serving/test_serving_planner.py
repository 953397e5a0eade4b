"""The capacity planner's rate beside the measured one: the crossing of the goodput threshold interpolated by hand,
the scenario chosen, the reasons given, the plan file read."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from serving_frames import capacity_plan, sweep_rows

from kvscope.analysis.capacity import ROW_COLUMNS
from kvscope.analysis.serving.planner import (
    PLAN_COLUMNS,
    PLANNER_COLUMNS,
    Slo,
    default_scenario,
    goodput_crossing,
    is_plan_file,
    planner_vs_measured,
    read_plan,
)
from kvscope.errors import KvscopeError


def test_plan_columns_are_the_planners() -> None:
    assert tuple(ROW_COLUMNS) == PLAN_COLUMNS


def test_goodput_crossing() -> None:
    x = np.array([1.0, 2.0, 4.0, 8.0])
    assert goodput_crossing(x, np.array([1.0, 0.95, 0.85, 0.2]), 0.9) == (2.0, pytest.approx(3.0))
    best, cross = goodput_crossing(x, np.array([1.0, 1.0, 0.95, 0.92]), 0.9)
    assert best == 8.0 and math.isnan(cross)  # never below within the sweep
    best, cross = goodput_crossing(x, np.array([0.5, 0.4, 0.3, 0.2]), 0.9)
    assert math.isnan(best) and math.isnan(cross)
    assert goodput_crossing(x, np.array([1.0, math.nan, 0.8, 0.2]), 0.9) == (1.0, pytest.approx(1 + 0.1 / 0.2 * 3))


def test_planner_vs_measured() -> None:
    sweep = pd.concat([sweep_rows("chunked", [1.0, 2.0, 4.0, 8.0], [1.0] * 4, [1.0, 0.95, 0.85, 0.2]),
                       sweep_rows("prefill-first", [2.0, 1.0, 4.0], [1.0] * 3, [0.95, 1.0, 0.99])],
                      ignore_index=True)
    interf = pd.DataFrame({"policy": ["chunked"] * 2, "iteration_class": ["decode-only", "with-prefill"],
                           "itl_p50_ratio": [1.8, 1.8], "itl_p99_ratio": [3.5, 3.5]})
    df = planner_vs_measured(capacity_plan(), sweep, Slo(160.0, 100.0), interf)
    assert list(df.columns) == list(PLANNER_COLUMNS)
    c, p = (df[df["policy"] == k].iloc[0] for k in ("chunked", "prefill-first"))
    assert c["scenario"] == "paged bfloat16 KV" and c["planned_rate_per_s"] == 4.0 and c["planned_batch"] == 16
    assert c["measured_max_rps"] == 2.0 and c["measured_crossing_rps"] == pytest.approx(3.0)
    assert c["measured_over_planned"] == pytest.approx(0.75)
    assert c["why"].startswith("the planner assumes prefills do not stall the decode steps; measured interference: "
                               "decode tokens of iterations with prefill have 1.80x the decode-only ITL at p50, 3.50x")
    assert "chunked prefill splits prompts" in c["why"]
    # prefill-first meets 0.9 everywhere: no crossing; the highest point is the measured rate
    assert p["measured_max_rps"] == 4.0 and math.isnan(p["measured_crossing_rps"])
    assert p["measured_over_planned"] == pytest.approx(1.0)
    assert p["why"].startswith("the goodput stays at or above the threshold up to the largest point: the measured "
                               "rate is a lower bound; they agree within 10%")
    assert "prefill-first runs whole prompts" in p["why"]


def test_other_slo_and_scenario() -> None:
    sweep = sweep_rows("chunked", [1.0, 2.0], [1.0, 1.0], [1.0, 1.0])
    df = planner_vs_measured(capacity_plan(), sweep, Slo(200.0, 100.0), scenario="paged fp8 KV")
    r = df.iloc[0]
    assert r["planned_rate_per_s"] == 8.0 and r["measured_over_planned"] == pytest.approx(0.25)
    assert "measured against slo_ttft_ms 160, the plan's target is 200" in r["why"]
    faster = sweep_rows("chunked", [2.0, 6.0], [1.0, 1.0], [1.0, 1.0])
    above = planner_vs_measured(capacity_plan(), faster, Slo(160, 100))
    assert "; the plan's TTFT is a static batch" in above.iloc[0]["why"]
    plan = capacity_plan()
    assert default_scenario(plan[~plan["scenario"].str.startswith("paged")]) == "contiguous bfloat16 KV"


def test_bad_plans(tmp_path: Path) -> None:
    sweep = sweep_rows("chunked", [1.0], [1.0], [1.0])
    with pytest.raises(KvscopeError, match="holds no scenario with a request rate"):
        plan = capacity_plan()
        planner_vs_measured(plan[plan["quantity"] != "request_rate_per_s"].assign(scenario="x"), sweep, Slo(1, 1))
    with pytest.raises(KvscopeError, match="lacks column\\(s\\) value"):
        planner_vs_measured(capacity_plan().drop(columns="value"), sweep, Slo(1, 1))
    good = tmp_path / "plan.csv"
    capacity_plan().to_csv(good, index=False)
    assert is_plan_file(good) and read_plan(good).equals(pd.read_csv(good))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert not is_plan_file(bad) and not is_plan_file(tmp_path / "absent.csv")
    with pytest.raises(KvscopeError, match="is not a kvscope capacity table"):
        read_plan(bad)
