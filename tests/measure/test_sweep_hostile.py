"""Hostile inputs to `kvscope sweep`: two writers of one file, a resume under other settings, a malformed file to
resume, another model's file, repeated sizes, batches too large to allocate, a failing disk, a bad `--out`. Every bad
input ends in one `kvscope: error: ...` line and exit code 2, with no traceback and no finished row lost or changed."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY_CONFIGS
from paths import ROOT

from kvscope.analysis.sweep_file import read_sweep
from kvscope.cli import main
from kvscope.engine.plan import RunPlan, RunSpec
from kvscope.errors import KvscopeError
from kvscope.measure import sweep as sweep_mod
from kvscope.measure.memory import allocation_failure
from kvscope.measure.sweep_file import model_identity
from kvscope.model.source import resolve_model

REPO = ROOT
BASE = ["sweep", "--model", "tiny", "--device", "cpu", "--gen-tokens", "3", "--warmup", "0", "--reps", "2"]
SUFFIXES = [".csv", ".parquet"]
HUGE_BATCH = 10**9  # tiny's KV cache at batch 10**9 and 11 positions: 5.6 TB


def _sweep(out: Path | str, seqs: str = "8,16", batches: str = "1,2", *extra: str, model: str = "tiny") -> int:
    argv = [*BASE, "--seq", seqs, "--batch-sizes", batches, "--out", str(out), *extra]
    argv[argv.index("--model") + 1] = model
    return main(argv)


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line on stderr (log lines may come before it); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("kvscope: error:")]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def _only_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line, which must be all stderr holds (a refusal before any work)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvscope: error: "), err
    return lines[0]


def _log(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _pairs(out: Path) -> list[tuple[int, int]]:
    df = read_sweep(out)
    return list(zip(df["seq_len"].tolist(), df["batch"].tolist(), strict=True))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A finished sweep of seq 8,16 x batch 1,2, once per format (copied by the tests that need one)."""
    folder = tmp_path_factory.mktemp("made")
    files = {}
    for suffix in SUFFIXES:
        out = folder / f"s{suffix}"
        assert _sweep(out) == 0
        files[suffix] = out.read_bytes()
    return files


