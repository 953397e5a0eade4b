"""`kvscope serve` on the CPU (tiny preset): a load's run folder and its records, a sweep, a request refused for the
pool, a stop by SIGINT in the middle of a load, and bad input in one line with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from cli_checks import fail

from kvscope.cli import main
from kvscope.schema import (
    BATCHES_FILE,
    ITERATIONS_FILE,
    LEDGER_FILE,
    REQUEST_COLUMNS,
    REQUESTS_FILE,
    SERVE_SWEEP_FILE,
    SUMMARY_FILE,
    TRACE_FILE,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--prompt-len", "uniform:4:24", "--output-len", "uniform:2:10", "--seed", "3"]


def test_serve_writes_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    rc = main(["serve", "--rps", "50", "--requests", "12", *SMALL, "--out", str(out), "--slo-ttft-ms", "1000",
               "--slo-tpot-ms", "500", "--max-batch-tokens", "32", "--json"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["serve_folder"] == str(out)
    for name in (REQUESTS_FILE, ITERATIONS_FILE, BATCHES_FILE, LEDGER_FILE, SUMMARY_FILE, TRACE_FILE):
        assert (out / name).is_file(), name
    req = pd.read_parquet(out / REQUESTS_FILE)
    assert list(req.columns) == list(REQUEST_COLUMNS)
    assert len(req) == 12 and (req["status"] == "finished").all()
    assert (req["generated_tokens"] == req["output_tokens"]).all()
    assert all(len(g) == n - 1 for g, n in zip(req["itl_ms"], req["generated_tokens"], strict=True))
    assert (req["ttft_ms"] >= req["queue_ms"]).all()
    batches = pd.read_parquet(out / BATCHES_FILE)
    # every prompt token and every output token but the last went through a forward exactly once (no preemption)
    per_req = batches.groupby("request_id")["tokens"].sum()
    assert (per_req.sort_index().to_numpy() == (req["prompt_tokens"] + req["generated_tokens"] - 1).to_numpy()).all()
    it = pd.read_parquet(out / ITERATIONS_FILE)
    assert (it.groupby("iteration")["tokens"].sum() <= 32).all()  # the token budget
    summary = pd.read_parquet(out / SUMMARY_FILE)
    assert int(summary["requests_finished"].iloc[0]) == 12


def test_prompt_longer_than_pool_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reqs = tmp_path / "r.csv"
    reqs.write_text("arrival_s,prompt_tokens,output_tokens\n0,8,4\n0.01,400,4\n0.02,6,3\n")
    out = tmp_path / "s"
    rc = main(["serve", "--request-file", str(reqs), "--out", str(out), "--kv-pool-gb", "0.0001",
               "--max-seq", "512"])
    assert rc == 0, capsys.readouterr().err
    req = pd.read_parquet(out / REQUESTS_FILE).set_index("request_id")
    assert req.loc[1, "status"] == "refused" and "blocks" in req.loc[1, "reason"]
    assert (req.loc[[0, 2], "status"] == "finished").all()


def test_sweep_over_rates_and_policies(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    rc = main(["serve", "--rps", "20,80", "--policy", "prefill-first,chunked", "--requests", "6", *SMALL,
               "--out", str(out)])
    assert rc == 0
    table = pd.read_parquet(out / SERVE_SWEEP_FILE)
    assert list(table["policy"]) == ["prefill-first", "prefill-first", "chunked", "chunked"]
    assert list(table["rps"]) == [20.0, 80.0, 20.0, 80.0]
    assert all((out / p / REQUESTS_FILE).is_file() for p in table["point"])


def test_sigint_mid_load_writes_finished(tmp_path: Path) -> None:
    out = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "kvscope", "serve", "--concurrency", "4", "--duration", "120",
                             "--prompt-len", "16", "--output-len", "400", "--max-seq", "512", "--out", str(out),
                             "--no-progress"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "s").exists() and time.time() < deadline:
        partial = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
        if partial:
            break
        time.sleep(0.2)
    time.sleep(3.0)  # the model is built and the load running
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    req = pd.read_parquet(out / REQUESTS_FILE)
    assert (req["status"] == "cut").any()
    assert "requests cut" in err


@pytest.mark.parametrize(("args", "needle"), [
    (["--rps", "0"], "--rps"), (["--rps", "nan"], "--rps"), (["--rps", "-2"], "--rps"), (["--rps", "inf"], "--rps"),
    (["--concurrency", "0"], "--concurrency"), (["--concurrency", "2.5"], "--concurrency"),
    (["--rps", "1", "--concurrency", "2"], "exactly one"), ([], "exactly one"),
    (["--rps", "1", "--block-size", "7"], "--block-size"), (["--rps", "1", "--policy", "fifo"], "--policy"),
    (["--rps", "1", "--prompt-len", "uniform:9:2"], "--prompt-len"), (["--rps", "1", "--max-seqs", "0"], "--max-seqs"),
    (["--rps", "1", "--attn", "sdpa"], "--attn"),
])
def test_bad_input_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
                            ) -> None:
    line = fail(["serve", "--requests", "2", "--out", str(tmp_path / "o"), *args], capsys)
    assert needle in line
    assert not (tmp_path / "o").exists()


def test_bad_request_file_names_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reqs = tmp_path / "r.csv"
    reqs.write_text("arrival_s,prompt_tokens,output_tokens\n0,8,4\n0.5,x,4\n")
    line = fail(["serve", "--request-file", str(reqs), "--out", str(tmp_path / "o")], capsys)
    assert "line 3" in line
