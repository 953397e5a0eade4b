"""Projection at scale on a generated export: 200,000 NVTX ranges and 1,000,000 kernels (SQLite, nsys's schema).

    python3 benchmarks/projection_scale.py [--ranges 200000] [--kernels 1000000]

Prints the time to read the export and to project it (the target: under 10 s on a 2-core machine).
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from kvscope.analysis.align.join import label_ranges
from kvscope.analysis.nsys.export import load_export
from kvscope.analysis.nsys.projection import project


def generate(path: Path, n_ranges: int, n_kernels: int, threads: int = 2) -> None:
    """Per thread: steps of one outer range and four inner ranges; kernels launched inside the inner ranges."""
    steps = n_ranges // 5
    per_inner = -(-n_kernels // (steps * 4))  # ceil: at least n_kernels
    gt = [(1 << 48) | (7 << 24) | (t + 1) for t in range(threads)]
    step_ns = 10 * (per_inner * 4 + 8) * 100
    nvtx, rt, kern = [], [], []
    corr = 0
    for s in range(steps):
        g = gt[s % threads]
        t0 = (s // threads) * step_ns
        nvtx.append((t0, t0 + step_ns - 100, 59, f"decode step {s}", 1, g))
        for i in range(4):
            a = t0 + 100 + i * (per_inner * 1000 + 200)
            nvtx.append((a, a + per_inner * 1000 + 100, 59, f"L{i:02d}", 1, g))
            for k in range(per_inner):
                cs = a + 50 + k * 1000
                corr += 1
                rt.append((cs, cs + 300, g, corr, 1))
                kern.append((cs + 400, cs + 900, 0, 7, corr, g & ~0xFFFFFF, 2, 2))
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT)")
    con.executemany("INSERT INTO StringIds VALUES (?, ?)", [(1, "cudaLaunchKernel"), (2, "nvjet_gemm")])
    con.execute("CREATE TABLE NVTX_EVENTS (start INTEGER, end INTEGER, eventType INTEGER, text TEXT, domainId "
                "INTEGER, globalTid INTEGER)")
    con.executemany("INSERT INTO NVTX_EVENTS VALUES (-1, NULL, 75, 'kvscope', 1, ?)", [(g,) for g in gt])
    con.executemany("INSERT INTO NVTX_EVENTS VALUES (?, ?, ?, ?, ?, ?)", nvtx)
    con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER, end INTEGER, globalTid INTEGER, "
                "correlationId INTEGER, nameId INTEGER)")
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, ?, ?, ?)", rt)
    con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER, end INTEGER, deviceId INTEGER, streamId "
                "INTEGER, correlationId INTEGER, globalPid INTEGER, demangledName INTEGER, shortName INTEGER)")
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?, ?, ?, ?, ?, ?, ?)", kern)
    con.commit()
    con.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranges", type=int, default=200_000)
    p.add_argument("--kernels", type=int, default=1_000_000)
    ns = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "generated.sqlite"
        t0 = time.perf_counter()
        generate(path, ns.ranges, ns.kernels)
        t1 = time.perf_counter()
        exp = load_export(path)
        t2 = time.perf_counter()
        proj = project(exp)
        t3 = time.perf_counter()
        labeled = label_ranges(proj)
        t4 = time.perf_counter()
    r = proj.ranges
    assert int(r.loc[r["level"] == 0, "gpu_ops"].sum()) == len(exp.gpu_ops)
    print(f"generated export: {len(exp.ranges):,} ranges, {len(exp.calls):,} API calls, {len(exp.gpu_ops):,} "
          f"kernels (written in {t1 - t0:.1f} s)")
    print(f"read {t2 - t1:.2f} s, project {t3 - t2:.2f} s, read + project {t3 - t1:.2f} s, label {t4 - t3:.2f} s "
          f"(cpu count {len(__import__('os').sched_getaffinity(0))})")
    assert np.isfinite(labeled["level"]).all()


if __name__ == "__main__":
    main()
