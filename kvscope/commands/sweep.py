"""`kvscope sweep`: every (seq, batch) pair as one run, one model load for the whole sweep.

The output file. `--out` is a `.csv` or `.parquet` file (any case of the extension; a link is followed and its
target written). Each finished configuration is appended at once and atomically: the whole file is written to a
temporary name beside it, synced, and renamed over it, so a sweep that stops (a crash, Ctrl-C, a full disk) loses
nothing it finished and never leaves a half-written file. Rows already in the file are never changed: a CSV's
existing cells are copied as the text they are, a Parquet file's existing columns keep their values and types;
a column that only new rows have is added with empty cells for the old rows. Repeated values in `--seq` or
`--batch-sizes` are measured once (a note says so).

One writer at a time. For the whole sweep, kvscope holds an advisory `fcntl.flock` on a lock file beside the output,
`.<name>.lock` (removed at the end). A second sweep of the same file, with or without `--resume`, is refused with a
one-line error while the first one runs. A lock file left by a killed sweep holds no lock and blocks nothing.

Settings. Every row records the settings that change its numbers, in these columns: `model` (the name),
`model_source` (`preset:<name>`, or `checkpoint:` / `config:` and the resolved path), `model_arch` (the first 16 hex
digits of the SHA-256 of `ModelArgs.as_dict()` without the name, as sorted JSON), `dtype`, `device` (`cpu` or the GPU's
name), `attn`, `granularity`, `gen_tokens`, `warmup`, `reps`, `seed`, `cuda_graphs`, `kernels` (both as resolved for
the device) and `collapse_factor`. A Parquet file also holds them, with the model's architecture, in its schema
metadata (JSON under `kvscope`, key `sweep`). `--resume` skips the configurations the file already holds, and refuses
(naming the setting and both values) a file whose recorded settings differ from this sweep's in any way, whose rows
disagree among themselves, that does not record them (a file of an older kvscope; a Parquet file without kvscope
sweep metadata), or that is not a well-formed sweep file (columns `seq_len`, `batch`, `flag`,
`decode_p50_ms_per_tok`, `decode_tok_s`; `seq_len` and `batch` positive integers; each configuration once).

Out of memory. A configuration whose allocation fails is recorded with `flag=oom`, its memory is freed, and the sweep
goes on: `torch.OutOfMemoryError`, `MemoryError`, and a `RuntimeError` of an allocator that could not allocate (the
CPU's "DefaultCPUAllocator: can't allocate memory", "CUDA error: out of memory"); any other error stops the sweep. A
configuration whose KV cache, with the weights (and on the CPU the prompt), needs more bytes than the device has in
all (on the CPU: physical memory, or the cgroup limit when lower) is recorded as `oom` without being tried, so an
absurd batch never makes the host swap or wakes the OOM killer.

`flag` also marks collapse (with `collapse_factor` F): `latency-collapse` when the decode ms per token is more than
F times the best earlier configuration with the same batch (the sequence axis), `throughput-collapse` when decode
tokens/s is below the best earlier configuration with the same sequence length (the batch axis) divided by F. A
row's flag is set once, when it is appended, against the rows before it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import gc
import hashlib
import io
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kvscope.commands.run import CLASSIC_COLUMNS, RunSpec, measure, prepare, use_graphs, use_kernels
from kvscope.engine.plan import RunConfig
from kvscope.errors import KvscopeError
from kvscope.io import METADATA_KEY
from kvscope.model.kv_cache import KVCache
from kvscope.model.weights import ModelSource, load_model

DEFAULT_COLLAPSE_FACTOR = 2.0
FORMATS = {".csv": "csv", ".parquet": "parquet"}
# the settings every row records; a resume must match them all (the order is the order of the checks)
SETTINGS = ("model", "model_source", "model_arch", "dtype", "device", "attn", "granularity", "gen_tokens", "warmup",
            "reps", "seed", "cuda_graphs", "kernels", "collapse_factor")
REQUIRED_COLUMNS = ("seq_len", "batch", "flag", "decode_p50_ms_per_tok", "decode_tok_s")
_INT64_MAX = 2**63 - 1
# substrings of the messages of allocation failures raised as a plain RuntimeError (compared in lower case)
_ALLOC_FAILURES = ("can't allocate memory", "cannot allocate memory", "out of memory", "cublas_status_alloc_failed",
                   "storage size calculation overflowed")
_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?")
_CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
_TMP_EXTRA = ".." + "0" * 12 + ".tmp"  # what a temporary file's name adds to the sweep file's: .NAME.<12 hex>.tmp


@dataclass(frozen=True)
class SweepSpec:
    base: RunSpec  # model, gen_tokens, warmup, reps, granularity, attn, dtype, device, seed, graphs, kernels
    seqs: tuple[int, ...]
    batches: tuple[int, ...]
    out: Path
    collapse_factor: float = DEFAULT_COLLAPSE_FACTOR
    resume: bool = False


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """Comma-separated positive sizes that fit in 64 bits (a sweep file stores them as int64)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise KvscopeError(f"{flag}: empty list")
    out = []
    for x in items:
        try:
            v = int(x)
        except ValueError:  # also digits beyond Python's int-parsing limit
            raise KvscopeError(f"{flag}: {_shown(x)} is not an integer") from None
        if v <= 0:
            raise KvscopeError(f"{flag}: sizes must be positive, got {v}")
        if v > _INT64_MAX:
            raise KvscopeError(f"{flag}: sizes must fit in 64 bits (at most {_INT64_MAX}), got {_shown(x)}")
        out.append(v)
    return tuple(out)


