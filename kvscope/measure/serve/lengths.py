"""Token-length distributions of a served load (`--prompt-len`, `--output-len`): parsed from one CLI string, sampled
from a seeded numpy Generator, always whole numbers >= 1.

Forms (`what` names the flag in every message):

- `512`: every request has 512 tokens;
- `uniform:128:1024`: integers from 128 to 1024, both included, equally likely;
- `lognormal:MEDIAN:SIGMA`: log-normal with that median and that standard deviation of the log, rounded to the
  nearest integer (at least 1);
- any form may end in `:max=N`, a clip: no sample above N (a fixed length must not exceed it, nor a uniform's low).

No length exceeds `LENGTH_MAX` (2**31 - 1): a log-normal's tail is clipped there even without `max=`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvscope.argtypes import shown
from kvscope.errors import KvscopeError

LENGTH_MAX = 2**31 - 1  # the longest length any form yields: int32 token counts, never an overflow downstream
KINDS = ("fixed", "uniform", "lognormal")
SIGMA_MAX = 10.0  # a log-normal's sigma beyond which its lengths are all 1 or all the cap
FORMS = "N, uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA, each optionally ending in :max=N"


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: `kind` one of `KINDS`; `low`/`high` the fixed value (both) or the uniform's
    bounds; `median`/`sigma` the log-normal's; `max` the clip (None: `LENGTH_MAX`)."""

    kind: str
    low: int = 1
    high: int = 1
    median: float = 1.0
    sigma: float = 0.0
    max: int | None = None

    def __post_init__(self) -> None:
        why = _invalid(self.kind, self.low, self.high, self.median, self.sigma, self.max)
        if why:
            raise KvscopeError(f"length distribution {self.text}: {why}")

    @property
    def text(self) -> str:
        """The CLI form that parses back into this distribution (for metadata and messages)."""
        if self.kind == "fixed":
            body = str(self.low)
        elif self.kind == "uniform":
            body = f"uniform:{self.low}:{self.high}"
        else:
            body = f"lognormal:{_number(self.median)}:{_number(self.sigma)}"
        return body if self.max is None else f"{body}:max={self.max}"

    @property
    def cap(self) -> int:
        """The largest length a sample can have."""
        top = LENGTH_MAX if self.kind == "lognormal" else self.high
        return top if self.max is None else min(top, self.max)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` lengths (int64, each from 1 to `cap`) drawn from `rng`."""
        if self.kind == "fixed":
            return np.full(n, min(self.low, self.cap), dtype=np.int64)
        if self.kind == "uniform":
            out = rng.integers(self.low, self.high, size=n, endpoint=True, dtype=np.int64)
            return np.minimum(out, self.cap)
        x = rng.lognormal(math.log(self.median), self.sigma, size=n)
        return np.rint(np.clip(x, 1.0, float(self.cap))).astype(np.int64)

    def mean(self) -> float:
        """The expected length: exact for a fixed or uniform length (after the clip); for a log-normal, the mean of
        the continuous value clipped to [1, cap], before rounding to whole tokens (rounding moves it by < 0.5)."""
        if self.kind == "fixed":
            return float(min(self.low, self.cap))
        if self.kind == "uniform":
            lo, hi, cap = self.low, self.high, self.cap
            kept = min(hi, cap) - lo + 1  # the values below the clip, each 1 / (hi - lo + 1) likely
            return (kept * (lo + min(hi, cap)) / 2 + (hi - min(hi, cap)) * cap) / (hi - lo + 1)
        return _clipped_lognormal_mean(self.median, self.sigma, 1.0, float(self.cap))


def _number(x: float) -> str:
    """`x` short (`300`, `1.5`) where that reads back as the same float, else in full."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


def _clipped_lognormal_mean(median: float, s: float, a: float, b: float) -> float:
    """E[clip(X, a, b)] for X = median * exp(s Z), Z standard normal."""
    if s == 0.0:
        return min(max(median, a), b)
    mu = math.log(median)
    phi = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))  # noqa: E731
    la, lb = math.log(a), math.log(b)
    below = phi((la - mu) / s)
    above = 1.0 - phi((lb - mu) / s)
    inside = math.exp(mu + s * s / 2) * (phi((lb - mu - s * s) / s) - phi((la - mu - s * s) / s))
    return a * below + inside + b * above


def _invalid(kind: str, low: int, high: int, median: float, sigma: float, clip: int | None) -> str:
    """Why these fields are not a distribution, or ''."""
    if kind not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}, got {kind!r}"
    if clip is not None and not 1 <= clip <= LENGTH_MAX:
        return f"max must be from 1 to {LENGTH_MAX}, got {clip}"
    if kind in ("fixed", "uniform"):
        if not 1 <= low <= high <= LENGTH_MAX:
            return f"lengths must satisfy 1 <= low <= high <= {LENGTH_MAX}, got {low} and {high}"
        if kind == "fixed" and low != high:
            return f"a fixed length has one value, got {low} and {high}"
        if clip is not None and clip < low:
            return f"max={clip} is below the shortest length {low}"
        return ""
    if not (math.isfinite(median) and 1.0 <= median <= LENGTH_MAX):
        return f"the median must be a finite number from 1 to {LENGTH_MAX}, got {median:g}"
    if not (math.isfinite(sigma) and 0.0 <= sigma <= SIGMA_MAX):
        return f"sigma must be a finite number from 0 to {SIGMA_MAX:g}, got {sigma:g}"
    return ""


def parse_length_dist(text: str, what: str) -> LengthDist:
    """`text` (a form of the module's docstring) as a LengthDist; anything else is a one-line KvscopeError naming
    `what` (the flag, e.g. "--prompt-len") and the accepted forms."""
    if not isinstance(text, str):
        raise KvscopeError(f"{what}: expected text ({FORMS}), got {type(text).__name__}")
    parts = [p.strip() for p in text.strip().split(":")]
    clip = None
    if len(parts) > 1 and parts[-1].lower().startswith("max="):
        clip = _int(parts.pop()[4:], what, text, "max")
    kind = parts[0].lower()
    low = high = 1
    median, sigma = 1.0, 0.0
    if kind == "uniform" and len(parts) == 3:
        low, high = _int(parts[1], what, text, "low"), _int(parts[2], what, text, "high")
    elif kind == "lognormal" and len(parts) == 3:
        median, sigma = _float(parts[1], what, text, "median"), _float(parts[2], what, text, "sigma")
    elif (kind == "fixed" and len(parts) == 2) or (len(parts) == 1 and kind not in KINDS):
        kind = "fixed"
        low = high = _int(parts[-1], what, text, "length")
    else:
        raise KvscopeError(f"{what}: {shown(text)} is not a length distribution (forms: {FORMS})")
    why = _invalid(kind, low, high, median, sigma, clip)
    if why:
        raise KvscopeError(f"{what}: {shown(text)}: {why} (forms: {FORMS})")
    return LengthDist(kind, low, high, median, sigma, clip)


def _int(part: str, what: str, text: str, name: str) -> int:
    try:
        value = int(part)
    except ValueError:
        raise KvscopeError(f"{what}: {shown(text)}: {name} {shown(part)} is not an integer (forms: {FORMS})"
                           ) from None
    if not 1 <= value <= LENGTH_MAX:
        raise KvscopeError(f"{what}: {shown(text)}: {name} must be from 1 to {LENGTH_MAX}, got {value} "
                           f"(forms: {FORMS})")
    return value


def _float(part: str, what: str, text: str, name: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise KvscopeError(f"{what}: {shown(text)}: {name} {shown(part)} is not a number (forms: {FORMS})"
                           ) from None
    if not math.isfinite(value):
        raise KvscopeError(f"{what}: {shown(text)}: {name} must be finite, got {shown(part)} (forms: {FORMS})")
    return value
