"""Token-length distributions of a served load (`kvscope.measure.serve.lengths`): the CLI forms, their refusals (one
line naming the flag and the forms), seeded samples within bounds, and the mean against many samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvscope.errors import KvscopeError
from kvscope.measure.serve.lengths import LENGTH_MAX, LengthDist, parse_length_dist

N = 200_000  # samples per statistical check


@pytest.mark.parametrize(("text", "want"), [
    ("512", LengthDist("fixed", 512, 512)),
    (" fixed:7 ", LengthDist("fixed", 7, 7)),
    ("uniform:128:1024", LengthDist("uniform", 128, 1024)),
    ("UNIFORM:5:5", LengthDist("uniform", 5, 5)),
    ("lognormal:300:1.5", LengthDist("lognormal", median=300.0, sigma=1.5)),
    ("lognormal:300:0", LengthDist("lognormal", median=300.0, sigma=0.0)),
    ("uniform:1:10:max=5", LengthDist("uniform", 1, 10, max=5)),
    ("lognormal:300:1:max=4096", LengthDist("lognormal", median=300.0, sigma=1.0, max=4096)),
    ("64:max=64", LengthDist("fixed", 64, 64, max=64)),
])
def test_forms_parse_and_print_back(text: str, want: LengthDist) -> None:
    got = parse_length_dist(text, "--prompt-len")
    assert got == want
    assert parse_length_dist(got.text, "--prompt-len") == got


@pytest.mark.parametrize(("text", "why"), [
    ("", "length '' is not an integer"),
    ("abc", "length 'abc' is not an integer"),
    ("1.5", "length '1.5' is not an integer"),
    ("0", "length must be from 1 to"),
    ("-3", "length must be from 1 to"),
    (str(LENGTH_MAX + 1), "length must be from 1 to"),
    ("uniform:1", "is not a length distribution"),
    ("uniform:1:2:3", "is not a length distribution"),
    ("normal:1:2", "is not a length distribution"),
    ("uniform:5:3", "1 <= low <= high"),
    ("uniform:0:3", "low must be from 1 to"),
    ("lognormal:0.5:1", "the median must be a finite number from 1"),
    ("lognormal:100:-1", "sigma must be a finite number from 0 to 10"),
    ("lognormal:100:nan", "sigma must be finite, got 'nan'"),
    ("lognormal:inf:1", "median must be finite"),
    ("lognormal:x:1", "median 'x' is not a number"),
    ("512:max=100", "max=100 is below the shortest length 512"),
    ("uniform:8:16:max=4", "max=4 is below the shortest length 8"),
    ("5:max=", "max '' is not an integer"),
    ("5:max=0", "max must be from 1 to"),
    ("max=5", "length 'max=5' is not an integer"),
])
def test_bad_text_is_one_line_naming_the_flag_and_the_forms(text: str, why: str) -> None:
    with pytest.raises(KvscopeError) as info:
        parse_length_dist(text, "--output-len")
    msg = str(info.value)
    assert msg.startswith("--output-len: ") and why in msg, msg
    assert "uniform:LOW:HIGH" in msg and "lognormal:MEDIAN:SIGMA" in msg and "\n" not in msg


def test_not_text_is_refused() -> None:
    with pytest.raises(KvscopeError, match=r"^--prompt-len: expected text"):
        parse_length_dist(512, "--prompt-len")  # type: ignore[arg-type]


def test_a_bad_dataclass_is_refused_too() -> None:
    with pytest.raises(KvscopeError, match="1 <= low <= high"):
        LengthDist("uniform", 9, 3)
    with pytest.raises(KvscopeError, match="kind must be one of"):
        LengthDist("zipf")


@pytest.mark.parametrize("text", ["512", "uniform:128:1024", "lognormal:300:1", "lognormal:300:2.5:max=2048",
                                  "uniform:1:10:max=5", "lognormal:2:3"])
def test_samples_are_seeded_whole_and_within_bounds(text: str) -> None:
    d = parse_length_dist(text, "--prompt-len")
    a = d.sample(np.random.default_rng(7), N)
    assert a.dtype == np.int64 and a.shape == (N,)
    assert np.array_equal(a, d.sample(np.random.default_rng(7), N))
    assert a.min() >= 1 and a.max() <= d.cap
    if d.kind == "uniform":  # every value of the range is drawn
        assert set(np.unique(a)) == set(range(d.low, min(d.high, d.cap) + 1))


@pytest.mark.parametrize("text", ["512", "uniform:128:1024", "uniform:1:10:max=5", "lognormal:300:0.5",
                                  "lognormal:300:1:max=500", "lognormal:3:1"])
def test_mean_matches_many_samples(text: str) -> None:
    """The sample mean of N draws is within 5 standard errors (+ 0.5 for the rounding of a log-normal) of mean()."""
    d = parse_length_dist(text, "--prompt-len")
    a = d.sample(np.random.default_rng(11), N).astype(float)
    bound = 5 * a.std() / math.sqrt(N) + (0.5 if d.kind == "lognormal" else 0.0)
    assert abs(a.mean() - d.mean()) <= bound + 1e-9, (a.mean(), d.mean(), bound)


def test_exact_means() -> None:
    assert parse_length_dist("512", "x").mean() == 512.0
    assert parse_length_dist("uniform:128:1024", "x").mean() == 576.0
    assert parse_length_dist("uniform:1:10:max=5", "x").mean() == pytest.approx((1 + 2 + 3 + 4 + 5 * 6) / 10)
    assert parse_length_dist("lognormal:300:0", "x").mean() == 300.0
    unclipped = parse_length_dist("lognormal:300:1", "x").mean()
    assert unclipped == pytest.approx(300 * math.exp(0.5), rel=1e-6)  # the clip at 1 changes it by < 1e-6
