"""Parquet and JSON output: atomic writes (temporary file, then rename), atomic output folders (`AtomicFolder`:
temporary folder, then rename) and run metadata under the key `kvscope`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.errors import KvscopeError

METADATA_KEY = b"kvscope"


def write_parquet(df: pd.DataFrame, path: Path, metadata: dict[str, Any]) -> None:
    """Write `df` to `path` atomically, with `metadata` as JSON in the schema metadata under `kvscope`."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(metadata, default=str).encode()
    table = table.replace_schema_metadata(meta)
    _atomic(path, lambda tmp: pq.write_table(table, tmp))


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


class AtomicFolder:
    """An output folder written whole or not at all (torch-free, for the analysis commands).

    Files go into a temporary sibling folder (`.NAME.partial-*`, the path `with` yields), which is renamed to `final`
    only when the `with` block ends without an error. On an error (a `KvscopeError`, a full disk, Ctrl-C, SIGTERM)
    the temporary folder is removed, and with it every parent folder this made, so `final` is as it was before.

    What `final` may be: absent (made, with its parents), an empty folder (filled), or a folder that `replaceable`
    accepts, typically one holding only files this same command writes (replaced whole at the end: the old folder is
    renamed aside, the new one renamed into place, the old one removed). Anything else (a file, a link, a folder with
    other content) is refused with a one-line `KvscopeError` at construction, before any work is done, and checked
    again when the `with` block starts.

    An `OSError` raised inside the block (a write that fails) becomes a `KvscopeError` naming `final` and the
    system's reason (e.g. "No space left on device"); the temporary path is never named.
    """

    def __init__(self, final: Path, label: str, replaceable: Callable[[Path], bool] | None = None) -> None:
        self.final = Path(final)
        self.label = label  # how messages name the folder, e.g. "--out" or "report folder"
        self.replaceable = replaceable
        self.tmp: Path | None = None
        self._created: list[Path] = []
        self._check()

    def _check(self) -> None:
        final = self.final
        if final.is_symlink():
            raise KvscopeError(f"{self.label} {final} is a symbolic link; give a folder path")
        if final.exists():
            if not final.is_dir():
                raise KvscopeError(f"{self.label} {final} is not a folder")
            try:
                refused = any(final.iterdir()) and not (self.replaceable is not None and self.replaceable(final))
            except OSError as exc:
                raise KvscopeError(f"{self.label} {final} cannot be read: {exc.strerror or exc}") from None
            if refused:
                raise KvscopeError(f"{self.label} {final} already exists and holds other files; give an empty or "
                                   "new folder")
        ancestor = final.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise KvscopeError(f"{self.label} {final} cannot be written ({ancestor} is not a writable folder)")

    def __enter__(self) -> Path:
        self._check()
        ancestor = self.final.parent
        while not ancestor.exists():
            self._created.append(ancestor)  # innermost first
            ancestor = ancestor.parent
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the mode of a plain mkdir
        except OSError as exc:
            self._discard()
            raise KvscopeError(f"{self.label} {self.final} cannot be written: {exc.strerror or exc}") from None
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc_type is None:
            try:
                self._commit()
                return False
            except OSError as err:  # a rename failed: `final` is as it was
                self._discard()
                raise KvscopeError(f"cannot write {self.label} {self.final}: {err.strerror or err}") from None
        self._discard()
        if isinstance(exc, OSError):
            raise KvscopeError(f"cannot write {self.label} {self.final}: {exc.strerror or exc}") from None
        return False

    def _commit(self) -> None:
        if self.tmp is None:
            raise RuntimeError("AtomicFolder committed outside its with block")
        final = self.final
        if not final.exists() or not any(final.iterdir()):
            os.replace(self.tmp, final)  # rename(2) replaces an empty folder in one step
            self.tmp = None
            return
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old)  # `old` is an empty folder: replaced by the previous output
        try:
            os.replace(self.tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        self.tmp = None
        try:
            shutil.rmtree(old)
        except OSError as exc:
            raise KvscopeError(f"{self.label} {final} is written, but its previous content, moved to {old}, could not "
                               f"be removed: {exc.strerror or exc}") from None

    def _discard(self) -> None:
        if self.tmp is not None:  # cleanup after an error that is being raised: that error is the one to report
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for folder in self._created:  # innermost first; stop at the first that is not empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []
