"""The sweep's `--out`: checked before the model loads, and written by one sweep at a time.

`check_out` refuses, in one line, a path that cannot be a sweep file (a folder, another extension, a link to either,
a folder that is missing or not writable, a name too long for the temporary file written beside it); nothing is
created. One writer at a time: for the whole sweep, kvscope holds an advisory `fcntl.flock` on a lock file beside the
output, `.<name>.lock` (removed at the end). A second sweep of the same file, with or without `--resume`, is refused
with a one-line error while the first one runs. A lock file left by a killed sweep holds no lock and blocks nothing.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path

from kvscope.analysis.sweep_file import SWEEP_FORMATS
from kvscope.errors import KvscopeError
from kvscope.io import TMP_NAME_EXTRA, check_path, os_reason


def check_out(out: Path) -> tuple[str, Path]:
    """The format (`csv` | `parquet`) and the resolved path of `--out`, or a one-line error for a path that cannot be
    a sweep file. Nothing is created."""
    if not str(out).strip():
        raise KvscopeError("--out is empty: give a FILE.csv or FILE.parquet")
    if "\0" in str(out):
        raise KvscopeError("--out must not contain a NUL character")
    found = check_path(out, "--out")  # a name too long, a loop of links, a file on the way: one line
    try:
        return _check_out(out, found)
    except OSError as exc:  # a folder that cannot be searched
        raise KvscopeError(f"--out {out}: {os_reason(exc)}") from None


def _check_out(out: Path, found: os.stat_result | None) -> tuple[str, Path]:
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise KvscopeError(f"--out {out} is a folder: give a FILE.csv or FILE.parquet")
    if out.name.lower() in SWEEP_FORMATS:  # `.csv` alone: a hidden file with no extension, to pathlib
        raise KvscopeError(f"--out {out}: the file name is only the extension {out.name}; give a name before it, "
                           f"such as sweep{out.name}")
    if out.suffix.lower() not in SWEEP_FORMATS:
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
    if check_path(parent, "--out folder") is None:
        raise KvscopeError(f"--out {out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise KvscopeError(f"--out {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KvscopeError(f"--out {out}: folder {parent} is not writable")
    longest = os.pathconf(parent, "PC_NAME_MAX") - len(TMP_NAME_EXTRA)
    if len(path.name.encode()) > longest:
        raise KvscopeError(f"--out {out}: the file name takes {len(path.name.encode())} bytes, at most {longest} here "
                           "(the sweep writes .NAME.<random>.tmp beside it)")
    return SWEEP_FORMATS[path.suffix.lower()], path


class OutputLock:
    """An advisory `flock` on `.<name>.lock` beside the sweep file, held while the `with` block runs; a second holder
    is refused at once. The lock file is removed at the end, while still locked: a sweep that opened it meanwhile
    finds another file (or none) under the name once it gets the lock, and starts again with the new one."""

    def __init__(self, path: Path, shown: Path, say: Callable[[str], None]) -> None:
        self.lock = path.with_name(f".{path.name}.lock")
        self.shown = shown
        self.say = say
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
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
