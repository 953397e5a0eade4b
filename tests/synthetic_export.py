"""Build small synthetic nsys SQLite exports for edge cases (same tables and columns as nsys 2025.3 writes)."""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def gtid(pid: int, tid: int) -> int:
    return (1 << 48) | (pid << 24) | tid


@dataclass
class Synth:
    nvtx: list[tuple] = field(default_factory=list)
    runtime: list[tuple] = field(default_factory=list)
    kernels: list[tuple] = field(default_factory=list)
    memcpy: list[tuple] = field(default_factory=list)
    strings: dict[str, int] = field(default_factory=dict)
    with_kernels: bool = True
    with_nvtx: bool = True

    def sid(self, text: str) -> int:
        return self.strings.setdefault(text, len(self.strings) + 1)

    def domain(self, pid: int, tid: int, domain_id: int, name: str) -> None:
        self.nvtx.append((-1, None, 75, name, None, domain_id, gtid(pid, tid), None))

    def range(self, pid: int, tid: int, start: int, end: int | None, text: str, domain_id: int = 0,
              style: int = 59, registered: bool = False, end_tid: int | None = None) -> int:
        self.nvtx.append((start, end, style, None if registered else text, self.sid(text) if registered else None,
                          domain_id, gtid(pid, tid), gtid(pid, end_tid) if end_tid is not None else None))
        return len(self.nvtx)  # rowid

    def launch(self, pid: int, tid: int, start: int, end: int, corr: int, kernels: list[tuple[int, int, int]],
               name: str = "cudaLaunchKernel", kernel_name: str = "void gemm_kernel()", graph_nodes: bool = False
               ) -> None:
        self.runtime.append((start, end, gtid(pid, tid), corr, self.sid(name)))
        for i, (ks, ke, stream) in enumerate(kernels):
            self.kernels.append((ks, ke, 0, stream, corr, gtid(pid, 0) & ~0xFFFFFF, self.sid(kernel_name),
                                 self.sid(kernel_name), (100 + i) if graph_nodes else None))

    def write(self, path: Path) -> Path:
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT)")
        con.executemany("INSERT INTO StringIds VALUES (?, ?)", [(i, s) for s, i in self.strings.items()])
        con.execute("CREATE TABLE META_DATA_EXPORT (name TEXT, value TEXT)")
        con.executemany("INSERT INTO META_DATA_EXPORT VALUES (?, ?)",
                        [("EXPORT_PRODUCT_VERSION", "synthetic"), ("EXPORT_SCHEMA_VERSION", "3.20.3")])
        if self.with_nvtx:
            con.execute("CREATE TABLE NVTX_EVENTS (start INTEGER, end INTEGER, eventType INTEGER, text TEXT, "
                        "textId INTEGER, domainId INTEGER, globalTid INTEGER, endGlobalTid INTEGER, category INTEGER, "
                        "int64Value INTEGER)")
            con.executemany("INSERT INTO NVTX_EVENTS VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)", self.nvtx)
        con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER, end INTEGER, globalTid INTEGER, "
                    "correlationId INTEGER, nameId INTEGER)")
        con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, ?, ?, ?)", self.runtime)
        if self.with_kernels:
            con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER, end INTEGER, deviceId INTEGER, "
                        "streamId INTEGER, correlationId INTEGER, globalPid INTEGER, demangledName INTEGER, "
                        "shortName INTEGER, graphNodeId INTEGER)")
            con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", self.kernels)
        con.commit()
        con.close()
        return path


def sqlite_copy(source: Path, path: Path, *statements: str) -> Path:
    """A copy of the SQLite export `source` at `path`, changed by the SQL `statements`."""
    shutil.copy(source, path)
    con = sqlite3.connect(path)
    for sql in statements:
        con.execute(sql)
    con.commit()
    con.close()
    return path


def big_export(path: Path, n_ranges: int, n_kernels: int, threads: int = 2) -> Path:
    """A kvscope-like SQLite export at scale, built with numpy (seconds for a million kernels): per thread, decode
    steps of one `decode step N` range holding four layer ranges `L00`..`L03` (domain `kvscope`), kernels launched
    inside the layer ranges, one API call per kernel. `n_ranges` is rounded down to a multiple of 5; the kernels
    are at least `n_kernels` (each layer range gets the same number)."""
    steps = n_ranges // 5
    per = -(-n_kernels // (steps * 4))  # kernels per layer range
    layer_ns = per * 1000 + 100
    step_ns = 100 + 4 * (layer_ns + 100) + 100
    s = np.arange(steps)
    t0 = (s // threads) * step_ns
    g = np.array([gtid(7, t + 1) for t in range(threads)], dtype=np.int64)[s % threads]
    li = np.arange(4)
    la = (t0[:, None] + 100 + li[None, :] * (layer_ns + 100))  # layer starts, (steps, 4)
    step_rows = np.stack([t0, t0 + step_ns - 50, np.full(steps, 59), s, g], axis=1)
    layer_rows = np.stack([la.ravel(), (la + layer_ns).ravel(), np.full(steps * 4, 59), np.tile(li, steps) - 4,
                           np.repeat(g, 4)], axis=1)
    ranges = np.concatenate([step_rows, layer_rows])
    names = [f"decode step {i}" for i in range(steps)]
    text = [names[int(v)] if v >= 0 else f"L{int(v) + 4:02d}" for v in ranges[:, 3]]
    ks = (la.ravel()[:, None] + 50 + np.arange(per)[None, :] * 1000).ravel()  # launch starts
    kg = np.repeat(np.repeat(g, 4), per)
    corr = np.arange(1, len(ks) + 1)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT)")
    con.executemany("INSERT INTO StringIds VALUES (?, ?)", [(1, "cudaLaunchKernel"), (2, "nvjet_sm90_gemm"),
                                                            (3, "gemm")])
    con.execute("CREATE TABLE NVTX_EVENTS (start INTEGER, end INTEGER, eventType INTEGER, text TEXT, domainId "
                "INTEGER, globalTid INTEGER)")
    con.executemany("INSERT INTO NVTX_EVENTS VALUES (0, NULL, 75, 'kvscope', 1, ?)",
                    [(int(x),) for x in np.unique(g)])
    con.executemany("INSERT INTO NVTX_EVENTS VALUES (?, ?, 59, ?, 1, ?)",
                    zip(ranges[:, 0].tolist(), ranges[:, 1].tolist(), text, ranges[:, 4].tolist(), strict=True))
    con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER, end INTEGER, globalTid INTEGER, "
                "correlationId INTEGER, nameId INTEGER)")
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, ?, ?, 1)",
                    zip(ks.tolist(), (ks + 300).tolist(), kg.tolist(), corr.tolist(), strict=True))
    con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER, end INTEGER, deviceId INTEGER, streamId "
                "INTEGER, correlationId INTEGER, globalPid INTEGER, demangledName INTEGER, shortName INTEGER, "
                "graphNodeId INTEGER)")
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?, 0, 7, ?, ?, 2, 3, NULL)",
                    zip((ks + 400).tolist(), (ks + 900).tolist(), corr.tolist(), (kg & ~0xFFFFFF).tolist(),
                        strict=True))
    con.commit()
    con.close()
    return path
