"""kvscope.io: the one atomic file write (temporary name beside the file, synced, renamed over it) and the one atomic
output folder (`AtomicFolder`) with its policy of which existing folder it may replace."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pandas as pd
import pytest
from cli_checks import snapshot

from kvscope.errors import KvscopeError
from kvscope.io import TMP_NAME_EXTRA, AtomicFolder, OutputFile, check_path, write_bytes, write_json


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_bytes_replaces_whole_and_keeps_the_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.csv"
    write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # a new file: what open() gives
    path.chmod(0o600)
    renamed: list[str] = []
    real = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        renamed.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a replaced file keeps its bits
    assert len(renamed) == 1 and renamed[0].startswith(".s.csv.") and renamed[0].endswith(".tmp")
    assert len(renamed[0]) == len(path.name) + len(TMP_NAME_EXTRA)  # what sweep_out's name check counts on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.json"
    write_json({"a": 1}, path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        write_json({"a": 2}, path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_text() == '{"a": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def _own(folder: Path) -> bool:
    return all(p.name == "out.txt" for p in folder.iterdir())


def test_policy_none_never_replaces(tmp_path: Path) -> None:
    final = tmp_path / "run"
    final.mkdir()
    (final / "out.txt").write_text("old")
    with pytest.raises(KvscopeError) as info:
        AtomicFolder(final, "output folder")
    assert str(info.value) == f"output folder {final} already exists and is not empty; give a new or empty folder"
    assert (final / "out.txt").read_text() == "old"


def test_policy_replaces_its_own_earlier_output_whole(tmp_path: Path) -> None:
    final = tmp_path / "rep"
    final.mkdir()
    (final / "out.txt").write_text("old")
    with AtomicFolder(final, "--out", replaceable=_own) as tmp:
        (tmp / "out.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["out.txt"] and (final / "out.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    (final / "mine.txt").write_text("not kvscope's")
    with pytest.raises(KvscopeError) as info:
        AtomicFolder(final, "--out", replaceable=_own)
    assert str(info.value) == f"--out {final} already exists and holds other files; give a new or empty folder"


def test_a_folder_filled_meanwhile_is_replaced_only_when_the_policy_accepts_it(tmp_path: Path) -> None:
    final = tmp_path / "rep"
    folder = AtomicFolder(final, "--out", replaceable=_own)
    tmp = folder.open()
    (tmp / "out.txt").write_text("ours")
    final.mkdir()
    (final / "theirs.txt").write_text("another program's")
    with pytest.raises(KvscopeError) as info:
        folder.commit()
    assert str(info.value) == (f"--out {final} was filled by another run while this one ran; that folder is kept and "
                               "this run's files were discarded")
    assert [p.name for p in final.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_discard_removes_the_parents_it_made(tmp_path: Path) -> None:
    final = tmp_path / "a" / "b" / "run"
    folder = AtomicFolder(final, "output folder")
    (folder.open() / "x").write_text("half")
    folder.discard()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        folder.commit()


# ---- check_path: the one check of a user's path (issue 22) --------------------------------------------------------
def _loop(folder: Path) -> Path:
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    return folder / "a"


@pytest.mark.parametrize("kind", ["too-long", "too-long-below", "loop", "inside-a-loop", "under-a-file",
                                  "under-a-file-deeper", "eio", "eacces", "nul"])
def test_check_path_turns_every_refusal_into_one_line(kind: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    reason = {"too-long": "File name too long", "too-long-below": "File name too long",
              "loop": "Too many levels of symbolic links", "inside-a-loop": "Too many levels of symbolic links",
              "under-a-file": f"{tmp_path / 'file'} is not a folder",
              "under-a-file-deeper": f"{tmp_path / 'file'} is not a folder", "eio": "Input/output error",
              "eacces": "Permission denied", "nul": "a path must not contain a NUL character"}[kind]
    loop = _loop(tmp_path)
    path = {"too-long": tmp_path / ("x" * 300), "too-long-below": tmp_path / ("x" * 300) / "y",
            "loop": loop, "inside-a-loop": loop / "x.csv",
            "under-a-file": tmp_path / "file" / "x", "under-a-file-deeper": tmp_path / "file" / "x" / "y",
            "eio": tmp_path / "disk", "eacces": tmp_path / "locked", "nul": f"{tmp_path}/a\0b"}[kind]
    if kind in ("eio", "eacces"):
        code = errno.EIO if kind == "eio" else errno.EACCES

        def refuse(p: object, *a: object, **k: object) -> None:
            raise OSError(code, os.strerror(code), str(p))

        monkeypatch.setattr(os, "stat", refuse)
    with pytest.raises(KvscopeError) as info:
        check_path(path, "--out")
    assert str(info.value) == f"--out {path}: {reason}"
    with pytest.raises(KvscopeError) as info:
        check_path(path)  # no label: the path alone
    assert str(info.value) == f"{path}: {reason}"


def test_check_path_says_what_is_there(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    assert check_path(tmp_path / "missing", "x") is None
    assert check_path(tmp_path / "missing" / "deeper", "x") is None
    assert check_path(tmp_path / "missing" / ("x" * 300), "x") is None  # the system stops at the missing folder
    assert check_path(tmp_path / "dangling", "x") is None  # a link to nothing: nothing is there
    assert stat.S_ISREG(check_path(tmp_path / "f", "x").st_mode)
    assert stat.S_ISDIR(check_path(str(tmp_path), "x").st_mode)
    assert check_path(tmp_path / "f" / "x", "x", absent=(errno.ENOENT, errno.ENOTDIR)) is None


# ---- OutputFile: the policy of a file a command writes --------------------------------------------------------------
HEADER = b"scenario,quantity\n"


def _own_table(path: Path) -> bool:
    return path.read_bytes().startswith(HEADER)


def _out(path: Path, *inputs: tuple[str, Path]) -> OutputFile:
    return OutputFile(path, "--out", _own_table, "a table", inputs)


@pytest.mark.parametrize("how", ["same", "relative", "dotted", "link", "hard-link", "link-to-link"])
def test_output_file_never_writes_over_an_input(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = tmp_path / "s.csv"
    sweep.write_bytes(HEADER + b"measurements\n")  # even an input that looks like the command's own output
    monkeypatch.chdir(tmp_path)
    out = {"same": sweep, "relative": Path("s.csv"), "dotted": Path(".") / "sub" / ".." / "s.csv",
           "link": tmp_path / "l.csv", "hard-link": tmp_path / "h.csv", "link-to-link": tmp_path / "ll.csv"}[how]
    (tmp_path / "sub").mkdir()
    (tmp_path / "l.csv").symlink_to(sweep)
    os.link(sweep, tmp_path / "h.csv")
    (tmp_path / "ll.csv").symlink_to(tmp_path / "l.csv")
    before = snapshot(tmp_path)
    with pytest.raises(KvscopeError) as info:
        _out(out, ("--sweep file", Path("s.csv")))
    assert str(info.value) == (f"--out {out} is the --sweep file s.csv; kvscope never writes over its input: give "
                               "another file")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("kind", "message"), [
    ("foreign", "--out {out} already exists and is not a table (kvscope replaces only its own earlier output); give "
                "a new file name"),
    ("empty", "--out {out} already exists and is not a table (kvscope replaces only its own earlier output); give "
              "a new file name"),
    ("parquet", "--out {out} already exists and is not a table (kvscope replaces only its own earlier output); give "
                "a new file name"),
    ("folder", "--out {out} is a folder; give a file name"),
    ("fifo", "--out {out} is not a regular file; give a file name"),
    ("no-folder", "--out {out}: folder {tmp}/missing does not exist"),
    ("under-a-file", "--out {out}: {tmp}/file is not a folder"),
    ("loop", "--out {out}: Too many levels of symbolic links"),
    ("in-a-loop", "--out {out}: Too many levels of symbolic links"),
    ("too-long", "--out {out}: File name too long"),
    ("no-room", "--out {out}: the file name takes 240 bytes, at most 237 here (kvscope writes .NAME.<random>.tmp "
                "beside it)"),
])
def test_output_file_refuses_what_is_not_its_own(kind: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    out = {"no-folder": tmp_path / "missing" / "t.csv", "under-a-file": tmp_path / "file" / "t.csv",
           "in-a-loop": tmp_path / "a" / "t.csv", "too-long": tmp_path / ("t" * 300),
           "no-room": tmp_path / ("t" * 236 + ".csv")}.get(kind, tmp_path / "t.csv")
    if kind == "foreign":
        out.write_text("my notes\n")
    elif kind == "empty":
        out.write_bytes(b"")
    elif kind == "parquet":
        pd.DataFrame({"a": [1]}).to_parquet(out)
    elif kind == "folder":
        out.mkdir()
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind in ("loop", "in-a-loop"):
        (tmp_path / "t.csv").symlink_to(tmp_path / "u.csv")
        (tmp_path / "u.csv").symlink_to(tmp_path / "t.csv")
        if kind == "in-a-loop":
            (tmp_path / "a").symlink_to(tmp_path / "t.csv")
    before = snapshot(tmp_path)
    with pytest.raises(KvscopeError) as info:
        _out(out)
    assert str(info.value) == message.format(out=out, tmp=tmp_path)
    assert snapshot(tmp_path) == before


def test_output_file_replaces_its_own_earlier_output_through_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real.csv"
    real.write_bytes(HEADER + b"old\n")
    real.chmod(0o640)
    (tmp_path / "l.csv").symlink_to(real)
    assert _out(tmp_path / "l.csv").write(HEADER + b"new\n") == real
    assert real.read_bytes() == HEADER + b"new\n" and (tmp_path / "l.csv").is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert _out(tmp_path / "new.csv").write(HEADER) == tmp_path / "new.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.csv", "new.csv", "real.csv"]


def test_output_file_checks_again_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    file = _out(out)
    out.write_text("appeared meanwhile\n")  # another program's file
    with pytest.raises(KvscopeError) as info:
        file.write(HEADER)
    assert str(info.value) == (f"--out {out} already exists and is not a table (kvscope replaces only its own "
                               "earlier output); give a new file name")
    assert out.read_text() == "appeared meanwhile\n"


@pytest.mark.parametrize(("readonly", "reason"), [(True, "Read-only file system"), (False, "Permission denied")])
def test_output_file_in_a_folder_it_cannot_write(readonly: bool, reason: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Root ignores mode bits: the folder's refusal is simulated where the check asks the system."""
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))

    class Ro:
        f_flag = os.ST_RDONLY if readonly else 0

    monkeypatch.setattr(os, "statvfs", lambda p: Ro() if Path(p) == tmp_path else real_statvfs(p))
    with pytest.raises(KvscopeError) as info:
        _out(tmp_path / "t.csv")
    assert str(info.value) == f"--out {tmp_path / 't.csv'} cannot be written: folder {tmp_path}: {reason}"
    assert list(tmp_path.iterdir()) == []


