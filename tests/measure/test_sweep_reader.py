"""One reader for the sweep file (`kvscope.analysis.sweep_file`): what `kvscope sweep` writes, `kvscope report` and
`kvscope capacity` read, whatever the case of its extension; and a hand-edited file gets the same verdict from
`kvscope sweep --resume` and from `kvscope report` (and `kvscope capacity`): the same one-line error, or acceptance."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvscope.analysis.sweep_file import SweepTable, read_sweep
from kvscope.cli import main
from kvscope.errors import KvscopeError

SWEEP = ["sweep", "--model", "tiny", "--device", "cpu", "--gen-tokens", "2", "--reps", "1", "--warmup", "0"]
SIZES = ["--seq", "8,16", "--batch-sizes", "1,2"]  # four configurations: lines 2 to 5 of a CSV
CAPACITY = ["--gpu-mem-gb", "1", "--tpot-slo-ms", "1000", "--ttft-slo-ms", "10000", "--prompt", "8", "--output", "2"]


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line stderr holds: the error (never a traceback)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvscope: error: "), lines
    return lines[0].removeprefix("kvscope: error: ")


@pytest.mark.parametrize("suffix", [".PARQUET", ".Csv"])
def test_sweep_with_any_case_of_extension_feeds_report_and_capacity(suffix: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"s{suffix}"
    assert main([*SWEEP, "--seq", "8", "--batch-sizes", "1,2", "--out", str(out)]) == 0
    if suffix == ".PARQUET":  # written as Parquet, with its sweep metadata
        table = pq.read_table(out)
        assert table.column("batch").to_pylist() == [1, 2]
        assert json.loads(table.schema.metadata[b"kvscope"])["sweep"]["model"] == "tiny"
    else:
        assert out.read_text().startswith("seq_len,batch,")
    capsys.readouterr()
    rep = tmp_path / "rep"
    assert main(["report", str(out), "--out", str(rep)]) == 0
    assert capsys.readouterr().out.startswith(f"report: {rep / 'report.md'} (")
    md = (rep / "report.md").read_text()
    assert md.startswith("# kvscope sweep: tiny\n")
    assert f"Source: `{out}` (2 configurations, 0 out of memory)." in md
    assert main(["capacity", "--sweep", str(out), *CAPACITY, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (payload["sweep"], payload["model"], payload["dtype"]) == (str(out), "tiny", "float32")
    assert {r["quantity"] for r in payload["rows"]} >= {"kv_bytes_per_request", "max_batch_memory", "max_batch_slo"}
    assert main([*SWEEP, "--seq", "8", "--batch-sizes", "1,2,4", "--out", str(out), "--resume"]) == 0
    assert [b for _, b in SweepTable.read(out).configs()] == [1, 2, 4]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A finished sweep of seq 8,16 x batch 1,2 per format, copied by the tests."""
    folder = tmp_path_factory.mktemp("made")
    files = {}
    for suffix in (".csv", ".parquet"):
        out = folder / f"s{suffix}"
        assert main([*SWEEP, *SIZES, "--out", str(out)]) == 0
        files[suffix] = out.read_bytes()
    return files


def _csv(path: Path, edit: Callable[[list[list[str]]], list[list[str]]]) -> None:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(edit(rows))


def _cell(column: str, row: int, value: str) -> Callable[[list[list[str]]], list[list[str]]]:
    """Set `column` in data row `row` (0-based; line row + 2)."""
    def edit(rows: list[list[str]]) -> list[list[str]]:
        rows[row + 1][rows[0].index(column)] = value
        return rows
    return edit


def _drop(column: str) -> Callable[[list[list[str]]], list[list[str]]]:
    def edit(rows: list[list[str]]) -> list[list[str]]:
        i = rows[0].index(column)
        return [r[:i] + r[i + 1:] for r in rows]
    return edit


NOT_NUMBER, NOT_MEASURE = "is not a number", "is not a finite number >= 0"
ONE_LINE = "holds a control character; a sweep file's names and cells are one line of text each"


def _bad_cell(column: str, row: int, value: str, what: str) -> tuple[Callable, str]:
    """Data row `row` (line row + 2) given `value` in `column`, and the reader's verdict on that cell."""
    return _cell(column, row, value), f"{{out}}: column {column}, line {row + 2}: {value!r} {what}"


