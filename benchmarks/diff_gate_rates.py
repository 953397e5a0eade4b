"""How often `kvscope diff --fail-if slower:T%` cries wolf, and how often it catches a real slowdown, on real CPU runs.

Makes `--pairs` pairs of sides, each side `--runs-per-side` `kvscope run` folders of the same code and the same
arguments (by default the tiny preset on the CPU: prompt 16, 16 new tokens, 20 timed repetitions after 5 warm-ups,
phase granularity, no NVTX), each run a fresh `python3 -m kvscope run` process, one after the other (a pair's A runs,
then its B runs; the next pair B first). Two ways to compare a pair:

- one run a side (the first run of each side): the samples are the repetitions of one run;
- a folder of runs a side (all of them): the samples are the runs, each the median of its repetitions.

For each, and each threshold T of `--thresholds`:

- false alarms: `kvscope.diff(A, B, fail_if="slower:T%")`: the share of pairs the gate fails (exit 1) although
  nothing changed, and the share it cannot tell (exit 2);
- power: the same gates on (A, B slowed), B's run folders rewritten so that every timed region and the host clock's
  times take `--slowdown` times as long (the test-only delay of tests/analysis/diff: no switch in the engine): the
  share of pairs the gate fails, as it should.

Each rate comes with its exact (Clopper-Pearson) 95% interval, and so does the noise the gate works against: the
pairs' B / A ratio of the row's median, and the width of the diff's own interval. The gated rows: the decode step
(the default gate's row) and the prefill.

    python3 benchmarks/diff_gate_rates.py --pairs 30 --runs-per-side 5 --json diff_gate_rates.json

`--threads N` sets OMP_NUM_THREADS for the runs (default 1: on a small shared host torch's default thread pool
stalls a step for tens of milliseconds whenever a worker thread is descheduled; 0 leaves torch's default). Runs go
into a temporary folder, removed at the end (`--keep DIR` keeps them there). Torch-free itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvscope  # noqa: E402
from kvscope.io import read_metadata, write_parquet  # noqa: E402
from kvscope.schema import SUMMARY_FILE, TIMINGS_FILE  # noqa: E402

RUN_ARGS = ["--model", "tiny", "--device", "cpu", "--seq", "16", "--gen-tokens", "16", "--reps", "20", "--warmup",
            "5", "--granularity", "phase", "--no-nvtx"]
ROWS = ("decode step", "prefill")
HOST_KEYS = ("host_ttft_ms", "host_decode_ms")


def one_run(out: Path, run_args: list[str], threads: int) -> float:
    """`python3 -m kvscope run RUN_ARGS --out OUT` in a fresh process; its wall time (s)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kvscope", "run", *run_args, "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"diff_gate_rates: kvscope run exited {done.returncode}: "
                         f"{(done.stderr.strip().splitlines() or [''])[-1]}")
    return time.perf_counter() - t0


