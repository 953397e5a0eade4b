"""`kvscope sweep`: every (seq, batch) pair as one run, one model load for the whole sweep.

Each finished configuration is appended to the output file (CSV or Parquet) at once, atomically (the file is
rewritten to a temporary name and renamed), so a sweep that stops loses nothing it finished. A configuration that
runs out of GPU memory is recorded with `flag=oom`, its memory is freed, and the sweep goes on. `--resume` skips the
configurations the file already holds and leaves their rows as they are; it refuses a file of another model or dtype.

`flag` also marks collapse (with `collapse_factor` F): `latency-collapse` when the decode ms per token is more than
F times the best earlier configuration with the same batch (the sequence axis), `throughput-collapse` when decode
tokens/s is below the best earlier configuration with the same sequence length (the batch axis) divided by F.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from kvscope.errors import KvscopeError
from kvscope.io import read_metadata, write_csv, write_parquet
from kvscope.profiler.run import CLASSIC_COLUMNS, RunSpec, measure, prepare
from kvscope.profiler.weights import load_model

DEFAULT_COLLAPSE_FACTOR = 2.0
_IDENTITY = ("model", "dtype", "attn", "gen_tokens")


@dataclass(frozen=True)
class SweepSpec:
    base: RunSpec  # model, gen_tokens, warmup, reps, granularity, attn, dtype, device, seed
    seqs: tuple[int, ...]
    batches: tuple[int, ...]
    out: Path
    collapse_factor: float = DEFAULT_COLLAPSE_FACTOR
    resume: bool = False


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise KvscopeError(f"{flag}: empty list")
    out = []
    for x in items:
        try:
            v = int(x)
        except ValueError:
            raise KvscopeError(f"{flag}: {x!r} is not an integer") from None
        if v <= 0:
            raise KvscopeError(f"{flag}: sizes must be positive, got {v}")
        out.append(v)
    return tuple(out)


def read_table(path: Path) -> pd.DataFrame:
    """A sweep file (CSV or Parquet); `flag` comes back as strings, empty where nothing is flagged."""
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False,
                                                                                 na_values=[""])
    except (OSError, ValueError) as exc:
        raise KvscopeError(f"cannot read {path}: {exc}") from None
    if "flag" in df.columns:
        df["flag"] = df["flag"].astype("string").fillna("")
    return df


def _write(df: pd.DataFrame, path: Path, meta: dict[str, Any]) -> None:
    cols = [c for c in CLASSIC_COLUMNS if c in df.columns] + [c for c in df.columns if c not in CLASSIC_COLUMNS]
    df = df[cols]
    if path.suffix == ".parquet":
        write_parquet(df, path, meta)
    else:
        write_csv(df, path)


def _identity(spec: RunSpec, model_name: str, dtype: str) -> dict[str, Any]:
    return {"model": model_name, "dtype": dtype, "attn": spec.attn, "gen_tokens": spec.gen_tokens}


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


def run_sweep(sw: SweepSpec, progress: Callable[[int, int, str], None] | None = None,
              log: Callable[[str], None] | None = None) -> pd.DataFrame:
    say = log or (lambda _m: None)
    if sw.out.suffix not in (".csv", ".parquet"):
        raise KvscopeError(f"--out {sw.out}: the sweep file must end in .csv or .parquet")
    if not sw.collapse_factor > 1:
        raise KvscopeError(f"--collapse-factor must be > 1, got {sw.collapse_factor}")
    # every configuration is checked before the model is loaded
    configs = [(s, b) for s in sw.seqs for b in sw.batches]
    checked = {}
    for s, b in configs:
        spec = replace(sw.base, seq=s, batch_size=b, out=None)
        checked[(s, b)] = (spec, *prepare(spec))
    _, source, cfg0 = checked[configs[0]]
    dtype_name = str(cfg0.dtype).removeprefix("torch.")
    ident = _identity(sw.base, source.args.name, dtype_name)
    parent = sw.out.parent
    if not parent.is_dir():
        raise KvscopeError(f"--out {sw.out}: folder {parent} does not exist")
    if not _writable(parent):
        raise KvscopeError(f"--out {sw.out}: folder {parent} is not writable")
    done = pd.DataFrame()
    if sw.out.exists():
        if not sw.resume:
            raise KvscopeError(f"{sw.out} exists; pass --resume to continue that sweep, or choose another file")
        done = read_table(sw.out)
        _check_same_sweep(done, ident, sw.out)
    elif sw.resume:
        say(f"--resume: {sw.out} does not exist yet, starting a new sweep")
    finished = set(zip(done.get("seq_len", []), done.get("batch", []), strict=False))
    todo = [c for c in configs if c not in finished]
    if not todo:
        say("every configuration is already in the file")
        return done
    meta = {"sweep": {**ident, "seqs": list(sw.seqs), "batches": list(sw.batches),
                      "collapse_factor": sw.collapse_factor, "warmup": sw.base.warmup, "reps": sw.base.reps}}
    model, ready_s = load_model(source, cfg0.device, cfg0.dtype, seed=sw.base.seed)
    say(f"{source.args.name} ready in {ready_s:.2f} s; {len(todo)} configuration(s) to run")
    rows = done
    for i, (s, b) in enumerate(todo):
        spec, _, cfg = checked[(s, b)]
        if progress:
            progress(i, len(todo), f"seq {s} batch {b}")
        row = _one(model, spec, source, cfg, ready_s)
        rows = pd.concat([rows, row], ignore_index=True) if len(rows) else row
        rows["flag"] = collapse_flags(rows, sw.collapse_factor)
        _write(rows, sw.out, meta)  # the finished configuration is on disk before the next one starts
        if progress:
            progress(i + 1, len(todo), f"seq {s} batch {b}")
    return rows


def _one(model: torch.nn.Module, spec: RunSpec, source: Any, cfg: Any, ready_s: float) -> pd.DataFrame:
    run_id = f"{source.args.name}-bs{spec.batch_size}-seq{spec.seq}"
    try:
        return measure(model, spec, source, cfg, run_id, ready_s).summary
    except torch.OutOfMemoryError:
        row = {c: math.nan for c in CLASSIC_COLUMNS}
        row.update({"seq_len": spec.seq, "batch": spec.batch_size, "flag": "oom", "run_id": run_id,
                    **_identity(spec, source.args.name, str(cfg.dtype).removeprefix("torch."))})
        return pd.DataFrame([row])
    finally:
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()


def _check_same_sweep(done: pd.DataFrame, ident: dict[str, Any], path: Path) -> None:
    if path.suffix == ".parquet":
        try:
            saved = read_metadata(path).get("sweep", {})
        except ValueError:
            saved = {}
    else:
        saved = {k: done[k].iloc[0] for k in _IDENTITY if k in done.columns and len(done)}
    for key in _IDENTITY:
        if key in saved and str(saved[key]) != str(ident[key]):
            raise KvscopeError(f"--resume: {path} is a sweep of {key}={saved[key]}, this one has {key}={ident[key]}")
    if not {"seq_len", "batch"} <= set(done.columns):
        raise KvscopeError(f"--resume: {path} is not a kvscope sweep file (no seq_len/batch columns)")


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)
