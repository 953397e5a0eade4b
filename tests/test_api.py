"""The Python API (`kvscope.api`, exposed lazily by `kvscope`): each function against its command's output for the
same input, its errors as the command's one-line messages, and `import kvscope` light and torch-free."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import kvscope
from kvscope.cli import error_line, main
from kvscope.errors import KvscopeError
from kvscope.io import read_metadata, write_parquet
from kvscope.schema import ALIGN_OUTPUT_FILES, CLASS_ROOFLINE_FILE

ROOT = Path(__file__).resolve().parents[1]
NSYS = ROOT / "tests" / "data" / "nsys"
FOREIGN = ROOT / "tests" / "data" / "foreign"
RUN_DIR = NSYS / "qwen25-05b-run"
TINY_RUN = ["--model", "tiny", "--device", "cpu", "--seq", "16", "--gen-tokens", "4", "--warmup", "1", "--reps", "2"]


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line of a command that fails on bad input."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _api_error(fn: Any, *args: Any, **kwargs: Any) -> str:
    """The line the command line would print for the KvscopeError that `fn(*args, **kwargs)` raises."""
    with pytest.raises(KvscopeError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return error_line(info.value)


def _cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ---- the package -------------------------------------------------------------------------------------------------
def _python(code: str, block_torch: bool = False) -> subprocess.CompletedProcess[str]:
    prelude = "import sys; sys.modules['torch'] = None\n" if block_torch else ""
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_import_kvscope_is_light() -> None:
    done = _python("import sys, kvscope\n"
                   "heavy = sorted(m for m in ('torch', 'pandas', 'numpy', 'pyarrow', 'kvscope.api', 'kvscope.cli') "
                   "if m in sys.modules)\n"
                   "print(heavy, kvscope.__all__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == ("[] ['KvscopeError', 'Run', 'Serve', '__version__', 'align', "
                                          "'class_roofline', 'diff', 'kv_math', 'load_export', 'load_run', "
                                          "'load_serve', 'project', 'run', 'serve']")


def test_api_names_resolve_lazily() -> None:
    from kvscope import api

    for name in ("run", "load_run", "load_export", "project", "align", "kv_math", "Run"):
        assert getattr(kvscope, name) is getattr(api, name)
    assert kvscope.KvscopeError is KvscopeError
    assert set(kvscope.__all__) <= set(dir(kvscope))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kvscope.nope  # noqa: B018


def test_the_stub_types_every_lazy_name() -> None:
    """__init__.pyi (what type checkers read) re-exports exactly the names __getattr__ resolves, from their modules."""
    import ast

    stub = ast.parse((ROOT / "kvscope" / "__init__.pyi").read_text())
    imported = {(node.module, a.name) for node in stub.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert imported == {(module, name) for name, module in kvscope._LAZY.items()}
    (stub_all,) = [ast.literal_eval(n.value) for n in stub.body if isinstance(n, ast.Assign)]
    assert stub_all == kvscope.__all__ == sorted([*kvscope._LAZY, "__version__"])


def test_the_api_works_without_torch() -> None:
    code = f"""
import sys, kvscope
k = kvscope.kv_math("qwen2.5-3b", batch_size=8, seq=4096, gpu_mem_gb=80)
r = kvscope.load_run({str(RUN_DIR)!r})
a = kvscope.align({str(NSYS / "qwen25-05b.sqlite")!r}, r)
p = kvscope.project({str(FOREIGN / "plain.sqlite")!r})
e = kvscope.load_export({str(NSYS / "tiny.parquetdir")!r})
try:
    kvscope.kv_math("qwen2.5-3b", batch_size=0)
except kvscope.KvscopeError as exc:
    err = str(exc)
