"""`kvscope sweep --nsys` end to end on the CPU: a stand-in nsys runs the sweep program it is given (the real sweep,
in its own process) and "captures" each configuration as a real export of kvscope's loop whose run range names that
configuration; the rows gain the attribution columns, after every other column."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
from paths import DATA

from kvscope.analysis.align.attribution import PointFacts, aligned, attribution
from kvscope.analysis.sweep_file import read_sweep
from kvscope.cli import main
from kvscope.model.config import PRESETS
from kvscope.schema import ATTRIBUTION_COLUMNS, CLASSIC_COLUMNS, KERNELS_FILE, STEPS_FILE

EXPORT = DATA / "nsys" / "tiny.sqlite"  # `run bs=1 seq=32 gen=4` of the tiny preset
EXPORT_RUN = "run bs=1 seq=32 gen=4"
BASE = ["sweep", "--model", "tiny", "--device", "cpu", "--gen-tokens", "3", "--warmup", "0", "--reps", "1"]

# `profile`: records its arguments, runs the program after `-f true`, then writes one report per point of
# $FAKE_NSYS_POINTS ("B S G;B S G"), as nsys names repeated captures (<-o>.<n>.nsys-rep). `export`: the real export
# with its run range renamed to the report's point
_FAKE_NSYS = f"""#!{sys.executable}
import json, os, shutil, sqlite3, subprocess, sys
args = sys.argv[1:]
if args[0] == "export":
    out, rep = args[args.index("-o") + 1], args[-1]
    b, s, g = open(rep).read().split()
    shutil.copy({str(EXPORT)!r}, out)
    con = sqlite3.connect(out)
    con.execute("UPDATE StringIds SET value = ? WHERE value = ?", (f"run bs={{b}} seq={{s}} gen={{g}}", {EXPORT_RUN!r}))
    con.commit()
    sys.exit(0)
with open(os.environ["FAKE_NSYS_LOG"], "w") as f:
    json.dump({{"argv": args, "tmpdir": os.environ.get("TMPDIR")}}, f)
report = args[args.index("-o") + 1]
code = subprocess.run(args[args.index("-f") + 2:]).returncode
for i, point in enumerate(p for p in os.environ.get("FAKE_NSYS_POINTS", "").split(";") if p):
    suffix = "qdstrm" if os.environ.get("FAKE_NSYS_RAW") else "nsys-rep"  # a raw capture nsys did not import
    open(f"{{report}}.{{i + 1}}.{{suffix}}", "w").write(point)
sys.exit(code)
"""


@pytest.fixture
def nsys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    exe = tmp_path / "bin" / "nsys"
    exe.parent.mkdir()
    exe.write_text(_FAKE_NSYS)
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_NSYS_LOG", str(tmp_path / "nsys-argv.json"))
    return exe


def _points(monkeypatch: pytest.MonkeyPatch, *points: tuple[int, int]) -> None:
    """The (seq, batch) points the stand-in nsys captures (gen 3)."""
    monkeypatch.setenv("FAKE_NSYS_POINTS", ";".join(f"{b} {s} 3" for s, b in points))


def _expected(seq: int, batch: int) -> dict[str, object]:
    """The attribution of the stand-in's export for a CPU point (float32: 4 bytes, no calibration)."""
    return attribution(aligned(EXPORT), PointFacts(PRESETS["tiny"], batch, seq, 4, "float32", None))


def _same(got: object, want: object) -> bool:
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return got == want


