"""The load sources of `kvscope serve` (`kvscope.measure.serve.load`): Poisson arrivals (seeded, at the asked rate,
cut by count or duration), the closed loop (exactly N handed out, one per completion), the checks of the load's
numbers, the synthetic prompts, and `argtypes.positive_rate`."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import numpy as np
import pytest

from kvscope.argtypes import RATE_MAX, positive_rate
from kvscope.errors import KvscopeError
from kvscope.measure.serve.lengths import parse_length_dist
from kvscope.measure.serve.load import (
    ClosedLoop,
    RequestSpec,
    check_concurrency,
    check_duration,
    check_rate,
    closed_loop,
    open_loop,
    synthetic_prompt,
)

PROMPT = parse_length_dist("uniform:16:64", "--prompt-len")
OUTPUT = parse_length_dist("lognormal:32:0.8:max=128", "--output-len")


def test_open_loop_is_reproducible_and_seeded() -> None:
    a = open_loop(4.0, 500, None, PROMPT, OUTPUT, seed=3)
    assert a == open_loop(4.0, 500, None, PROMPT, OUTPUT, seed=3)
    assert a != open_loop(4.0, 500, None, PROMPT, OUTPUT, seed=4)
    assert [s.request_id for s in a] == list(range(500))
    assert all(isinstance(s, RequestSpec) and type(s.arrival_s) is float and type(s.prompt_tokens) is int
               and type(s.output_tokens) is int for s in a)
    times = [s.arrival_s for s in a]
    assert times == sorted(times) and times[0] > 0  # the first arrival one gap after 0
    assert all(16 <= s.prompt_tokens <= 64 and 1 <= s.output_tokens <= 128 for s in a)


def test_open_loop_mean_rate_over_many_arrivals() -> None:
    """200,000 arrivals at 5 per second: the rate n / T (T the last arrival, a Gamma(n) time) has a relative standard
    deviation of 1 / sqrt(n) = 0.22%, so it is within 5 of them (1.12%); the gaps are exponential: their coefficient
    of variation is 1, its estimate's relative standard deviation sqrt(2 / n) = 0.32% (5 of them: 1.6%)."""
    n, rate = 200_000, 5.0
    times = np.array([s.arrival_s for s in open_loop(rate, n, None, PROMPT, OUTPUT, seed=0)])
    assert len(times) == n
    assert abs(n / times[-1] / rate - 1) < 5 / math.sqrt(n)
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert abs(gaps.std() / gaps.mean() - 1) < 5 * math.sqrt(2 / n)
    for seed in range(1, 6):  # other seeds too (10,000 arrivals each: 5 / sqrt(n) = 5%)
        t = open_loop(rate, 10_000, None, PROMPT, OUTPUT, seed=seed)[-1].arrival_s
        assert abs(10_000 / t / rate - 1) < 5 / math.sqrt(10_000)


def test_duration_cut_keeps_every_arrival_before_it() -> None:
    """Over a duration D at rate r the count is Poisson(rD): within 5 sqrt(rD) of rD; the same seed and rate give the
    same first arrivals whether cut by count or by duration."""
    rate, duration = 50.0, 2_000.0
    specs = open_loop(rate, None, duration, PROMPT, OUTPUT, seed=9)
    assert all(s.arrival_s < duration for s in specs)
    assert abs(len(specs) - rate * duration) < 5 * math.sqrt(rate * duration)
    longer = open_loop(rate, len(specs) + 1, None, PROMPT, OUTPUT, seed=9)
    assert longer[:-1] == specs and longer[-1].arrival_s >= duration


def test_count_and_duration_stop_at_whichever_comes_first() -> None:
    by_count = open_loop(10.0, 20, 1_000.0, PROMPT, OUTPUT, seed=1)  # 20 arrivals: 1.19 s with this seed
    assert len(by_count) == 20 and by_count[-1].arrival_s < 3.0
    by_time = open_loop(10.0, 10_000, 3.0, PROMPT, OUTPUT, seed=1)  # 33 arrivals in 3 s with this seed
    assert 20 < len(by_time) < 10_000 and by_time[:20] == by_count
    assert all(s.arrival_s < 3.0 for s in by_time)
    assert open_loop(0.001, None, 0.01, PROMPT, OUTPUT, seed=1) == []  # no arrival in a short window: empty


def test_lengths_of_request_i_do_not_depend_on_the_source() -> None:
    """The lengths come from their own streams: request i has the same lengths at any rate, and in a closed loop."""
    a = open_loop(2.0, 5_000, None, PROMPT, OUTPUT, seed=5)
    b = open_loop(900.0, 5_000, None, PROMPT, OUTPUT, seed=5)
    loop = closed_loop(7, 5_000, None, PROMPT, OUTPUT, seed=5)
    c = loop.start()
    while (nxt := loop.on_finish(1.0)) is not None:
        c.append(nxt)
    lengths = lambda specs: [(s.prompt_tokens, s.output_tokens) for s in specs]  # noqa: E731
    assert lengths(a) == lengths(b) == lengths(c)