print(k["kv_bytes_per_token"], k["max_batch"], len(r.timings), len(a.steps), len(p), len(e.ranges), err)
print(sys.modules["torch"])
"""
    done = _python(code, block_torch=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["36864 518 229 8 8 165 --batch-size must be positive, got 0", "None"]


# ---- kv_math -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},
    {"batch_size": 8, "seq": 4096, "gpu_mem_gb": 80, "kv_dtype": "fp8", "rps": 10, "latency_s": 2.5, "page_size": 16},
    {"batch_size": 3, "seq": 100, "dtype": "fp32", "gpu_mem_gb": 0.5, "reserve_gb": 0.0},
    {"seq": 1000, "gpu_mem_gb": 24.5, "reserve_gb": 2.25, "rps": 0.5, "latency_s": 3.1},
])
def test_kv_math_equals_the_command(kwargs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["kv-math", "--model", "qwen2.5-3b", "--json"]
    for key, value in kwargs.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    got = kvscope.kv_math("qwen2.5-3b", **kwargs)
    assert got == _cli_json(argv, capsys)
    assert json.loads(json.dumps(got)) == got  # plain JSON types, as the command prints them


def test_kv_math_of_a_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 320, "max_position_embeddings": 256, "torch_dtype": "float32"}))
    got = kvscope.kv_math(cfg, batch_size=3, seq=100)  # a checkpoint folder or config.json path
    assert got == _cli_json(["kv-math", "--model", str(cfg), "--batch-size", "3", "--seq", "100", "--json"], capsys)
    assert got["dtype"] == "float32" and got["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4 == 512


@pytest.mark.parametrize(("kwargs", "argv"), [
    ({"batch_size": 0}, ["--batch-size", "0"]),
    ({"batch_size": -3}, ["--batch-size", "-3"]),
    ({"batch_size": 1.5}, ["--batch-size", "1.5"]),
    ({"batch_size": 2**63}, ["--batch-size", str(2**63)]),
    ({"seq": 40000}, ["--seq", "40000"]),
    ({"gpu_mem_gb": -1.0}, ["--gpu-mem-gb", "-1.0"]),
    ({"gpu_mem_gb": float("inf")}, ["--gpu-mem-gb", "inf"]),
    ({"gpu_mem_gb": float("nan")}, ["--gpu-mem-gb", "nan"]),
    ({"reserve_gb": -0.5}, ["--reserve-gb", "-0.5"]),
    ({"rps": 3}, ["--rps", "3"]),
    ({"rps": 3, "latency_s": 0}, ["--rps", "3", "--latency-s", "0"]),
    ({"page_size": 0}, ["--page-size", "0"]),
    ({"kv_dtype": "int4"}, ["--kv-dtype", "int4"]),
    ({"dtype": "int8"}, ["--dtype", "int8"]),
])
def test_kv_math_errors_are_the_commands(kwargs: dict[str, Any], argv: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _api_error(kvscope.kv_math, "qwen2.5-3b", **kwargs) == _cli_error(
        ["kv-math", "--model", "qwen2.5-3b", *argv], capsys)


@pytest.mark.parametrize("model", ["no-such-preset", "-x", "", "/nonexistent/config.json"])
def test_kv_math_bad_model(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _api_error(kvscope.kv_math, model) == _cli_error(["kv-math", f"--model={model}"], capsys)


# ---- load_run ----------------------------------------------------------------------------------------------------
def test_load_run_returns_the_files_as_on_disk() -> None:
    r = kvscope.load_run(RUN_DIR)
    assert r.path == RUN_DIR
    for frame, name in ((r.timings, "timings"), (r.summary, "summary"), (r.nvml, "nvml")):
        pd.testing.assert_frame_equal(frame, pd.read_parquet(RUN_DIR / f"{name}.parquet"))
    assert r.metadata == read_metadata(RUN_DIR / "summary.parquet")
    assert (len(r.timings), len(r.summary), len(r.nvml)) == (229, 1, 27)
    assert repr(r) == (f"Run(path={str(RUN_DIR)!r}, timings=<229 rows>, summary=<1 rows>, nvml=<27 rows>, "
                       f"metadata=<{len(r.metadata)} keys>)")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.summary = pd.DataFrame()  # type: ignore[misc]


def test_load_run_of_an_nsys_folder_and_without_nvml(tmp_path: Path) -> None:
    nsys_out = tmp_path / "nsys-out"
    shutil.copytree(RUN_DIR, nsys_out / "run")
    (nsys_out / "run" / "nvml.parquet").unlink()
    r = kvscope.load_run(str(nsys_out))
    assert r.path == nsys_out / "run" and r.nvml is None
    pd.testing.assert_frame_equal(r.summary, kvscope.load_run(RUN_DIR).summary)


def test_load_run_errors(tmp_path: Path) -> None:
    def message(path: object) -> str:
        with pytest.raises(KvscopeError) as info:
            kvscope.load_run(path)  # type: ignore[arg-type]
        return str(info.value)

    assert message(tmp_path / "absent") == f"{tmp_path / 'absent'} is not a folder"
    assert message(tmp_path) == (f"{tmp_path} is not a kvscope run folder (no summary.parquet in it or in its run/ "
                                 "subfolder)")
    assert message("") == "load_run: path must not be empty, got ''"
    assert message(3) == "load_run: path must be a path (str or os.PathLike), got int"
    only_summary = tmp_path / "half"
    only_summary.mkdir()
    shutil.copy(RUN_DIR / "summary.parquet", only_summary)
    assert message(only_summary) == f"{only_summary / 'timings.parquet'} is missing"
    (only_summary / "timings.parquet").write_bytes(b"PAR1 not really")
    assert message(only_summary).startswith(f"cannot read {only_summary / 'timings.parquet'} (")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(foreign / "summary.parquet")
    shutil.copy(RUN_DIR / "timings.parquet", foreign)
    assert message(foreign) == (f"{foreign / 'summary.parquet'} lacks column(s) run_id, model, device, dtype, attn, "
                                "granularity, batch, seq_len, gen_tokens, reps, warmup (not a kvscope summary, or a "
                                "damaged one)")  # the message of `kvscope report`
    pd.read_parquet(RUN_DIR / "summary.parquet").to_parquet(foreign / "summary.parquet")  # pandas keeps no metadata
    assert message(foreign) == f"{foreign / 'summary.parquet'} has no kvscope metadata (not written by kvscope run)"


# ---- load_export, project, align -----------------------------------------------------------------------------------
def test_load_export_reads_sqlite_and_parquetdir_alike() -> None:
    sql, pq_dir = kvscope.load_export(NSYS / "tiny.sqlite"), kvscope.load_export(str(NSYS / "tiny.parquetdir"))
    assert (len(sql.ranges), len(sql.calls), len(sql.gpu_ops)) == (len(pq_dir.ranges), len(pq_dir.calls),
                                                                   len(pq_dir.gpu_ops))
    assert set(sql.ranges["domain"]) == {"kvscope"}
    with pytest.raises(KvscopeError, match=r"absent\.sqlite"):
        kvscope.load_export(NSYS / "absent.sqlite")


def test_project_equals_the_commands_ranges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "align"
    assert main(["align", str(NSYS / "tiny.sqlite"), "--out", str(out)]) == 0
    capsys.readouterr()
    expected = pd.read_parquet(out / "ranges.parquet")
    for i, export in enumerate((NSYS / "tiny.sqlite", kvscope.load_export(NSYS / "tiny.sqlite"))):
        write_parquet(kvscope.project(export), tmp_path / f"{i}.parquet", {})  # the command's writer
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{i}.parquet"), expected)


def test_project_a_foreign_export_against_nsys() -> None:
    """plain.sqlite (not a kvscope run: two threads, a named domain): every range, projected as nsys projects it."""
    p = kvscope.project(FOREIGN / "plain.sqlite")
    ref = pd.read_csv(FOREIGN / "plain_nvtx_gpu_proj_trace.csv")
    assert len(p) == 8 and sorted(set(p["domain"].fillna(""))) == ["", "myengine"]
    assert len(p["tid"].unique()) == 2
    with_gpu = p.dropna(subset=["gpu_start_ns"])
    assert sorted(with_gpu["gpu_start_ns"].astype(int)) == sorted(ref["Projected Start (ns)"].astype(int))


def _align_cli(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, pd.DataFrame]:
    """The tables `kvscope align ... --out OUT` writes (its Parquet files), by file name; class_roofline.parquet left
    out (the command's alone: the API's `align` has no model)."""
    assert main(["align", *argv, "--out", str(out)]) == 0
    capsys.readouterr()
    return {p.name: pd.read_parquet(p) for p in sorted(out.glob("*.parquet")) if p.name != CLASS_ROOFLINE_FILE}


def _same_tables(result: Any, written: dict[str, pd.DataFrame], tmp: Path) -> None:
    """The API's tables are the command's: the same files, and each table, through the same Parquet writer, equal to
    the command's file (the writer is where missing values and empty categories take their on-disk form)."""
    tables = result.tables()
    assert sorted(tables) == sorted(written)
    tmp.mkdir()
    for name, frame in written.items():
        write_parquet(tables[name], tmp / name, {})
        pd.testing.assert_frame_equal(pd.read_parquet(tmp / name), frame, obj=name)


