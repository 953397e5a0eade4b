"""`kvscope nsys -- serve ...`: the arguments after `--` read as `kvscope serve`'s (one load, kvscope's run folder,
NVTX on), bad ones refused in one line with exit code 2 before nsys starts, and a served load on the CPU profiled
under a stand-in nsys (no GPU here) whose export is a small synthetic one with `iter 0` and `iter 1`: the serve run
folder in `run/`, the capture range and node-level graph tracing asked of nsys, the per-iteration tables beside the
alignment."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from cli_checks import fail

from kvscope.analysis.serving.iterations_nsys import (
    ITERATION_GPU_COLUMNS,
    ITERATION_GPU_FILE,
    ITERATION_KERNELS_FILE,
    nsys_kernel_classes,
)
from kvscope.cli import main, parse_args
from kvscope.schema import ITERATIONS_FILE, NSYS_RUN_SUBFOLDER, REQUESTS_FILE
from tests.synthetic_export import Synth

SMALL = ["--device", "cpu", "--model", "tiny", "--prompt-len", "uniform:4:24", "--output-len", "uniform:2:6", "--seed",
         "3", "--max-batch-tokens", "32", "--no-progress"]

# a stand-in nsys: `profile` records its arguments, runs the program (everything after `-f true`) and writes the
# report; `export` copies $FAKE_NSYS_EXPORT to its -o path
_FAKE_NSYS = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
if args[0] == "export":
    shutil.copy(os.environ["FAKE_NSYS_EXPORT"], args[args.index("-o") + 1])
    sys.exit(0)
with open(os.environ["FAKE_NSYS_LOG"], "w") as f:
    json.dump(args, f)
report = args[args.index("-o") + 1]
code = subprocess.run(args[args.index("-f") + 2:]).returncode
open(report + ".nsys-rep", "w").write("rep")
sys.exit(code)
"""


@pytest.mark.parametrize("after", [["serve"], ["kvscope", "serve"]])
def test_serve_arguments_are_parsed_as_serves(after: list[str]) -> None:
    ns = parse_args(["nsys", "--out", "x", "--", *after, "--rps", "2", "--requests", "4", "--policy", "prefill-first"])
    assert ns.serve is not None and ns.serve.command == "serve"
    assert ns.serve.rps == "2" and ns.serve.requests == 4 and ns.serve.policy == "prefill-first"
    assert ns.run is None and ns.command_args == [] and ns.out == "x"
    assert ns.run_args == ["--rps", "2", "--requests", "4", "--policy", "prefill-first"]


@pytest.mark.parametrize(("after", "mode"), [
    ([], "run"), (["--seq", "8"], "run"), (["kvscope", "run", "--seq", "8"], "run"),
    (["python3", "serve.py"], "command"), (["./serve"], "command"),
])
def test_other_arguments_keep_their_meaning(after: list[str], mode: str) -> None:
    ns = parse_args(["nsys", "--", *after])
    assert ns.serve is None
    assert (ns.run is not None) == (mode == "run") and bool(ns.command_args) == (mode == "command")


