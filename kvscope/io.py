"""Paths and output, written whole or not at all: the one check of a path a user gives (`check_path`: every error of
the system's as one line), the one atomic file write (`_atomic`: temporary file, sync, rename; used by
`write_parquet`, `write_json`, `write_bytes`), the one output file (`OutputFile`) and the one output folder
(`AtomicFolder`: temporary folder, then rename) with the one policy of every command that writes, and run metadata
under the key `kvscope`.

The policy of every writer (`kvscope run`, `sweep`, `nsys`, `align`, `report`, `capacity --out`, `calibrate`'s
cache, and the Python API's `run`): never over one of the command's inputs (the same path, through links, or the
same file under another name), never over anything but the command's own earlier output (recognised by its files or
its content), written atomically (all of it or nothing), and every path checked before the work starts, so that a
path that cannot be written ends in one line before anything is computed or printed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.errors import KvscopeError

METADATA_KEY = b"kvscope"
# what the temporary file of an atomic write adds to the file's name: .NAME.<12 hex>.tmp
TMP_NAME_EXTRA = ".." + "0" * 12 + ".tmp"
# what the temporary folder of an AtomicFolder adds to the folder's name: .NAME.partial-<8 random> (tempfile.mkdtemp)
FOLDER_NAME_EXTRA = "..partial-" + "0" * 8
_NAME_MAX = 255  # where the file system does not say (os.pathconf)


def os_reason(exc: OSError) -> str:
    """An OSError's reason in one line: the system's text ("File name too long"), else the error's own text."""
    return exc.strerror or " ".join(str(exc).split()) or type(exc).__name__


def check_path(path: str | os.PathLike[str], label: str = "", absent: tuple[int, ...] = (errno.ENOENT,)
               ) -> os.stat_result | None:
    """The one check of a path a user gives (an argument, a flag, a Python API parameter, an output path): what is
    there (links followed), or None when nothing is (a missing file or folder, a link to nothing: errno in `absent`).
    Any other refusal of the system's is a one-line KvscopeError `<label> <path>: <reason>`, never a traceback: a
    name longer than the file system allows, a loop of links, a file where a folder is expected (its message names
    that file), a folder that cannot be searched, an I/O error."""
    shown = f"{label} {os.fspath(path)}".strip()
    try:
        return os.stat(path)
    except ValueError:  # a NUL character: the system cannot even be asked
        raise KvscopeError(f"{shown}: a path must not contain a NUL character") from None
    except OSError as exc:
        if exc.errno in absent:
            return None
        if exc.errno == errno.ENOTDIR:
            raise KvscopeError(f"{shown}: {_not_a_folder(Path(path))}") from None
        raise KvscopeError(f"{shown}: {os_reason(exc)}") from None


def _not_a_folder(path: Path) -> str:
    """Why `path` got ENOTDIR: the folder on its way that is not one (a file), or the system's text."""
    for ancestor in path.parents:
        try:
            if not stat.S_ISDIR(os.stat(ancestor).st_mode):
                return f"{ancestor} is not a folder"
        except OSError:
            continue
    return os.strerror(errno.ENOTDIR)


def _name_room(folder: Path, extra: str) -> int:
    """The longest name (bytes) a file in `folder` may have so that `extra` added to it still fits the file system."""
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = _NAME_MAX
    return longest - len(extra)


def _writable(folder: Path) -> str | None:
    """None when this process may make files in `folder`, else why not (a read-only file system, permission)."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    except OSError:
        pass
    return os.strerror(errno.EACCES)


def _same(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one file or folder: the same path once links are resolved, or the same file under
    two names (a hard link: os.path.samefile). A path that cannot be looked at is no match."""
    try:
        if a.resolve() == b.resolve():
            return True
        return os.path.samefile(a, b)
    except (OSError, RuntimeError, ValueError):
        return False


def _inside(inner: Path, outer: Path) -> bool:
    """Whether `inner` lies inside the folder `outer` (links resolved)."""
    try:
        return outer.resolve() in inner.resolve().parents
    except (OSError, RuntimeError, ValueError):
        return False


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


Inputs = Iterable[tuple[str, "str | os.PathLike[str]"]]  # (how messages name it, path) of each input


