"""Build small synthetic nsys SQLite exports for edge cases (same tables and columns as nsys 2025.3 writes)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path


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
