"""The calibration cache `kvscope calibrate` writes (issue 22, causes 1 and 2): written like every output
(`kvscope.io.OutputFile`: atomically, never over a file that is not a calibration cache, a link followed to its file),
and a cache path the system refuses (`$XDG_CACHE_HOME` too long, a loop of links, a file on the way, a folder that
cannot be made or written) is one line, never a traceback. Measuring needs a GPU; writing does not: `save` is called
with a measured result's shape."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from cli_checks import fail

from kvscope.errors import KvscopeError
from kvscope.profiler.calibrate import cache_path, load_ceilings, save

RESULT = {"gpu": "NVIDIA H200", "copy_gb_s": 4000.0, "bf16_tflop_s": 800.0}
OTHER = {"gpu": "NVIDIA H100", "copy_gb_s": 3000.0, "bf16_tflop_s": 700.0}


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def test_save_keeps_the_other_gpus_and_follows_a_link(cache_home: Path, tmp_path: Path) -> None:
    real = tmp_path / "shared" / "calibration.json"
    real.parent.mkdir()
    real.write_text(json.dumps({OTHER["gpu"]: OTHER}))
    (cache_home / "kvscope").mkdir(parents=True)
    cache_path().symlink_to(real)
    assert save(RESULT) == cache_path()
    assert cache_path().is_symlink()  # before: the link was replaced by a file, the shared cache left behind
    assert json.loads(real.read_text()) == {OTHER["gpu"]: OTHER, RESULT["gpu"]: RESULT}
    assert load_ceilings(RESULT["gpu"]).copy_gb_s == 4000.0


@pytest.mark.parametrize(("kind", "reason"), [
    ("too-long", "File name too long"),
    ("loop", "Too many levels of symbolic links"),
    ("under-a-file", "{home} is not a folder"),
])
@pytest.mark.parametrize("call", ["save", "load_ceilings"])
def test_a_cache_path_the_system_refuses_is_one_line(kind: str, reason: str, call: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = {"too-long": tmp_path / ("c" * 300), "loop": tmp_path / "a", "under-a-file": tmp_path / "file"}[kind]
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    with pytest.raises(KvscopeError) as info:
        save(RESULT) if call == "save" else load_ceilings(RESULT["gpu"])
    assert str(info.value) == f"calibration cache {cache_path()}: {reason.format(home=home)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "file"]
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_cache_folder_that_cannot_be_made(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root ignores mode bits: the system's refusal is simulated."""
    def refuse(self: Path, *_a: object, **_k: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(KvscopeError) as info:
        save(RESULT)
    assert str(info.value) == (f"calibration cache {cache_path()}: cannot make the folder {cache_home / 'kvscope'}: "
                               "Read-only file system")


def test_a_full_disk_keeps_the_cache_as_it_was(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_path().parent.mkdir(parents=True)
    cache_path().write_text(json.dumps({OTHER["gpu"]: OTHER}))

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(KvscopeError) as info:
        save(RESULT)
    assert str(info.value) == f"cannot write calibration cache {cache_path()}: No space left on device"
    assert json.loads(cache_path().read_text()) == {OTHER["gpu"]: OTHER}
    assert [p.name for p in cache_path().parent.iterdir()] == ["calibration.json"]


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2]", "calibration cache {p} is not a JSON object; move it away and run `kvscope calibrate` again"),
    ("my notes", "calibration cache {p} cannot be read (Expecting value: line 1 column 1 (char 0)); move it away and "
                 "run `kvscope calibrate` again"),
])
def test_a_file_that_is_not_a_cache_is_never_replaced(content: str, message: str, cache_home: Path) -> None:
    cache_path().parent.mkdir(parents=True)
    cache_path().write_text(content)
    with pytest.raises(KvscopeError) as info:
        save(RESULT)
    assert str(info.value) == message.format(p=cache_path())
    assert cache_path().read_text() == content


def test_a_cache_that_is_a_folder(cache_home: Path) -> None:
    cache_path().mkdir(parents=True)
    with pytest.raises(KvscopeError) as info:
        save(RESULT)
    assert str(info.value) == (f"calibration cache {cache_path()} cannot be read (Is a directory); move it away and "
                               "run `kvscope calibrate` again")
    assert cache_path().is_dir() and list(cache_path().iterdir()) == []


@pytest.mark.parametrize(("kind", "message"), [
    ("loop", "calibration cache {p}: Too many levels of symbolic links"),
    ("not-a-cache", "calibration cache {p} is not a JSON object; move it away and run `kvscope calibrate` again"),
    ("folder-is-a-file", "calibration cache {p}: {home} is not a folder"),
])
def test_the_command_checks_its_cache_before_measuring(kind: str, message: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the GPU was measured first (here, on a CPU, the command stopped at "measures a GPU"), and the cache's
    problem came after the measurement, as a traceback."""
    home = tmp_path / ("file" if kind == "folder-is-a-file" else "cache")
    if kind == "loop":
        (tmp_path / "cache").symlink_to(tmp_path / "cache")
    elif kind == "not-a-cache":
        (home / "kvscope").mkdir(parents=True)
        (home / "kvscope" / "calibration.json").write_text("[]")
    else:
        home.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    line = fail(["calibrate", "--device", "cpu"], capsys)
    assert line == "kvscope: error: " + message.format(p=cache_path(), home=home)