def slowed(src: Path, out: Path, factor: float) -> Path:
    """A copy of the run folder `src` at `out` with every timed region and the host clock's times `factor` times as
    long (the metadata otherwise the run's own)."""
    out.mkdir(parents=True)
    t = pd.read_parquet(src / TIMINGS_FILE)
    t["dur_ms"] = t["dur_ms"] * factor
    write_parquet(t, out / TIMINGS_FILE, read_metadata(src / TIMINGS_FILE))
    meta = read_metadata(src / SUMMARY_FILE)
    for key in HOST_KEYS:
        if key in meta:
            meta[key] = [v * factor for v in meta[key]]
    write_parquet(pd.read_parquet(src / SUMMARY_FILE), out / SUMMARY_FILE, meta)
    return out


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval of a binomial proportion k / n (by bisection on the binomial tail)."""
    def tail(p: float, lo: int, hi: int) -> float:
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(lo, hi + 1))

    def solve(f: Any) -> float:
        a, b = 0.0, 1.0
        for _ in range(60):
            m = (a + b) / 2
            a, b = (m, b) if f(m) else (a, m)
        return (a + b) / 2

    alpha = (1 - level) / 2
    low = 0.0 if k == 0 else solve(lambda p: tail(p, k, n) < alpha)
    high = 1.0 if k == n else solve(lambda p: tail(p, 0, k) > alpha)
    return low, high


def make_pairs(pairs: int, per_side: int, folder: Path, run_args: list[str], threads: int
               ) -> list[tuple[Path, Path]]:
    """`pairs` pairs of sides, each side a folder of `per_side` run folders (r0, r1, ...)."""
    made, seconds = [], []
    for i in range(pairs):
        a, b = folder / f"pair{i:03d}" / "a", folder / f"pair{i:03d}" / "b"
        for side in ((a, b) if i % 2 == 0 else (b, a)):
            for j in range(per_side):
                seconds.append(one_run(side / f"r{j}", run_args, threads))
        made.append((a, b))
        print(f"pair {i + 1}/{pairs} ({statistics.median(seconds):.1f} s a run)", file=sys.stderr, flush=True)
    return made


def slowed_side(side: Path, out: Path, factor: float) -> Path:
    for run in sorted(side.iterdir()):
        slowed(run, out / run.name, factor)
    return out


def gate_codes(a: Path, b: Path, thresholds: list[float]) -> dict[str, Any]:
    """One diff of A and B: per gated row, its B / A ratio of medians, its interval, and each threshold's exit
    code."""
    specs = [f"slower:{t:g}%:{row}" for row in ROWS for t in thresholds]
    result = kvscope.diff(a, b, fail_if=specs)
    table = result.table.set_index("row")
    out: dict[str, Any] = {}
    for row in ROWS:
        line = table.loc[row]
        out[row] = {"ratio": float(line["b"] / line["a"]), "ci_low_pct": float(line["ci_low_pct"]),
                    "ci_high_pct": float(line["ci_high_pct"]), "verdict": str(line["verdict"]),
                    "codes": {f"{o.gate.pct:g}": o.code for o in result.gates if o.row == row}}
    return out


def rates(results: list[dict[str, Any]], row: str, threshold: float) -> dict[str, Any]:
    codes = [r[row]["codes"][f"{threshold:g}"] for r in results]
    n = len(codes)
    fail, unsure = codes.count(1), codes.count(2)
    return {"n": n, "fail": fail, "cannot_tell": unsure, "pass": codes.count(0),
            "fail_rate": fail / n, "fail_rate_95": clopper_pearson(fail, n), "cannot_tell_rate": unsure / n}


def noise(results: list[dict[str, Any]], row: str) -> dict[str, float]:
    """The spread the gate works against: the pairs' B / A ratios (%), and the diff's interval width (%)."""
    pct = np.array([(r[row]["ratio"] - 1) * 100 for r in results])
    width = np.array([r[row]["ci_high_pct"] - r[row]["ci_low_pct"] for r in results])
    return {"ratio_median_pct": float(np.median(pct)), "ratio_p5_pct": float(np.percentile(pct, 5)),
            "ratio_p95_pct": float(np.percentile(pct, 95)), "ratio_max_abs_pct": float(np.abs(pct).max()),
            "interval_width_median_pct": float(np.nanmedian(width))}


def report(summary: dict[str, Any]) -> str:
    lines = [f"{summary['pairs']} pairs of sides of {summary['runs_per_side']} runs, `kvscope run "
             f"{' '.join(summary['run_args'])}` (OMP_NUM_THREADS={summary['threads'] or 'default'}), "
             f"{summary['host']}; power against every region {(summary['slowdown'] - 1) * 100:g}% slower", ""]
    lines.append("| a side | row | gate | false alarms (exit 1, A = B) | cannot tell (A = B) | power (exit 1, B "
                 "slower) | cannot tell (B slower) |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, m in summary["modes"].items():
        for row in ROWS:
            for t in summary["thresholds"]:
                same, slow = m["same"][row][f"{t:g}"], m["slow"][row][f"{t:g}"]
                fa, pw = same["fail_rate_95"], slow["fail_rate_95"]
                lines.append(f"| {mode} | {row} | slower:{t:g}% | {same['fail']}/{same['n']} ({fa[0]:.0%} to "
                             f"{fa[1]:.0%}) | {same['cannot_tell']}/{same['n']} | {slow['fail']}/{slow['n']} "
                             f"({pw[0]:.0%} to {pw[1]:.0%}) | {slow['cannot_tell']}/{slow['n']} |")
    lines += ["", "| a side | row | B / A of identical sides: median (5th to 95th percentile), largest | the diff's "
              "interval, median width |", "| --- | --- | --- | --- |"]
    for mode, m in summary["modes"].items():
        for row in ROWS:
            nz = m["noise"][row]
            lines.append(f"| {mode} | {row} | {nz['ratio_median_pct']:+.1f}% ({nz['ratio_p5_pct']:+.1f}% to "
                         f"{nz['ratio_p95_pct']:+.1f}%), {nz['ratio_max_abs_pct']:.1f}% | "
                         f"{nz['interval_width_median_pct']:.1f}% |")
    return "\n".join(lines)


def evaluate(pairs: list[tuple[Path, Path]], slow: list[Path], thresholds: list[float]) -> dict[str, Any]:
    """The gates' rates over the pairs (A, B) and (A, B slowed), and the noise of (A, B)."""
    same = [gate_codes(a, b, thresholds) for a, b in pairs]
    slower = [gate_codes(a, s, thresholds) for (a, _), s in zip(pairs, slow, strict=True)]
    return {"same": {r: {f"{t:g}": rates(same, r, t) for t in thresholds} for r in ROWS},
            "slow": {r: {f"{t:g}": rates(slower, r, t) for t in thresholds} for r in ROWS},
            "noise": {r: noise(same, r) for r in ROWS}, "pairs_same": same, "pairs_slow": slower}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=30)
    p.add_argument("--runs-per-side", type=int, default=5, help="run folders a side (compared as a folder of runs)")
    p.add_argument("--thresholds", default="2,3,5", help="gate thresholds in %%, comma-separated")
    p.add_argument("--slowdown", type=float, default=1.05, help="the slowdown the power is measured against")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (0: torch's default)")
    p.add_argument("--keep", type=Path, default=None, help="keep the run folders in this (new) folder")
    p.add_argument("--json", type=Path, default=None, help="write the rates and every pair's numbers here")
    p.add_argument("run_args", nargs="*", help=f"after --: kvscope run arguments (default: {' '.join(RUN_ARGS)})")
    ns = p.parse_args(argv)
    thresholds = [float(t) for t in ns.thresholds.split(",")]
    folder = ns.keep or Path(tempfile.mkdtemp(prefix="diff-gate-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        pairs = make_pairs(ns.pairs, ns.runs_per_side, folder, ns.run_args or RUN_ARGS, ns.threads)
        slow = [slowed_side(b, b.parent / "b-slow", ns.slowdown) for _, b in pairs]
        modes = {"one run": evaluate([(a / "r0", b / "r0") for a, b in pairs], [s / "r0" for s in slow], thresholds)}
        if ns.runs_per_side > 1:
            modes[f"{ns.runs_per_side} runs"] = evaluate(pairs, slow, thresholds)
    finally:
        if ns.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    summary = {"pairs": ns.pairs, "runs_per_side": ns.runs_per_side, "run_args": ns.run_args or RUN_ARGS,
               "threads": ns.threads, "slowdown": ns.slowdown, "thresholds": thresholds,
               "host": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end",
               "modes": modes}
    print(report(summary))
    if ns.json is not None:
        ns.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