def _mixed(column: str, row: int, value: str, was: str) -> tuple[Callable, str]:
    """Data row `row` of another sweep (`value` in `column`, `was` in the others), and the reader's verdict."""
    return _cell(column, row, value), (f"{{out}} mixes sweeps: {column}={was} in line 2, {column}={value} in line "
                                       f"{row + 2}; a sweep file holds one sweep's rows")


# (edit of the CSV, or raw bytes; the verdict of both: None for acceptance, else the error without "kvscope: error: ")
CSV_CASES = {
    "text-batch": (_cell("batch", 1, "two"), "{out}: column batch, line 3: 'two' is not a positive integer"),
    "empty-batch": (_cell("batch", 3, ""), "{out}: column batch, line 5: '' is not a positive integer"),
    "fraction-seq": (_cell("seq_len", 0, "8.5"), "{out}: column seq_len, line 2: '8.5' is not a positive integer"),
    "zero-batch": (_cell("batch", 2, "0"), "{out}: column batch, line 4: '0' is not a positive integer"),
    "no-seq_len": (_drop("seq_len"), "{out} is not a kvscope sweep file: no column seq_len"),
    "no-batch": (_drop("batch"), "{out} is not a kvscope sweep file: no column batch"),
    "column-twice": (lambda rows: [r[:1] + r for r in rows], "{out} is not a kvscope sweep file: column seq_len "
                                                             "appears twice"),
    "configuration-twice": (lambda rows: [*rows, rows[2]], "{out}: line 6 repeats seq_len=8, batch=2 of line 3; a "
                                                          "sweep file holds each configuration once"),
    "short-row": (lambda rows: [*rows[:3], rows[3][:-2], *rows[4:]], "{out}: line 4 has {n2} fields, the header "
                                                                     "has {n}"),
    "empty": (b"", "{out} is empty: not a kvscope sweep file"),
    "blank-lines": (b"\n\n\n", "{out} is empty: not a kvscope sweep file"),
    "not-utf8": (b"seq_len,batch\n8,\xff\n", "cannot read {out}: not a CSV file ('utf-8' codec can't decode byte "
                                             "0xff in position 16: invalid start byte)"),
    "open-quote": (b'seq_len,batch\n"8,1\n', "cannot read {out}: not a CSV file (unexpected end of data)"),
    # number columns (a known name, or a unit at the end): a finite number >= 0, or missing
    "negative-duration": _bad_cell("decode_p50_ms_per_tok", 1, "-3.5", NOT_MEASURE),
    "negative-prefill": _bad_cell("prefill_p50_ms", 0, "-1", NOT_MEASURE),
    "infinite-rate": _bad_cell("decode_tok_s", 2, "inf", NOT_MEASURE),
    "minus-infinite-time": _bad_cell("ttft_ms", 3, "-Infinity", NOT_MEASURE),
    "negative-mib": _bad_cell("peak_allocated_mib", 0, "-1e3", NOT_MEASURE),
    "negative-bytes": _bad_cell("kv_alloc_bytes", 1, "-5", NOT_MEASURE),
    "text-time": _bad_cell("decode_p50_ms_per_tok", 2, "slow", NOT_NUMBER),
    "text-in-a-report-column": _bad_cell("vram_reserved_mb", 0, "1,024", NOT_NUMBER),
    "true-in-a-number": _bad_cell("weights_bytes", 1, "True", NOT_NUMBER),
    "text-setting-number": _bad_cell("gen_tokens", 0, "two", NOT_NUMBER),
    # one line per cell: no newline or other control character in a cell or a column name
    "newline-in-cell": (_cell("run_id", 1, "tiny\nbs2"), f"{{out}}: column run_id, line 4: 'tiny\\nbs2' {ONE_LINE}"),
    "carriage-return-in-cell": (b'seq_len,batch,device\n8,1,"cpu\r"\n', f"{{out}}: column device, line 3: 'cpu\\r' "
                                f"{ONE_LINE}"),
    "bare-carriage-return": (_cell("device", 0, "cpu\r"), "{out}: line 2 has {at_device} fields, the header has {n}"),
    "tab-in-a-number": _bad_cell("decode_tok_s", 3, "1.5\t", ONE_LINE),
    "newline-in-a-name": (lambda rows: [[*rows[0][:-1], "collapse\nfactor"], *rows[1:]],
                          f"{{out}}: the column name 'collapse\\nfactor' {ONE_LINE}"),
    "nul-in-cell": (b"seq_len,batch,model\n8,1,ti\x00ny\n", f"{{out}}: column model, line 2: 'ti\\x00ny' {ONE_LINE}"),
    # one sweep: one model, dtype and device in the whole file, one value of each engine setting per engine
    "two-models": _mixed("model", 2, "qwen2.5-0.5b", "tiny"),
    "two-model-sources": _mixed("model_source", 1, "preset:llama-tiny", "preset:tiny"),
    "two-dtypes": _mixed("dtype", 3, "bfloat16", "float32"),
    "two-devices": _mixed("device", 1, "NVIDIA H100", "cpu"),
    "an-empty-setting": _mixed("model", 3, "", "tiny"),
    "two-gen-tokens": _mixed("gen_tokens", 2, "4", "2"),
    "two-attns": _mixed("attn", 1, "eager", "sdpa"),
    # accepted by all: missing values, zero, spellings of the same size, blank lines between rows, a note by hand
    "missing-spelling": (_cell("decode_tok_s", 2, "NA"), None),
    "zero-time": (_cell("decode_p50_ms_per_tok", 1, "0"), None),
    "text-in-a-column-of-no-unit": (lambda rows: [[*rows[0], "note"], *[[*r, "ok, fast"] for r in rows[1:]]], None),
    "integral-float-size": (_cell("seq_len", 0, "8.0"), None),
    "blank-line-between-rows": (lambda rows: [*rows[:3], [], *rows[3:]], None),
}