@pytest.mark.parametrize(("export", "run"), [("tiny.sqlite", "tiny-run"), ("qwen25-05b.sqlite", "qwen25-05b-run"),
                                             ("tiny.parquetdir", None)])
def test_align_equals_the_commands_tables(export: str, run: str | None, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(NSYS / export)] + (["--timings", str(NSYS / run)] if run else [])
    written = _align_cli(argv, tmp_path / "align", capsys)
    assert set(ALIGN_OUTPUT_FILES) - {CLASS_ROOFLINE_FILE} <= set(written)  # a kvscope run: every table
    result = kvscope.align(NSYS / export, NSYS / run if run else None)
    _same_tables(result, written, tmp_path / "api")
    assert (result.ranges is not None and result.kernels is not None and result.regions is not None
            and result.steps is not None and result.classes is not None and result.skipped is None)
    if run:  # a loaded Run, or a loaded export, stands for its file
        by_run = kvscope.align(kvscope.load_export(str(NSYS / export)), kvscope.load_run(NSYS / run))
        _same_tables(by_run, written, tmp_path / "by-run")


@pytest.mark.parametrize(("export", "kwargs", "argv"), [
    ("plain.sqlite", {}, []),
    ("plain.sqlite", {"domain": "myengine"}, ["--domain", "myengine"]),
    ("plain.sqlite", {"domain": ""}, ["--domain="]),
    ("plain.sqlite", {"range_re": r"iter \d", "start_ns": 4_300_000_000}, ["--range", r"iter \d", "--start", "4.3s"]),
    ("multiproc.sqlite", {"pid": 1094}, ["--pid", "1094"]),
    ("multiproc.sqlite", {"pid": 1094, "end_ns": 7_100_000_000}, ["--pid", "1094", "--end", "7100000000"]),
    ("hf.sqlite", {"phase_map": {"decode": "^generate"}}, ["--phase-map", "decode=^generate"]),
    ("hf.sqlite", {"phase_map": "prefill=^generate 0$,decode=^generate 1$"},
     ["--phase-map", "prefill=^generate 0$,decode=^generate 1$"]),
])
def test_align_filters_and_phase_map_are_the_commands(export: str, kwargs: dict[str, Any], argv: list[str],
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = _align_cli([str(FOREIGN / export), *argv], tmp_path / "align", capsys)
    result = kvscope.align(FOREIGN / export, **kwargs)
    _same_tables(result, written, tmp_path / "api")
    assert (result.steps is None) == (result.classes is None) == ("phase_map" not in kwargs)
    assert result.regions is None and result.skipped is not None  # not a kvscope run: no align.parquet


def test_align_classes_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "classes.json"
    rules.write_text(json.dumps({"rule": [{"class": "attention", "pattern": "gemv"}]}))
    written = _align_cli([str(NSYS / "tiny.sqlite"), "--classes", str(rules)], tmp_path / "align", capsys)
    _same_tables(kvscope.align(NSYS / "tiny.sqlite", classes=rules), written, tmp_path / "api")


def test_align_errors_are_the_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases: list[tuple[Path, dict[str, Any], list[str]]] = [
        (NSYS / "tiny.sqlite", {"timings": tmp_path}, ["--timings", str(tmp_path)]),
        (tmp_path / "absent.sqlite", {}, []),
        (FOREIGN / "plain.sqlite", {"timings": NSYS / "tiny-run"}, ["--timings", str(NSYS / "tiny-run")]),
        (FOREIGN / "plain.sqlite", {"range_re": "("}, ["--range", "("]),
        (FOREIGN / "plain.sqlite", {"phase_map": "stage=x"}, ["--phase-map", "stage=x"]),
        (FOREIGN / "nokernels.sqlite", {"phase_map": "prefill="}, ["--phase-map", "prefill="]),
    ]
    for export, kwargs, argv in cases:
        cli = _cli_error(["align", str(export), "--out", str(tmp_path / "out"), *argv], capsys)
        assert _api_error(kvscope.align, export, **kwargs) == cli, (kwargs, cli)
    assert _api_error(kvscope.align, "") == "kvscope: error: align: export must not be empty, got ''"
    assert _api_error(kvscope.align, NSYS / "tiny.sqlite", 3) == (
        "kvscope: error: align: timings must be a path (str or os.PathLike) or a Run, a DataFrame or None, got int")
    assert not (tmp_path / "out").exists()


class _BytesPath:
    """An os.PathLike whose path is bytes (os.fspath gives b"..."): no command-line path."""

    def __fspath__(self) -> bytes:
        return b"runs/x"


@pytest.mark.parametrize(("function", "kwargs", "message"), [
    ("run", {"out": b"runs/x"}, "run: out must be a path (str or os.PathLike) or None, got bytes"),
    ("run", {"out": _BytesPath()}, "run: out must be a path (str or os.PathLike) or None, got bytes"),
    ("run", {"model": b"tiny"}, "run: model must be a path (str or os.PathLike) or None, got bytes"),
    ("run", {"batch_size": None}, "run: batch_size must be an integer, got None"),
    ("run", {"seq": [16]}, "run: seq must be an integer, got list"),
    ("run", {"device": ["cpu"]}, "run: device must be a str or None, got list"),
    ("run", {"granularity": None}, "run: granularity must be a str, got None"),
    ("run", {"nvml_interval_ms": b"20"}, "run: nvml_interval_ms must be a number, got bytes"),
    ("kv_math", {"model": None}, "kv_math: model must be a path (str or os.PathLike), got None"),
    ("kv_math", {"page_size": b"16"}, "kv_math: page_size must be an integer or None, got bytes"),
    ("kv_math", {"reserve_gb": None}, "kv_math: reserve_gb must be a number, got None"),
    ("kv_math", {"kv_dtype": 8}, "kv_math: kv_dtype must be a str or None, got int"),
    ("load_run", {"path": b"runs/x"}, "load_run: path must be a path (str or os.PathLike), got bytes"),
    ("load_export", {"path": NSYS / "tiny.sqlite", "nsys": 5},
     "load_export: nsys must be a path (str or os.PathLike) or None, got int"),
    ("project", {"export": 5},
     "project: export must be a path (str or os.PathLike) or a loaded export (kvscope.load_export), got int"),
    ("project", {"export": NSYS / "tiny.sqlite", "nsys": b"nsys"},
     "project: nsys must be a path (str or os.PathLike) or None, got bytes"),
    ("align", {"timings": b"runs/x"},
     "align: timings must be a path (str or os.PathLike) or a Run, a DataFrame or None, got bytes"),
    # the filters', the phase map's and the classes' types are checked by the analysis, with the command's messages
    ("align", {"phase_map": {"decode": 5}}, "--phase-map: decode= must be a regular expression (text), got int 5"),
    ("align", {"domain": 5}, "--domain must be text (an NVTX domain's name), got int 5"),
    ("align", {"classes": b"classes.toml"}, "--classes must be a rules file (a path) or loaded rules "
                                            "(kernel_classes.load_rules), got bytes b'classes.toml'"),
])
def test_arguments_of_no_flag_type_are_refused(function: str, kwargs: dict[str, Any], message: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A value that is neither its flag's type nor its text (bytes, a list, None for a flag with a default) is refused
    by its argument's name before anything is read or written (`out=b"..."` made a folder named `b'...'`)."""
    monkeypatch.chdir(tmp_path)
    fn = getattr(kvscope, function)
    bases: dict[str, dict[str, Any]] = {
        "run": {"model": "tiny", "device": "cpu", "seq": 8, "gen_tokens": 2, "warmup": 0, "reps": 1, "out": "runs/r"},
        "kv_math": {"model": "qwen2.5-3b"}, "align": {"export": NSYS / "tiny.sqlite"}}
    base = bases.get(function, {})
    assert _api_error(fn, **{**base, **kwargs}) == f"kvscope: error: {message}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("change", "message"), [
    (lambda e: setattr(e, "ranges", e.ranges.rename(columns={"start_ns": "begin"})),
     "export.ranges lacks column(s) start_ns (changed after load_export?)"),
    (lambda e: setattr(e, "gpu_ops", e.gpu_ops.drop(columns=["corr", "stream"])),
     "export.gpu_ops lacks column(s) stream, corr (changed after load_export?)"),
    (lambda e: setattr(e, "calls", e.calls.astype({"start_ns": "float64"})),
     "export.calls column start_ns holds float64 values, not whole numbers (changed after load_export?)"),
    (lambda e: setattr(e, "ranges", e.ranges.assign(pid=e.ranges["pid"].astype("Int64").where(e.ranges.index != 3))),
     "export.ranges column pid holds Int64 values with gaps, not whole numbers (changed after load_export?)"),
    (lambda e: setattr(e, "calls", None), "export.calls must be a DataFrame (as load_export made it), got None"),
])
def test_a_changed_export_is_refused(change: Any, message: str) -> None:
    exp = kvscope.load_export(NSYS / "tiny.sqlite")
    change(exp)
    for function in ("project", "align"):
        assert _api_error(getattr(kvscope, function), exp) == f"kvscope: error: {function}: {message}"


