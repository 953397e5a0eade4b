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

`RangeFilter` checks its values (types too: the Python API passes them unparsed) with the command's messages, and
`RangeFilter.kept_ranges` refuses filters that keep none of the export's ranges, saying which filter matched nothing
(alone, or only together with another) and what the export holds: its domains, processes, time span, and for
`--range` its names.
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
_SHOWN_CHARS = 40  # longest value quoted whole in a message
_SHOWN_NAMES = 3  # range names a message shows


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
        for flag, value, what in (("--domain", self.domain, "an NVTX domain's name"),
                                  ("--range", self.range_re, "a regular expression")):
            if value is not None and not isinstance(value, str):
                raise KvscopeError(f"{flag} must be text ({what}), got {wrong_value(value)}")
        if self.range_re is not None:
            _compile(self.range_re)
        for name, value in (("start", self.start_ns), ("end", self.end_ns), ("pid", self.pid)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 0):
                raise KvscopeError(f"--{name} must be a non-negative integer, got {value!r}")
            if value is not None and value > _INT64_MAX:
                raise KvscopeError(f"--pid {value} does not fit in 64 bits" if name == "pid" else
                                   f"--{name} {value} is beyond any export's clock (over 2**63 ns)")
        if self.start_ns is not None and self.end_ns is not None and self.end_ns < self.start_ns:
            raise KvscopeError(f"--end ({self.end_ns} ns) is before --start ({self.start_ns} ns)")

    def ranges(self, r: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the ranges (columns domain, name, pid, start_ns, end_ns) to keep."""
        return _all(self._axes(r), len(r))

    def kept_ranges(self, r: pd.DataFrame, source: object) -> np.ndarray:
        """`ranges`, refused (a KvscopeError naming the export `source`) when filters keep none of the ranges `r`:
        which filter matched nothing (alone, or only together with others) and what the export holds."""
        axes = self._axes(r)
        keep = _all(axes, len(r))
        if keep.any() or not axes or not len(r):
            return keep
        empty = [flag for flag, mask in axes if not mask.any()]
        if empty:
            what, alone = ", nor ".join(empty), ""
        else:
            what, alone = " and ".join(flag for flag, _ in axes) + " together", "each matches some alone; "
        names = any(flag.startswith("--range ") for flag in empty or [flag for flag, _ in axes])
        raise KvscopeError(f"{source}: no NVTX range matches {what} ({alone}{_holdings(r, names)})")

    def _axes(self, r: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
        """(flag as given, boolean mask of the ranges it keeps) for each filter set."""
        start, end = r["start_ns"].to_numpy(np.int64), r["end_ns"].to_numpy(np.int64)
        axes = []
        if self.domain is not None:
            axes.append((f"--domain {_quoted(self.domain)}", (r["domain"].fillna("") == self.domain).to_numpy(bool)))
        if self.range_re is not None:
            axes.append((f"--range {_quoted(self.range_re)}", search_mask(r["name"], _compile(self.range_re))))
        if self.start_ns is not None:
            axes.append((f"--start {self.start_ns} ns", end >= self.start_ns))
        if self.end_ns is not None:
            axes.append((f"--end {self.end_ns} ns", start <= self.end_ns))
        if self.pid is not None:
            axes.append((f"--pid {self.pid}", r["pid"].to_numpy() == self.pid))
        return axes

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


def _all(axes: list[tuple[str, np.ndarray]], n: int) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    for _, mask in axes:
        keep &= mask
    return keep


def _holdings(r: pd.DataFrame, names: bool) -> str:
    """What the ranges `r` hold, for a message: their domains, processes and time span (and names)."""
    domains = sorted(r["domain"].fillna("").unique())
    shown = [f"{_quoted(d)} (the default)" if d == "" else _quoted(d) for d in domains]
    pids = [str(p) for p in sorted(int(p) for p in pd.unique(r["pid"]))]
    text = (f"the export's {len(r)} ranges: domains {_first(shown)}; processes {_first(pids)}; from "
            f"{int(r['start_ns'].min())} to {int(r['end_ns'].max())} ns")
    if names:
        distinct = pd.unique(r["name"].fillna("").astype(str))
        text += f"; {len(distinct)} names, such as {', '.join(_quoted(n) for n in distinct[:_SHOWN_NAMES])}"
    return text


def _first(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _quoted(text: str) -> str:
    """`text` quoted for a message, shortened when long."""
    return repr(text) if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS // 2]!r}... ({len(text)} characters)"


def wrong_value(value: object) -> str:
    """A wrong argument's type and value, for a message (`int 5`, `bytes b'x'`), shortened when long."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + '...'}"


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
