"""Hostile inputs to `kvscope sweep --resume`: a resume under other settings, a malformed or hand-edited file (bad
sizes, text, negative or infinite times, a newline in a cell, rows of two models), another model's file, a Parquet
file without kvscope metadata. Each ends in one `kvscope: error: ...` line and exit code 2 before any work, the file
as it was; the same verdict `kvscope report` and `kvscope capacity` give (tests/measure/test_sweep_reader.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import TINY_CONFIGS
from sweep_checks import (
    SUFFIXES,
    copy_made,
    csv_rows,
    edit_csv,
    edit_meta,
    log_text,
    made_sweeps,
    names_in,
    only_error_line,
    pairs_of,
    sweep_cli,
    write_csv_rows,
)

from kvscope.analysis.sweep_file import read_sweep
from kvscope.measure import sweep as sweep_mod
from kvscope.measure.sweep_file import model_identity
from kvscope.model.source import resolve_model


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return made_sweeps(tmp_path_factory.mktemp("made"))


# ---- 1. a resume under other settings ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("extra", "setting"), [
    (["--collapse-factor", "3"], "collapse_factor=2.0, this one has collapse_factor=3.0"),
    (["--collapse-factor", "2.5"], "collapse_factor=2.0, this one has collapse_factor=2.5"),
    (["--granularity", "layer"], "granularity=phase, this one has granularity=layer"),
    (["--granularity", "none"], "granularity=phase, this one has granularity=none"),
    (["--reps", "3"], "reps=2, this one has reps=3"),
    (["--warmup", "1"], "warmup=0, this one has warmup=1"),
    (["--gen-tokens", "4"], "gen_tokens=3, this one has gen_tokens=4"),
    (["--attn", "eager"], "attn=sdpa, this one has attn=eager"),
    (["--dtype", "bfloat16"], "dtype=float32, this one has dtype=bfloat16"),
    (["--seed", "1"], "seed=0, this one has seed=1"),
    (["--engine", "transformers"], "engine=kvscope, this one has engine=transformers"),
])
def test_resume_refuses_other_settings(made: dict[str, bytes], tmp_path: Path, suffix: str, extra: list[str],
                                       setting: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_made(made, tmp_path, suffix)
    assert sweep_cli(out, "8,16,32", "1,2", "--resume", *extra) == 2
    assert only_error_line(capsys) == f"kvscope: error: --resume: {out} is a sweep of {setting}"
    assert out.read_bytes() == made[suffix]
    assert names_in(tmp_path) == [out.name]


@pytest.mark.parametrize(("column", "value"), [
    ("device", "NVIDIA H100 80GB HBM3"), ("cuda_graphs", "True"), ("kernels", "True"), ("dtype", "bfloat16"),
    ("model_arch", "0123456789abcdef"), ("model_source", "config:/elsewhere/config.json"), ("seed", ""),
])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_resume_refuses_a_file_of_other_recorded_settings(made: dict[str, bytes], tmp_path: Path, suffix: str,
                                                          column: str, value: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Settings this CPU cannot change on the command line (device, graphs, kernels), edited in the file."""
    out = copy_made(made, tmp_path, suffix)
    if suffix == ".csv":
        edit_csv(out, column, value)
    else:
        edit_meta(out, lambda doc: doc["sweep"].__setitem__(column, value))
    before = out.read_bytes()
    ours = {"device": "cpu", "cuda_graphs": "False", "kernels": "False", "dtype": "float32", "seed": "0",
            "model_source": "preset:tiny",
            "model_arch": model_identity(resolve_model("tiny"))[1]}[column]
    assert sweep_cli(out, "8,16,32", "1,2", "--resume") == 2
    assert only_error_line(capsys) == (f"kvscope: error: --resume: {out} is a sweep of {column}={value}, this one "
                                       f"has {column}={ours}")
    assert out.read_bytes() == before


