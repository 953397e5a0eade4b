"""The HTTP front started in the test's own process (tiny preset, CPU, a free port), for the tests/measure/serve/
test_http_*.py files: `running(...)` yields a `Server` whose `finish()` asks the stop and returns the run folder read
back (`HttpServeRun`). Sharing the process also shares `time.perf_counter`: a client's stamps and the records' lie
on one clock (`Server.abs(t)` turns a record's time on the load's clock into a perf_counter reading)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvscope.measure.serve.http_run import HttpReady, HttpServeRun, HttpStop, execute_http
from kvscope.measure.serve.spec import ServeSpec

# a block of the tiny preset in float32: 2 layers x (K, V) x 16 positions x 2 KV heads x 16 dims x 4 bytes
TINY_BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4
GIB = 1 << 30


def pool_gb(blocks: int) -> float:
    """--kv-pool-gb for a KV pool of `blocks` usable blocks of 16 positions (tiny, float32)."""
    return blocks * TINY_BLOCK_BYTES / GIB


@dataclass
class Server:
    ready: HttpReady
    stop: HttpStop
    thread: threading.Thread
    box: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.ready.url

    @property
    def front(self) -> Any:
        return self.ready.front

    def abs(self, t: float) -> float:
        return self.front.loop.t0 + t

    def finish(self, timeout: float = 60.0) -> HttpServeRun | None:
        self.stop.request()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["run"]


@contextlib.contextmanager
def running(out: Path, **fields: Any) -> Iterator[Server]:
    """The server of ServeSpec(http=True, tiny, CPU, port 0, `fields`) until the block ends (stopped then if the
    test did not call `finish()`)."""
    spec = ServeSpec(**{"http": True, "port": 0, "model": "tiny", "device": "cpu", "out": str(out), **fields})
    stop, box, started = HttpStop(), {}, threading.Event()

    def ready(r: HttpReady) -> None:
        box["ready"] = r
        started.set()

    def target() -> None:
        try:
            box["run"] = execute_http(spec, stop, None, ready)
        except BaseException as exc:
            box["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    started.wait(120)
    if "error" in box:
        raise box["error"]
    server = Server(box["ready"], stop, thread, box)
    try:
        yield server
    finally:
        if thread.is_alive():
            stop.request()
            stop.request()
            thread.join(60)