def _verdicts(out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str | None, str | None]:
    """(resume's, report's) verdict on `out`: None when accepted, else the one error line; the file is unchanged."""
    before = out.read_bytes()
    verdicts: list[str | None] = []
    for argv in ([*SWEEP, *SIZES, "--out", str(out), "--resume"], ["report", str(out), "--out", str(tmp_path / "r")]):
        code = main(argv)
        assert code in (0, 2)
        verdicts.append(None if code == 0 else _error(capsys))
        capsys.readouterr()
        assert out.read_bytes() == before  # resume had nothing left to run; report only reads
    return verdicts[0], verdicts[1]


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_resume_and_report_give_a_hand_edited_csv_the_same_verdict(case: str, made: dict[str, bytes],
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    edit, expected = CSV_CASES[case]
    out = tmp_path / "s.csv"
    if isinstance(edit, bytes):
        out.write_bytes(edit)
    else:
        out.write_bytes(made[".csv"])
        _csv(out, edit)
    header = made[".csv"].split(b"\n")[0].split(b",")
    n = len(header)
    want = None if expected is None else expected.format(out=out, n=n, n2=n - 2, at_device=header.index(b"device") + 1)
    assert _verdicts(out, tmp_path, capsys) == (want, want)
    if want is not None:  # capacity reads the file with the same reader: the same refusal
        assert main(["capacity", "--sweep", str(out), *CAPACITY]) == 2
        assert _error(capsys) == want
        before = out.read_bytes()  # a resume with a new point to run: refused before any, nothing compared or added
        assert main([*SWEEP, "--seq", "8,16,32", "--batch-sizes", "1,2", "--out", str(out), "--resume"]) == 2
        assert _error(capsys) == want and out.read_bytes() == before
    else:
        assert len(read_sweep(out)) == 4


def _parquet_column(name: str, values: list) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        table = pq.read_table(path)
        pq.write_table(table.set_column(table.column_names.index(name), name, pa.array(values)), path)
    return edit


def _parquet_meta(raw: bytes) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"kvscope": raw}), path)
    return edit