@pytest.mark.parametrize(("column", "value", "was"), [
    ("collapse_factor", "3.0", "2.0"), ("seed", "1", "0"), ("gen_tokens", "4", "3"), ("model", "other", "tiny"),
    ("model_source", "preset:other", "preset:tiny"), ("dtype", "bfloat16", "float32"), ("device", "", "cpu"),
    ("engine", "transformers", "kvscope"),
])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_resume_refuses_rows_of_mixed_settings(column: str, value: str, was: str, suffix: str,
                                               made: dict[str, bytes], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Rows of two sweeps: refused in the reader's words (those of `kvscope report` and `kvscope capacity`), but for
    two engines, which a report compares and a resume cannot append to; never a row added after them."""
    out = copy_made(made, tmp_path, suffix)
    if suffix == ".csv":
        edit_csv(out, column, value, rows=[2])
    else:
        table = pq.read_table(out)
        cells = table.column(column).to_pylist()
        cells[2] = type(cells[0])(value) if value else None
        pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(cells)), out)
    before = out.read_bytes()
    assert sweep_cli(out, "8,16,32", "1,2", "--resume") == 2
    where = ("line 2", "line 4") if suffix == ".csv" else ("row 1", "row 3")
    mixed = f"{column}={was} in {where[0]}, {column}={value} in {where[1]}"
    if column == "engine":
        assert only_error_line(capsys) == f"kvscope: error: --resume: {out} mixes sweeps: {mixed}"
    else:
        assert only_error_line(capsys) == (f"kvscope: error: {out} mixes sweeps: {mixed}; a sweep file holds one "
                                           "sweep's rows")
    assert out.read_bytes() == before and names_in(tmp_path) == [out.name]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("setting", ["collapse_factor", "seed", "model_arch"])
def test_resume_refuses_a_file_that_does_not_record_a_setting(made: dict[str, bytes], tmp_path: Path, suffix: str,
                                                              setting: str, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    out = copy_made(made, tmp_path, suffix)
    if suffix == ".csv":
        table = csv_rows(out)
        i = table[0].index(setting)
        write_csv_rows(out, [row[:i] + row[i + 1:] for row in table])
        line = f"--resume: {out} has no column {setting} (written by an older kvscope, or not by kvscope sweep); " \
               "start a new file"
    else:
        edit_meta(out, lambda doc: doc["sweep"].pop(setting))
        line = f"--resume: {out} records no {setting} in its kvscope metadata (written by an older kvscope?); " \
               "start a new file"
    before = out.read_bytes()
    assert sweep_cli(out, "8,16,32", "1,2", "--resume") == 2
    assert only_error_line(capsys) == f"kvscope: error: {line}"
    assert out.read_bytes() == before


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_resume_never_changes_finished_rows(made: dict[str, bytes], tmp_path: Path, suffix: str) -> None:
    """Finished rows keep every cell, even flags that the collapse rule would set otherwise now."""
    out = copy_made(made, tmp_path, suffix)
    odd_flags = ["latency-collapse", "", "mine;throughput-collapse", "oom"]
    if suffix == ".csv":
        for i, flag in enumerate(odd_flags):
            edit_csv(out, "flag", flag, rows=[i])
        edit_csv(out, "prefill_p50_ms", "1.00000000000000000000001", rows=[1])  # not pandas' own spelling
        before = out.read_bytes()
    else:
        table = pq.read_table(out)
        i = table.column_names.index("flag")
        table = table.set_column(i, "flag", pa.array(odd_flags, type=table.schema.field("flag").type))
        pq.write_table(table, out)
        before_table = pq.read_table(out)
    assert sweep_cli(out, "8,16,32", "1,2", "--resume") == 0
    assert pairs_of(out) == [(8, 1), (8, 2), (16, 1), (16, 2), (32, 1), (32, 2)]
    if suffix == ".csv":
        assert out.read_bytes().startswith(before)  # the old bytes, then the new rows
        assert csv_rows(out)[2][2] == "1.00000000000000000000001"
    else:
        after = pq.read_table(out)
        assert after.slice(0, 4).equals(before_table)
        assert after.column("flag").to_pylist()[:4] == odd_flags
        meta = json.loads(after.schema.metadata[b"kvscope"])["sweep"]
        assert meta["seqs"] == [8, 16, 32] and meta["collapse_factor"] == 2.0
    assert read_sweep(out)["flag"].tolist()[:4] == odd_flags


# ---- 2. a malformed file to resume -----------------------------------------------------------------------------
@pytest.mark.parametrize(("column", "value"), [
    ("seq_len", "abc"), ("seq_len", ""), ("seq_len", "8.5"), ("seq_len", "-8"), ("seq_len", "0"),
    ("seq_len", "1e400"), ("seq_len", "nan"), ("seq_len", "99999999999999999999"),
    ("batch", "two"), ("batch", "True"), ("batch", " "), ("batch", "0x2"),
])
def test_resume_refuses_a_csv_with_a_bad_size(made: dict[str, bytes], tmp_path: Path, column: str, value: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_made(made, tmp_path, ".csv")
    edit_csv(out, column, value, rows=[2])  # the third data row: line 4
    before = out.read_bytes()
    assert sweep_cli(out, "8,16", "1,2", "--resume") == 2
    assert only_error_line(capsys) == (f"kvscope: error: {out}: column {column}, line 4: {value!r} is not a positive "
                                       "integer")
    assert out.read_bytes() == before
    assert names_in(tmp_path) == [out.name]


def _drop_column(name: str) -> Callable[[list[list[str]]], list[list[str]]]:
    def edit(rows: list[list[str]]) -> list[list[str]]:
        i = rows[0].index(name)
        return [r[:i] + r[i + 1:] for r in rows]
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_drop_column("seq_len"), "{out} is not a kvscope sweep file: no column seq_len"),
    (_drop_column("batch"), "{out} is not a kvscope sweep file: no column batch"),
    (_drop_column("flag"), "--resume: {out} has no column flag (written by an older kvscope, or not by kvscope "
                           "sweep); start a new file"),
    (_drop_column("decode_tok_s"), "--resume: {out} has no column decode_tok_s (written by an older kvscope, or not "
                                   "by kvscope sweep); start a new file"),
    (lambda rows: [rows[0][:1] + rows[0], *[r[:1] + r for r in rows[1:]]],
     "{out} is not a kvscope sweep file: column seq_len appears twice"),
    (lambda rows: [*rows, rows[1]], "{out}: line 6 repeats seq_len=8, batch=1 of line 2; a sweep file holds each "
                                    "configuration once"),
    (lambda rows: [rows[0], rows[1], rows[2][:-1], *rows[3:]], "{out}: line 3 has {n1} fields, the header has {n}"),
    (lambda rows: [rows[0], rows[1] + ["x"], *rows[2:]], "{out}: line 2 has {n2} fields, the header has {n}"),
    (lambda rows: [rows[0], [c if i != rows[0].index("decode_tok_s") else "fast" for i, c in enumerate(rows[1])],
                   *rows[2:]], "{out}: column decode_tok_s, line 2: 'fast' is not a number"),
])
def test_resume_refuses_a_malformed_csv(made: dict[str, bytes], tmp_path: Path, edit: Callable, message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_made(made, tmp_path, ".csv")
    rows = csv_rows(out)
    write_csv_rows(out, edit(rows))
    before = out.read_bytes()
    assert sweep_cli(out, "8,16", "1,2", "--resume") == 2
    n = len(rows[0])
    assert only_error_line(capsys) == "kvscope: error: " + message.format(out=out, n=n, n1=n - 1, n2=n + 1)
    assert out.read_bytes() == before


@pytest.mark.parametrize(("content", "message"), [
    (b"", "{out} is empty: not a kvscope sweep file"),
    (b"\n\n", "{out} is empty: not a kvscope sweep file"),
    (b"a,b\n1,2\n", "{out} is not a kvscope sweep file: no column seq_len"),
    (b"seq_len,batch\n\xff\xfe,1\n", "cannot read {out}: not a CSV file ('utf-8' codec can't decode byte 0xff in "
                                     "position 14: invalid start byte)"),
    (b'seq_len,batch\n"8,1\n', "cannot read {out}: not a CSV file (unexpected end of data)"),
])
def test_resume_refuses_a_file_that_is_no_sweep(content: bytes, message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.csv"
    out.write_bytes(content)
    assert sweep_cli(out, "8", "1", "--resume") == 2
    assert only_error_line(capsys) == "kvscope: error: " + message.format(out=out)
    assert out.read_bytes() == content
    assert names_in(tmp_path) == ["s.csv"]


def test_resume_reads_integer_valued_sizes_and_a_header_alone(made: dict[str, bytes], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_made(made, tmp_path, ".csv")
    edit_csv(out, "seq_len", "8.0", rows=[0])  # (8.0, 1) is (8, 1): nothing to run again
    before = out.read_bytes()
    assert sweep_cli(out, "8,16", "1,2", "--resume") == 0
    assert "every configuration is already in the file" in log_text(capsys)
    assert out.read_bytes() == before
    header = tmp_path / "h.csv"
    header.write_bytes(made[".csv"].split(b"\n")[0] + b"\n")  # no rows: every configuration runs
    assert sweep_cli(header, "8", "1,2", "--resume") == 0
    assert pairs_of(header) == [(8, 1), (8, 2)]


@pytest.mark.parametrize(("values", "row", "shown"), [
    (["8", "8", "x", "16"], 3, "'x'"), ([8.0, 8.5, 16.0, 16.0], 2, "8.5"), ([8, 8, None, 16], 3, "None"),
    ([8, -8, 16, 16], 2, "-8"),
])
def test_resume_refuses_a_parquet_file_with_a_bad_size(made: dict[str, bytes], tmp_path: Path, values: list,
                                                       row: int, shown: str, capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    out = copy_made(made, tmp_path, ".parquet")
    table = pq.read_table(out)
    table = table.set_column(table.column_names.index("seq_len"), "seq_len", pa.array(values))
    pq.write_table(table, out)
    before = out.read_bytes()
    assert sweep_cli(out, "8,16", "1,2", "--resume") == 2
    assert only_error_line(capsys) == (f"kvscope: error: {out}: column seq_len, row {row}: {shown} is not a positive "
                                       "integer")
    assert out.read_bytes() == before


# ---- 3. another model's file, a Parquet file without kvscope metadata -------------------------------------------
@pytest.mark.parametrize("strip", [
    lambda meta: {k: v for k, v in meta.items() if k != b"kvscope"},  # pandas metadata only
    lambda meta: {},  # no schema metadata at all
    lambda meta: {**meta, b"kvscope": json.dumps({"model": {"name": "tiny"}}).encode()},  # a run's, not a sweep's
    lambda meta: {**meta, b"kvscope": json.dumps(["sweep"]).encode()},
    lambda meta: {**meta, b"kvscope": json.dumps({"sweep": "tiny"}).encode()},
])
def test_resume_refuses_a_parquet_file_without_sweep_metadata(made: dict[str, bytes], tmp_path: Path,
                                                              strip: Callable[[dict], dict],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_made(made, tmp_path, ".parquet")
    table = pq.read_table(out)
    pq.write_table(table.replace_schema_metadata(strip(dict(table.schema.metadata))), out)
    before = out.read_bytes()
    assert sweep_cli(out, "8,16,32", "1,2", "--resume") == 2
    assert only_error_line(capsys) == (f"kvscope: error: --resume: {out} has no kvscope sweep metadata (not written by "
                                   "kvscope sweep); start a new file")
    assert out.read_bytes() == before


def test_resume_refuses_unreadable_parquet_metadata_or_file(made: dict[str, bytes], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_made(made, tmp_path, ".parquet")
    table = pq.read_table(out)
    pq.write_table(table.replace_schema_metadata({b"kvscope": b"{not json"}), out)
    assert sweep_cli(out, "8", "1", "--resume") == 2
    assert only_error_line(capsys) == f"kvscope: error: {out}: its kvscope metadata is not valid JSON"
    out.write_bytes(b"PAR1 this is not a parquet file")
    assert sweep_cli(out, "8", "1", "--resume") == 2
    line = only_error_line(capsys)
    assert line.startswith(f"kvscope: error: cannot read {out}: not a Parquet file (")
    assert out.read_bytes() == b"PAR1 this is not a parquet file"


def _config(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps({**TINY_CONFIGS["llama"], **changes}))
    return path


@pytest.mark.parametrize("case", ["other-architecture", "same-architecture-elsewhere", "edited-in-place", "preset"])
def test_resume_tells_config_json_models_apart(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    first = _config(tmp_path / "a")
    out = tmp_path / "s.csv"
    assert sweep_cli(out, "8", "1", model=str(first)) == 0
    assert read_sweep(out)["model"].tolist() == ["config"]  # the name alone tells nothing apart
    before = out.read_bytes()
    arch = model_identity(resolve_model(str(first)))[1]
    if case == "other-architecture":
        second = _config(tmp_path / "b", intermediate_size=128)
        setting = f"model_source=config:{first}, this one has model_source=config:{second}"
    elif case == "same-architecture-elsewhere":
        second = _config(tmp_path / "c")
        setting = f"model_source=config:{first}, this one has model_source=config:{second}"
    elif case == "edited-in-place":
        second = _config(tmp_path / "a", num_hidden_layers=3)
        now = model_identity(resolve_model(str(second)))[1]
        setting = f"model_arch={arch}, this one has model_arch={now}"
    else:
        second = Path("tiny")
        setting = "model=config, this one has model=tiny"
    capsys.readouterr()
    assert sweep_cli(out, "8,16", "1", "--resume", model=str(second)) == 2
    assert only_error_line(capsys) == f"kvscope: error: --resume: {out} is a sweep of {setting}"
    assert out.read_bytes() == before


def test_resume_with_the_same_config_json_goes_on(tmp_path: Path) -> None:
    config = _config(tmp_path / "a")
    out = tmp_path / "s.parquet"
    assert sweep_cli(out, "8", "1", model=str(config)) == 0
    assert sweep_cli(out, "8,16", "1", "--resume", model=str(tmp_path / "a" / ".." / "a" / "config.json")) == 0
    assert pairs_of(out) == [(8, 1), (16, 1)]
    meta = json.loads(pq.read_schema(out).metadata[b"kvscope"])["sweep"]
    assert meta["model_source"] == f"config:{config}" and meta["model_args"]["intermediate_size"] == 96


# ---- 4. what a new row is compared with ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_new_point_is_never_compared_with_a_zero_time(made: dict[str, bytes], tmp_path: Path,
                                                        suffix: str) -> None:
    """A hand-edited 0 ms decode (a number the reader takes: >= 0) is no measure to compare with: before, every new
    point of that batch was flagged latency-collapse (more than twice 0 ms)."""
    out = copy_made(made, tmp_path, suffix)
    if suffix == ".csv":
        edit_csv(out, "decode_p50_ms_per_tok", "0", rows=[0, 2])  # (8, 1) and (16, 1)
    else:
        table = pq.read_table(out)
        i = table.column_names.index("decode_p50_ms_per_tok")
        pq.write_table(table.set_column(i, "decode_p50_ms_per_tok", pa.array([0.0, 1.0, 0.0, 1.0])), out)
    assert sweep_cli(out, "8,16,32", "1", "--resume") == 0
    df = read_sweep(out)
    assert pairs_of(out) == [(8, 1), (8, 2), (16, 1), (16, 2), (32, 1)]
    assert df["flag"].tolist()[4] == ""


@pytest.mark.parametrize(("earlier", "flag"), [
    ([0.0], ""), ([math.nan], ""), ([0.0, 10.0], "latency-collapse"), ([10.0, 0.0, math.nan], "latency-collapse"),
    ([30.0, 0.0], ""),
])
def test_collapse_flags_compare_with_measured_rows_only(earlier: list[float], flag: str) -> None:
    """A new row of 25 ms per token against the earlier rows of its batch: only finite positive times count."""
    n = len(earlier)
    df = pd.DataFrame({"seq_len": [*range(8, 8 + n), 64], "batch": 1, "flag": "",
                       "decode_p50_ms_per_tok": [*earlier, 25.0], "decode_tok_s": math.nan})
    assert sweep_mod.collapse_flags(df, 2.0)[-1] == flag
