"""Issue 11, trust: a fresh install that works, a summary that says what it measured, NVML out of the process."""

from __future__ import annotations

import ast
import math
import os
import re
import stat
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kvscope.cli import main
from kvscope.errors import KvscopeError

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name where they differ
_DISTRIBUTION = {"pynvml": "nvidia-ml-py", "yaml": "pyyaml"}


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for path in (ROOT / "kvscope").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in stdlib and n not in ("kvscope", "__future__")}


def test_every_runtime_import_is_declared() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in deps}
    imported = _third_party_imports()
    assert "matplotlib" in imported  # the report's plots: the import that was missing
    missing = sorted(n for n in imported if _DISTRIBUTION.get(n, n).lower() not in declared)
    assert missing == [], f"imported by kvscope but not declared in pyproject.toml: {missing}"


def test_ci_runs_the_readme_test_command_in_a_fresh_venv() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    test_cmd = next(line for line in readme if "pytest" in line and line.startswith("./scripts/setup.sh"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    body = [line for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert body[-1] == test_cmd  # exactly the README's command, last
    venv = next(i for i, line in enumerate(body) if "-m venv" in line)
    assert "--system-site-packages" not in body[venv]
    activate = next(i for i, line in enumerate(body) if "bin/activate" in line)
    assert venv < activate < len(body) - 1
    assert os.stat(ROOT / ".ci" / "run").st_mode & stat.S_IXUSR


# ---- summary honesty ------------------------------------------------------------------------------------------
def _run(tmp_path: Path, *argv: str) -> tuple[pd.Series, pd.DataFrame]:
    out = tmp_path / "r"
    assert main(["run", "--model", "tiny", "--device", "cpu", "--seq", "8", "--gen-tokens", "4", "--warmup", "1",
                 "--no-nvtx", "--out", str(out), *argv]) == 0
    return pd.read_parquet(out / "summary.parquet").iloc[0], pd.read_parquet(out / "timings.parquet")


def test_granularity_none_reports_host_clock_not_nan(tmp_path: Path) -> None:
    from kvscope.io import read_metadata

    s, t = _run(tmp_path, "--reps", "3", "--granularity", "none")
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
    from kvscope.io import read_metadata

    s, t = _run(tmp_path, "--reps", "4", "--granularity", "phase")
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
    s, t = _run(tmp_path, "--reps", str(reps), "--granularity", "phase")
    assert s["ttft_samples"] == reps and s["prefill_gpu_samples"] == reps
    assert math.isfinite(s["ttft_p90_ms"]) is p90 and math.isfinite(s["ttft_p99_ms"]) is p99
    steps = t[t["level"] == "step"]["dur_ms"]
    assert s["tpot_samples"] == reps * 3
    assert math.isfinite(s["tpot_p90_ms"]) is (reps * 3 >= 10)
    assert math.isfinite(s["tpot_p99_ms"]) is (reps * 3 >= 100)
    if reps * 3 >= 10:
        assert s["tpot_p90_ms"] == np.percentile(steps, 90)


def test_percentile_gate_at_100_samples() -> None:
    from kvscope.analysis.summary import percentile

    assert math.isnan(percentile(list(range(99)), 99))
    assert percentile(list(range(100)), 99) == np.percentile(range(100), 99)
    assert percentile(list(range(10)), 90) == np.percentile(range(10), 90)
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 50) == 3.0


def test_spread_flag_marks_a_host_bound_phase() -> None:
    from kvscope.analysis.summary import SPREAD_FLAG_PCT, spread

    tight = spread([10.0, 10.1, 10.0, 9.9, 10.05])
    assert tight["iqr_pct"] < SPREAD_FLAG_PCT and not tight["wide"]
    wide = spread([10.0, 14.0, 20.0, 12.0, 25.0])
    assert wide["iqr_pct"] == pytest.approx((20.0 - 12.0) / 14.0 * 100)
    assert wide["wide"]
    assert math.isnan(spread([])["iqr_pct"]) and not spread([])["wide"]


def test_summary_table_shows_spread_and_samples(tmp_path: Path) -> None:
    from rich.console import Console

    from kvscope.commands.summary_table import summary_table

    s, _ = _run(tmp_path, "--reps", "3", "--granularity", "phase")
    console = Console(width=200, record=True)
    console.print(summary_table(pd.DataFrame([s])))
    text = console.export_text()
    assert "TTFT (host clock) p50 [q1, q3] (ms)" in text and "3 samples" in text  # brackets shown, not markup
    assert f"{s['ttft_q1_ms']:.3f}" in text and f"{s['ttft_q3_ms']:.3f}" in text


def test_cuda_needs_a_warmup() -> None:
    from kvscope.engine.plan import RunSpec, check_warmup

    check_warmup(RunSpec(warmup=0), torch.device("cpu"))  # nothing to compile or capture on the CPU
    check_warmup(RunSpec(warmup=1), torch.device("cuda"))
    with pytest.raises(KvscopeError, match="--warmup 0 on CUDA"):
        check_warmup(RunSpec(warmup=0), torch.device("cuda"))


# ---- NVML in a child process ----------------------------------------------------------------------------------
_FAKE_PYNVML = '''
"""A stand-in for nvidia-ml-py: a GPU whose utilisation rises 1 per query, buffered samples optional."""
import os, time

NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
NVML_TOTAL_POWER_SAMPLES, NVML_GPU_UTILIZATION_SAMPLES, NVML_MEMORY_UTILIZATION_SAMPLES = 0, 1, 2
NVML_PROCESSOR_CLK_SAMPLES, NVML_MEMORY_CLK_SAMPLES = 5, 6
NVML_VALUE_TYPE_DOUBLE, NVML_VALUE_TYPE_UNSIGNED_INT, NVML_VALUE_TYPE_UNSIGNED_LONG = 0, 1, 2
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, NVML_VALUE_TYPE_SIGNED_LONG_LONG = 3, 4
BUFFERED = os.environ.get("FAKE_NVML_BUFFERED") == "1"
_calls = {"n": 0}

class NVMLError(Exception):
    pass

class _U:
    gpu, memory = 0, 0

class _M:
    used = 3 * 2**30

class _V:
    def __init__(self, v): self.uiVal = v

class _S:
    def __init__(self, ts, v): self.timeStamp, self.sampleValue = ts, _V(v)

def nvmlInit():
    if os.environ.get("FAKE_NVML_FAIL"):
        raise NVMLError("Driver Not Loaded")
def nvmlDeviceGetHandleByUUID(uuid): return uuid
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetName(h): return b"Fake GPU"
def nvmlSystemGetDriverVersion(): return "999.1"
def nvmlDeviceGetUtilizationRates(h):
    _calls["n"] += 1
    u = _U(); u.gpu = _calls["n"] % 100; u.memory = 7; return u
def nvmlDeviceGetMemoryInfo(h): return _M()
def nvmlDeviceGetClockInfo(h, which): return 1980 if which == NVML_CLOCK_SM else 2619
def nvmlDeviceGetPowerUsage(h): return 123456
def nvmlDeviceGetTemperature(h, which): return 41
def nvmlDeviceGetCurrentClocksEventReasons(h): return 4
def nvmlDeviceGetSamples(h, sampling_type, last_us):
    if not BUFFERED:
        raise NVMLError("Not Supported")
    now_us = time.time_ns() // 1000
    # the driver keeps a sample every 10 ms (on a 10 ms grid) of the last 0.2 s
    stamps = [now_us - now_us % 10_000 - k * 10_000 for k in range(20)]
    value = {0: 250000, 1: 88, 2: 12, 5: 1755, 6: 2619}[sampling_type]
    return NVML_VALUE_TYPE_UNSIGNED_INT, [_S(t, value) for t in sorted(stamps) if t > last_us]
'''


@pytest.fixture
def fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lib = tmp_path / "fakelib"
    lib.mkdir()
    (lib / "pynvml.py").write_text(_FAKE_PYNVML)
    monkeypatch.setenv("PYTHONPATH", str(lib))
    props = type("Props", (), {"uuid": "fake-uuid"})()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _i: props)
    return lib


def _sample_for(seconds: float, interval_ms: float = 10.0):
    from kvscope.profiler.nvml import NvmlSampler

    threads = threading.active_count()
    s = NvmlSampler(torch.device("cuda"), interval_ms)
    assert s.child_pid is not None and s.child_pid != os.getpid()
    assert threading.active_count() == threads  # no thread in the measured process
    time.sleep(0.3)  # the child starts (model loading happens here in a run)
    origin = time.perf_counter_ns()
    s.start(origin)
    time.sleep(seconds)
    s.stop()
    return s, origin


def test_nvml_samples_come_from_a_child_process_polled(fake_gpu: Path) -> None:
    from kvscope.schema import NVML_COLUMNS as COLUMNS

    s, _ = _sample_for(0.4)
    assert s.available and s.reason == "" and s.mode == "polled"
    assert s.driver == "999.1"
    df = s.samples
    assert list(df.columns) == list(COLUMNS)
    assert 10 <= len(df) <= 60  # ~40 wake-ups of 10 ms inside a 0.4 s window
    assert df["t_ms"].is_monotonic_increasing and df["t_ms"].iloc[0] >= 0 and df["t_ms"].iloc[-1] <= 400 + 50
    assert (df["power_w"] == 123.456).all() and (df["sm_clock_mhz"] == 1980).all() and (df["temp_c"] == 41).all()
    assert (df["mem_used_mib"] == 3 * 1024).all() and (df["clock_event_reasons"] == 4).all()
    assert df["gpu_util_pct"].is_monotonic_increasing  # the fake's counter: every row is a fresh query
    meta = s.metadata()
    assert meta["process"] == "child" and meta["mode"] == "polled" and meta["available"] is True


def test_nvml_buffered_samples_wake_the_child_rarely(fake_gpu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_BUFFERED", "1")
    s, _ = _sample_for(0.6)
    assert s.available and s.mode == "buffered"
    df = s.samples
    # buffered metrics arrive at the driver's 10 ms spacing although the child woke only every 250 ms
    assert len(df) >= 30
    assert (df["gpu_util_pct"] == 88).all() and (df["power_w"] == 250.0).all() and (df["sm_clock_mhz"] == 1755).all()
    gaps = np.diff(df["t_ms"].to_numpy())
    assert np.median(gaps) == pytest.approx(10.0, abs=1.0)
    # the polled memory reading came at a wake-up and is carried forward from there
    assert df["mem_used_mib"].notna().sum() >= len(df) - 30


def test_nvml_failure_is_a_reason_not_an_error(fake_gpu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_FAIL", "1")
    s, _ = _sample_for(0.1)
    assert not s.available and s.samples is None
    assert s.reason == "NVML unavailable: NVMLError: Driver Not Loaded"


def test_nvml_on_cpu_starts_nothing() -> None:
    from kvscope.profiler.nvml import NvmlSampler

    s = NvmlSampler(torch.device("cpu"))
    assert s.child_pid is None and not s.available and s.reason == "not a CUDA device"
    s.start(time.perf_counter_ns())
    s.stop()
    assert s.samples is None


# ---- nsys capture hygiene -------------------------------------------------------------------------------------
def test_importer_search_stays_inside_the_nsys_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvscope.measure.nsys import find_importer

    monkeypatch.delenv("QDSTRM_IMPORTER", raising=False)
    install = tmp_path / "nsight" / "target-linux-x64"
    install.mkdir(parents=True)
    nsys = install / "nsys"
    nsys.write_text("")
    far = tmp_path / "elsewhere" / "deep" / "QdstrmImporter"
    far.parent.mkdir(parents=True)
    far.write_text("")
    assert find_importer(str(nsys)) is None  # never a search of the folders above the install
    seen: list[str] = []
    real_glob = Path.glob

    def spy(self: Path, pattern: str, *a: object, **k: object):
        seen.append(pattern)
        return real_glob(self, pattern, *a, **k)

    monkeypatch.setattr(Path, "glob", spy)
    host = tmp_path / "nsight" / "host-linux-x64"
    host.mkdir()
    (host / "QdstrmImporter").write_text("")
    assert find_importer(str(nsys)) == str(host / "QdstrmImporter")
    assert not any("**" in p for p in seen)


def test_capture_never_takes_another_process_raw_capture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in nsys that leaves its raw capture unimported (as nsys does without libdw) in its TMPDIR: capture()
    imports that one, not the newer one another process left in /tmp."""
    from kvscope.measure import nsys as nsys_capture

    fake = tmp_path / "bin"
    fake.mkdir()
    nsys = fake / "nsys"
    nsys.write_text("#!/bin/sh\n"
                    "out=''; while [ $# -gt 0 ]; do [ \"$1\" = -o ] && out=$2; shift; done\n"
                    "mkdir -p \"$(dirname \"$out\")/run\" && : > \"$(dirname \"$out\")/run/timings.parquet\"\n"
                    "echo mine > \"${TMPDIR:-/tmp}/nsys-report-mine.qdstrm\"\n"
                    "exit 1\n")
    importer = fake / "QdstrmImporter"
    importer.write_text("#!/bin/sh\n# -i FILE: writes FILE's .nsys-rep beside it, holding FILE's content\n"
                        "cp \"$2\" \"${2%.qdstrm}.nsys-rep\"\n")
    for f in (nsys, importer):
        f.chmod(0o755)
    monkeypatch.setenv("QDSTRM_IMPORTER", str(importer))
    foreign = Path("/tmp") / f"nsys-report-zz-foreign-{os.getpid()}.qdstrm"  # sorts after "mine"
    foreign.write_text("foreign")
    try:
        os.utime(foreign, (time.time() + 60, time.time() + 60))  # the newest one in /tmp
        out = tmp_path / "cap"
        out.mkdir()
        rep, run_dir = nsys_capture.capture(["--model", "tiny"], out, str(nsys))
        assert rep.read_text() == "mine\n" and run_dir == out / "run"
        assert foreign.read_text() == "foreign"
        assert sorted(p.name for p in out.iterdir()) == ["report.nsys-rep", "run"]  # its scratch folder is gone
    finally:
        foreign.unlink(missing_ok=True)


# ---- the report: spread in the tables, plots that hold the data ----------------------------------------------------
def test_run_report_shows_the_spread_of_ttft_and_tpot(tmp_path: Path) -> None:
    s, _ = _run(tmp_path, "--reps", "12", "--granularity", "phase")
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| TTFT") or line.startswith("| TPOT")]
    assert len(rows) == 2
    ttft = [c.strip() for c in rows[0].strip("|").split("|")]
    assert ttft[1] == "host"
    assert ttft[2:5] == [f"{s['ttft_ms']:,.3f}", f"{s['ttft_q1_ms']:,.3f}", f"{s['ttft_q3_ms']:,.3f}"]
    assert ttft[6] == f"{s['ttft_p90_ms']:,.3f}" and ttft[7] == "" and ttft[8] == "12"  # 12 samples: p90, no p99
    tpot = [c.strip() for c in rows[1].strip("|").split("|")]
    assert tpot[2] == f"{s['tpot_p50_ms']:,.3f}" and tpot[8] == f"{12 * 3}"
    assert ("is spread" in md) is bool(s["spread_flag"])


def test_sweep_plots_hold_the_data_they_show(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from kvscope.analysis.report.build import FIGURE_DPI, FIGURE_SIZE_IN, sweep_report

    sweep = tmp_path / "s.csv"
    assert main(["sweep", "--model", "tiny", "--device", "cpu", "--seq", "8,16,32", "--batch-sizes", "1,2",
                 "--gen-tokens", "3", "--warmup", "0", "--reps", "2", "--out", str(sweep)]) == 0
    df = pd.read_csv(sweep)
    rep = sweep_report(sweep)
    for y in ("decode_tok_s", "prefill_ms_per_tok"):
        ax = rep.figures[f"{y}_vs_seq_len.png"].axes[0]
        assert len(ax.lines) == 2  # one line per batch size
        for line, (batch, g) in zip(ax.lines, df.groupby("batch"), strict=True):
            g = g.sort_values("seq_len")
            assert line.get_label() == f"batch {batch}"
            assert list(line.get_xdata()) == g["seq_len"].tolist()
            assert list(line.get_ydata()) == pytest.approx(g[y].tolist(), rel=1e-12)
        lo, hi = ax.get_ylim()
        assert lo <= df[y].min() and hi >= df[y].max()
    md = rep.markdown()
    assert "## Spread of TTFT (host clock) and TPOT" in md
    assert main(["report", str(sweep), "--out", str(tmp_path / "rep")]) == 0
    png = imread(tmp_path / "rep" / "decode_tok_s_vs_seq_len.png")
    assert png.shape[:2] == (round(FIGURE_SIZE_IN[1] * FIGURE_DPI), round(FIGURE_SIZE_IN[0] * FIGURE_DPI))
    assert float(png[..., :3].std()) > 0.01  # not a blank canvas
