"""kvscope.io: the one atomic file write (temporary name beside the file, synced, renamed over it) and the one atomic
output folder (`AtomicFolder`) with its policy of which existing folder it may replace."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from kvscope.errors import KvscopeError
from kvscope.io import TMP_NAME_EXTRA, AtomicFolder, write_bytes, write_json


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