def test_output_file_write_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "t.csv"
    out.write_bytes(HEADER + b"old\n")
    file = _out(out)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(KvscopeError) as info:
        file.write(HEADER + b"new\n")
    assert str(info.value) == f"cannot write --out {out}: No space left on device"
    assert out.read_bytes() == HEADER + b"old\n" and [p.name for p in tmp_path.iterdir()] == ["t.csv"]


# ---- AtomicFolder: what appeared meanwhile, inputs, paths the system refuses ------------------------------------
def test_its_own_kind_of_output_that_appeared_meanwhile_is_kept(tmp_path: Path) -> None:
    """Two commands into one new --out at once: the second to commit is refused, though the first's output is of
    the kind the policy replaces (before: replaced, both reported success, one output lost)."""
    final = tmp_path / "rep"
    first, second = AtomicFolder(final, "--out", replaceable=_own_txt), AtomicFolder(final, "--out",
                                                                                     replaceable=_own_txt)
    (first.open() / "out.txt").write_text("first")
    (second.open() / "out.txt").write_text("second")
    assert first.commit() == final
    with pytest.raises(KvscopeError) as info:
        second.commit()
    assert str(info.value) == (f"--out {final} was filled by another run while this one ran; that folder is kept and "
                               "this run's files were discarded")
    assert (final / "out.txt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


@pytest.mark.parametrize("when", ["before-open", "before-commit"])
def test_an_earlier_output_replaced_meanwhile_is_kept(when: str, tmp_path: Path) -> None:
    """The folder was an earlier output when the command started; another command replaced it with its own while
    this one worked: that newer output is kept."""
    final = tmp_path / "rep"
    final.mkdir()
    (final / "out.txt").write_text("earlier")
    folder = AtomicFolder(final, "--out", replaceable=_own_txt)
    if when == "before-commit":
        (folder.open() / "out.txt").write_text("mine")
    other = AtomicFolder(final, "--out", replaceable=_own_txt)
    with other as tmp:
        (tmp / "out.txt").write_text("the other's")
    with pytest.raises(KvscopeError) as info:
        if when == "before-open":
            folder.open()
        else:
            folder.commit()
    ours = "nothing was written" if when == "before-open" else "this run's files were discarded"
    assert str(info.value) == (f"--out {final} was filled by another run while this one ran; that folder is kept and "
                               f"{ours}")
    assert (final / "out.txt").read_text() == "the other's" and sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def _own_txt(folder: Path) -> bool:
    return all(p.name == "out.txt" for p in folder.iterdir())


@pytest.mark.parametrize("how", ["holds", "is"])
def test_atomic_folder_never_replaces_an_input(how: str, tmp_path: Path) -> None:
    final = tmp_path / "rep"
    final.mkdir()
    (final / "out.txt").write_text("an earlier output, and this command's input")
    given = final / "out.txt" if how == "holds" else final
    with pytest.raises(KvscopeError) as info:
        AtomicFolder(final, "--out", replaceable=lambda _f: True, inputs=[("--classes file", given)])
    assert str(info.value) == (f"--out {final} {how} the --classes file {given}; kvscope never writes over its "
                               "input: give another folder")
    assert (final / "out.txt").read_text() == "an earlier output, and this command's input"


@pytest.mark.parametrize(("kind", "reason"), [
    ("too-long", "File name too long"),
    ("loop", "Too many levels of symbolic links"),
    ("in-a-loop", "Too many levels of symbolic links"),  # before: "cannot be written: File exists"
    ("no-room", "the folder name {name20}... takes 240 bytes, at most 237 here (kvscope writes .NAME.partial-<random> "
                "beside it)"),
    ("no-room-parent", "the folder name {parent20}... takes 256 bytes, at most 255 here"),
    ("too-long-parent", "File name too long"),
])
def test_atomic_folder_paths_the_system_refuses(kind: str, reason: str, tmp_path: Path) -> None:
    long_name, long_parent = "r" * 240, "p" * 256
    loop = _loop(tmp_path)
    final = {"too-long": tmp_path / ("r" * 300), "loop": loop, "in-a-loop": loop / "run",
             "no-room": tmp_path / long_name, "no-room-parent": tmp_path / "new" / long_parent / "run",
             "too-long-parent": tmp_path / long_parent / "run"}[kind]
    before = snapshot(tmp_path)
    with pytest.raises(KvscopeError) as info:
        AtomicFolder(final, "output folder")
    assert str(info.value) == f"output folder {final}: " + reason.format(name20=long_name[:20],
                                                                         parent20=long_parent[:20])
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