@pytest.mark.parametrize(("concurrency", "n"), [(4, 10), (16, 5), (1, 1), (3, 3)])
def test_closed_loop_hands_out_exactly_n(concurrency: int, n: int) -> None:
    loop = closed_loop(concurrency, n, None, PROMPT, OUTPUT, seed=0)
    assert isinstance(loop, ClosedLoop)
    first = loop.start()
    assert len(first) == min(concurrency, n) and all(s.arrival_s == 0.0 for s in first)
    handed, now = list(first), 0.0
    for _ in range(3 * n):  # more completions reported than requests: the surplus gets None
        now += 0.5
        spec = loop.on_finish(now)
        if spec is not None:
            assert spec.arrival_s == now
            handed.append(spec)
    assert [s.request_id for s in handed] == list(range(n))
    assert loop.issued == n and loop.done


def test_closed_loop_stops_at_the_duration() -> None:
    loop = closed_loop(2, None, 10.0, PROMPT, OUTPUT, seed=0)
    assert len(loop.start()) == 2
    assert loop.on_finish(4.0).arrival_s == 4.0  # type: ignore[union-attr]
    assert loop.on_finish(9.999) is not None and not loop.done
    assert loop.on_finish(10.0) is None and loop.done
    assert loop.on_finish(12.0) is None and loop.issued == 4
    both = closed_loop(2, 3, 10.0, PROMPT, OUTPUT, seed=0)  # the count first
    both.start()
    assert both.on_finish(1.0) is not None and both.on_finish(2.0) is None


def test_closed_loop_misuse_is_a_programming_error() -> None:
    loop = closed_loop(2, 5, None, PROMPT, OUTPUT, seed=0)
    with pytest.raises(RuntimeError, match="before start"):
        loop.on_finish(1.0)
    loop.start()
    with pytest.raises(RuntimeError, match="twice"):
        loop.start()
    loop.on_finish(2.0)
    with pytest.raises(ValueError, match="goes back"):
        loop.on_finish(1.0)
    with pytest.raises(ValueError, match="not finite"):
        loop.on_finish(float("nan"))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: open_loop(0.0, 5, None, PROMPT, OUTPUT, 0), "--rps: must be a positive finite number"),
    (lambda: open_loop(float("inf"), 5, None, PROMPT, OUTPUT, 0), "--rps: must be a positive finite number"),
    (lambda: open_loop(RATE_MAX * 2, 5, None, PROMPT, OUTPUT, 0), "--rps: must be a positive finite number"),
    (lambda: open_loop(1.0, None, None, PROMPT, OUTPUT, 0), "needs --requests or --duration"),
    (lambda: open_loop(1.0, 0, None, PROMPT, OUTPUT, 0), "--requests: must be a whole number from 1"),
    (lambda: open_loop(1.0, 2.5, None, PROMPT, OUTPUT, 0), "--requests: must be a whole number from 1"),
    (lambda: open_loop(1.0, True, None, PROMPT, OUTPUT, 0), "--requests: must be a whole number from 1"),
    (lambda: open_loop(1.0, None, -1.0, PROMPT, OUTPUT, 0), "--duration: must be a positive finite number"),
    (lambda: open_loop(1.0, None, float("nan"), PROMPT, OUTPUT, 0), "--duration: must be a positive finite"),
    (lambda: open_loop(1e6, None, 1e5, PROMPT, OUTPUT, 0), "is about 100,000,000,000 requests, more than"),
    (lambda: open_loop(1.0, 5, None, PROMPT, OUTPUT, -1), "--seed: must be a whole number from 0"),
    (lambda: closed_loop(0, 5, None, PROMPT, OUTPUT, 0), "--concurrency: must be a whole number from 1"),
    (lambda: closed_loop(2, None, None, PROMPT, OUTPUT, 0), "needs --requests or --duration"),
])
def test_bad_numbers_are_one_line_naming_the_flag(call: Callable[[], object], message: str) -> None:
    with pytest.raises(KvscopeError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_checks_return_the_value() -> None:
    assert check_rate(3) == 3.0 and type(check_rate(np.float32(2.5))) is float
    assert check_concurrency(np.int64(8)) == 8 and check_concurrency(4.0) == 4
    assert check_duration(60) == 60.0
    for bad in ("5", None, True, -2, float("nan")):
        with pytest.raises(KvscopeError, match=r"^--my-flag: "):
            check_rate(bad, "--my-flag")
        with pytest.raises(KvscopeError, match=r"^--concurrency: "):
            check_concurrency(bad)


def test_synthetic_prompt_is_seeded_and_in_the_vocabulary() -> None:
    a = synthetic_prompt(np.random.default_rng(1), 1000, 50)
    assert a == synthetic_prompt(np.random.default_rng(1), 1000, 50)
    assert len(a) == 1000 and all(type(t) is int and 0 <= t < 50 for t in a) and len(set(a)) == 50
    with pytest.raises(ValueError):
        synthetic_prompt(np.random.default_rng(1), 0, 50)


@pytest.mark.parametrize(("text", "message"), [
    ("0", "must be a positive number"), ("-1", "must be a positive number"), ("nan", "must be a finite number"),
    ("inf", "must be a finite number"), ("2e9", "must be at most 1,000,000,000 per second"),
])
def test_positive_rate_argtype(text: str, message: str) -> None:
    assert positive_rate("2.5") == 2.5 and positive_rate("1e9") == 1e9
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        positive_rate(text)
    with pytest.raises(ValueError):
        positive_rate("fast")


def test_positive_rate_in_a_parser(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="serve")
    parser.add_argument("--rps", type=positive_rate)
    assert parser.parse_args(["--rps", "4"]).rps == 4.0
    for text, said in (("x", "invalid float value: 'x'"), ("0", "argument --rps: must be a positive number")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--rps", text])
        assert said in capsys.readouterr().err
