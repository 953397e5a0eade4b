"""An SQLite export is read from exactly the path given, and only read (issue 22, cause 3).

- a name holding characters that mean something in an SQLite URI (`#`, `?`, `%`, `&`) is read from that file, never
  from another one (`exp#1.sqlite` is not `exp`, `p%41.sqlite` is not `pA.sqlite`), and reading creates no file
  (`q?x.sqlite` once created an empty `q`);
- an export in WAL journal mode is read where its folder is not writable (SQLite would create `-shm` and `-wal`
  files beside it), and leaves no file behind where it is; one whose last changes are still in its `-wal` file and
  that cannot be read there is refused saying exactly why.

A read-only folder is made by a read-only bind mount in a private mount namespace (`unshare -m`: root ignores
permission bits) or, for other users, by taking the folder's write permission away; the tests that need one are
skipped where neither works.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from cli_checks import fail
from paths import DATA, ROOT

import kvscope.api as api
from kvscope.cli import main
from kvscope.errors import KvscopeError

TINY = DATA / "nsys" / "tiny.sqlite"  # 165 ranges, a kvscope run
PLAIN = DATA / "foreign" / "plain.sqlite"  # 8 ranges, another program
TINY_RANGES = 165

# (export name, the file an unescaped URI `file:<path>?mode=ro` opens instead)
URI_NAMES = [
    ("exp#1.sqlite", "exp"),
    ("q?x.sqlite", "q"),
    ("p%41.sqlite", "pA.sqlite"),
    ("x%2Fy.sqlite", "x/y.sqlite"),
    ("run?mode=rwc&a#b.sqlite", "run"),
]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _read(how: str, export: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> int:
    """The number of ranges that `how` (the command or an API function) reads from `export`."""
    if how == "cli":
        assert main(["align", str(export), "--out", str(out)]) == 0
        capsys.readouterr()
        return len(pd.read_parquet(out / "ranges.parquet"))
    if how == "load_export":
        exp = api.load_export(export)
        assert exp.source == export
        return len(exp.ranges)
    if how == "project":
        return len(api.project(export))
    result = api.align(export)
    assert result.regions is not None  # tiny's kvscope regions, not another export's
    return len(result.ranges)


@pytest.mark.parametrize("how", ["cli", "load_export", "project", "align"])
@pytest.mark.parametrize(("name", "decoy"), URI_NAMES)
def test_uri_characters_read_the_file_named(name: str, decoy: str, how: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "exports"
    (folder / decoy).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY, folder / name)
    shutil.copy(PLAIN, folder / decoy)  # what the unescaped URI would read
    before = _listing(folder)
    assert _read(how, folder / name, tmp_path / "out", capsys) == TINY_RANGES
    assert _listing(folder) == before


@pytest.mark.parametrize("how", ["cli", "load_export", "project", "align"])
@pytest.mark.parametrize(("name", "decoy"), URI_NAMES)
def test_uri_characters_create_no_file(name: str, decoy: str, how: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    shutil.copy(TINY, folder / name)
    assert _read(how, folder / name, tmp_path / "out", capsys) == TINY_RANGES
    assert _listing(folder) == [name]
    assert not (folder / decoy).exists()


def test_uri_characters_in_a_relative_path(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(TINY, tmp_path / "exp#1.sqlite")
    shutil.copy(PLAIN, tmp_path / "exp")
    monkeypatch.chdir(tmp_path)
    assert main(["align", "exp#1.sqlite", "--out", "out"]) == 0
    capsys.readouterr()
    assert len(pd.read_parquet(tmp_path / "out" / "ranges.parquet")) == TINY_RANGES
    assert len(api.load_export("exp#1.sqlite").ranges) == TINY_RANGES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "exp#1.sqlite", "out"]


def test_uri_characters_in_an_nsys_rep_name(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An .nsys-rep is exported to `<its stem>.sqlite` in a temporary folder, which is then read by that name."""
    from analysis.align.test_align_hostile import _fake_nsys

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    rep = tmp_path / "run#1?x.nsys-rep"
    rep.write_bytes(b"rep")
    exe = _fake_nsys(tmp_path, f'cp "{TINY}" "$TARGET"')
    tmp_root = tmp_path / "tmp"
    assert len(api.load_export(rep, nsys=str(exe)).ranges) == TINY_RANGES
    assert main(["align", str(rep), "--nsys", str(exe), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert len(pd.read_parquet(tmp_path / "out" / "ranges.parquet")) == TINY_RANGES
    assert list(tmp_root.iterdir()) == []


def test_a_missing_export_is_never_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("gone.sqlite", "q?x.sqlite", "exp#1.sqlite"):
        line = fail(["align", str(tmp_path / name), "--out", str(tmp_path / "out")], capsys)
        assert line == f"kvscope: error: export not found: {tmp_path / name}"
        with pytest.raises(KvscopeError) as info:
            api.load_export(tmp_path / name)
        assert str(info.value) == f"export not found: {tmp_path / name}"
    assert list(tmp_path.iterdir()) == []


# ---- WAL journal mode ----------------------------------------------------------------------------------------------
def _wal_export(path: Path, pending: bool = False, shm: bool = False) -> Path:
    """tiny.sqlite at `path` in WAL journal mode. `pending`: its last change (the last range deleted: 164 ranges)
    is still in `path-wal`, not in the file; `shm`: `path-shm` is there too."""
    work = Path(tempfile.mkdtemp(prefix="wal-", dir=path.parent.parent))
    src = work / "w.sqlite"
    shutil.copy(TINY, src)
    con = sqlite3.connect(src)
    assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    con.close()  # the last connection closes: the WAL is checkpointed and removed
    assert sorted(p.name for p in work.iterdir()) == ["w.sqlite"]
    con = sqlite3.connect(src)
    if pending:
        con.execute("PRAGMA wal_autocheckpoint=0")
        con.execute("DELETE FROM NVTX_EVENTS WHERE rowid = (SELECT max(rowid) FROM NVTX_EVENTS WHERE eventType = 59)")
        con.commit()
    # copied while the connection is open, as a crashed or still running writer leaves them
    shutil.copy(src, path)
    for suffix in ("-wal", "-shm") if pending else ():
        if suffix == "-wal" or shm:
            shutil.copy(src.with_name(src.name + suffix), path.with_name(path.name + suffix))
    con.close()
    shutil.rmtree(work)
    assert path.read_bytes()[18:20] == b"\x02\x02"  # the header's WAL mode
    return path


@pytest.mark.parametrize("how", ["cli", "load_export", "project", "align"])
def test_wal_export_leaves_no_file_beside_it(how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    export = _wal_export(folder / "w.sqlite")
    assert _read(how, export, tmp_path / "out", capsys) == TINY_RANGES
    assert _listing(folder) == ["w.sqlite"]


@pytest.mark.parametrize("how", ["cli", "load_export", "project", "align"])
def test_wal_export_with_pending_changes_reads_them(how: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    export = _wal_export(folder / "w.sqlite", pending=True)
    assert _read(how, export, tmp_path / "out", capsys) == TINY_RANGES - 1


# in a private mount namespace, folder $1 bound onto itself read-only
_RO_MOUNT = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1"'


def _can_mount() -> bool:
    probe = Path(tempfile.mkdtemp(prefix="ro-probe-"))
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", _RO_MOUNT + ' && ! touch "$1/x" 2>/dev/null', "sh",
                               str(probe)], capture_output=True, check=False)
        return done.returncode == 0 and not (probe / "x").exists()
    except OSError:
        return False
    finally:
        shutil.rmtree(probe)


@pytest.fixture
def read_only() -> Iterator:
    """run(folder, argv): `python3 -m kvscope argv` with `folder` read-only (a CompletedProcess)."""
    root = os.geteuid() == 0
    if root and not _can_mount():
        pytest.skip("no read-only folder here: running as root without a private mount namespace")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    changed: list[Path] = []

    def run(folder: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "kvscope", *argv]
        if root:
            cmd = ["unshare", "-m", "sh", "-c", _RO_MOUNT + ' && shift && exec "$@"', "sh", str(folder), *cmd]
        else:
            folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
            changed.append(folder)
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)

    yield run
    for folder in changed:
        folder.chmod(0o755)


@pytest.mark.parametrize(("mode", "ranges"), [("rollback", TINY_RANGES), ("wal", TINY_RANGES),
                                              ("wal with -wal and -shm", TINY_RANGES - 1)])
def test_read_only_folder_is_read(mode: str, ranges: int, tmp_path: Path, read_only) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    export = folder / "w.sqlite"
    if mode == "rollback":
        shutil.copy(TINY, export)
    else:
        _wal_export(export, pending=ranges != TINY_RANGES, shm=True)
    before = _listing(folder)
    done = read_only(folder, ["align", str(export), "--out", str(tmp_path / "out")])
    assert done.returncode == 0, done.stderr
    assert len(pd.read_parquet(tmp_path / "out" / "ranges.parquet")) == ranges
    assert _listing(folder) == before


def test_read_only_folder_with_pending_wal_is_refused(tmp_path: Path, read_only) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    export = _wal_export(folder / "w.sqlite", pending=True)
    done = read_only(folder, ["align", str(export), "--out", str(tmp_path / "out")])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"kvscope: error: {export}: an SQLite export in WAL journal mode whose last changes are in w.sqlite-wal, "
        "which SQLite reads only by creating w.sqlite-shm beside it, and it cannot (unable to open database file: "
        "is the folder read-only?): copy w.sqlite and w.sqlite-wal together to a writable folder, or checkpoint it "
        "where it is writable (sqlite3 w.sqlite 'PRAGMA wal_checkpoint(TRUNCATE)')"]
    assert not (tmp_path / "out").exists()
    assert _listing(folder) == ["w.sqlite", "w.sqlite-wal"]


