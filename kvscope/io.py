"""Output, written whole or not at all: the one atomic file write (`_atomic`: temporary file, sync, rename; used by
`write_parquet`, `write_json`, `write_bytes`), the one atomic output folder (`AtomicFolder`: temporary folder, then
rename), and run metadata under the key `kvscope`."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.errors import KvscopeError

METADATA_KEY = b"kvscope"
# what the temporary file of an atomic write adds to the file's name: .NAME.<12 hex>.tmp
TMP_NAME_EXTRA = ".." + "0" * 12 + ".tmp"


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


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `_atomic`)."""
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


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
    """The one atomic file write: `write(tmp)` fills a new file beside `path` (`.NAME.<12 hex>.tmp`, see
    TMP_NAME_EXTRA), which is synced and renamed over `path`, so `path` either is as it was or holds all of it. A
    file that is replaced keeps its permission bits; a new one gets those open() gives (the umask). On any error the
    temporary file is removed and the error raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        try:
            if path.exists():
                os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
            write(str(tmp))
            os.fsync(fd)  # the file's data, whichever descriptor `write` used
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error being raised is the one to report
            tmp.unlink()
        raise


class AtomicFolder:
    """An output folder written whole or not at all: the one used by every command that writes a folder (`kvscope
    run`, `kvscope nsys`, `kvscope align`, `kvscope report`).

    Files go into a temporary sibling folder (`.NAME.partial-*`, made by `open()`, which `with` yields), renamed to
    `final` by `commit()` (at the end of a `with` block without an error). `discard()` (on an error in the `with`
    block: a `KvscopeError`, a full disk, Ctrl-C, SIGTERM) removes the temporary folder, and with it every parent
    folder `open()` made, so `final` is as it was before.

    The policy, `replaceable`: which existing folder `final` may be. Always: absent (made, with its parents) or an
    empty folder (filled). None (a run folder): nothing else. A predicate (typically "holds only files this same
    command writes", its own earlier output recognised by its file names): a folder it accepts is replaced whole at
    the commit (the old folder renamed aside, the new one renamed into place, the old one removed). Anything else (a
    file, a link, a folder with other content) is refused with a one-line `KvscopeError` at construction, before any
    work is done, and checked again by `open()`. A folder that another process fills while this one works is never
    replaced unless the policy accepts it: the commit then fails, and says so.

    In a `with` block, an `OSError` raised inside (a write that fails) becomes a `KvscopeError` naming `final` and the
    system's reason (e.g. "No space left on device"); the temporary path is never named. `label` is how messages
    name the folder, e.g. "--out", "report folder", "output folder".
    """

    def __init__(self, final: Path, label: str, replaceable: Callable[[Path], bool] | None = None) -> None:
        self.final = Path(final)
        self.label = label
        self.replaceable = replaceable
        self.tmp: Path | None = None
        self._created: list[Path] = []
        self._check()

    def _name(self) -> str:
        return f"{self.label} {self.final}"

    def _check(self) -> None:
        final = self.final
        if final.is_symlink():  # the final rename would replace the link, not fill the folder it points to
            raise KvscopeError(f"{self._name()} is a symbolic link; give the folder's own path")
        if final.exists():
            if not final.is_dir():
                what = "a file" if final.is_file() else "not a folder"
                raise KvscopeError(f"{self._name()} already exists and is {what}; give a new or empty folder")
            try:
                refused = any(final.iterdir()) and not self._replaceable()
            except OSError as exc:
                raise KvscopeError(f"{self._name()} cannot be read: {exc.strerror or exc}") from None
            if refused:
                held = "is not empty" if self.replaceable is None else "holds other files"
                raise KvscopeError(f"{self._name()} already exists and {held}; give a new or empty folder")
        ancestor = final.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise KvscopeError(f"{self._name()} cannot be written ({ancestor} is not a writable folder)")

    def _replaceable(self) -> bool:
        return self.replaceable is not None and self.replaceable(self.final)

    def open(self) -> Path:
        """Check `final` again and make the temporary folder (and the parents `final` lacks); its path."""
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
            self.discard()
            raise KvscopeError(f"{self._name()} cannot be written: {exc.strerror or exc}") from None
        return self.tmp

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc_type is None:
            self.commit()
            return False
        self.discard()
        if isinstance(exc, OSError):
            raise KvscopeError(f"cannot write {self._name()}: {exc.strerror or exc}") from None
        return False

    def commit(self) -> Path:
        """Rename the temporary folder to `final` (replacing a previous output the policy accepts); `final`. On a
        failure the temporary folder is discarded, `final` is as it was, and a KvscopeError says why."""
        if self.tmp is None:
            raise RuntimeError("AtomicFolder.commit() before open()")
        try:
            self._place()
        except OSError as exc:
            self.discard()
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise KvscopeError(f"{self._name()} was filled by another run while this one ran; that folder is kept "
                                   "and this run's files were discarded") from None
            raise KvscopeError(f"cannot write {self._name()}: {exc.strerror or exc}") from None
        return self.final

    def _place(self) -> None:
        tmp, final = self.tmp, self.final
        try:
            os.replace(tmp, final)  # rename(2) replaces an absent or empty folder in one step, and refuses others
            self.tmp = None
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self._replaceable():
                raise
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        try:
            os.replace(final, old)  # `old` is an empty folder: replaced by the previous output
        except OSError:
            with contextlib.suppress(OSError):
                old.rmdir()
            raise
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        self.tmp = None
        try:
            shutil.rmtree(old)
        except OSError as exc:
            raise KvscopeError(f"{self._name()} is written, but its previous content, moved to {old}, could not be "
                               f"removed: {exc.strerror or exc}") from None

    def discard(self) -> None:
        """Remove the temporary folder and the parents `open()` made (those still empty); never raises."""
        if self.tmp is not None:  # cleanup after an error that is being raised: that error is the one to report
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for folder in self._created:  # innermost first; stop at the first that is not empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []
