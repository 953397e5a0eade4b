"""A tiny `kvscope run` on the CPU, read back from its files and checked exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_run import tiny_run

from kvscope.cli import main
from kvscope.errors import KvscopeError
from kvscope.io import read_metadata
from kvscope.model.config import PRESETS

REPS, GEN, SEQ, BATCH = 3, 6, 12, 2
OPS = {"norm", "qkv", "rope", "kv_write", "attn", "o_proj", "mlp"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny-op"
    rc = main(["run", "--model", "tiny", "--device", "cpu", "--batch-size", str(BATCH), "--seq", str(SEQ),
               "--gen-tokens", str(GEN), "--warmup", "1", "--reps", str(REPS), "--granularity", "op",
               "--out", str(out)])
    assert rc == 0
    return out


def test_files(run_dir: Path) -> None:
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.parquet", "timings.parquet", "trace.json"]
    assert not list(run_dir.parent.glob(".*partial*"))


def test_reps_steps_layers_and_ops(run_dir: Path) -> None:
    t = pd.read_parquet(run_dir / "timings.parquet")
    n_layers = PRESETS["tiny"].n_layers
    assert (t["level"] == "run").sum() == 1
    assert sorted(t.loc[t["level"] == "rep", "rep"]) == list(range(REPS))
    steps = t[t["level"] == "step"]
    assert len(steps) == REPS * (GEN - 1)
    assert sorted(set(steps["step"])) == list(range(1, GEN))
    assert steps["name"].tolist()[: GEN - 1] == [f"decode step {i}" for i in range(1, GEN)]
    assert (steps["context_len"] == SEQ + steps["step"]).all()
    assert ((t["level"] == "phase") & (t["phase"] == "prefill")).sum() == REPS
    assert ((t["level"] == "phase") & (t["phase"] == "decode")).sum() == REPS
    # one row per (rep, phase/step, layer, op)
    ops = t[t["level"] == "op"]
    per_unit = REPS * GEN  # prefill + GEN-1 decode steps, per rep
    assert len(ops) == per_unit * n_layers * len(OPS)
    assert set(ops["op"]) == OPS
    assert not ops.duplicated(["rep", "phase", "step", "layer", "op"]).any()
    assert (ops["name"] == ops.apply(lambda r: f"L{r.layer:02d}.{r.op}", axis=1)).all()
    layers = t[(t["level"] == "layer") & t["layer"].notna()]
    assert len(layers) == per_unit * n_layers
    named = t[(t["level"] == "layer") & t["layer"].isna()]
    assert sorted(named["name"].unique()) == ["embed", "lm_head", "sample"]
    assert len(named) == per_unit * 3
    assert (t["clock"] == "host").all()


def test_nesting_sums(run_dir: Path) -> None:
    t = pd.read_parquet(run_dir / "timings.parquet")
    steps = t[t["level"] == "step"].set_index(["rep", "step"])["dur_ms"]
    layers = t[(t["level"] == "layer") & (t["phase"] == "decode")].groupby(["rep", "step"])["dur_ms"].sum()
    assert (layers <= steps.loc[layers.index]).all()
    ops = t[(t["level"] == "op")].groupby(["rep", "phase", "step", "layer"])["dur_ms"].sum()
    lay = t[(t["level"] == "layer") & t["layer"].notna()].set_index(["rep", "phase", "step", "layer"])["dur_ms"]
    assert (ops <= lay.loc[ops.index]).all()
    # children start inside their parents
    for (rep, step), row in t[t["level"] == "step"].set_index(["rep", "step"]).iterrows():
        kids = t[(t["rep"] == rep) & (t["step"] == step) & (t["level"] == "layer")]
        assert (kids["start_ms"] >= row["start_ms"]).all()
        assert (kids["start_ms"] + kids["dur_ms"] <= row["start_ms"] + row["dur_ms"] + 1e-6).all()


def test_summary_medians_equal_recomputed(run_dir: Path) -> None:
    t = pd.read_parquet(run_dir / "timings.parquet")
    s = pd.read_parquet(run_dir / "summary.parquet")
    assert len(s) == 1
    row = s.iloc[0]
    assert list(s.columns[:10]) == ["seq_len", "batch", "prefill_p50_ms", "prefill_ms_per_tok", "prefill_tok_s",
                                    "decode_p50_ms_per_tok", "decode_tok_s", "total_tok_s", "vram_reserved_mb",
                                    "flag"]
    prefill = t[(t["level"] == "phase") & (t["phase"] == "prefill")]["dur_ms"]
    steps = t[t["level"] == "step"]["dur_ms"]
    assert row["prefill_p50_ms"] == np.median(prefill)
    assert row["decode_p50_ms_per_tok"] == np.median(steps)
    assert np.isnan(row["tpot_p99_ms"])  # 15 samples: a p90, no p99
    assert row["tpot_p90_ms"] == np.percentile(steps, 90)
    assert row["tpot_samples"] == len(steps) == 15
    assert row["tpot_q1_ms"] == np.percentile(steps, 25) and row["tpot_q3_ms"] == np.percentile(steps, 75)
    assert row["prefill_tok_s"] == pytest.approx(BATCH * SEQ / (np.median(prefill) / 1e3), rel=1e-12)
    assert row["decode_tok_s"] == pytest.approx(BATCH / (np.median(steps) / 1e3), rel=1e-12)
    assert (row["seq_len"], row["batch"], row["gen_tokens"], row["decode_steps"], row["reps"]) == (
        SEQ, BATCH, GEN, GEN - 1, REPS)
    a = PRESETS["tiny"]
    assert row["kv_cache_bytes"] == a.n_layers * 2 * BATCH * a.n_kv_heads * (SEQ + GEN) * a.head_dim * 4
    assert row["kv_alloc_bytes"] == row["kv_cache_bytes"]
    assert row["weights_bytes"] == a.param_count() * 4
    assert row["flag"] == ""
    assert not row["cuda_graphs"] and not row["kernels"]  # CPU: the eager loop, torch operations


def test_metadata_parses(run_dir: Path) -> None:
    for name in ("timings.parquet", "summary.parquet"):
        meta = read_metadata(run_dir / name)
        assert meta["model"]["args"]["name"] == "tiny"
        assert meta["run"]["granularity"] == "op" and meta["run"]["reps"] == REPS
        assert meta["clock"] == "host" and meta["device"] == "cpu"
        assert meta["nvml"]["available"] is False and meta["nvml"]["reason"]
        assert len(meta["host_decode_ms"]) == REPS
        assert meta["kvscope_version"] and meta["torch"]
        assert meta["cuda_graphs"] is False and meta["kernels"] is False and meta["graph_region_timing"] is None


def test_chrome_trace_loads(run_dir: Path) -> None:
    trace = json.loads((run_dir / "trace.json").read_text())
    t = pd.read_parquet(run_dir / "timings.parquet")
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(t)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert {e["name"] for e in spans} == set(t["name"])
    assert json.loads(trace["otherData"]["kvscope"])["run"]["seq"] == SEQ


def test_granularity_phase_has_no_layer_rows(tmp_path: Path) -> None:
    out = tmp_path / "p"
    assert main(["run", "--model", "tiny", "--device", "cpu", "--seq", "8", "--gen-tokens", "3", "--warmup", "0",
                 "--reps", "2", "--granularity", "phase", "--out", str(out)]) == 0
    t = pd.read_parquet(out / "timings.parquet")
    assert sorted(t["level"].unique()) == ["phase", "rep", "run", "step"]
    assert len(t) == 1 + 2 * (1 + 2 + 2)


def test_granularity_none_writes_a_host_clock_summary(tmp_path: Path) -> None:
    out = tmp_path / "n"
    assert main(["run", "--model", "tiny", "--device", "cpu", "--seq", "8", "--gen-tokens", "3", "--warmup", "0",
                 "--reps", "2", "--granularity", "none", "--no-nvtx", "--out", str(out)]) == 0
    assert len(pd.read_parquet(out / "timings.parquet")) == 0
    s = pd.read_parquet(out / "summary.parquet").iloc[0]
    assert s["flag"] == "" and s["clock"] == "host" and s["decode_p50_ms_per_tok"] > 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--seq", "3000"], "--seq 3000 exceeds tiny's maximum context of 2048"),
    (["--seq", "2040", "--gen-tokens", "16"], "context of 2056 tokens exceeds tiny's maximum of 2048"),
    (["--granularity", "kernel"], "invalid choice: 'kernel'"),
    (["--reps", "0"], "--reps must be an integer >= 1"),
    (["--gen-tokens", "0"], "--gen-tokens must be an integer >= 1"),
])
def test_bad_run_input(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bad"
    rc = main(["run", "--model", "tiny", "--device", "cpu", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["run", "--model", "tiny", "--device", "cpu", "--out", str(blocker / "sub" / "run")])
    assert rc == 2 and "cannot be written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        import os

        if os.geteuid() == 0:
            pytest.skip("root can write into a read-only folder")
        rc = main(["run", "--model", "tiny", "--device", "cpu", "--out", str(locked / "run")])
        assert rc == 2
    finally:
        locked.chmod(0o700)


def test_existing_output_is_never_overwritten(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    rc = main(["run", "--model", "tiny", "--device", "cpu", "--out", str(run_dir)])
    assert rc == 2 and "already exists and is not empty" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_failure_mid_run_leaves_no_partial_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvscope.engine.plan import RunSpec
    from kvscope.measure import output as run_output
    from kvscope.measure.run import execute

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("simulated failure while writing")

    monkeypatch.setattr(run_output, "write_json", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        execute(RunSpec(model="tiny", device="cpu", seq=8, gen_tokens=2, warmup=0, reps=1,
                        out=str(tmp_path / "a" / "b")))
    assert list(tmp_path.iterdir()) == []


def test_sigterm_mid_run_leaves_no_partial_folder(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kvscope", "run", "--model", "tiny", "--device", "cpu", "--seq",
                             "64", "--gen-tokens", "64", "--reps", "100000", "--warmup", "0", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".killed.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert list(tmp_path.iterdir()) == []


def test_events_reserved_ahead_match_the_regions_of_a_rep(run_dir: Path) -> None:
    from kvscope.measure.run import regions_per_rep
    from kvscope.profiler.instrument import Instrument

    t = pd.read_parquet(run_dir / "timings.parquet")
    per_rep = t[t["rep"] == 1]
    assert len(per_rep) == regions_per_rep(Instrument("op", "cpu", nvtx=False), PRESETS["tiny"].n_layers, GEN)
    # with graphs, a decode step's layer and op regions are event nodes inside the graph: no pooled events
    pooled = per_rep[~((per_rep["phase"] == "decode") & per_rep["level"].isin(["layer", "op"]))]
    assert len(pooled) == regions_per_rep(Instrument("op", "cpu", nvtx=False), PRESETS["tiny"].n_layers, GEN,
                                          graphs=True)


def test_kv_prediction_matches_measured_allocation(run_dir: Path) -> None:
    s = pd.read_parquet(run_dir / "summary.parquet").iloc[0]
    assert s["kv_predicted_bytes"] == s["kv_cache_bytes"]
    assert abs(s["kv_alloc_bytes"] - s["kv_predicted_bytes"]) <= 0.01 * s["kv_predicted_bytes"]


def test_graphs_default_on_for_cuda_at_every_granularity() -> None:
    from kvscope.engine.plan import RunSpec, use_graphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing runs on them
    for g in ("none", "phase", "layer", "op"):
        assert use_graphs(RunSpec(granularity=g).graphs, cuda) is True
        assert use_graphs(RunSpec(granularity=g, graphs=False).graphs, cuda) is False
        assert use_graphs(RunSpec(granularity=g).graphs, cpu) is False
    with pytest.raises(KvscopeError, match="--graphs on needs a CUDA device"):
        use_graphs(RunSpec(graphs=True).graphs, cpu)


# ---- the summary says what it measured: the clock, two TTFT columns, percentiles only with enough samples ----
def test_granularity_none_reports_host_clock_not_nan(tmp_path: Path) -> None:
    s, t = tiny_run(tmp_path, "--reps", "3", "--granularity", "none")
    assert len(t) == 0
    assert s["clock"] == "host"
    for col in ("ttft_ms", "prefill_p50_ms", "decode_p50_ms_per_tok", "tpot_p50_ms", "decode_tok_s",
                "prefill_tok_s", "total_tok_s"):
        assert math.isfinite(s[col]) and s[col] > 0, col
    assert math.isnan(s["prefill_gpu_ms"])  # no events at granularity none
    meta = read_metadata(tmp_path / "r" / "summary.parquet")
    host_steps = np.asarray(meta["host_decode_ms"]) / 3  # 3 decode steps a repetition
    assert s["tpot_p50_ms"] == pytest.approx(np.median(host_steps), rel=1e-12)
    assert s["tpot_samples"] == 3 and s["ttft_samples"] == 3
    assert s["flag"] == ""


def test_two_ttft_columns_and_their_clocks(tmp_path: Path) -> None:
    s, t = tiny_run(tmp_path, "--reps", "4", "--granularity", "phase")
    meta = read_metadata(tmp_path / "r" / "summary.parquet")
    prefill = t[(t["level"] == "phase") & (t["phase"] == "prefill")]["dur_ms"]
    assert s["prefill_gpu_ms"] == np.median(prefill)  # the event (here: host-clock region) time
    assert s["prefill_p50_ms"] == s["prefill_gpu_ms"]  # the classic column stays the timed region
    ttft = np.asarray(meta["host_ttft_ms"])
    assert len(ttft) == 4 and s["ttft_ms"] == np.median(ttft)
    assert s["ttft_q1_ms"] == np.percentile(ttft, 25) and s["ttft_q3_ms"] == np.percentile(ttft, 75)
    # the host waits for the token: TTFT covers the timed prefill region
    assert (ttft >= prefill.to_numpy() - 1e-3).all()
    assert s["clock"] == "host"  # a CPU run: every region is on the host clock


@pytest.mark.parametrize(("reps", "p90", "p99"), [(5, False, False), (9, False, False), (10, True, False)])
def test_percentiles_only_with_enough_samples(tmp_path: Path, reps: int, p90: bool, p99: bool) -> None:
    s, t = tiny_run(tmp_path, "--reps", str(reps), "--granularity", "phase")
    assert s["ttft_samples"] == reps and s["prefill_gpu_samples"] == reps
    assert math.isfinite(s["ttft_p90_ms"]) is p90 and math.isfinite(s["ttft_p99_ms"]) is p99
    steps = t[t["level"] == "step"]["dur_ms"]
    assert s["tpot_samples"] == reps * 3
    assert math.isfinite(s["tpot_p90_ms"]) is (reps * 3 >= 10)
    assert math.isfinite(s["tpot_p99_ms"]) is (reps * 3 >= 100)
    if reps * 3 >= 10:
        assert s["tpot_p90_ms"] == np.percentile(steps, 90)