def test_every_point_is_captured_and_attributed(nsys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _points(monkeypatch, (8, 1), (16, 1))
    out = tmp_path / "seq.csv"
    rc = main([*BASE, "--seq", "8,16", "--batch-sizes", "1", "--out", str(out), "--nsys", str(nsys)])
    assert rc == 0, capsys.readouterr().err
    argv = json.loads((tmp_path / "nsys-argv.json").read_text())["argv"]
    assert argv[0] == "profile"
    for flag in ("--capture-range=cudaProfilerApi", "--capture-range-end=repeat", "--cuda-graph-trace=node",
                 "--trace=cuda,nvtx"):
        assert flag in argv
    df = read_sweep(out)
    cols = list(df.columns)
    assert cols[:len(CLASSIC_COLUMNS)] == list(CLASSIC_COLUMNS)
    assert cols[-len(ATTRIBUTION_COLUMNS):] == list(ATTRIBUTION_COLUMNS)  # after every other column
    assert list(zip(df["seq_len"], df["batch"], strict=True)) == [(8, 1), (16, 1)]
    for _, row in df.iterrows():
        want = _expected(int(row["seq_len"]), 1)
        for col, value in want.items():
            assert _same(row[col], value), (row["seq_len"], col, row[col], value)
        folder = out.parent / row["nsys_report"]
        assert row["nsys_report"] == f"seq-nsys/tiny-bs1-seq{row['seq_len']}"
        names = {p.name for p in folder.iterdir()}
        assert {"report.nsys-rep", "report.sqlite", KERNELS_FILE, STEPS_FILE, "trace.json"} <= names
    assert row["decode_bytes"] != df.iloc[0]["decode_bytes"]  # each row's bytes at its own context
    assert sorted(p.name for p in (tmp_path / "seq-nsys").iterdir()) == ["tiny-bs1-seq16", "tiny-bs1-seq8"]


def test_keep_reports_off_keeps_the_parquet_tables_only(nsys: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _points(monkeypatch, (8, 1))
    out = tmp_path / "s.parquet"
    assert main([*BASE, "--seq", "8", "--batch-sizes", "1", "--out", str(out), "--nsys", str(nsys),
                 "--keep-reports", "off"]) == 0
    df = pd.read_parquet(out)
    folder = out.parent / df.iloc[0]["nsys_report"]
    files = sorted(p.name for p in folder.iterdir())
    assert files and all(f.endswith(".parquet") for f in files) and KERNELS_FILE in files
    assert df.iloc[0]["decode_kernels"] == 91.0 and bool(df.iloc[0]["decode_launch_bound"]) is True
    assert list(df.columns)[-len(ATTRIBUTION_COLUMNS):] == list(ATTRIBUTION_COLUMNS)


def test_missing_nsys_is_one_line_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import kvscope.measure.sweep as sweep

    def no_load(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sweep, "load_for", no_load)
    out = tmp_path / "s.csv"
    rc = main([*BASE, "--seq", "8", "--batch-sizes", "1", "--out", str(out), "--nsys", str(tmp_path / "no-nsys")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == f"kvscope: error: --nsys {tmp_path / 'no-nsys'}: nsys not found (no such file)"
    assert not out.exists() and not (tmp_path / "s-nsys").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--keep-reports", "off"], "--keep-reports needs --nsys"),
    (["--nsys-flag=--sample=cpu"], "--nsys-flag needs --nsys"),
])
def test_nsys_options_need_nsys(extra: list[str], message: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BASE, "--seq", "8", "--batch-sizes", "1", "--out", str(tmp_path / "s.csv"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_resume_keeps_rows_and_attributes_the_new_ones(nsys: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r.csv"
    assert main([*BASE, "--seq", "8", "--batch-sizes", "1", "--out", str(out)]) == 0  # a classic sweep first
    first = out.read_text().splitlines()
    _points(monkeypatch, (16, 1))
    assert main([*BASE, "--seq", "8,16", "--batch-sizes", "1", "--out", str(out), "--nsys", str(nsys),
                 "--resume"]) == 0
    lines = out.read_text().splitlines()
    header = lines[0].split(",")
    assert header[:len(first[0].split(","))] == first[0].split(",")
    assert lines[1].split(",")[:len(first[1].split(","))] == first[1].split(",")  # the old row's cells as they were
    df = read_sweep(out)
    old, new = df.iloc[0], df.iloc[1]
    assert all(pd.isna(old[c]) for c in ATTRIBUTION_COLUMNS)  # valid, without attribution
    assert new["nsys_report"] == "r-nsys/tiny-bs1-seq16" and new["decode_kernels"] == 91.0
    # again with nothing left to run: nsys is not started, the file is as it was
    (tmp_path / "nsys-argv.json").unlink()
    assert main([*BASE, "--seq", "8,16", "--batch-sizes", "1", "--out", str(out), "--nsys", str(nsys),
                 "--resume"]) == 0
    assert out.read_text().splitlines() == lines and not (tmp_path / "nsys-argv.json").exists()


def test_oom_and_foreign_reports_get_no_attribution(nsys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    huge = 2**40  # a batch whose KV cache no host holds: recorded as oom without running
    _points(monkeypatch, (8, 1), (8, huge), (99, 1))  # (99, 1) is not a point of this sweep
    out = tmp_path / "o.csv"
    assert main([*BASE, "--seq", "8", "--batch-sizes", f"1,{huge}", "--out", str(out), "--nsys", str(nsys)]) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "seq 99 batch 1 is not a configuration of this sweep; left out" in err
    assert f"seq 8 batch {huge}: out of memory; no attribution" in err
    df = read_sweep(out)
    ok, oom = df.iloc[0], df.iloc[1]
    assert oom["flag"] == "oom" and all(pd.isna(oom[c]) for c in ATTRIBUTION_COLUMNS)
    assert ok["decode_kernels"] == 91.0
    assert sorted(p.name for p in (tmp_path / "o-nsys").iterdir()) == ["tiny-bs1-seq8"]


def test_a_sweep_that_fails_inside_nsys_is_said(nsys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.csv"
    out.write_text("not,a,sweep\n")
    # refused before nsys starts, as without --nsys
    assert main([*BASE, "--seq", "8", "--batch-sizes", "1", "--out", str(out), "--nsys", str(nsys),
                 "--resume"]) == 2
    assert "not a kvscope sweep file" in capsys.readouterr().err
    assert not (tmp_path / "nsys-argv.json").exists() and not (tmp_path / "f-nsys").exists()


def test_raw_captures_are_imported(nsys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    importer = tmp_path / "bin" / "QdstrmImporter"
    importer.write_text(f"#!{sys.executable}\nimport shutil, sys\nq = sys.argv[2]\n"
                        "shutil.copy(q, q[:-len('.qdstrm')] + '.nsys-rep')\n")
    importer.chmod(0o755)
    monkeypatch.setenv("QDSTRM_IMPORTER", str(importer))
    monkeypatch.setenv("FAKE_NSYS_RAW", "1")
    _points(monkeypatch, (8, 1))
    out = tmp_path / "q.csv"
    assert main([*BASE, "--seq", "8", "--batch-sizes", "1", "--out", str(out), "--nsys", str(nsys)]) == 0
    row = read_sweep(out).iloc[0]
    assert row["nsys_report"] == "q-nsys/tiny-bs1-seq8" and row["decode_kernels"] == 91.0


def test_the_sweep_inside_nsys_is_the_one_asked_for() -> None:
    from dataclasses import replace

    from kvscope.engine.plan import RunSpec
    from kvscope.measure.sweep import SweepSpec
    from kvscope.measure.sweep_nsys import spec_from_json, spec_json

    sw = SweepSpec(RunSpec(model="qwen2.5-3b", gen_tokens=8, reps=3, seed=2**63, graphs=False, nvtx=True,
                           engine="transformers"), (128, 4096), (1, 8), Path("/x/s.csv"), 3.5, True)
    assert spec_from_json(json.loads(json.dumps(spec_json(sw)))) == sw
    assert spec_from_json(json.loads(json.dumps(spec_json(replace(sw, resume=False))))).resume is False


@pytest.mark.gpu
def test_real_nsys_sweep_of_the_tiny_preset(tmp_path: Path) -> None:
    """Real nsys on a GPU: one nsys process, one report per point (capture-range-end=repeat), every row attributed
    with the kernels of its own capture."""
    from kvscope.analysis.nsys.export import find_nsys

    if find_nsys() is None:
        pytest.skip("nsys not found")
    out = tmp_path / "g.csv"
    rc = main(["sweep", "--model", "tiny", "--seq", "32,64", "--batch-sizes", "1,2", "--gen-tokens", "4",
               "--warmup", "1", "--reps", "2", "--out", str(out), "--nsys"])
    assert rc == 0
    df = read_sweep(out)
    assert list(df.columns)[-len(ATTRIBUTION_COLUMNS):] == list(ATTRIBUTION_COLUMNS)
    assert df["nsys_report"].tolist() == [f"g-nsys/tiny-bs{b}-seq{s}" for s, b in
                                          zip(df["seq_len"], df["batch"], strict=True)]
    for _, row in df.iterrows():
        steps = pd.read_parquet(out.parent / row["nsys_report"] / STEPS_FILE)
        decode = steps[steps["phase"] == "decode"]
        assert len(decode) == 2 * 3 and row["decode_kernels"] == decode["kernels"].median() > 0
        assert 0 < row["decode_busy_ms"] <= row["decode_span_ms"]
        classes = [row[f"decode_{w}_ms"] for w in ("gemm", "attention", "norm", "elementwise", "copy",
                                                     "communication", "other")]
        assert row["decode_gemm_ms"] > 0 and sum(classes) > 0