PARQUET_CASES = {
    "text-seq": (_parquet_column("seq_len", ["8", "8", "x", "16"]),
                 "{out}: column seq_len, row 3: 'x' is not a positive integer"),
    "negative-batch": (_parquet_column("batch", [1, 2, -1, 2]),
                       "{out}: column batch, row 3: -1 is not a positive integer"),
    "configuration-twice": (_parquet_column("batch", [1, 2, 2, 2]),
                            "{out}: row 4 repeats seq_len=16, batch=2 of row 3; a sweep file holds each configuration "
                            "once"),
    "number-flag": (_parquet_column("flag", [0.0, 1.0, 2.0, 3.0]), "{out}: column flag, row 1: 0.0 is not text"),
    "metadata-not-json": (_parquet_meta(b"{not json"), "{out}: its kvscope metadata is not valid JSON"),
    "empty": (lambda path: path.write_bytes(b""), "{out} is empty: not a kvscope sweep file"),
    "negative-duration": (_parquet_column("decode_p50_ms_per_tok", [1.0, -2.0, 3.0, 4.0]),
                          "{out}: column decode_p50_ms_per_tok, row 2: -2.0 is not a finite number >= 0"),
    "infinite-rate": (_parquet_column("decode_tok_s", [1.0, 2.0, float("inf"), 4.0]),
                      "{out}: column decode_tok_s, row 3: inf is not a finite number >= 0"),
    "text-time": (_parquet_column("ttft_ms", ["1.0", "slow", "2", None]),
                  "{out}: column ttft_ms, row 2: 'slow' is not a number"),
    "true-in-a-number": (_parquet_column("kv_alloc_bytes", [True, False, True, False]),
                         "{out}: column kv_alloc_bytes, row 1: True is not a number"),
    "newline-in-cell": (_parquet_column("run_id", ["a", "b", "c\nd", "e"]),
                        "{out}: column run_id, row 3: 'c\\nd' holds a control character; a sweep file's names and "
                        "cells are one line of text each"),
    "two-models": (_parquet_column("model", ["tiny", "tiny", "tiny", "other"]),
                   "{out} mixes sweeps: model=tiny in row 1, model=other in row 4; a sweep file holds one sweep's "
                   "rows"),
    "two-dtypes": (_parquet_column("dtype", ["float32", "float16", "float32", "float32"]),
                   "{out} mixes sweeps: dtype=float32 in row 1, dtype=float16 in row 2; a sweep file holds one "
                   "sweep's rows"),
    "missing-time": (_parquet_column("decode_p50_ms_per_tok", [1.0, None, float("nan"), 0.0]), None),
    "text-number-spelled": (_parquet_column("ttft_ms", ["1.0", "2", "NaN", " 3 "]), None),
}