@pytest.mark.parametrize(("after", "message"), [
    (["serve", "--rps", "2", "--bogus"], "serve: unrecognized arguments: --bogus"),
    (["kvscope", "serve", "--concurrency", "2", "--seq", "8"], "serve: unrecognized arguments: --seq 8"),
    (["serve", "--rps"], "serve: argument --rps: expected one argument"),
    (["serve", "--rps", "2", "--policy", "fifo,chunked"], "nsys: profiles one served load: give one --policy"),
    (["serve", "--rps", "1,2"], "nsys: profiles one served load: give one --rps value, not '1,2'"),
    (["serve", "--concurrency", "2,4"], "give one --concurrency value"),
    (["serve", "--rps", "2", "--out", "elsewhere"], "nsys: give --out before --, not among the serve arguments"),
    (["serve", "--rps", "2", "--no-nvtx"], "nsys: needs NVTX ranges: drop --no-nvtx"),
])
def test_bad_serve_arguments_are_one_line(after: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    out = tmp_path / "n"
    line = fail(["nsys", "--nsys", sys.executable, "--out", str(out), "--", *after], capsys)
    assert message in line
    assert not out.exists()


def test_tp_is_refused_for_a_served_load(capsys: pytest.CaptureFixture[str]) -> None:
    assert "a served load runs on one device" in fail(["nsys", "--tp", "2", "--", "serve", "--rps", "2"], capsys)


def test_a_bad_load_is_refused_before_nsys_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked as `kvscope serve` checks it (here: no load given) before nsys runs: the stand-in is never called."""
    exe = tmp_path / "nsys"
    exe.write_text("#!/bin/sh\ntouch \"$0.ran\"\nexit 1\n")
    exe.chmod(0o755)
    line = fail(["nsys", "--nsys", str(exe), "--out", str(tmp_path / "n"), "--", "serve", *SMALL], capsys)
    assert "exactly one of --rps, --concurrency or --request-file" in line
    assert not (tmp_path / "nsys.ran").exists() and not (tmp_path / "n").exists()


def _export(path: Path) -> Path:
    """`iter 0` (one gemv kernel, 1 ms) and `iter 1` (one attention kernel, 0.5 ms) in the NVTX domain `kvscope`."""
    s = Synth()
    s.domain(5, 1, 1, "kvscope")
    s.range(5, 1, 1_000_000, 3_000_000, "iter 0", domain_id=1)
    s.launch(5, 1, 1_100_000, 1_200_000, 1, [(1_500_000, 2_500_000, 7)], kernel_name="kvscope_gemv_m4")
    s.range(5, 1, 4_000_000, 5_000_000, "iter 1", domain_id=1)
    s.launch(5, 1, 4_100_000, 4_200_000, 2, [(4_300_000, 4_800_000, 7)],
             kernel_name="kvscope_decode_attention_d128_g2")
    return s.write(path)


def test_a_served_load_is_profiled_with_its_iterations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    exe = tmp_path / "bin" / "nsys"
    exe.parent.mkdir()
    exe.write_text(_FAKE_NSYS)
    exe.chmod(0o755)
    log = tmp_path / "argv.json"
    monkeypatch.setenv("FAKE_NSYS_LOG", str(log))
    monkeypatch.setenv("FAKE_NSYS_EXPORT", str(_export(tmp_path / "synthetic.sqlite")))
    out = tmp_path / "n"
    rc = main(["nsys", "--nsys", str(exe), "--out", str(out), "--json", "--", "serve", "--rps", "50", "--requests",
               "4", *SMALL])
    captured = capsys.readouterr()
    stdout = captured.out
    assert rc == 0, captured.err
    argv = json.loads(log.read_text())
    at = argv.index("-f") + 2
    assert "--capture-range=cudaProfilerApi" in argv[:at] and "--capture-range-end=stop" in argv[:at]
    assert "--cuda-graph-trace=node" in argv[:at]
    program = argv[at:]
    assert program[:4] == [sys.executable, "-m", "kvscope", "serve"] and program[-2] == "--out"
    assert Path(program[-1]).name == NSYS_RUN_SUBFOLDER
    run = out / NSYS_RUN_SUBFOLDER
    assert (run / REQUESTS_FILE).is_file() and (run / ITERATIONS_FILE).is_file()
    gpu = pd.read_parquet(out / ITERATION_GPU_FILE)
    assert list(gpu.columns) == list(ITERATION_GPU_COLUMNS)
    assert gpu["iteration"].tolist() == [0, 1] and gpu["busy_ms"].tolist() == [1.0, 0.5]
    assert gpu["event_ms"].notna().all()  # the run's own iterations 0 and 1 (host-timed on the CPU)
    classes = nsys_kernel_classes(run)
    assert classes is not None
    assert {(int(r.iteration), r[1], float(r.ms)) for r in classes.itertuples(index=False)} == {
        (0, "gemm", 1.0), (1, "attention", 0.5)}
    assert (out / ITERATION_KERNELS_FILE).is_file() and "2 iterations captured" in stdout
    payload = json.loads(stdout.strip().splitlines()[-1])
    assert payload["serve_iterations"]["iterations"] == 2 and payload["profiled_exit_code"] == 0
