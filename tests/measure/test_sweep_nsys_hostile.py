"""`kvscope sweep --nsys`'s capture folders follow the writers' policy (issue 22, cause 1): `<stem>-nsys/<point>/` is
new, or that point's earlier capture (the tables of `kvscope align`, its trace, the report and its export, nothing
else), replaced whole (`kvscope.io.AtomicFolder`); a folder there with anything else in it is kept as it is and the
row gets no attribution, said on stderr (before: it was removed with everything in it). The stand-in nsys of
test_sweep_nsys.py captures each point."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from cli_checks import snapshot
from test_sweep_nsys import BASE, _points, nsys  # noqa: F401  (nsys: the stand-in's fixture)

from kvscope.analysis.sweep_file import read_sweep
from kvscope.cli import main
from kvscope.schema import ATTRIBUTION_COLUMNS, KERNELS_FILE


@pytest.mark.parametrize("content", ["a file", "a folder", "a link"])
def test_a_folder_that_is_not_a_capture_is_kept(content: str, nsys: Path, tmp_path: Path,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _points(monkeypatch, (8, 1), (16, 1))
    point = tmp_path / "s-nsys" / "tiny-bs1-seq8"
    point.mkdir(parents=True)
    (point / KERNELS_FILE).write_bytes(b"an old table")  # what a capture holds, and one thing it never holds
    if content == "a file":
        (point / "my-notes.txt").write_text("mine")
    elif content == "a folder":
        (point / "plots").mkdir()
    else:
        (point / "report.sqlite").symlink_to(tmp_path / "elsewhere.sqlite")
    before = snapshot(point)
    out = tmp_path / "s.csv"
    assert main([*BASE, "--seq", "8,16", "--batch-sizes", "1", "--out", str(out), "--nsys", str(nsys)]) == 0
    err = "".join(capsys.readouterr().err.split())  # rich wraps long lines, within words too
    said = (f"kvscope: capture folder {point} already exists and holds other files; give a new or empty folder; seq 8 "
            "batch 1 gets no attribution")
    assert "".join(said.split()) in err
    assert snapshot(point) == before
    df = read_sweep(out)
    kept, other = df.iloc[0], df.iloc[1]
    assert all(pd.isna(kept[c]) for c in ATTRIBUTION_COLUMNS)
    assert other["nsys_report"] == "s-nsys/tiny-bs1-seq16" and other["decode_kernels"] == 91.0
    assert sorted(p.name for p in (tmp_path / "s-nsys").iterdir()) == ["tiny-bs1-seq16", "tiny-bs1-seq8"]


@pytest.mark.parametrize("keep", ["on", "off"])
def test_an_earlier_capture_of_the_point_is_replaced_whole(keep: str, nsys: Path, tmp_path: Path,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _points(monkeypatch, (8, 1))
    point = tmp_path / "s-nsys" / "tiny-bs1-seq8"
    point.mkdir(parents=True)
    for name in (KERNELS_FILE, "report.nsys-rep", "report.sqlite", "trace.json"):
        (point / name).write_bytes(b"stale")
    out = tmp_path / "s.csv"
    assert main([*BASE, "--seq", "8", "--batch-sizes", "1", "--out", str(out), "--nsys", str(nsys),
                 "--keep-reports", keep]) == 0
    assert read_sweep(out).iloc[0]["decode_kernels"] == 91.0
    names = sorted(p.name for p in point.iterdir())
    assert all(p.read_bytes() != b"stale" for p in point.iterdir())
    assert ("report.nsys-rep" in names) == (keep == "on") and ("trace.json" in names) == (keep == "on")
    assert len(pd.read_parquet(point / KERNELS_FILE)) > 0
    assert sorted(p.name for p in (tmp_path / "s-nsys").iterdir()) == ["tiny-bs1-seq8"]  # no temporary folder left
