"""measure.nsys, capture hygiene: the importer of raw captures is looked for inside the nsys install only, and a
capture never takes another process's raw capture from /tmp (stand-in nsys and QdstrmImporter, no GPU here)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvscope.measure import nsys as nsys_capture
from kvscope.measure.nsys import find_importer


def test_importer_search_stays_inside_the_nsys_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QDSTRM_IMPORTER", raising=False)
    install = tmp_path / "nsight" / "target-linux-x64"
    install.mkdir(parents=True)
    nsys = install / "nsys"
    nsys.write_text("")
    far = tmp_path / "elsewhere" / "deep" / "QdstrmImporter"
    far.parent.mkdir(parents=True)
    far.write_text("")
    assert find_importer(str(nsys)) is None  # never a search of the folders above the install
    seen: list[str] = []
    real_glob = Path.glob

    def spy(self: Path, pattern: str, *a: object, **k: object):
        seen.append(pattern)
        return real_glob(self, pattern, *a, **k)

    monkeypatch.setattr(Path, "glob", spy)
    host = tmp_path / "nsight" / "host-linux-x64"
    host.mkdir()
    (host / "QdstrmImporter").write_text("")
    assert find_importer(str(nsys)) == str(host / "QdstrmImporter")
    assert not any("**" in p for p in seen)


def test_capture_never_takes_another_process_raw_capture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in nsys that leaves its raw capture unimported (as nsys does without libdw) in its TMPDIR: capture()
    imports that one, not the newer one another process left in /tmp."""
    fake = tmp_path / "bin"
    fake.mkdir()
    nsys = fake / "nsys"
    nsys.write_text("#!/bin/sh\n"
                    "out=''; while [ $# -gt 0 ]; do [ \"$1\" = -o ] && out=$2; shift; done\n"
                    "mkdir -p \"$(dirname \"$out\")/run\" && : > \"$(dirname \"$out\")/run/timings.parquet\"\n"
                    "echo mine > \"${TMPDIR:-/tmp}/nsys-report-mine.qdstrm\"\n"
                    "exit 1\n")
    importer = fake / "QdstrmImporter"
    importer.write_text("#!/bin/sh\n# -i FILE: writes FILE's .nsys-rep beside it, holding FILE's content\n"
                        "cp \"$2\" \"${2%.qdstrm}.nsys-rep\"\n")
    for f in (nsys, importer):
        f.chmod(0o755)
    monkeypatch.setenv("QDSTRM_IMPORTER", str(importer))
    foreign = Path("/tmp") / f"nsys-report-zz-foreign-{os.getpid()}.qdstrm"  # sorts after "mine"
    foreign.write_text("foreign")
    try:
        os.utime(foreign, (time.time() + 60, time.time() + 60))  # the newest one in /tmp
        out = tmp_path / "cap"
        out.mkdir()
        rep, run_dir = nsys_capture.capture(["--model", "tiny"], out, str(nsys))
        assert rep.read_text() == "mine\n" and run_dir == out / "run"
        assert foreign.read_text() == "foreign"
        assert sorted(p.name for p in out.iterdir()) == ["report.nsys-rep", "run"]  # its scratch folder is gone
    finally:
        foreign.unlink(missing_ok=True)