def test_a_timings_table_gets_the_commands_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A DataFrame given as timings is checked as `--timings` checks its file, with the same message but for the
    name."""
    t = pd.read_parquet(NSYS / "tiny-run" / "timings.parquet")
    for change in (lambda d: d.drop(columns=["dur_ms", "rep"]),
                   lambda d: d.astype({"dur_ms": str}).assign(dur_ms=lambda x: x["dur_ms"].where(x.index != 2, "?")),
                   lambda d: d.assign(start_ms=d["start_ms"].where(d.index != 5))):
        run = tmp_path / "run"
        shutil.copytree(NSYS / "tiny-run", run, dirs_exist_ok=True)
        write_parquet(change(t), run / "timings.parquet", read_metadata(NSYS / "tiny-run" / "timings.parquet"))
        cli = _cli_error(["align", str(NSYS / "tiny.sqlite"), "--timings", str(run), "--out", str(tmp_path / "o")],
                         capsys)
        api = _api_error(kvscope.align, NSYS / "tiny.sqlite", change(t))
        assert api == cli.replace(str(run / "timings.parquet"), "the timings DataFrame")
        assert api.startswith("kvscope: error: the timings DataFrame")


def test_align_of_a_tensor_parallel_run_is_the_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Timings with a `rank` column: each rank aligned with its own rows as `kvscope align --timings` does (they were
    joined with every rank's ranges at once), and the filters refused as the command refuses them."""
    from analysis.align.test_ranks import _two_rank_run

    export, run_dir = _two_rank_run(tmp_path)
    written = _align_cli([str(export), "--timings", str(run_dir)], tmp_path / "align", capsys)
    result = kvscope.align(export, run_dir)
    assert sorted(result.regions["rank"].unique()) == [0, 1] and len(result.regions) == 10
    _same_tables(result, {k: v for k, v in written.items() if not k.startswith("rank")}, tmp_path / "api")
    table = pd.read_parquet(run_dir / "timings.parquet")
    _same_tables(kvscope.align(export, table), {k: v for k, v in written.items() if not k.startswith("rank")},
                 tmp_path / "api-table")
    cli = _cli_error(["align", str(export), "--timings", str(run_dir), "--pid", "22", "--out", str(tmp_path / "x")],
                     capsys)
    assert _api_error(kvscope.align, export, run_dir, pid=22) == cli
    assert _api_error(kvscope.align, export, table, domain="kvscope", start_ns=0) == (
        "kvscope: error: align: --domain, --start cannot be combined with the timings of a tensor-parallel run (the "
        "timings DataFrame: one process per rank, each aligned whole)")