@pytest.mark.parametrize("case", list(PARQUET_CASES))
def test_resume_and_report_give_a_hand_edited_parquet_file_the_same_verdict(
        case: str, made: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit, expected = PARQUET_CASES[case]
    out = tmp_path / "s.parquet"
    out.write_bytes(made[".parquet"])
    edit(out)
    want = None if expected is None else expected.format(out=out)
    assert _verdicts(out, tmp_path, capsys) == (want, want)


def test_a_truncated_parquet_file_gets_the_same_error(made: dict[str, bytes], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.parquet"
    out.write_bytes(made[".parquet"][: len(made[".parquet"]) // 2])
    resume, report = _verdicts(out, tmp_path, capsys)
    assert resume == report
    assert resume is not None and resume.startswith(f"cannot read {out}: not a Parquet file (")


def test_resume_alone_needs_the_columns_it_computes_flags_from(made: dict[str, bytes], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A file without `decode_tok_s` is a sweep file (the report leaves the column out); a resume needs it for the
    collapse flags, as it needs the settings columns, and says so."""
    out = tmp_path / "s.csv"
    out.write_bytes(made[".csv"])
    _csv(out, _drop("decode_tok_s"))
    assert _verdicts(out, tmp_path, capsys) == (
        f"--resume: {out} has no column decode_tok_s (written by an older kvscope, or not by kvscope sweep); start "
        "a new file", None)


@pytest.mark.parametrize("name", ["s.txt", "s", "s.csv.bak"])
def test_another_extension_is_no_sweep_file(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    path.write_text("seq_len,batch\n8,1\n")
    assert main(["report", str(path), "--out", str(tmp_path / "r")]) == 2
    assert _error(capsys) == f"{path}: a sweep file ends in .csv or .parquet"
    assert main(["capacity", "--sweep", str(path), *CAPACITY]) == 2
    assert _error(capsys) == f"{path}: a sweep file ends in .csv or .parquet"
    assert not (tmp_path / "r").exists()


def test_a_header_alone_is_a_sweep_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "h.CSV"
    path.write_bytes(b"\xef\xbb\xbfseq_len,batch,flag\n")  # a byte-order mark is allowed
    table = SweepTable.read(path)
    assert (table.fmt, table.header, table.rows(), table.configs(), table.flags()) == (
        "csv", ["seq_len", "batch", "flag"], 0, [], [])
    with pytest.raises(KvscopeError) as info:
        read_sweep(path)
    assert str(info.value) == f"{path} has no rows"


def test_frame_types_and_cells_as_written(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("seq_len,batch,flag,decode_tok_s,note\n8.0,1,oom,,x\n 16 ,2,,12.5,\n")
    table = SweepTable.read(path, shown=Path("shown.csv"))
    assert table.lines == [2, 3] and table.configs() == [(8, 1), (16, 2)]
    assert table.floats("decode_tok_s")[1] == 12.5
    with pytest.raises(KvscopeError) as info:
        table.floats("note")
    assert str(info.value) == "shown.csv: column note, line 2: 'x' is not a number"
    df = read_sweep(path)
    assert df["seq_len"].tolist() == [8, 16] and str(df["seq_len"].dtype) == "int64"
    assert df["flag"].tolist() == ["oom", ""]
    assert df["decode_tok_s"].isna().tolist() == [True, False]


def _two_engines(rows: list[list[str]]) -> list[list[str]]:
    """The four rows again as transformers' (an engine setting of its own: attn), as two sweeps put side by side."""
    engine, attn = rows[0].index("engine"), rows[0].index("attn")
    other = [[("transformers" if i == engine else "eager" if i == attn else c) for i, c in enumerate(r)]
             for r in rows[1:]]
    return [*rows, *other]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_of_two_engines_is_a_report_and_nothing_else(suffix: str, made: dict[str, bytes], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Two engines' sweeps of one model in one file: the report compares them (a line per engine); a resume cannot
    append one engine's rows to it and capacity plans from one engine; each says so in one line."""
    out = tmp_path / f"s{suffix}"
    out.write_bytes(made[suffix])
    if suffix == ".csv":
        _csv(out, _two_engines)
    else:
        table = pq.read_table(out)
        other = table
        for name, value in (("engine", "transformers"), ("attn", "eager")):
            i = other.column_names.index(name)
            other = other.set_column(i, name, pa.array([value] * other.num_rows, type=other.schema.field(i).type))
        pq.write_table(pa.concat_tables([table, other]), out)
    where = ("line 2", "line 6") if suffix == ".csv" else ("row 1", "row 5")
    resume, report = _verdicts(out, tmp_path, capsys)
    assert (resume, report) == (f"--resume: {out} mixes sweeps: engine=kvscope in {where[0]}, engine=transformers in "
                                f"{where[1]}", None)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "### Seq sweep at batch 1 (kvscope)" in md and "### Seq sweep at batch 1 (transformers)" in md
    assert main(["capacity", "--sweep", str(out), *CAPACITY]) == 2
    assert _error(capsys) == (f"{out} holds the rows of several engines (kvscope, transformers): plan from one "
                              "engine's sweep")


def test_an_engine_setting_is_one_per_engine(made: dict[str, bytes], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """In a file of two engines, one engine's rows of two sweeps (attn sdpa and eager): the same refusal from all."""
    out = tmp_path / "s.csv"
    out.write_bytes(made[".csv"])
    _csv(out, lambda rows: _cell("attn", 5, "sdpa")(_two_engines(rows)))
    want = (f"{out} mixes sweeps (transformers engine): attn=eager in line 6, attn=sdpa in line 7; a sweep file holds "
            "one sweep's rows")
    assert _verdicts(out, tmp_path, capsys) == (want, want)
    assert main(["capacity", "--sweep", str(out), *CAPACITY]) == 2
    assert _error(capsys) == want