def _shown(text: str) -> str:
    """`text` quoted for a message, shortened when long (a 5,000-digit number is not repeated back)."""
    return repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"


def read_table(path: Path) -> pd.DataFrame:
    """A sweep file (CSV or Parquet); `flag` comes back as strings, empty where nothing is flagged."""
    try:
        df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(
            path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise KvscopeError(f"cannot read {path}: {exc}") from None
    if "flag" in df.columns:
        df["flag"] = df["flag"].astype("string").fillna("")
    return df


def collapse_flags(df: pd.DataFrame, factor: float) -> list[str]:
    """The collapse flag of every row against the rows before it (see the module docstring)."""
    flags = []
    for i, row in enumerate(df.itertuples(index=False)):
        earlier = df.iloc[:i]
        earlier = earlier[~earlier["flag"].fillna("").astype(str).str.contains("oom")]
        marks = [f for f in str(row.flag or "").split(";") if f and "collapse" not in f]
        same_batch = earlier[earlier["batch"] == row.batch]["decode_p50_ms_per_tok"].dropna()
        if len(same_batch) and row.decode_p50_ms_per_tok > factor * same_batch.min():
            marks.append("latency-collapse")
        same_seq = earlier[earlier["seq_len"] == row.seq_len]["decode_tok_s"].dropna()
        if len(same_seq) and row.decode_tok_s < same_seq.max() / factor:
            marks.append("throughput-collapse")
        flags.append(";".join(marks))
    return flags


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether `exc` says that memory could not be allocated, on any device (see the module docstring)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _ALLOC_FAILURES)


def check_out(out: Path) -> tuple[str, Path]:
    """The format (`csv` | `parquet`) and the resolved path of `--out`, or a one-line error for a path that cannot be
    a sweep file. Nothing is created."""
    if not str(out).strip():
        raise KvscopeError("--out is empty: give a FILE.csv or FILE.parquet")
    if "\0" in str(out):
        raise KvscopeError("--out must not contain a NUL character")
    try:
        return _check_out(out)
    except OSError as exc:  # a name too long for the file system, a folder that cannot be searched
        raise KvscopeError(f"--out {out}: {exc.strerror or exc}") from None


