"""The analysis on real served loads: one made here on the CPU (`kvscope serve`, the tiny model, a dozen requests),
and the lead's fixture tests/data/serve_run/ where it exists. Identities that hold on any run: the summary the run
wrote is the one recomputed from its records, the exact time average of the requests in the system is their summed
time in it over the span, the requests' GPU shares sum back to the iterations, every gap is classed once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from paths import DATA

from kvscope.analysis.serving.interference import interference, itl_samples_by_iteration, step_samples
from kvscope.analysis.serving.records import ServeRun, find_serve_run, read_serve_run
from kvscope.analysis.serving.request_cost import request_gpu_cost
from kvscope.analysis.serving.summary import serve_summary
from kvscope.cli import main
from kvscope.schema import SUMMARY_FILE

FIXTURE = DATA / "serve_run"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "run"
    assert main(["serve", "--device", "cpu", "--model", "tiny", "--rps", "50", "--policy", "chunked", "--requests",
                 "12", "--prompt-len", "uniform:8:40", "--output-len", "uniform:3:8", "--max-batch-tokens", "32",
                 "--slo-ttft-ms", "500", "--slo-tpot-ms", "100", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(params=["cpu", "fixture"])
def run(request: pytest.FixtureRequest) -> ServeRun:
    if request.param == "fixture":
        folder = find_serve_run(FIXTURE) if FIXTURE.is_dir() else None
        if folder is None:
            pytest.skip("tests/data/serve_run/ is not there (yet)")
        return read_serve_run(folder)
    return read_serve_run(request.getfixturevalue("cpu_run"))


def test_the_written_summary_is_the_recomputed_one(run: ServeRun) -> None:
    if not (run.path / SUMMARY_FILE).exists():
        pytest.skip("no summary.parquet in the run folder")
    written = pd.read_parquet(run.path / SUMMARY_FILE)
    again = serve_summary(run.requests, run.iterations, run.metadata)
    pd.testing.assert_frame_equal(written[list(again.columns)], again, check_dtype=False)


def test_little_time_average_is_the_summed_time_in_system(run: ServeRun) -> None:
    row = serve_summary(run.requests, run.iterations, run.metadata).iloc[0]
    arrival, finish = run.requests["arrival_s"].to_numpy(float), run.requests["finish_s"].to_numpy(float)
    ok = np.isfinite(arrival) & np.isfinite(finish)
    assert row["mean_in_system"] == pytest.approx((finish[ok] - arrival[ok]).sum() / row["duration_s"], rel=1e-9)


def test_gpu_shares_sum_back(run: ServeRun) -> None:
    if "kv_bytes_per_token" not in run.serve:
        pytest.skip("the run's metadata has no KV bytes per token")
    cost = request_gpu_cost(run.batches, run.iterations, None, run.metadata, run.requests)
    carried = run.iterations[run.iterations["iteration"].isin(run.batches["iteration"])]
    assert cost["gpu_ms"].sum() == pytest.approx(carried["dur_ms"].sum(), rel=1e-12)
    assert cost.attrs["unassigned_ms"] == pytest.approx(run.iterations["dur_ms"].sum() - carried["dur_ms"].sum())
    done = cost[cost["iterations"] > 0]
    shares = done["own_gpu_share"] + done["others_gpu_share"] + done["idle_queue_share"]
    assert shares.dropna().to_numpy() == pytest.approx(np.ones(shares.notna().sum()))


def test_every_gap_classed_once(run: ServeRun) -> None:
    gaps = itl_samples_by_iteration(run.requests, run.iterations)
    expected = sum(len(g) for g in run.requests["itl_ms"] if g is not None)
    assert len(gaps) == expected
    table = interference(run.batches, run.iterations, run.requests, run.metadata)
    assert table["itl_n"].sum() == expected
    assert table["decode_tokens"].sum() == run.batches.loc[run.batches["kind"] == "decode", "tokens"].sum()
    assert len(step_samples(run.batches, run.iterations)) == (run.batches["kind"] == "decode").sum()


def test_report(run: ServeRun, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    assert main(["report", str(run.path), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Why" in md and (out / "serve_timeline.png").stat().st_size > 1000