def _copy(made: dict[str, bytes], folder: Path, suffix: str) -> Path:
    out = folder / f"s{suffix}"
    out.write_bytes(made[suffix])
    return out


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _write_csv_rows(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def _edit_csv(path: Path, column: str, value: str, rows: list[int] | None = None) -> None:
    """Set `column` to `value` in the given data rows (0-based), or in all of them."""
    table = _csv_rows(path)
    i = table[0].index(column)
    for n, row in enumerate(table[1:]):
        if rows is None or n in rows:
            row[i] = value
    _write_csv_rows(path, table)


def _edit_meta(path: Path, edit: Callable[[dict], object]) -> None:
    """Change the kvscope metadata of a Parquet file in place (the rows stay as they are)."""
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    doc = json.loads(meta[b"kvscope"])
    edit(doc)
    meta[b"kvscope"] = json.dumps(doc).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


@contextlib.contextmanager
def _held(lock: Path) -> Iterator[None]:
    """The lock a running sweep holds, held by the test."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def _busy(out: Path, lock: Path) -> str:
    return (f"kvscope: error: {out} is being written by another kvscope sweep (it holds {lock}); wait for it to end "
            "or choose another --out")


# ---- 1. two writers of one file ------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("resume", [False, True])
def test_a_second_writer_is_refused_while_the_lock_is_held(made: dict[str, bytes], tmp_path: Path, suffix: str,
                                                           resume: bool, capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(made, tmp_path, suffix) if resume else tmp_path / f"s{suffix}"
    lock = tmp_path / f".s{suffix}.lock"
    with _held(lock):
        assert _sweep(out, "8,16,32", "1,2", *(["--resume"] if resume else [])) == 2
    assert _only_error(capsys) == _busy(out, lock)
    assert lock.exists()  # the refused sweep leaves the holder's lock file alone
    if resume:
        assert out.read_bytes() == made[suffix]
        assert _names(tmp_path) == sorted([lock.name, out.name])
    else:
        assert _names(tmp_path) == [lock.name]


_GATED = """
import sys
import time
from pathlib import Path

from kvscope.measure import sweep

started, go = Path(sys.argv[1]), Path(sys.argv[2])
real = sweep.measure


def gated(*args, **kwargs):
    started.touch()  # the sweep holds its lock and measures its first configuration
    while not go.exists():
        time.sleep(0.01)
    return real(*args, **kwargs)


sweep.measure = gated
from kvscope.cli import main

sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_two_real_sweeps_of_one_file(suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out, lock = tmp_path / f"s{suffix}", tmp_path / f".s{suffix}.lock"
    started, go, script = work / "started", work / "go", work / "gated.py"
    script.write_text(_GATED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [*BASE, "--seq", "8", "--batch-sizes", "1,2", "--out", str(out)]
    first = subprocess.Popen([sys.executable, str(script), str(started), str(go), *argv], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first sweep did not start"
            time.sleep(0.02)
        # the first sweep is in the middle of its first configuration: a second one, resuming or not, is refused
        assert _sweep(out, "8,16", "1,2") == 2
        assert _only_error(capsys) == _busy(out, lock)
        assert _sweep(out, "8,16", "1,2", "--resume") == 2
        assert _only_error(capsys) == _busy(out, lock)
        go.touch()
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert _pairs(out) == [(8, 1), (8, 2)]  # the first sweep's rows, each once
    assert _names(tmp_path) == sorted([out.name, "work"])  # its lock file is gone
    assert _sweep(out, "8,16", "1,2", "--resume") == 0  # and a resume goes ahead once it is done
    assert _pairs(out) == [(8, 1), (8, 2), (16, 1), (16, 2)]


def test_the_lock_file_goes_and_a_stale_one_blocks_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    out, lock = tmp_path / "s.csv", tmp_path / ".s.csv.lock"
    lock.write_text("")  # left by a sweep that was killed: nobody holds it
    assert _sweep(out, "8", "1") == 0
    assert _names(tmp_path) == ["s.csv"]
    capsys.readouterr()
    assert _sweep(out, "8", "1") == 2  # refused inside the lock (exists, no --resume): the lock file goes too
    assert "pass --resume" in _only_error(capsys)
    assert _names(tmp_path) == ["s.csv"]


def test_a_link_shares_the_lock_of_its_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target, link = tmp_path / "s.csv", tmp_path / "link.csv"
    link.symlink_to(target)
    with _held(tmp_path / ".s.csv.lock"):
        assert _sweep(link, "8", "1") == 2
    assert _only_error(capsys) == _busy(link, tmp_path / ".s.csv.lock")
    assert _sweep(link, "8", "1") == 0
    assert link.is_symlink() and link.resolve() == target and _pairs(target) == [(8, 1)]


# ---- 2. a resume under other settings ------------------------------------------------------------------------
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
    out = _copy(made, tmp_path, suffix)
    assert _sweep(out, "8,16,32", "1,2", "--resume", *extra) == 2
    assert _only_error(capsys) == f"kvscope: error: --resume: {out} is a sweep of {setting}"
    assert out.read_bytes() == made[suffix]
    assert _names(tmp_path) == [out.name]


@pytest.mark.parametrize(("column", "value"), [
    ("device", "NVIDIA H100 80GB HBM3"), ("cuda_graphs", "True"), ("kernels", "True"), ("dtype", "bfloat16"),
    ("model_arch", "0123456789abcdef"), ("model_source", "config:/elsewhere/config.json"), ("seed", ""),
])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_resume_refuses_a_file_of_other_recorded_settings(made: dict[str, bytes], tmp_path: Path, suffix: str,
                                                          column: str, value: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Settings this CPU cannot change on the command line (device, graphs, kernels), edited in the file."""
    out = _copy(made, tmp_path, suffix)
    if suffix == ".csv":
        _edit_csv(out, column, value)
    else:
        _edit_meta(out, lambda doc: doc["sweep"].__setitem__(column, value))
    before = out.read_bytes()
    ours = {"device": "cpu", "cuda_graphs": "False", "kernels": "False", "dtype": "float32", "seed": "0",
            "model_source": "preset:tiny",
            "model_arch": model_identity(resolve_model("tiny"))[1]}[column]
    assert _sweep(out, "8,16,32", "1,2", "--resume") == 2
    assert _only_error(capsys) == f"kvscope: error: --resume: {out} is a sweep of {column}={value}, this one has " \
                                  f"{column}={ours}"
    assert out.read_bytes() == before


def test_resume_refuses_rows_of_mixed_settings(made: dict[str, bytes], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(made, tmp_path, ".csv")
    _edit_csv(out, "collapse_factor", "3.0", rows=[2])
    assert _sweep(out, "8,16,32", "1,2", "--resume") == 2
    assert _only_error(capsys) == (f"kvscope: error: --resume: {out} mixes sweeps: collapse_factor=2.0 in line 2, "
                                   "collapse_factor=3.0 in line 4")


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("setting", ["collapse_factor", "seed", "model_arch"])
def test_resume_refuses_a_file_that_does_not_record_a_setting(made: dict[str, bytes], tmp_path: Path, suffix: str,
                                                              setting: str, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    out = _copy(made, tmp_path, suffix)
    if suffix == ".csv":
        table = _csv_rows(out)
        i = table[0].index(setting)
        _write_csv_rows(out, [row[:i] + row[i + 1:] for row in table])
        line = f"--resume: {out} has no column {setting} (written by an older kvscope, or not by kvscope sweep); " \
               "start a new file"
    else:
        _edit_meta(out, lambda doc: doc["sweep"].pop(setting))
        line = f"--resume: {out} records no {setting} in its kvscope metadata (written by an older kvscope?); " \
               "start a new file"
    before = out.read_bytes()
    assert _sweep(out, "8,16,32", "1,2", "--resume") == 2
    assert _only_error(capsys) == f"kvscope: error: {line}"
    assert out.read_bytes() == before


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_resume_never_changes_finished_rows(made: dict[str, bytes], tmp_path: Path, suffix: str) -> None:
    """Finished rows keep every cell, even flags that the collapse rule would set otherwise now."""
    out = _copy(made, tmp_path, suffix)
    odd_flags = ["latency-collapse", "", "mine;throughput-collapse", "oom"]
    if suffix == ".csv":
        for i, flag in enumerate(odd_flags):
            _edit_csv(out, "flag", flag, rows=[i])
        _edit_csv(out, "prefill_p50_ms", "1.00000000000000000000001", rows=[1])  # not pandas' own spelling
        before = out.read_bytes()
    else:
        table = pq.read_table(out)
        i = table.column_names.index("flag")
        table = table.set_column(i, "flag", pa.array(odd_flags, type=table.schema.field("flag").type))
        pq.write_table(table, out)
        before_table = pq.read_table(out)
    assert _sweep(out, "8,16,32", "1,2", "--resume") == 0
    assert _pairs(out) == [(8, 1), (8, 2), (16, 1), (16, 2), (32, 1), (32, 2)]
    if suffix == ".csv":
        assert out.read_bytes().startswith(before)  # the old bytes, then the new rows
        assert _csv_rows(out)[2][2] == "1.00000000000000000000001"
    else:
        after = pq.read_table(out)
        assert after.slice(0, 4).equals(before_table)
        assert after.column("flag").to_pylist()[:4] == odd_flags
        meta = json.loads(after.schema.metadata[b"kvscope"])["sweep"]
        assert meta["seqs"] == [8, 16, 32] and meta["collapse_factor"] == 2.0
    assert read_sweep(out)["flag"].tolist()[:4] == odd_flags


# ---- 3. a malformed file to resume -----------------------------------------------------------------------------
@pytest.mark.parametrize(("column", "value"), [
    ("seq_len", "abc"), ("seq_len", ""), ("seq_len", "8.5"), ("seq_len", "-8"), ("seq_len", "0"),
    ("seq_len", "1e400"), ("seq_len", "nan"), ("seq_len", "99999999999999999999"),
    ("batch", "two"), ("batch", "True"), ("batch", " "), ("batch", "0x2"),
])
def test_resume_refuses_a_csv_with_a_bad_size(made: dict[str, bytes], tmp_path: Path, column: str, value: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(made, tmp_path, ".csv")
    _edit_csv(out, column, value, rows=[2])  # the third data row: line 4
    before = out.read_bytes()
    assert _sweep(out, "8,16", "1,2", "--resume") == 2
    assert _only_error(capsys) == f"kvscope: error: {out}: column {column}, line 4: {value!r} is not a positive integer"
    assert out.read_bytes() == before
    assert _names(tmp_path) == [out.name]


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
    out = _copy(made, tmp_path, ".csv")
    rows = _csv_rows(out)
    _write_csv_rows(out, edit(rows))
    before = out.read_bytes()
    assert _sweep(out, "8,16", "1,2", "--resume") == 2
    n = len(rows[0])
    assert _only_error(capsys) == "kvscope: error: " + message.format(out=out, n=n, n1=n - 1, n2=n + 1)
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
    assert _sweep(out, "8", "1", "--resume") == 2
    assert _only_error(capsys) == "kvscope: error: " + message.format(out=out)
    assert out.read_bytes() == content
    assert _names(tmp_path) == ["s.csv"]


def test_resume_reads_integer_valued_sizes_and_a_header_alone(made: dict[str, bytes], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(made, tmp_path, ".csv")
    _edit_csv(out, "seq_len", "8.0", rows=[0])  # (8.0, 1) is (8, 1): nothing to run again
    before = out.read_bytes()
    assert _sweep(out, "8,16", "1,2", "--resume") == 0
    assert "every configuration is already in the file" in _log(capsys)
    assert out.read_bytes() == before
    header = tmp_path / "h.csv"
    header.write_bytes(made[".csv"].split(b"\n")[0] + b"\n")  # no rows: every configuration runs
    assert _sweep(header, "8", "1,2", "--resume") == 0
    assert _pairs(header) == [(8, 1), (8, 2)]


@pytest.mark.parametrize(("values", "row", "shown"), [
    (["8", "8", "x", "16"], 3, "'x'"), ([8.0, 8.5, 16.0, 16.0], 2, "8.5"), ([8, 8, None, 16], 3, "None"),
    ([8, -8, 16, 16], 2, "-8"),
])
def test_resume_refuses_a_parquet_file_with_a_bad_size(made: dict[str, bytes], tmp_path: Path, values: list,
                                                       row: int, shown: str, capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    out = _copy(made, tmp_path, ".parquet")
    table = pq.read_table(out)
    table = table.set_column(table.column_names.index("seq_len"), "seq_len", pa.array(values))
    pq.write_table(table, out)
    before = out.read_bytes()
    assert _sweep(out, "8,16", "1,2", "--resume") == 2
    assert _only_error(capsys) == f"kvscope: error: {out}: column seq_len, row {row}: {shown} is not a positive integer"
    assert out.read_bytes() == before


# ---- 4. another model's file, a Parquet file without kvscope metadata -------------------------------------------
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
    out = _copy(made, tmp_path, ".parquet")
    table = pq.read_table(out)
    pq.write_table(table.replace_schema_metadata(strip(dict(table.schema.metadata))), out)
    before = out.read_bytes()
    assert _sweep(out, "8,16,32", "1,2", "--resume") == 2
    assert _only_error(capsys) == (f"kvscope: error: --resume: {out} has no kvscope sweep metadata (not written by "
                                   "kvscope sweep); start a new file")
    assert out.read_bytes() == before


def test_resume_refuses_unreadable_parquet_metadata_or_file(made: dict[str, bytes], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(made, tmp_path, ".parquet")
    table = pq.read_table(out)
    pq.write_table(table.replace_schema_metadata({b"kvscope": b"{not json"}), out)
    assert _sweep(out, "8", "1", "--resume") == 2
    assert _only_error(capsys) == f"kvscope: error: {out}: its kvscope metadata is not valid JSON"
    out.write_bytes(b"PAR1 this is not a parquet file")
    assert _sweep(out, "8", "1", "--resume") == 2
    line = _only_error(capsys)
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
    assert _sweep(out, "8", "1", model=str(first)) == 0
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
    assert _sweep(out, "8,16", "1", "--resume", model=str(second)) == 2
    assert _only_error(capsys) == f"kvscope: error: --resume: {out} is a sweep of {setting}"
    assert out.read_bytes() == before


def test_resume_with_the_same_config_json_goes_on(tmp_path: Path) -> None:
    config = _config(tmp_path / "a")
    out = tmp_path / "s.parquet"
    assert _sweep(out, "8", "1", model=str(config)) == 0
    assert _sweep(out, "8,16", "1", "--resume", model=str(tmp_path / "a" / ".." / "a" / "config.json")) == 0
    assert _pairs(out) == [(8, 1), (16, 1)]
    meta = json.loads(pq.read_schema(out).metadata[b"kvscope"])["sweep"]
    assert meta["model_source"] == f"config:{config}" and meta["model_args"]["intermediate_size"] == 96


# ---- 5. repeated sizes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seqs", "batches", "pairs", "notes"), [
    ("16,16,32", "1,1", [(16, 1), (32, 1)], ["--seq: 16", "--batch-sizes: 1"]),
    ("8,8,8", "2,1,2", [(8, 2), (8, 1)], ["--seq: 8", "--batch-sizes: 2"]),
    ("8,16,8,16", "1", [(8, 1), (16, 1)], ["--seq: 8, 16"]),
    ("8, 08 ,8", "1", [(8, 1)], ["--seq: 8"]),
    ("16,8", "2,1", [(16, 2), (16, 1), (8, 2), (8, 1)], []),
])
def test_repeated_sizes_are_measured_once(seqs: str, batches: str, pairs: list[tuple[int, int]], notes: list[str],
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.csv"
    assert _sweep(out, seqs, batches) == 0
    assert _pairs(out) == pairs
    log = _log(capsys)
    for note in notes:
        assert f"kvscope: {note} given more than once; each configuration is measured once" in log
    assert log.count("given more than once") == len(notes)


def test_repeated_sizes_on_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.csv"
    assert _sweep(out, "16", "1") == 0
    assert _sweep(out, "16,16,32", "1,1", "--resume") == 0
    assert _pairs(out) == [(16, 1), (32, 1)]
    assert "1 configuration(s) to run" in _log(capsys)


# ---- 6. batches too large to allocate ------------------------------------------------------------------------
def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_batch_too_large_for_memory_is_oom_and_the_sweep_goes_on(suffix: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"s{suffix}"
    peak = _peak_rss_bytes()
    assert _sweep(out, "8,16", f"1,{HUGE_BATCH},2") == 0
    assert _peak_rss_bytes() - peak < 2**30  # nothing of the 5.6 TB was ever touched
    df = read_sweep(out)
    assert _pairs(out) == [(8, 1), (8, HUGE_BATCH), (8, 2), (16, 1), (16, HUGE_BATCH), (16, 2)]
    oom = df["batch"] == HUGE_BATCH
    assert df.loc[oom, "flag"].tolist() == ["oom", "oom"] and df.loc[oom, "decode_tok_s"].isna().all()
    assert (df.loc[~oom, "decode_tok_s"] > 0).all() and not df.loc[~oom, "flag"].str.contains("oom").any()
    assert df["seed"].tolist() == [0] * 6 and df["collapse_factor"].tolist() == [2.0] * 6  # oom rows record them too
    log = _log(capsys)
    assert re.search(rf"kvscope: seq 8 batch {HUGE_BATCH}: needs at least 5,\d{{3}}\.\d GiB, more than [\d,.]+ GiB; "
                     "recorded as oom without running", log), log


@pytest.mark.parametrize("batch", [10**12, 10**15])
def test_a_failed_allocation_is_oom_on_the_cpu(batch: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """With no memory size to predict from, the allocator itself refuses (sizes past any address space fail at
    once, whatever the overcommit policy) and the RuntimeError it raises is taken for oom."""
    monkeypatch.setattr(sweep_mod, "device_memory", lambda _device: None)
    out = tmp_path / "s.csv"
    peak = _peak_rss_bytes()
    assert _sweep(out, "8", f"1,{batch},2") == 0
    assert _peak_rss_bytes() - peak < 2**30
    df = read_sweep(out)
    assert df["flag"].str.contains("oom").tolist() == [False, True, False]
    assert df["decode_tok_s"].notna().tolist() == [True, False, True]
    log = _log(capsys)
    kv = 2 * 2 * batch * 11 * 2 * 16 * 4  # tiny: 2 layers, K and V, 11 positions, 2 KV heads of 16, float32
    assert (f"kvscope: seq 8 batch {batch}: out of memory (DefaultCPUAllocator: can't allocate memory: you tried to "
            f"allocate {kv} bytes. Error code 12 (Cannot allocate memory)); recorded as oom") in log


def _cpu_allocation_error() -> RuntimeError:
    try:
        torch.empty(2**60, dtype=torch.uint8)  # an exabyte: refused at once
    except RuntimeError as exc:
        return exc
    raise AssertionError("an exabyte was allocated")


@pytest.mark.parametrize(("exc", "expected"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 5632000000000 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("Storage size calculation overflowed with sizes=[2, 2, 100000000000000000, 11, 2, 16]"), True),
    (RuntimeError("simulated crash"), False),
    (RuntimeError("The size of tensor a (4) must match the size of tensor b (5) at non-singleton dimension 1"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (ValueError("out of memory"), False),
    (KvscopeError("out of memory"), False),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), False),
])
def test_what_counts_as_an_allocation_failure(exc: BaseException, expected: bool) -> None:
    assert allocation_failure(exc) is expected


def test_the_cpu_allocators_own_error_counts() -> None:
    exc = _cpu_allocation_error()
    assert "can't allocate memory" in str(exc) and allocation_failure(exc)


@pytest.mark.parametrize("message", ["CUDA error: an illegal memory access was encountered", "shape mismatch"])
def test_other_errors_stop_the_sweep_and_keep_what_it_finished(message: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = sweep_mod.measure

    def fail_second(model: object, plan: RunPlan, *a: object, **k: object) -> object:
        if plan.spec.batch_size == 2:
            raise RuntimeError(message)
        return real(model, plan, *a, **k)

    monkeypatch.setattr(sweep_mod, "measure", fail_second)
    out = tmp_path / "s.csv"
    with pytest.raises(RuntimeError, match=message):  # a bug is not taken for memory
        _sweep(out, "8", "1,2")
    assert _pairs(out) == [(8, 1)] and _names(tmp_path) == ["s.csv"]


def test_a_model_too_large_to_load_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    def oom(*_a: object, **_k: object) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 99 bytes.\nsecond line")

    monkeypatch.setattr(sweep_mod, "load_model", oom)
    assert _sweep(tmp_path / "s.csv", "8", "1") == 2
    assert _only_error(capsys) == ("kvscope: error: cannot load tiny on cpu: out of memory (DefaultCPUAllocator: "
                                   "can't allocate memory: you tried to allocate 99 bytes.)")
    assert _names(tmp_path) == []


# ---- 7. a failing disk -------------------------------------------------------------------------------------------
def _fail(err: int) -> Callable[..., None]:
    def raise_(*_a: object, **_k: object) -> None:
        raise OSError(err, os.strerror(err))
    return raise_


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("where", "err"), [
    ("fsync", errno.ENOSPC), ("fsync", errno.EDQUOT), ("fsync", errno.EIO),
    ("replace", errno.EROFS), ("replace", errno.EACCES),
])
@pytest.mark.parametrize("resume", [False, True])
def test_a_failing_write_is_one_line_and_keeps_the_file(made: dict[str, bytes], tmp_path: Path, suffix: str,
                                                        where: str, err: int, resume: bool,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(made, tmp_path, suffix) if resume else tmp_path / f"s{suffix}"
    monkeypatch.setattr(os, where, _fail(err))
    assert _sweep(out, "8,16,32", "1,2", *(["--resume"] if resume else [])) == 2
    monkeypatch.undo()
    after = "the file is as it was, with 4 configuration(s)" if resume else "no file was made"
    assert _error(capsys) == f"kvscope: error: cannot write {out}: {os.strerror(err)}; {after}"
    if resume:
        assert out.read_bytes() == made[suffix]
        assert _names(tmp_path) == [out.name]  # no temporary file, no lock file
    else:
        assert _names(tmp_path) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_file_size_limit_mid_sweep(made: dict[str, bytes], tmp_path: Path, suffix: str) -> None:
    """A real write that fails in the kernel (RLIMIT_FSIZE: EFBIG, "File too large"), in a process of its own."""
    out = _copy(made, tmp_path, suffix)
    limit = len(made[suffix]) + 64  # room for the file as it is, not for one more row
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "kvscope", *BASE, "--seq", "8,16,32", "--batch-sizes", "1,2", "--out", str(out),
            "--resume"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard)))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"kvscope: error: cannot write {out}: File too large; the file is "
                                                    "as it was, with 4 configuration(s)")
    assert out.read_bytes() == made[suffix]
    assert _names(tmp_path) == [out.name]


def test_an_unwritable_folder_or_file_is_refused_before_any_work(made: dict[str, bytes], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(made, tmp_path, ".csv")
    real = os.access
    monkeypatch.setattr(sweep_mod, "load_model", _never_loaded)
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    assert _sweep(out, "8,16,32", "1,2", "--resume") == 2
    assert _only_error(capsys) == f"kvscope: error: --out {out}: folder {tmp_path} is not writable"
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out else real(p, mode))
    assert _sweep(out, "8,16,32", "1,2", "--resume") == 2
    assert _only_error(capsys) == f"kvscope: error: --resume: {out} is not readable and writable"
    assert out.read_bytes() == made[".csv"] and _names(tmp_path) == [out.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert _sweep(folder / "s.csv", "8", "1") == 2
        assert _only_error(capsys) == f"kvscope: error: --out {folder / 's.csv'}: folder {folder} is not writable"
    finally:
        folder.chmod(0o755)


def test_a_resumed_file_keeps_its_mode(made: dict[str, bytes], tmp_path: Path) -> None:
    out = _copy(made, tmp_path, ".csv")
    out.chmod(0o640)
    assert _sweep(out, "8,16,32", "1,2", "--resume") == 0
    assert out.stat().st_mode & 0o777 == 0o640


# ---- 8. a bad --out ------------------------------------------------------------------------------------------
def _never_loaded(*_a: object, **_k: object) -> None:
    raise AssertionError("the model was loaded before --out was checked")


def _setup_out(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """An --out of the given kind, and the message it must get ({out} stands for the path)."""
    ext = "{out}: the sweep file must end in .csv or .parquet"
    folder = "{out} is a folder: give a FILE.csv or FILE.parquet"
    plain = {"txt": "s.txt", "none": "s", "bak": "s.csv.bak", "space": "s.csv ", "dotfile": ".csv", "json": "s.json",
             "csvx": "s.csvx"}
    if kind in plain:
        return tmp_path / plain[kind], ext
    if kind in ("dir", "dir.csv", "dir.parquet"):
        path = tmp_path / kind
        path.mkdir()
        return path, folder
    if kind == "link-to-dir":
        (tmp_path / "d").mkdir()
        (tmp_path / "l.csv").symlink_to(tmp_path / "d")
        return tmp_path / "l.csv", folder
    if kind == "link-to-txt":
        (tmp_path / "t.txt").write_text("")
        (tmp_path / "l.csv").symlink_to(tmp_path / "t.txt")
        return tmp_path / "l.csv", "{out} is a link to " + str(tmp_path / "t.txt") + ", which does not end in .csv"
    if kind == "fifo":
        os.mkfifo(tmp_path / "f.csv")
        return tmp_path / "f.csv", "{out} is not a regular file"
    if kind == "parent-is-file":
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "s.csv", "{out}: " + str(tmp_path / "file") + " is not a folder"
    if kind == "no-parent":
        return tmp_path / "missing" / "s.csv", "{out}: folder " + str(tmp_path / "missing") + " does not exist"
    if kind == "long-name":
        return tmp_path / ("x" * 240 + ".csv"), "{out}: the file name takes 244 bytes, at most 237 here (the sweep " \
                                                "writes .NAME.<random>.tmp beside it)"
    if kind == "too-long-name":
        return tmp_path / ("x" * 300 + ".csv"), "{out}: File name too long"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["txt", "none", "bak", "space", "dotfile", "json", "csvx", "dir", "dir.csv",
                                  "dir.parquet", "link-to-dir", "link-to-txt", "fifo", "parent-is-file", "no-parent",
                                  "long-name", "too-long-name"])
def test_a_bad_out_is_refused_before_the_model_loads(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out, message = _setup_out(kind, tmp_path)
    before = _names(tmp_path)
    monkeypatch.setattr(sweep_mod, "load_model", _never_loaded)
    for extra in ([], ["--resume"]):
        assert _sweep(out, "8", "1", *extra) == 2
        assert _only_error(capsys) == "kvscope: error: --out " + message.format(out=out)
        assert _names(tmp_path) == before


def test_a_link_loop_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.csv").symlink_to(tmp_path / "b.csv")
    (tmp_path / "b.csv").symlink_to(tmp_path / "a.csv")
    monkeypatch.setattr(sweep_mod, "load_model", _never_loaded)
    assert _sweep(tmp_path / "a.csv", "8", "1") == 2
    assert _only_error(capsys).startswith(f"kvscope: error: --out {tmp_path / 'a.csv'}: ")
    assert _names(tmp_path) == ["a.csv", "b.csv"]


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_out_is_refused(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_mod, "load_model", _never_loaded)
    assert _sweep(text, "8", "1") == 2
    assert "--out" in _only_error(capsys)
    assert _names(tmp_path) == []


@pytest.mark.parametrize(("out", "message"), [
    (Path(""), "--out . is a folder: give a FILE.csv or FILE.parquet"),
    (Path("."), "--out . is a folder: give a FILE.csv or FILE.parquet"),
    (Path("s\0.csv"), "--out must not contain a NUL character"),
])
def test_the_api_refuses_an_empty_out(out: Path, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    monkeypatch.chdir(tmp_path)
    spec = sweep_mod.SweepSpec(RunSpec(model="tiny", device="cpu", gen_tokens=3, warmup=0, reps=2), (8,), (1,), out)
    with pytest.raises(KvscopeError) as info:
        sweep_mod.run_sweep(spec)
    assert str(info.value) == message


@pytest.mark.parametrize(("name", "read"), [("S.CSV", pd.read_csv), ("S.Parquet", pd.read_parquet)])
def test_the_extension_is_read_in_any_case(name: str, read: Callable, tmp_path: Path) -> None:
    assert _sweep(tmp_path / name, "8", "1,2") == 0
    assert read(tmp_path / name)["batch"].tolist() == [1, 2]
