"""The load of `kvscope serve`: which requests arrive when, with how many prompt and output tokens.

Three sources, each a list of `RequestSpec` (or, for the closed loop, a source the run loop asks):

- `open_loop`: a Poisson process of `rps` requests per second (exponential gaps from a seeded Generator, the first
  arrival one gap after 0), cut at `n_requests` or at `duration_s` (every arrival strictly before it), whichever
  comes first;
- `closed_loop`: `concurrency` users, each sending its next request the moment its previous one finishes
  (`ClosedLoop.start` at t=0, then `ClosedLoop.on_finish`), until `n_requests` were sent or `duration_s` passed;
- `read_request_file`: a CSV or JSONL file of `arrival_s, prompt_tokens, output_tokens` (and optionally
  `request_id`), checked row by row.

The lengths come from `LengthDist`s on their own seeded streams (`numpy.random.SeedSequence(seed)` spawns one stream
for the arrivals, one for the prompt lengths, one for the output lengths), drawn in fixed chunks: request i has the
same lengths in an open and a closed loop of the same seed and distributions, whatever the rate or concurrency.
Every refusal is a one-line `KvscopeError` naming the flag or the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvscope.argtypes import INT64_MAX, RATE_MAX, UINT64_MAX, shown
from kvscope.errors import KvscopeError
from kvscope.io import check_path, os_reason
from kvscope.measure.serve.lengths import LENGTH_MAX, LengthDist

MAX_REQUESTS = 10_000_000  # the most requests one load holds (its specs are kept in memory, its rows written)
CONCURRENCY_MAX = 1_000_000
_CHUNK = 4096  # lengths and gaps are drawn this many at a time: the same sequence whoever asks
FIELDS = ("arrival_s", "prompt_tokens", "output_tokens")
ID_FIELD = "request_id"
FILE_FORMS = "CSV with the header arrival_s,prompt_tokens,output_tokens[,request_id], or JSONL of such objects"
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass(frozen=True)
class RequestSpec:
    """One request of the load: its id, when it arrives (seconds since the load's start), its prompt length, and how
    many tokens it asks for."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


# ---- checks of the load's numbers ------------------------------------------------------------------------------------

def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_rate(value: object, flag: str = "--rps") -> float:
    """A positive finite rate (at most `RATE_MAX` per second), else a KvscopeError naming `flag`."""
    if not _is_number(value) or not math.isfinite(float(value)) or not 0 < float(value) <= RATE_MAX:
        raise KvscopeError(f"{flag}: must be a positive finite number up to {RATE_MAX:g}, got {value!r}")
    return float(value)


def check_concurrency(value: object, flag: str = "--concurrency") -> int:
    """A positive whole number of concurrent users (at most `CONCURRENCY_MAX`), else a KvscopeError naming `flag`."""
    return _check_count(value, flag, CONCURRENCY_MAX)


def check_duration(value: object, flag: str = "--duration") -> float:
    """A positive finite number of seconds, else a KvscopeError naming `flag`."""
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise KvscopeError(f"{flag}: must be a positive finite number of seconds, got {value!r}")
    return float(value)


def _check_count(value: object, flag: str, high: int) -> int:
    whole = _is_number(value) and math.isfinite(float(value)) and float(value).is_integer()
    if not whole or not 1 <= int(value) <= high:  # type: ignore[call-overload]
        raise KvscopeError(f"{flag}: must be a whole number from 1 to {high:,}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def _check_seed(seed: object) -> int:
    if not _is_number(seed) or not float(seed).is_integer() or not 0 <= int(seed) <= UINT64_MAX:  # type: ignore
        raise KvscopeError(f"--seed: must be a whole number from 0 to {UINT64_MAX}, got {seed!r}")
    return int(seed)  # type: ignore[call-overload]


def _limits(n_requests: object, duration_s: object) -> tuple[int | None, float | None]:
    """The load's stop: a number of requests, a duration, or both (whichever comes first); at least one."""
    if n_requests is None and duration_s is None:
        raise KvscopeError("the load needs --requests or --duration (or both: it stops at whichever comes first)")
    n = None if n_requests is None else _check_count(n_requests, "--requests", MAX_REQUESTS)
    return n, None if duration_s is None else check_duration(duration_s)


# ---- the seeded streams ----------------------------------------------------------------------------------------------

class _Streams:
    """The load's three seeded streams: arrival gaps, prompt lengths, output lengths, each drawn `_CHUNK` at a time."""

    def __init__(self, prompt: LengthDist, output: LengthDist, seed: object) -> None:
        gaps, prompts, outputs = np.random.SeedSequence(_check_seed(seed)).spawn(3)
        self.gaps = np.random.default_rng(gaps)
        self._dists = (prompt, output)
        self._rngs = (np.random.default_rng(prompts), np.random.default_rng(outputs))
        self._bufs: list[np.ndarray] = [np.empty(0, np.int64), np.empty(0, np.int64)]

    def lengths(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `k` (prompt, output) lengths."""
        out = []
        for i in range(2):
            while len(self._bufs[i]) < k:
                more = self._dists[i].sample(self._rngs[i], _CHUNK)
                self._bufs[i] = np.concatenate([self._bufs[i], more])
            out.append(self._bufs[i][:k])
            self._bufs[i] = self._bufs[i][k:]
        return out[0], out[1]


def _arrivals(rng: np.random.Generator, rate: float, n: int | None, duration: float | None) -> np.ndarray:
    """A Poisson process's arrival times: the first `n`, or those before `duration`, whichever are fewer."""
    chunks: list[np.ndarray] = []
    count, last = 0, 0.0
    while n is None or count < n:
        times = last + np.cumsum(rng.exponential(1.0 / rate, size=_CHUNK))
        if duration is not None and times[-1] >= duration:
            chunks.append(times[times < duration])
            break
        chunks.append(times)
        count, last = count + _CHUNK, float(times[-1])
    out = np.concatenate(chunks) if chunks else np.empty(0)
    return out if n is None else out[:n]


# ---- the sources -----------------------------------------------------------------------------------------------------

def open_loop(rps: float, n_requests: int | None, duration_s: float | None, prompt: LengthDist,
              output: LengthDist, seed: int) -> list[RequestSpec]:
    """Poisson arrivals at `rps` per second with lengths from `prompt` and `output`, ids 0, 1, ... in arrival order;
    stopped at `n_requests` or `duration_s`, whichever comes first (at least one must be given). A short duration may
    hold no arrival at all: the list is then empty."""
    rate = check_rate(rps)
    n, duration = _limits(n_requests, duration_s)
    if n is None and duration is not None and rate * duration > MAX_REQUESTS:
        raise KvscopeError(f"--rps {rate:g} over --duration {duration:g} s is about {rate * duration:,.0f} requests, "
                           f"more than {MAX_REQUESTS:,}: give --requests or a shorter duration")
    streams = _Streams(prompt, output, seed)
    times = _arrivals(streams.gaps, rate, n, duration)
    prompts, outputs = streams.lengths(len(times))
    return [RequestSpec(i, float(t), int(p), int(o))
            for i, (t, p, o) in enumerate(zip(times, prompts, outputs, strict=True))]


class ClosedLoop:
    """`concurrency` users, each sending a new request when its previous one finishes: `start()` hands the first
    `concurrency` specs (arrival 0), `on_finish(now_s)` one more per completion (arriving at `now_s`), until
    `n_requests` were handed out or `now_s` reaches `duration_s`; then None."""

    def __init__(self, concurrency: int, n_requests: int | None, duration_s: float | None, prompt: LengthDist,
                 output: LengthDist, seed: int) -> None:
        self.concurrency = check_concurrency(concurrency)
        self.n_requests, self.duration_s = _limits(n_requests, duration_s)
        self._streams = _Streams(prompt, output, seed)
        self.issued = 0
        self._started = False
        self._last_s = 0.0

    @property
    def done(self) -> bool:
        """Whether no request will be handed out any more (the count reached, or a finish at or after the duration)."""
        return (self.n_requests is not None and self.issued >= self.n_requests) or (
            self.duration_s is not None and self._last_s >= self.duration_s)

    def _next(self, now_s: float) -> RequestSpec:
        p, o = self._streams.lengths(1)
        spec = RequestSpec(self.issued, now_s, int(p[0]), int(o[0]))
        self.issued += 1
        return spec

    def start(self) -> list[RequestSpec]:
        """The first `concurrency` requests (fewer when `n_requests` is smaller), all arriving at 0; called once."""
        if self._started:
            raise RuntimeError("ClosedLoop.start called twice")
        self._started = True
        first = self.concurrency if self.n_requests is None else min(self.concurrency, self.n_requests)
        return [self._next(0.0) for _ in range(first)]

    def on_finish(self, now_s: float) -> RequestSpec | None:
        """A request finished at `now_s` (seconds since the load's start, never earlier than the last call's): the
        next request, arriving at `now_s`, or None when the load is over."""
        if not self._started:
            raise RuntimeError("ClosedLoop.on_finish before start")
        if not math.isfinite(now_s) or now_s < self._last_s:
            raise ValueError(f"ClosedLoop.on_finish: now_s {now_s!r} is not finite or goes back from {self._last_s}")
        self._last_s = float(now_s)
        return None if self.done else self._next(float(now_s))


def closed_loop(concurrency: int, n_requests: int | None, duration_s: float | None, prompt: LengthDist,
                output: LengthDist, seed: int) -> ClosedLoop:
    """A closed loop of `concurrency` users (see `ClosedLoop`); the same checks as `open_loop`."""
    return ClosedLoop(concurrency, n_requests, duration_s, prompt, output, seed)


def synthetic_prompt(rng: np.random.Generator, n_tokens: int, vocab_size: int) -> list[int]:
    """`n_tokens` token ids drawn uniformly from [0, vocab_size) by `rng` (seeded: the same prompt again)."""
    if n_tokens < 1 or vocab_size < 1:
        raise ValueError(f"synthetic_prompt: n_tokens {n_tokens} and vocab_size {vocab_size} must be >= 1")
    return rng.integers(0, vocab_size, size=n_tokens, dtype=np.int64).tolist()


# ---- a request file --------------------------------------------------------------------------------------------------

class _RowError(Exception):
    """A bad row: its line number and the reason (made into the file's one-line KvscopeError)."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def read_request_file(path: str | os.PathLike[str]) -> list[RequestSpec]:
    """The requests of a CSV (`.csv`, header required) or JSONL (`.jsonl`, `.json`: one object per line) file, sorted
    by arrival (stable). Fields: `arrival_s` (finite, >= 0), `prompt_tokens` and `output_tokens` (whole numbers >= 1),
    optionally `request_id` (whole, >= 0, unique; on every row or on none: without it, rows are numbered 0, 1, ... in
    the file's order); other columns or keys are ignored, blank lines skipped. Any bad row is a one-line KvscopeError
    `request file PATH, line N: reason` (N counts the file's lines from 1)."""
    shown_path = f"request file {os.fspath(path)}"
    kind = _EXTENSIONS.get(Path(path).suffix.lower())
    if kind is None:
        raise KvscopeError(f"{shown_path}: unknown extension {Path(path).suffix!r} (.csv, .jsonl or .json: "
                           f"{FILE_FORMS})")
    found = check_path(path, "request file")
    if found is None:
        raise KvscopeError(f"{shown_path}: no such file")
    if stat.S_ISDIR(found.st_mode):
        raise KvscopeError(f"{shown_path}: is a folder, not a file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except OSError as exc:
        raise KvscopeError(f"{shown_path}: {os_reason(exc)}") from None
    except UnicodeDecodeError as exc:
        raise KvscopeError(f"{shown_path}: not UTF-8 text (byte {exc.start})") from None
    try:
        rows = list(_csv_rows(text) if kind == "csv" else _jsonl_rows(text))
        specs = _specs(rows)
    except _RowError as exc:
        raise KvscopeError(f"{shown_path}, line {exc.line}: {exc.reason}") from None
    if not specs:
        raise KvscopeError(f"{shown_path}: no requests ({FILE_FORMS})")
    return sorted(specs, key=lambda s: s.arrival_s)


def _csv_rows(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, {field: text}) per non-blank row after the header; fields absent or empty are left out."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = _csv_header(line, row)
                continue
            if len(row) != len(header):
                raise _RowError(line, f"{len(row)} fields, the header (line 1) names {len(header)}")
            yield line, {name: cell.strip() for name, cell in zip(header, row, strict=True) if cell.strip()}
    except csv.Error as exc:
        raise _RowError(start, f"not CSV ({exc})") from None


def _csv_header(line: int, row: list[str]) -> list[str]:
    header = [cell.strip() for cell in row]
    missing = [f for f in FIELDS if f not in header]
    if missing:
        looks_numeric = all(_float_or_none(cell) is not None for cell in header)
        why = "no header" if looks_numeric else f"the header lacks {', '.join(missing)}"
        raise _RowError(line, f"{why} ({FILE_FORMS})")
    twice = sorted({h for h in header if h and header.count(h) > 1})
    if twice:
        raise _RowError(line, f"the header names {', '.join(twice)} twice")
    return header


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line (JSON text holds no raw newline: a line is a "\\n")."""
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise _RowError(line, f"not JSON ({exc.args[0].split(':')[0]})") from None
        if not isinstance(obj, dict):
            raise _RowError(line, f"not a JSON object (one object per line: {FILE_FORMS})")
        yield line, {k: v for k, v in obj.items() if v is not None}


def _specs(rows: list[tuple[int, dict[str, Any]]]) -> list[RequestSpec]:
    """The rows checked, in the file's order; ids given on every row or none, never twice."""
    if len(rows) > MAX_REQUESTS:
        raise _RowError(rows[MAX_REQUESTS][0], f"more than {MAX_REQUESTS:,} requests")
    with_id = bool(rows) and ID_FIELD in rows[0][1]
    seen: dict[int, int] = {}
    specs = []
    for i, (line, row) in enumerate(rows):
        for name in FIELDS:
            if name not in row:
                raise _RowError(line, f"no {name} (missing field)")
        if (ID_FIELD in row) != with_id:
            why = f"no {ID_FIELD} (missing field), yet line {rows[0][0]} has one" if with_id else \
                f"a {ID_FIELD}, yet line {rows[0][0]} has none"
            raise _RowError(line, f"{why}: give it on every row or on none")
        rid = _whole(line, ID_FIELD, row[ID_FIELD], 0, INT64_MAX) if with_id else i
        if rid in seen:
            raise _RowError(line, f"{ID_FIELD} {rid} is already on line {seen[rid]} (duplicate request_id)")
        seen[rid] = line
        specs.append(RequestSpec(rid, _arrival(line, row["arrival_s"]),
                                 _whole(line, "prompt_tokens", row["prompt_tokens"], 1, LENGTH_MAX),
                                 _whole(line, "output_tokens", row["output_tokens"], 1, LENGTH_MAX)))
    return specs


def _float_or_none(value: object) -> float | None:
    """A cell's number (a CSV cell's text, a JSON number), or None when it is none (text, a bool, a list...)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return float(value) if _is_number(value) else None


def _arrival(line: int, value: object) -> float:
    x = _float_or_none(value)
    if x is None:
        raise _RowError(line, f"arrival_s {shown(str(value))} is not a number")
    if not math.isfinite(x) or x < 0:
        raise _RowError(line, f"arrival_s must be finite and >= 0, got {shown(str(value))}")
    return x


def _whole(line: int, name: str, value: object, low: int, high: int) -> int:
    """A whole number from `low` to `high` (`12`, `12.0`, `1e3`; never `12.5`, `true`, `"x"`)."""
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        try:
            n = int(value)
        except ValueError:  # more digits than Python parses (4,300): out of range anyway
            n = high + 1
    else:
        x = _float_or_none(value)
        if x is None:
            raise _RowError(line, f"{name} {shown(str(value))} is not a number")
        if not math.isfinite(x) or not x.is_integer():
            raise _RowError(line, f"{name} must be a whole number, got {shown(str(value))}")
        n = int(value) if isinstance(value, (int, np.integer)) else int(x)
    if not low <= n <= high:
        raise _RowError(line, f"{name} must be from {low} to {high:,}, got {shown(str(value))}")
    return n
