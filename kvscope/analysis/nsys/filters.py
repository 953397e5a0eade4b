"""Which ranges and GPU operations `kvscope align` keeps: `--domain`, `--range`, `--start`/`--end`, `--pid`.

- domain: the NVTX domain's name, exactly (`""` is the default domain, which nsys's reports show as `:name`);
- range_re: a regular expression searched (`re.search`) in the range's message, without its domain;
- start_ns / end_ns: a window on the export's clock (ns since the capture's session start, as every timestamp of an
  export); a range is kept when its CPU span [start, end] overlaps the window, a GPU operation when its GPU span
  does; either bound may be absent;
- pid: one process.

Filters select; they never change a kept range's projection (its level, parent, GPU span and operations are those
of the whole export, as nsys computes them). `parse_time_ns` reads the window's bounds from the command line:
integer nanoseconds (`1500000`) or seconds with an `s` suffix (`1.5s`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import numpy as np
import pandas as pd

from kvscope.errors import KvscopeError
from kvscope.schema import NS_PER_S

_TIME = re.compile(r"(\d+)|(\d+(?:\.\d*)?|\.\d+)s")
_INT64_MAX = 2**63 - 1


def parse_time_ns(text: str, flag: str = "--start") -> int:
    """`text` as ns: `1500000` (ns) or `1.5s` (seconds); a one-line KvscopeError otherwise."""
    m = _TIME.fullmatch(text.strip())
    if m is None:
        raise KvscopeError(f"{flag} must be nanoseconds (e.g. 1500000) or seconds with an s suffix (e.g. 1.5s), got "
                           f"{text.strip()[:40]!r}")
    try:
        ns = int(m[1]) if m[1] is not None else int(Decimal(m[2]) * NS_PER_S)
    except InvalidOperation:
        raise KvscopeError(f"{flag}: {text.strip()[:40]!r} is not a time") from None
    if ns > _INT64_MAX:
        raise KvscopeError(f"{flag} {text.strip()[:40]!r} is beyond any export's clock (over 2**63 ns)")
    return ns


@dataclass(frozen=True)
class RangeFilter:
    """What to keep; None keeps everything on that axis."""

    domain: str | None = None
    range_re: str | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    pid: int | None = None

    def __post_init__(self) -> None:
        if self.range_re is not None:
            _compile(self.range_re)
        for name, value in (("start", self.start_ns), ("end", self.end_ns), ("pid", self.pid)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 0):
                raise KvscopeError(f"--{name} must be a non-negative integer, got {value!r}")
        if self.start_ns is not None and self.end_ns is not None and self.end_ns < self.start_ns:
            raise KvscopeError(f"--end ({self.end_ns} ns) is before --start ({self.start_ns} ns)")

    def ranges(self, r: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the ranges (columns domain, name, pid, start_ns, end_ns) to keep."""
        keep = self._window(r["start_ns"].to_numpy(np.int64), r["end_ns"].to_numpy(np.int64))
        if self.pid is not None:
            keep &= r["pid"].to_numpy() == self.pid
        if self.domain is not None:
            keep &= (r["domain"].fillna("") == self.domain).to_numpy(bool)
        if self.range_re is not None:
            keep &= search_mask(r["name"], _compile(self.range_re))
        return keep

    def ops(self, ops: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the GPU operations (columns pid, start_ns, end_ns) to keep."""
        keep = self._window(ops["start_ns"].to_numpy(np.int64), ops["end_ns"].to_numpy(np.int64))
        if self.pid is not None:
            keep &= ops["pid"].to_numpy() == self.pid
        return keep

    def _window(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        keep = np.ones(len(start), dtype=bool)
        if self.start_ns is not None:
            keep &= end >= self.start_ns
        if self.end_ns is not None:
            keep &= start <= self.end_ns
        return keep


def search_mask(names: pd.Series, pattern: re.Pattern[str]) -> np.ndarray:
    """Boolean mask of the names in which `pattern` is found (`re.search`; a missing name is empty), each distinct
    name searched once."""
    codes, uniques = pd.factorize(names.fillna("").astype(str))
    hit = np.fromiter((pattern.search(u) is not None for u in uniques), dtype=bool, count=len(uniques))
    return hit[codes] if len(codes) else np.zeros(0, dtype=bool)


def _compile(pattern: str, flag: str = "--range") -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise KvscopeError(f"{flag}: {pattern[:60]!r} is not a regular expression ({exc})") from None