class OutputFile:
    """A file a command writes (`kvscope capacity --out`, the calibration cache), checked when made, before any work
    (a one-line `KvscopeError` for any refusal), and written by `write` atomically (`_atomic`).

    The policy: `path` may be absent (its folder must exist and be writable), or the command's own earlier output
    (`own(path)` recognises it by its content, `what` names it in messages), which is replaced whole. Never one of
    `inputs` (the same path through links, or the same file under another name), never a folder, a device or any
    file `own` does not recognise. A link is followed: the file it points to is the one checked and written. `write`
    checks again (a file that appeared meanwhile is refused too) and turns every OSError into one line naming
    `label` and `path`."""

    def __init__(self, path: str | os.PathLike[str], label: str, own: Callable[[Path], bool], what: str,
                 inputs: Inputs = ()) -> None:
        self.path = Path(path)
        self.label = label
        self.own = own
        self.what = what
        self.inputs = [(name, Path(p)) for name, p in inputs]
        self.target = self._check()

    def _name(self) -> str:
        return f"{self.label} {self.path}"

    def _check(self) -> Path:
        found = check_path(self.path, self.label)
        try:
            target = self.path.resolve()
        except (OSError, RuntimeError) as exc:  # a loop of links found while resolving
            raise KvscopeError(f"{self._name()}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
        for name, given in self.inputs:
            if _same(self.path, given):
                raise KvscopeError(f"{self._name()} is the {name} {given}; kvscope never writes over its input: give "
                                   "another file")
        if found is not None:
            if stat.S_ISDIR(found.st_mode):
                raise KvscopeError(f"{self._name()} is a folder; give a file name")
            if not stat.S_ISREG(found.st_mode):
                raise KvscopeError(f"{self._name()} is not a regular file; give a file name")
            try:
                mine = self.own(target)
            except OSError as exc:
                raise KvscopeError(f"{self._name()} cannot be read: {os_reason(exc)}") from None
            if not mine:
                raise KvscopeError(f"{self._name()} already exists and is not {self.what} (kvscope replaces only its "
                                   "own earlier output); give a new file name")
        folder = target.parent
        if check_path(folder, f"{self._name()}: folder") is None:
            raise KvscopeError(f"{self._name()}: folder {folder} does not exist")
        room = _name_room(folder, TMP_NAME_EXTRA)
        if len(target.name.encode()) > room:
            raise KvscopeError(f"{self._name()}: the file name takes {len(target.name.encode())} bytes, at most {room} "
                               "here (kvscope writes .NAME.<random>.tmp beside it)")
        why = _writable(folder)
        if why is not None:
            raise KvscopeError(f"{self._name()} cannot be written: folder {folder}: {why}")
        return target

    def write(self, data: bytes) -> Path:
        """Check again, then write `data` atomically; the path written (links resolved)."""
        self.target = self._check()
        try:
            write_bytes(self.target, data)
        except OSError as exc:
            raise KvscopeError(f"cannot write {self._name()}: {os_reason(exc)}") from None
        return self.target


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
    file, a link, a folder with other content, one of the command's `inputs` or a folder that holds one, a path the
    system refuses: `check_path`) is refused with a one-line `KvscopeError` at construction, before any work is done,
    and checked again by `open()`. Only what was at `final` at construction may be replaced: a folder another
    process makes, fills or replaces meanwhile (its own earlier output too: two commands into one new `--out` at
    once) is kept, and `open()` or `commit()` fails and says so.

    In a `with` block, an `OSError` raised inside (a write that fails) becomes a `KvscopeError` naming `final` and the
    system's reason (e.g. "No space left on device"); the temporary path is never named. `label` is how messages
    name the folder, e.g. "--out", "report folder", "output folder".
    """

    def __init__(self, final: Path, label: str, replaceable: Callable[[Path], bool] | None = None,
                 inputs: Inputs = ()) -> None:
        self.final = Path(final)
        self.label = label
        self.replaceable = replaceable
        self.inputs = [(name, Path(p)) for name, p in inputs]
        self.tmp: Path | None = None
        self._created: list[Path] = []
        self._check()
        self._seen = _identity(self.final)  # what was there when the command started: all it may replace

    def _name(self) -> str:
        return f"{self.label} {self.final}"

    def _check(self) -> None:
        final = self.final
        # a name too long, a loop of links, a folder that cannot be searched; a file on the way: said below
        check_path(final, self.label, absent=(errno.ENOENT, errno.ENOTDIR))
        if final.is_symlink():  # the final rename would replace the link, not fill the folder it points to
            raise KvscopeError(f"{self._name()} is a symbolic link; give the folder's own path")
        if final.exists():
            if not final.is_dir():
                what = "a file" if final.is_file() else "not a folder"
                raise KvscopeError(f"{self._name()} already exists and is {what}; give a new or empty folder")
            try:
                refused = any(final.iterdir()) and not self._replaceable()
            except OSError as exc:
                raise KvscopeError(f"{self._name()} cannot be read: {os_reason(exc)}") from None
            if refused:
                held = "is not empty" if self.replaceable is None else "holds other files"
                raise KvscopeError(f"{self._name()} already exists and {held}; give a new or empty folder")
            for name, given in self.inputs:
                if _same(final, given) or _inside(given, final):
                    how = "is" if _same(final, given) else "holds"
                    raise KvscopeError(f"{self._name()} {how} the {name} {given}; kvscope never writes over its "
                                       "input: give another folder")
        ancestor = final.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise KvscopeError(f"{self._name()} cannot be written ({ancestor} is not a writable folder)")
        made = [a for a in final.parents if ancestor in a.parents]  # the parents open() makes
        room, most = _name_room(ancestor, FOLDER_NAME_EXTRA), _name_room(ancestor, "")
        for name, limit in ((final.name, room), *((a.name, most) for a in made)):
            if len(name.encode()) > limit:
                raise KvscopeError(f"{self._name()}: the folder name {name[:20]}... takes {len(name.encode())} bytes, "
                                   f"at most {limit} here" + (" (kvscope writes .NAME.partial-<random> beside it)"
                                                              if limit == room else ""))

    def _replaceable(self) -> bool:
        return self.replaceable is not None and self.replaceable(self.final)

    def open(self) -> Path:
        """Check `final` again and make the temporary folder (and the parents `final` lacks); its path."""
        self._check()
        if _identity(self.final) != self._seen:
            raise KvscopeError(self._raced("nothing was written"))
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
            raise KvscopeError(f"{self._name()} cannot be written: {os_reason(exc)}") from None
        return self.tmp

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc_type is None:
            self.commit()
            return False
        self.discard()
        if isinstance(exc, OSError):
            raise KvscopeError(f"cannot write {self._name()}: {os_reason(exc)}") from None
        return False

    def commit(self) -> Path:
        """Rename the temporary folder to `final` (replacing a previous output the policy accepts, and only the one
        that was there when the command started); `final`. On a failure the temporary folder is discarded, `final`
        is as it was, and a KvscopeError says why."""
        if self.tmp is None:
            raise RuntimeError("AtomicFolder.commit() before open()")
        try:
            placed = self._place()
        except OSError as exc:
            self.discard()
            raise KvscopeError(f"cannot write {self._name()}: {os_reason(exc)}") from None
        if not placed:
            self.discard()
            raise KvscopeError(self._raced("this run's files were discarded"))
        return self.final

    def _raced(self, ours: str) -> str:
        """The message of a `final` that another process made or changed while this one worked."""
        if self.final.is_dir() and not self.final.is_symlink():
            return f"{self._name()} was filled by another run while this one ran; that folder is kept and {ours}"
        return f"{self._name()} appeared while this run ran and is not a folder; it is kept and {ours}"

    def _place(self) -> bool:
        """`tmp` renamed to `final`: True; False (nothing done) when `final` is now something this command may not
        replace: made by another process meanwhile, changed since the start, or not its own earlier output."""
        tmp, final = self.tmp, self.final
        try:
            os.replace(tmp, final)  # rename(2) replaces an absent or empty folder in one step, and refuses others
            self.tmp = None
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
        if self._seen is None or _identity(final) != self._seen or not self._replaceable():
            return False
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
                               f"removed: {os_reason(exc)}") from None
        return True

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


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """What is at `path` (not following a link): its device, inode, type and modification time, which change when
    another process makes, replaces or fills it; None when nothing is there."""
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), st.st_mtime_ns
