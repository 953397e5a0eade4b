"""Parquet and JSON output: atomic writes (temporary file, then rename) and run metadata under the key `kvscope`."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"kvscope"


def write_parquet(df: pd.DataFrame, path: Path, metadata: dict[str, Any]) -> None:
    """Write `df` to `path` atomically, with `metadata` as JSON in the schema metadata under `kvscope`."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(metadata, default=str).encode()
    table = table.replace_schema_metadata(meta)
    _atomic(path, lambda tmp: pq.write_table(table, tmp))


def write_csv(df: pd.DataFrame, path: Path) -> None:
    _atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(obj: Any, path: Path, indent: int | None = None) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, default=str, indent=indent)))


def read_metadata(path: Path) -> dict[str, Any]:
    """The `kvscope` metadata of a Parquet file written by `write_parquet`."""
    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} has no kvscope metadata")
    return json.loads(meta[METADATA_KEY])


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _atomic(path: Path, write: Callable[[str], object]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