def _check_out(out: Path) -> tuple[str, Path]:
    if out.is_dir():
        raise KvscopeError(f"--out {out} is a folder: give a FILE.csv or FILE.parquet")
    if out.suffix.lower() not in FORMATS:
        raise KvscopeError(f"--out {out}: the sweep file must end in .csv or .parquet")
    try:
        path = out.resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise KvscopeError(f"--out {out}: cannot resolve the path: {exc}") from None
    if path.suffix.lower() != out.suffix.lower():
        raise KvscopeError(f"--out {out} is a link to {path}, which does not end in {out.suffix}")
    if path.is_dir():
        raise KvscopeError(f"--out {out} is a link to the folder {path}: give a FILE.csv or FILE.parquet")
    if path.exists() and not path.is_file():
        raise KvscopeError(f"--out {out} is not a regular file")
    parent = path.parent
    if not parent.exists():
        raise KvscopeError(f"--out {out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise KvscopeError(f"--out {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KvscopeError(f"--out {out}: folder {parent} is not writable")
    longest = os.pathconf(parent, "PC_NAME_MAX") - len(_TMP_EXTRA)
    if len(path.name.encode()) > longest:
        raise KvscopeError(f"--out {out}: the file name takes {len(path.name.encode())} bytes, at most {longest} here "
                           "(the sweep writes .NAME.<random>.tmp beside it)")
    return FORMATS[path.suffix.lower()], path


def model_identity(source: ModelSource) -> tuple[str, str]:
    """(`model_source`, `model_arch`): where the model comes from, and a digest of its architecture."""
    arch = {k: v for k, v in source.args.as_dict().items() if k != "name"}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if source.kind == "preset":
        return f"preset:{source.args.name}", digest
    where = source.folder if source.folder is not None else Path(source.spec)
    return f"{source.kind}:{where.expanduser().resolve()}", digest


def sweep_settings(sw: SweepSpec, source: ModelSource, cfg: RunConfig) -> dict[str, Any]:
    """The settings every row of this sweep records (the column names of `SETTINGS`)."""
    model_source, model_arch = model_identity(source)
    device = cfg.device
    return {
        "model": source.args.name, "model_source": model_source, "model_arch": model_arch,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "attn": sw.base.attn, "granularity": sw.base.granularity, "gen_tokens": sw.base.gen_tokens,
        "warmup": sw.base.warmup, "reps": sw.base.reps, "seed": sw.base.seed,
        "cuda_graphs": use_graphs(sw.base.graphs, device),
        "kernels": use_kernels(sw.base.kernels, device, cfg.dtype),
        "collapse_factor": float(sw.collapse_factor),
    }


def run_sweep(sw: SweepSpec, progress: Callable[[int, int, str], None] | None = None,
              log: Callable[[str], None] | None = None) -> pd.DataFrame:
    say = log or (lambda _m: None)
    fmt, path = check_out(sw.out)
    if not sw.collapse_factor > 1:
        raise KvscopeError(f"--collapse-factor must be > 1, got {sw.collapse_factor}")
    seqs = _unique(sw.seqs, "--seq", say)
    batches = _unique(sw.batches, "--batch-sizes", say)
    # every configuration is checked before the model is loaded
    configs = [(s, b) for s in seqs for b in batches]
    checked = {}
    for s, b in configs:
        spec = replace(sw.base, seq=s, batch_size=b, out=None)
        checked[(s, b)] = (spec, *prepare(spec))
    _, source, cfg0 = checked[configs[0]]
    settings = sweep_settings(sw, source, cfg0)
    with _OutputLock(path, sw.out, say):
        if path.exists():
            if not sw.resume:
                raise KvscopeError(f"{sw.out} exists; pass --resume to continue that sweep, or choose another file")
            if not os.access(path, os.R_OK | os.W_OK):
                raise KvscopeError(f"--resume: {sw.out} is not readable and writable")
            table = _SweepFile.read(path, fmt, sw.out)
            table.check_settings(settings)
        else:
            if sw.resume:
                say(f"--resume: {sw.out} does not exist yet, starting a new sweep")
            table = _SweepFile.new(fmt, sw.out)
        finished = set(table.configs())
        todo = [c for c in configs if c not in finished]
        if not todo:
            say("every configuration is already in the file")
            return read_table(path)
        meta = {"sweep": {**settings, "seqs": _union(table.meta.get("seqs"), seqs),
                          "batches": _union(table.meta.get("batches"), batches),
                          "model_args": source.args.as_dict()}}
        try:
            model, ready_s = load_model(source, cfg0.device, cfg0.dtype, seed=sw.base.seed)
        except (RuntimeError, MemoryError) as exc:
            if not is_allocation_failure(exc):
                raise
            raise KvscopeError(f"cannot load {source.args.name} on {cfg0.device}: out of memory "
                               f"({_reason(exc)})") from None
        say(f"{source.args.name} ready in {ready_s:.2f} s; {len(todo)} configuration(s) to run")
        memory = _device_memory(cfg0.device)
        for i, (s, b) in enumerate(todo):
            spec, _, cfg = checked[(s, b)]
            if progress:
                progress(i, len(todo), f"seq {s} batch {b}")
            row = _one(model, spec, source, cfg, ready_s, memory, say)
            for key, value in settings.items():
                row[key] = value
            row["flag"] = collapse_flags(pd.concat([table.numbers, row[table.numbers.columns]], ignore_index=True),
                                         sw.collapse_factor)[-1]
            kept = len(table.numbers)
            table.append(row)
            existed = path.exists()
            try:
                table.write(path, meta)  # the finished configuration is on disk before the next one starts
            except OSError as exc:
                after = f"the file is as it was, with {kept} configuration(s)" if existed else "no file was made"
                raise KvscopeError(f"cannot write {sw.out}: {exc.strerror or exc}; {after}") from None
            if progress:
                progress(i + 1, len(todo), f"seq {s} batch {b}")
        return read_table(path)


def _unique(values: Sequence[int], flag: str, say: Callable[[str], None]) -> tuple[int, ...]:
    if not values:
        raise KvscopeError(f"{flag}: empty list")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= _INT64_MAX:
            raise KvscopeError(f"{flag}: sizes must be positive 64-bit integers, got {v!r}")
    unique = tuple(dict.fromkeys(values))
    if len(unique) < len(values):
        repeated = [v for v in unique if values.count(v) > 1]
        say(f"{flag}: {', '.join(map(str, repeated))} given more than once; each configuration is measured once")
    return unique


def _union(saved: Any, values: Sequence[int]) -> list[int]:
    """The sizes of the file's metadata, then this sweep's new ones (first-seen order)."""
    earlier = [v for v in saved if isinstance(v, int)] if isinstance(saved, list) else []
    return list(dict.fromkeys([*earlier, *values]))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """The first line of an allocation failure, without c10's "[enforce fail at FILE:LINE] err == 0." prefix."""
    return _ENFORCE.sub("", _first_line(exc)) or type(exc).__name__


def _device_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has in all; None when it cannot be told (then nothing is predicted)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    if _CGROUP_MEMORY_MAX.is_file():  # cgroup v2: "max" or a byte count
        try:
            limit = _CGROUP_MEMORY_MAX.read_text().strip()
        except OSError:
            limit = "max"  # unreadable: the physical memory is the bound
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def _bytes_needed(spec: RunSpec, source: ModelSource, cfg: RunConfig) -> int:
    """A lower bound of the bytes one configuration needs on its device: weights, KV cache, and on the CPU the
    prompt (exact integers: a size no tensor can have is simply larger than any device)."""
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    need = source.args.param_count() * itemsize + KVCache.bytes_for(source.args, spec.batch_size, cfg.max_seq,
                                                                     cfg.dtype)
    if cfg.device.type == "cpu":
        need += spec.batch_size * spec.seq * torch.empty((), dtype=torch.int64).element_size()
    return need


def _one(model: torch.nn.Module, spec: RunSpec, source: ModelSource, cfg: RunConfig, ready_s: float,
         memory: int | None, say: Callable[[str], None]) -> pd.DataFrame:
    run_id = f"{source.args.name}-bs{spec.batch_size}-seq{spec.seq}"
    what = f"seq {spec.seq} batch {spec.batch_size}"
    need = _bytes_needed(spec, source, cfg)
    if need > (memory if memory is not None else _INT64_MAX):
        has = f"{memory / 2**30:,.1f} GiB" if memory is not None else "any device"
        say(f"{what}: needs at least {need / 2**30:,.1f} GiB, more than {has}; recorded as oom without running")
        return _oom_row(spec, run_id)
    try:
        return measure(model, spec, source, cfg, run_id, ready_s).summary
    except (RuntimeError, MemoryError) as exc:
        if not is_allocation_failure(exc):
            raise
        say(f"{what}: out of memory ({_reason(exc)}); recorded as oom")
        return _oom_row(spec, run_id)
    finally:
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()


def _oom_row(spec: RunSpec, run_id: str) -> pd.DataFrame:
    row: dict[str, Any] = {c: math.nan for c in CLASSIC_COLUMNS}
    row.update({"seq_len": spec.seq, "batch": spec.batch_size, "flag": "oom", "run_id": run_id})
    return pd.DataFrame([row])


class _OutputLock:
    """An advisory `flock` on `.<name>.lock` beside the sweep file, held while the `with` block runs; a second holder
    is refused at once. The lock file is removed at the end, while still locked: a sweep that opened it meanwhile
    finds another file (or none) under the name once it gets the lock, and starts again with the new one."""

    def __init__(self, path: Path, shown: Path, say: Callable[[str], None]) -> None:
        self.lock = path.with_name(f".{path.name}.lock")
        self.shown = shown
        self.say = say
        self.fd: int | None = None

    def __enter__(self) -> _OutputLock:
        for _ in range(100):
            try:
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise KvscopeError(f"cannot create the lock file {self.lock} of {self.shown}: "
                                   f"{exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise KvscopeError(f"{self.shown} is being written by another kvscope sweep (it holds {self.lock}); "
                                   "wait for it to end or choose another --out") from None
            except OSError as exc:
                os.close(fd)
                raise KvscopeError(f"cannot lock {self.lock}: {exc.strerror or exc}") from None
            try:
                now = os.stat(self.lock)
            except FileNotFoundError:
                now = None
            mine = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                self.fd = fd
                return self
            os.close(fd)  # the holder before us removed this lock file: lock the one under the name now
        raise KvscopeError(f"cannot lock {self.lock}: it keeps being replaced")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.lock)
        except FileNotFoundError:
            pass
        except OSError as err:  # harmless: a lock file nobody holds blocks nothing
            self.say(f"could not remove the lock file {self.lock}: {err.strerror or err}")
        finally:
            os.close(self.fd)
            self.fd = None


@dataclass
class _SweepFile:
    """A sweep file in memory, as it is on disk: a CSV as its header and cell texts, a Parquet file as its Arrow
    table and kvscope metadata; `numbers` holds the validated columns the collapse flags need, one row per row."""

    fmt: str
    shown: Path
    header: list[str] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # CSV: the line each row ends on
    table: pa.Table | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    numbers: pd.DataFrame = field(default_factory=lambda: _numbers([], [], [], [], []))

    @classmethod
    def new(cls, fmt: str, shown: Path) -> _SweepFile:
        return cls(fmt, shown)

    @classmethod
    def read(cls, path: Path, fmt: str, shown: Path) -> _SweepFile:
        return _read_csv(path, shown) if fmt == "csv" else _read_parquet(path, shown)

    def configs(self) -> Iterator[tuple[int, int]]:
        return zip(self.numbers["seq_len"].tolist(), self.numbers["batch"].tolist(), strict=True)

    def _column(self, name: str) -> list[Any]:
        if self.fmt == "csv":
            i = self.header.index(name)
            return [r[i] for r in self.cells]
        return self.table.column(name).to_pylist() if self.table is not None else []

    def _columns(self) -> list[str]:
        return self.header if self.fmt == "csv" else (self.table.column_names if self.table is not None else [])

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse to resume unless the file records every setting and each equals this sweep's."""
        if self.fmt == "parquet":
            saved = self.meta
            if not saved:
                raise KvscopeError(f"--resume: {self.shown} has no kvscope sweep metadata (not written by kvscope "
                                   "sweep); start a new file")
            for key in SETTINGS:
                if key not in saved:
                    raise KvscopeError(f"--resume: {self.shown} records no {key} in its kvscope metadata (written by "
                                       "an older kvscope?); start a new file")
                if _text(saved[key]) != _text(settings[key]):
                    raise KvscopeError(f"--resume: {self.shown} is a sweep of {key}={_text(saved[key])}, this one has "
                                       f"{key}={_text(settings[key])}")
        columns = self._columns()
        for key in SETTINGS:
            if key not in columns:
                raise KvscopeError(f"--resume: {self.shown} has no column {key} (written by an older kvscope, or not "
                                   "by kvscope sweep); start a new file")
            values = [_text(v) for v in self._column(key)]
            for i, v in enumerate(values):
                if v != values[0]:
                    raise KvscopeError(f"--resume: {self.shown} mixes sweeps: {key}={values[0]} in {self._where(0)}, "
                                       f"{key}={v} in {self._where(i)}")
            if values and values[0] != _text(settings[key]):
                raise KvscopeError(f"--resume: {self.shown} is a sweep of {key}={values[0]}, this one has "
                                   f"{key}={_text(settings[key])}")

    def _where(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.fmt == "csv" else f"row {i + 1}"

    def append(self, row: pd.DataFrame) -> None:
        """Add one row (a one-row frame); the rows already here keep their cells."""
        if self.fmt == "csv":
            new_header, new_cells = _csv_cells(row)
            extra = [c for c in new_header if c not in self.header]
            if not self.header:
                extra = _ordered(new_header)
            self.cells = [r + [""] * len(extra) for r in self.cells]
            self.header = self.header + extra
            given = dict(zip(new_header, new_cells, strict=True))
            self.cells.append([given.get(c, "") for c in self.header])
        else:
            self.table = _append_arrow(self.table, row[_ordered(list(row.columns))], self.shown)
        self.numbers = pd.concat([self.numbers, _numbers(*([row[c].iloc[0]] for c in REQUIRED_COLUMNS))],
                                 ignore_index=True)

    def write(self, path: Path, meta: dict[str, Any]) -> None:
        if self.fmt == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(self.header)
            writer.writerows(self.cells)
            data = buf.getvalue().encode()
        else:
            if self.table is None:
                raise RuntimeError("a sweep file is written after its first row only")
            schema_meta = {k: v for k, v in (self.table.schema.metadata or {}).items() if k != b"pandas"}
            schema_meta[METADATA_KEY] = json.dumps(meta, default=str).encode()
            sink = pa.BufferOutputStream()
            pq.write_table(self.table.replace_schema_metadata(schema_meta), sink)
            data = sink.getvalue().to_pybytes()
        _replace(path, data)


def _numbers(seq: list[Any], batch: list[Any], flag: list[Any], decode_ms: list[Any], decode_tok_s: list[Any]
             ) -> pd.DataFrame:
    """The typed columns collapse flags need (REQUIRED_COLUMNS, in that order)."""
    return pd.DataFrame({"seq_len": pd.Series(seq, dtype="int64"), "batch": pd.Series(batch, dtype="int64"),
                         "flag": pd.Series(flag, dtype="object"),
                         "decode_p50_ms_per_tok": pd.Series(decode_ms, dtype="float64"),
                         "decode_tok_s": pd.Series(decode_tok_s, dtype="float64")})


def _ordered(columns: list[str]) -> list[str]:
    """The classic columns first (in their order), then the others as they come."""
    return [c for c in CLASSIC_COLUMNS if c in columns] + [c for c in columns if c not in CLASSIC_COLUMNS]


def _text(value: Any) -> str:
    """A setting as the text a CSV cell holds ("" for a missing value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, str):
        text = value.strip()
        try:
            return _positive_int(int(text))
        except ValueError:
            try:
                return _positive_int(float(text))
            except ValueError:
                return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value <= _INT64_MAX else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return _positive_int(int(value))
    return None


def _number(value: Any) -> float | None:
    """A float cell: empty or missing is NaN; None when the value is not a number at all."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _validate(sf: _SweepFile) -> _SweepFile:
    """Check the columns resume relies on and fill `numbers`; refuse a malformed file in one line."""
    columns = sf._columns()
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise KvscopeError(f"{sf.shown} is not a kvscope sweep file: column {duplicated[0]} appears twice")
    for col in REQUIRED_COLUMNS:
        if col not in columns:
            raise KvscopeError(f"{sf.shown} is not a kvscope sweep file: no column {col}")
    ints: dict[str, list[int]] = {}
    for col in ("seq_len", "batch"):
        ints[col] = []
        for i, v in enumerate(sf._column(col)):
            n = _positive_int(v)
            if n is None:
                raise KvscopeError(f"{sf.shown}: column {col}, {sf._where(i)}: {v!r} is not a positive integer")
            ints[col].append(n)
    floats: dict[str, list[float]] = {}
    for col in ("decode_p50_ms_per_tok", "decode_tok_s"):
        floats[col] = []
        for i, v in enumerate(sf._column(col)):
            x = _number(v)
            if x is None:
                raise KvscopeError(f"{sf.shown}: column {col}, {sf._where(i)}: {v!r} is not a number")
            floats[col].append(x)
    flags = []
    for i, v in enumerate(sf._column("flag")):
        if v is not None and not isinstance(v, str):
            raise KvscopeError(f"{sf.shown}: column flag, {sf._where(i)}: {v!r} is not text")
        flags.append(v or "")
    seen: dict[tuple[int, int], int] = {}
    for i, key in enumerate(zip(ints["seq_len"], ints["batch"], strict=True)):
        if key in seen:
            raise KvscopeError(f"{sf.shown}: {sf._where(i)} repeats seq_len={key[0]}, batch={key[1]} of "
                               f"{sf._where(seen[key])}; a sweep file holds each configuration once")
        seen[key] = i
    sf.numbers = _numbers(ints["seq_len"], ints["batch"], flags, floats["decode_p50_ms_per_tok"],
                          floats["decode_tok_s"])
    return sf


def _read_csv(path: Path, shown: Path) -> _SweepFile:
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = next((cells for cells in reader if cells), None)  # blank lines hold nothing
            for cells in reader:
                if cells:  # a blank line holds no row
                    rows.append(cells)
                    lines.append(reader.line_num)
    except OSError as exc:
        raise KvscopeError(f"cannot read {shown}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise KvscopeError(f"cannot read {shown}: not a CSV file ({exc})") from None
    if header is None:
        raise KvscopeError(f"{shown} is empty: not a kvscope sweep file")
    for cells, line in zip(rows, lines, strict=True):
        if len(cells) != len(header):
            raise KvscopeError(f"{shown}: line {line} has {len(cells)} fields, the header has {len(header)}")
    return _validate(_SweepFile("csv", shown, header=header, cells=rows, lines=lines))


def _read_parquet(path: Path, shown: Path) -> _SweepFile:
    try:
        table = pq.read_table(path)
    except OSError as exc:
        raise KvscopeError(f"cannot read {shown}: {exc.strerror or exc}") from None
    except (ValueError, pa.ArrowException) as exc:
        raise KvscopeError(f"cannot read {shown}: not a Parquet file ({_first_line(exc)})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    meta: dict[str, Any] = {}
    if raw is not None:
        try:
            decoded = json.loads(raw)
        except ValueError:
            raise KvscopeError(f"{shown}: its kvscope metadata is not valid JSON") from None
        sweep = decoded.get("sweep") if isinstance(decoded, dict) else None
        meta = sweep if isinstance(sweep, dict) else {}
    return _validate(_SweepFile("parquet", shown, table=table, meta=meta))


def _csv_cells(row: pd.DataFrame) -> tuple[list[str], list[str]]:
    """A one-row frame as the header and cell texts pandas writes for it."""
    parsed = list(csv.reader(io.StringIO(row.to_csv(index=False, lineterminator="\n"))))
    return parsed[0], parsed[1]


def _append_arrow(old: pa.Table | None, row: pd.DataFrame, shown: Path) -> pa.Table:
    """`old` with one more row; the old columns keep their types (the new row is cast to them)."""
    new = pa.Table.from_pandas(row, preserve_index=False).replace_schema_metadata(None)
    if old is None:
        return new
    for i, f in enumerate(new.schema):
        if f.name not in old.column_names:
            continue
        old_type = old.schema.field(f.name).type
        if old_type == f.type:
            continue
        if pa.types.is_null(old_type):  # only nulls so far: they take the new row's type
            j = old.column_names.index(f.name)
            old = old.set_column(j, f.name, old.column(f.name).cast(f.type))
            continue
        try:
            new = new.set_column(i, f.name, new.column(f.name).cast(old_type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise KvscopeError(f"cannot append to {shown}: column {f.name} holds {old_type}, the new row "
                               f"{f.type}") from None
    return pa.concat_tables([old, new], promote_options="default")


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to a new file beside `path`, sync it and rename it over `path`: `path` is either as it was or
    holds all of `data`. A resumed file keeps its permission bits; a new one gets those open() gives (umask)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # see _TMP_EXTRA
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        try:
            if path.exists():
                os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error being raised is the one to report
            tmp.unlink()
        raise
