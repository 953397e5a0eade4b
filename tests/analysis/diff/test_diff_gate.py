"""`--fail-if` (kvscope/analysis/diff/gate.py): the specs it takes and refuses, and its three answers on intervals by
hand: 1 beyond the threshold with confidence, 0 not beyond it, 2 when it cannot tell (straddling, or no interval)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kvscope.analysis.diff.gate import CANNOT_TELL, FAIL, PASS, GateOutcome, combined, evaluate, parse_gate
from kvscope.errors import KvscopeError


def _table(*rows: tuple[str, float, float, str, str]) -> pd.DataFrame:
    return pd.DataFrame([{"row": r, "ci_low_pct": lo, "ci_high_pct": hi, "better": better, "reason": reason}
                         for r, lo, hi, better, reason in rows])


TABLE = _table(("decode step", 4.0, 6.0, "lower", "the 95% interval lies above +2%"),
               ("prefill", -1.0, 2.0, "lower", "..."),
               ("decode class gemm", 1.0, 5.0, "lower", "intervals overlap"),
               ("decode step 3", math.nan, math.nan, "lower", "too few samples: 2 and 2 repetitions"),
               ("all points total_tok_s", -6.0, -4.0, "higher", "..."))


@pytest.mark.parametrize(("text", "pct", "row"), [
    ("slower:3%", 3.0, None), ("slower:3", 3.0, None), (" slower:2.5%:decode class gemm ", 2.5, "decode class gemm"),
    ("slower:0%", 0.0, None),
    ("slower:5%:decode kernel void at::native::reduce_kernel<512>(T3)", 5.0,
     "decode kernel void at::native::reduce_kernel<512>(T3)"),
])
def test_specs(text: str, pct: float, row: str | None) -> None:
    gate = parse_gate(text)
    assert (gate.direction, gate.pct, gate.row) == ("slower", pct, row)


@pytest.mark.parametrize(("text", "message"), [
    ("slower", "--fail-if 'slower': expected slower:PCT or slower:PCT:ROW, e.g. slower:3% or 'slower:5%:decode "
               "class gemm'"),
    ("slower:3%:", "--fail-if 'slower:3%:': expected slower:PCT or slower:PCT:ROW"),
    ("faster:3%", "--fail-if 'faster:3%': 'faster' is not a direction (slower)"),
    ("slower:x%", "--fail-if 'slower:x%': 'x' is not a percentage"),
    ("slower:-1%", "--fail-if 'slower:-1%': the threshold must be from 0 to 1000%, got -1"),
    ("slower:nan", "--fail-if 'slower:nan': the threshold must be from 0 to 1000%, got nan"),
    ("slower:1e9", "--fail-if 'slower:1e9': the threshold must be from 0 to 1000%, got 1e9"),
])
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(KvscopeError) as err:
        parse_gate(text)
    assert str(err.value).startswith(message)


def test_the_three_answers() -> None:
    got = {spec: evaluate(parse_gate(spec), TABLE, "decode step") for spec in (
        "slower:3%", "slower:6%", "slower:3%:prefill", "slower:3%:decode class gemm", "slower:3%:decode step 3",
        "slower:3%:all points total_tok_s")}
    assert {s: o.code for s, o in got.items()} == {
        "slower:3%": FAIL, "slower:6%": PASS, "slower:3%:prefill": PASS, "slower:3%:decode class gemm": CANNOT_TELL,
        "slower:3%:decode step 3": CANNOT_TELL, "slower:3%:all points total_tok_s": FAIL}
    assert got["slower:3%"].message == ("gate slower:3% on 'decode step': failed: B is slower by +4.0% to +6.0% (95% "
                                        "interval), beyond 3%")
    assert got["slower:6%"].message.endswith("passed: B is slower by +4.0% to +6.0% (95% interval), not beyond 6%")
    assert got["slower:3%:decode class gemm"].message.endswith(
        "cannot tell: B is slower by +1.0% to +5.0% (95% interval), which straddles 3% (more samples narrow it)")
    assert got["slower:3%:decode step 3"].message == ("gate slower:3% on 'decode step 3': cannot tell: too few "
                                                      "samples: 2 and 2 repetitions")
    # a rate 4% to 6% lower is a time 1/0.96 - 1 to 1/0.94 - 1 longer
    assert got["slower:3%:all points total_tok_s"].message.endswith(
        "failed: B is slower by +4.2% to +6.4% (95% interval), beyond 3%")


def test_a_row_the_diff_lacks() -> None:
    with pytest.raises(KvscopeError, match=r"^--fail-if slower:3%:decode L99: the diff has no row 'decode L99' \(its "
                                           r"first rows: 'decode step', 'prefill', "):
        evaluate(parse_gate("slower:3%:decode L99"), TABLE, "decode step")
    with pytest.raises(KvscopeError, match="the diff has no headline row; name one"):
        evaluate(parse_gate("slower:3%"), TABLE, None)


def test_several_gates() -> None:
    def outcome(code: int) -> GateOutcome:
        return evaluate(parse_gate("slower:3%"), _table(("r", *{PASS: (0.0, 1.0), FAIL: (4.0, 5.0),
                                                                CANNOT_TELL: (1.0, 5.0)}[code], "lower", "")), "r")

    assert combined([outcome(PASS), outcome(PASS)]) == PASS
    assert combined([outcome(PASS), outcome(CANNOT_TELL)]) == CANNOT_TELL
    assert combined([outcome(CANNOT_TELL), outcome(FAIL)]) == FAIL