def test_kvscope_nsys_out_with_uri_characters(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvscope nsys --out` names the folder of the SQLite export it reads back: `#` and `?` in it are the name's."""
    from commands.test_nsys import _FAKE_NSYS, EXPORT

    exe = tmp_path / "bin" / "nsys"
    exe.parent.mkdir()
    exe.write_text(_FAKE_NSYS)
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_NSYS_LOG", str(tmp_path / "log.json"))
    out = tmp_path / "n#1?x"
    assert main(["nsys", "--nsys", str(exe), "--out", str(out), "--", sys.executable, "-c", "pass"]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    assert len(pd.read_parquet(out / "ranges.parquet")) == len(api.load_export(EXPORT).ranges)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "log.json", "n#1?x"]


@pytest.mark.parametrize("how", ["cli", "load_export", "project", "align"])
def test_an_export_that_cannot_be_opened_says_why(how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A file without read permission (simulated: the tests may run as root) is not "not an SQLite database"."""
    export = tmp_path / "x.sqlite"
    shutil.copy(TINY, export)
    real = Path.open

    def refused(self: Path, *args, **kwargs):
        if self == export:
            raise PermissionError(13, os.strerror(13), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refused)
    message = f"{export}: cannot read the export ({os.strerror(13)})"
    if how == "cli":
        assert fail(["align", str(export), "--out", str(tmp_path / "out")], capsys) == f"kvscope: error: {message}"
    else:
        with pytest.raises(KvscopeError) as info:
            getattr(api, how)(export)
        assert str(info.value) == message