# ---- run ---------------------------------------------------------------------------------------------------------
def test_run_writes_what_the_command_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *TINY_RUN, "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    r = kvscope.run("tiny", device="cpu", seq=16, gen_tokens=4, warmup=1, reps=2, out=tmp_path / "api")
    assert capsys.readouterr() == ("", "")  # quiet: nothing printed
    cli = kvscope.load_run(tmp_path / "cli")
    assert r.path == tmp_path / "api"
    assert sorted(p.name for p in r.path.iterdir()) == sorted(p.name for p in cli.path.iterdir()) == [
        "summary.parquet", "timings.parquet", "trace.json"]
    pd.testing.assert_frame_equal(r.summary, pd.read_parquet(r.path / "summary.parquet"))
    assert r.nvml is None and cli.nvml is None
    assert list(r.summary.columns) == list(cli.summary.columns)
    assert list(r.timings.columns) == list(cli.timings.columns)
    assert list(r.timings.dtypes) == list(cli.timings.dtypes)
    keys = ["level", "phase", "name", "rep", "step", "batch", "seq_len", "gen_tokens"]
    pd.testing.assert_frame_equal(r.timings[keys], cli.timings[keys])
    assert len(r.timings) == 1 + 2 * (1 + 2 + 3)  # the run; per rep: the rep, its two phases, its 3 decode steps
    same = ["batch", "seq_len", "gen_tokens", "decode_steps", "reps", "warmup", "model", "dtype", "attn",
            "granularity", "device", "cuda_graphs", "kernels", "clock", "kv_cache_bytes", "kv_predicted_bytes",
            "weights_bytes"]
    pd.testing.assert_frame_equal(r.summary[same], cli.summary[same])
    spec = {k: v for k, v in r.metadata["run"].items() if k != "out"}
    assert spec == {k: v for k, v in cli.metadata["run"].items() if k != "out"}
    assert r.metadata["run"]["out"] == str(tmp_path / "api")


