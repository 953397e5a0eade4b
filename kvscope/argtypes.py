"""Typed converters for command-line values: what a number or a path must be before any command sees it.

Every int flag of every subcommand goes through `IntArg`, every float flag through `FloatArg`, every path or name
through `TextArg`, so the representability checks live here, in one place:

- an integer fits in 64 bits (signed, or unsigned for seeds), so nothing downstream overflows a tensor size or a
  Parquet column;
- a float is finite (no `nan`, `inf`, or `1e999`, which Python reads as `inf`) and, where the flag states one, not
  above a maximum beyond which the value is meaningless or overflows (bytes that do not fit in 64 bits, a sampling
  interval longer than an hour);
- a path or name is not empty (argparse would pass `--out ''` on, and `Path('')` is the current folder) and holds no
  NUL character.

The domain of a value (a batch size >= 1, a collapse factor > 1, a non-negative reserve) is checked where the value
is used, so that the Python API (`RunSpec`, `KvQuery`, `SweepSpec`) refuses the same values with the same messages;
a converter checks a lower bound only where nothing downstream does (`--seed`). Converters raise `ValueError` for
text that is not a number (argparse reports "invalid int value: 'x'") and `argparse.ArgumentTypeError` otherwise
(argparse reports "argument --flag: <message>").
"""

from __future__ import annotations

import argparse
import math
import re

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1
GIB_MAX = 2**33  # GiB whose byte count still fits in 64 bits (2**33 * 2**30 = 2**63)
NVML_INTERVAL_MAX_MS = 3_600_000.0  # one hour: a longer NVML sampling interval samples nothing in a run
RATE_MAX = 1e9  # requests per second: a served load's arrival rate (and the rate times a latency fits in 64 bits)

_DIGITS = re.compile(r"[+-]?[0-9_]+")
_SHOWN = 40  # longest value quoted whole in a message


def shown(text: str) -> str:
    """`text` quoted for a message, shortened when long (a 10,000-digit number is not repeated back)."""
    text = text.strip()
    if len(text) <= _SHOWN:
        return repr(text)
    return f"{text[:20]!r}... ({len(text)} characters)"


class IntArg:
    """An integer flag's value, within [low, high] (by default the signed 64-bit range)."""

    __name__ = "int"  # argparse names the type in "invalid int value: 'x'"

    def __init__(self, low: int = INT64_MIN, high: int = INT64_MAX) -> None:
        self.low = low
        self.high = high

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            if _DIGITS.fullmatch(text.strip()):  # digits beyond Python's int-parsing limit (4,300 of them)
                raise argparse.ArgumentTypeError(self._range(shown(text))) from None
            raise
        if not self.low <= value <= self.high:
            raise argparse.ArgumentTypeError(self._range(shown(text)))
        return value

    def _range(self, got: str) -> str:
        if (self.low, self.high) == (INT64_MIN, INT64_MAX):
            return f"must fit in 64 bits ({INT64_MIN} to {INT64_MAX}), got {got}"
        return f"must be an integer from {self.low} to {self.high}, got {got}"


class FloatArg:
    """A float flag's value: finite, and at most `high` when given (`unit` names its unit in the message)."""

    __name__ = "float"  # argparse names the type in "invalid float value: 'x'"

    def __init__(self, high: float | None = None, unit: str = "") -> None:
        self.high = high
        self.unit = unit

    def __call__(self, text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {shown(text)}")
        if self.high is not None and value > self.high:
            limit = f"{self.high:,.0f}" if float(self.high).is_integer() else f"{self.high:g}"
            unit = f" {self.unit}" if self.unit else ""
            raise argparse.ArgumentTypeError(f"must be at most {limit}{unit}, got {shown(text)}")
        return value


class TextArg:
    """A path or name: not empty, not only spaces, no NUL character (the OS refuses it with a traceback)."""

    __name__ = "text"

    def __call__(self, text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
        if "\0" in text:
            raise argparse.ArgumentTypeError("must not contain a NUL character")
        return text


class PositiveFloatArg(FloatArg):
    """A `FloatArg` that must also be above 0 (a rate: zero requests per second is no load)."""

    def __call__(self, text: str) -> float:
        value = super().__call__(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {shown(text)}")
        return value


positive_rate = PositiveFloatArg(RATE_MAX, "per second")  # --rps of `kvscope serve`: positive, finite, <= RATE_MAX