def test_run_switches_map_to_the_spec(tmp_path: Path) -> None:
    r = kvscope.run("tiny", device="cpu", seq=8, gen_tokens=2, warmup=0, reps=1, graphs=False, kernels=False,
                    nvtx=True, granularity="layer", out=str(tmp_path / "r"))
    spec = r.metadata["run"]
    assert (spec["graphs"], spec["kernels"], spec["nvtx"], spec["granularity"]) == (False, False, True, "layer")
    assert r.metadata["nvtx"]["requested"] is True
    assert set(r.timings["level"]) == {"run", "rep", "phase", "step", "layer"}


@pytest.mark.parametrize(("kwargs", "argv"), [
    ({"batch_size": 0}, ["--batch-size", "0"]),
    ({"seq": 3000}, ["--seq", "3000"]),
    ({"seq": 2040, "gen_tokens": 16}, ["--seq", "2040", "--gen-tokens", "16"]),
    ({"seq": "x"}, ["--seq", "x"]),
    ({"reps": True}, ["--reps", "True"]),
    ({"warmup": -1}, ["--warmup", "-1"]),
    ({"granularity": "kernel"}, ["--granularity", "kernel"]),
    ({"attn": "bogus"}, ["--attn", "bogus"]),
    ({"dtype": "int8"}, ["--dtype", "int8"]),
    ({"device": "tpu"}, ["--device", "tpu"]),
    ({"seed": -1}, ["--seed", "-1"]),
    ({"nvml_interval_ms": float("inf")}, ["--nvml-interval-ms", "inf"]),
    ({"model": "no-such-preset"}, ["--model", "no-such-preset"]),
    ({"graphs": True}, ["--graphs", "on"]),
    ({"kernels": True}, ["--kernels", "on"]),
])
def test_run_errors_are_the_commands(kwargs: dict[str, Any], argv: list[str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    base = {"model": "tiny", "device": "cpu", **kwargs}
    api = _api_error(kvscope.run, **base, out=tmp_path / "api")
    cli_argv = ["run", "--model", str(base["model"]), "--device", str(base["device"]), *argv]
    assert api == _cli_error([*cli_argv, "--out", str(tmp_path / "api")], capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_run_refuses_a_filled_folder_and_odd_switches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    filled = tmp_path / "filled"
    filled.mkdir()
    (filled / "x").write_text("x")
    assert _api_error(kvscope.run, "tiny", device="cpu", out=filled) == _cli_error(
        ["run", "--model", "tiny", "--device", "cpu", "--out", str(filled)], capsys)
    assert _api_error(kvscope.run, "tiny", out="") == "kvscope: error: run: argument --out: must not be empty, got ''"
    for name in ("graphs", "kernels", "nvtx"):
        assert _api_error(kvscope.run, "tiny", device="cpu", **{name: "on"}) == (
            f"kvscope: error: run: {name} must be True, False or None, got 'on'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filled"]


def test_run_takes_the_engine_and_prefill_graphs(tmp_path: Path) -> None:
    """`kvscope.run(engine=...)` runs transformers' loop as `--engine` does; prefill graphs on a CPU are refused as the
    flag is; the attention is left to the plan (sdpa on a CPU), not fixed by the API."""
    r = kvscope.run("tiny", seq=8, gen_tokens=3, warmup=1, reps=1, device="cpu", engine="transformers",
                    out=tmp_path / "hf")
    assert r.metadata["engine"] == "transformers"
    assert r.metadata["run"]["attn"] == "sdpa"
    assert set(r.summary["engine"]) == {"transformers"}
    with pytest.raises(KvscopeError, match="prefill"):
        kvscope.run("tiny", seq=8, gen_tokens=3, warmup=1, reps=1, device="cpu", prefill_graphs=True,
                    out=tmp_path / "pg")
    assert not (tmp_path / "pg").exists()
    with pytest.raises(KvscopeError, match="run: prefill_graphs must be True, False or None"):
        kvscope.run("tiny", prefill_graphs="on", out=tmp_path / "bad")  # type: ignore[arg-type]


def test_class_roofline_equals_the_commands_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kvscope.class_roofline(kvscope.align(...), timings=run)` is `kvscope align`'s class_roofline.parquet; without
    a model it says why there is none, as the command's skip line does."""
    export, run = NSYS / "qwen25-05b.sqlite", NSYS / "qwen25-05b-run"
    out = tmp_path / "align"
    assert main(["align", str(export), "--timings", str(run), "--ceilings", "2800,760", "--out", str(out)]) == 0
    capsys.readouterr()
    written = pd.read_parquet(out / "class_roofline.parquet")
    result = kvscope.align(export, run)
    got = kvscope.class_roofline(result, timings=run, ceilings="2800,760")
    pd.testing.assert_frame_equal(got.reset_index(drop=True), written.reset_index(drop=True))
    by_model = kvscope.class_roofline(result, "qwen2.5-0.5b", ceilings="2800,760")
    pd.testing.assert_frame_equal(by_model.reset_index(drop=True), written.reset_index(drop=True))
    with pytest.raises(KvscopeError, match=r"^align: skipped class_roofline.parquet: no model|no model"):
        kvscope.class_roofline(result)
    with pytest.raises(KvscopeError, match="result must be an AlignResult"):
        kvscope.class_roofline(str(export))  # type: ignore[arg-type]
