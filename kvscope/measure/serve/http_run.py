"""The HTTP front's lifetime (`kvscope serve --http`): the socket bound first (a port in use fails before any model
loads), the engine built and warmed up exactly as for the in-process load (`build_served`), the `ServeLoop` run in a
thread of its own (`external`: requests come from the app), uvicorn serving the Starlette app (`http.HttpApp`) on
this thread's event loop, and the records written when the server stops, through the same `frames` and
`write_serve_run` as the in-process load, requests.parquet with `HTTP_REQUEST_COLUMNS` added.

Stopping (`HttpStop`: SIGINT/SIGTERM through the command's handlers, or `request()` from Python): the first request
stops accepting (the listening socket closes; a request that still reaches the app is answered 503) and lets the
requests in flight finish for `drain_s` seconds; then, or at a second request, the loop stops and cuts what still
runs (each cut request's client hears an error), the connections close, and the folder is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import uvicorn

from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder, os_reason
from kvscope.measure.serve.execute import OUT_LABEL, ServeRun
from kvscope.measure.serve.http import EOS_REASON, Front, HttpApp
from kvscope.measure.serve.http_request import Limits
from kvscope.measure.serve.load import RequestSpec
from kvscope.measure.serve.loop import ServeLoop
from kvscope.measure.serve.output import default_out_dir, frames, write_serve_run
from kvscope.measure.serve.run import ServeResult, build_served, run_served
from kvscope.measure.serve.scheduler import CUT, FINISHED
from kvscope.measure.serve.spec import ServeSpec, check_spec, load_source
from kvscope.measure.serve.tokenizer import load_tokenizer
from kvscope.profiler.nvtx import start_end_ranges
from kvscope.schema import MS_PER_S, REQUESTS_FILE

POLL_S = 0.02  # how often the server's watcher looks at the stop request and the loop
GRACE_S = 10  # uvicorn's own limit on connections still open after the drain and the cut
_STOPPED = "the server stopped"


@dataclass
class HttpStop:
    """How the server is asked to stop; `request()` is safe in a signal handler (it only sets events)."""

    drain: threading.Event = field(default_factory=threading.Event)
    now: threading.Event = field(default_factory=threading.Event)

    def request(self) -> None:
        """The first call: stop accepting and drain; the next: cut what still runs."""
        if self.drain.is_set():
            self.now.set()
        self.drain.set()


@dataclass(frozen=True)
class HttpReady:
    """What `ready` is told once the server listens (the front: for tests and tools in the same process)."""

    url: str
    host: str
    port: int
    front: Front


@dataclass
class HttpServeRun(ServeRun):
    front: Front | None = None

    @property
    def http(self) -> dict[str, Any]:
        return self.result.meta.get("http", {})


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (not yet listening); KvscopeError in one line when it cannot be."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise KvscopeError(f"--host {host}: {os_reason(exc) if isinstance(exc, OSError) else exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise KvscopeError(f"cannot listen on {host}:{port}: {os_reason(exc)}") from None
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the command's handlers stay in place: they ask for the drain (HttpStop), they do not exit


def _no_prompt(spec: RequestSpec) -> list[int]:
    raise KvscopeError(f"request {spec.request_id}: the HTTP front has no in-process arrivals")


class _Runner:
    """The loop's thread and the server on this thread's event loop, until the stop (see the module docstring)."""

    def __init__(self, spec: ServeSpec, sock: socket.socket, front: Front, stop: HttpStop,
                 say: Callable[[str], None], ready: Callable[[HttpReady], None] | None, device: torch.device) -> None:
        self.spec, self.sock, self.front, self.stop, self.say, self.ready = spec, sock, front, stop, say, ready
        self.device = device
        self.loop_stop, self.loop_done = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.cut_why = _STOPPED
        self.protocol = ""
        self.address: tuple[str, int] = ("", 0)

    def drive(self) -> None:
        loop = self.front.loop
        cuda = self.device.index if self.device.index is not None else (
            torch.cuda.current_device() if self.device.type == "cuda" else None)
        thread = threading.Thread(target=self._run_loop, args=(cuda,), name="kvscope-serve-loop", daemon=True)
        before = loop.t0
        thread.start()
        deadline = time.monotonic() + 10
        while loop.t0 == before and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)  # the loop's clock starts in run(): stamps are taken on it
        front = self.front
        config = uvicorn.Config(HttpApp(front), lifespan="off", log_config=None, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=math.ceil(self.spec.drain_s) + GRACE_S)
        factory = getattr(config, "get_loop_factory", lambda: None)()  # uvloop where installed (uvicorn's "auto")
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(self._serve(config))
        finally:
            self.loop_stop.set()
            thread.join()
        if self.errors:
            raise self.errors[0]
        self.front.eos_records()
        self._name_the_cut()

    def _run_loop(self, cuda: int | None) -> None:
        try:
            if cuda is not None:  # the thread's current device: the one the engine was built on
                torch.cuda.set_device(cuda)
            self.front.loop.run(self.loop_stop.is_set, external=True, stop_reason=_STOPPED)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.front.ended(_STOPPED if not self.errors else "the engine's loop failed")
            self.loop_done.set()

    def _name_the_cut(self) -> None:
        loop = self.front.loop
        cut = [s for s in loop.sequences if s.state == CUT and s.reason == _STOPPED]
        for s in cut:
            s.reason = self.cut_why
        loop.cut_reason = self.cut_why if cut else ""

    async def _serve(self, config: uvicorn.Config) -> None:
        front, spec = self.front, self.spec
        front.aio = asyncio.get_running_loop()
        server = _Server(config)
        task = asyncio.create_task(server.serve(sockets=[self.sock]))
        while not server.started:
            if task.done():
                await task
                raise KvscopeError("the HTTP server did not start")
            await asyncio.sleep(0.005)
        self.protocol = (f"{getattr(config.http_protocol_class, '__name__', config.http_protocol_class)} on "
                         f"{type(front.aio).__module__}.{type(front.aio).__name__}")
        host, port = self.address = self.sock.getsockname()[:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        self.say(f"listening on {url} (model {front.limits.model!r}, tokenizer {front.tok.name}); SIGINT/SIGTERM "
                 f"drains for {spec.drain_s:g} s and writes the records")
        if self.ready is not None:
            self.ready(HttpReady(url, host, port, front))
        while not (self.stop.drain.is_set() or self.loop_done.is_set() or task.done()):
            await asyncio.sleep(POLL_S)
        await self._drain(server, task)

    async def _drain(self, server: _Server, task: asyncio.Task[None]) -> None:
        front, drain_s = self.front, self.spec.drain_s
        front.stop_accepting("a stop was asked" if self.stop.drain.is_set() else "the engine's loop ended")
        server.should_exit = True
        if front.flights and not self.loop_done.is_set():
            self.say(f"stopping: {len(front.flights)} requests in flight may finish for {drain_s:g} s")
        deadline = time.monotonic() + drain_s
        while front.flights and not self.stop.now.is_set() and not self.loop_done.is_set():
            if time.monotonic() >= deadline:
                self.cut_why = f"{_STOPPED}: --drain-s {drain_s:g} s ended"
                break
            await asyncio.sleep(POLL_S)
        if self.stop.now.is_set() and front.flights:
            self.cut_why = f"{_STOPPED}: a second stop cut the drain short"
        self.loop_stop.set()
        await task


def _overhead(req: pd.DataFrame) -> dict[str, float]:
    v = req.loc[req["status"] == FINISHED, "server_overhead_ms"].to_numpy(np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0}
    return {"n": len(v), "mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)), "max": float(v.max())}


def with_http_columns(req: pd.DataFrame, times: dict[int, tuple[float, float]]) -> pd.DataFrame:
    """requests.parquet with `HTTP_REQUEST_COLUMNS` (their definitions: kvscope.schema)."""
    out = req.copy()
    pair = [times.get(int(r), (math.nan, math.nan)) for r in out["request_id"]]
    out["http_arrival_s"] = np.array([p[0] for p in pair], np.float64)
    out["http_last_byte_s"] = np.array([p[1] for p in pair], np.float64)
    served = (out["http_last_byte_s"] - out["http_arrival_s"]) * MS_PER_S
    out["server_overhead_ms"] = np.where(out["status"] == FINISHED, served - out["e2e_ms"], math.nan)
    return out


def _http_meta(spec: ServeSpec, runner: _Runner, req: pd.DataFrame, max_seq: int) -> dict[str, Any]:
    front = runner.front
    host, port = runner.address
    return {"host": host, "port": port, "served_model_name": front.limits.model, "tokenizer": front.tok.name,
            "max_seq": max_seq, "drain_s": spec.drain_s, "queue_limit": spec.queue_limit,
            "max_body_bytes": spec.max_body_bytes, "protocol": runner.protocol,
            "requests": len(req), "finished_at_eos": int((req["reason"] == EOS_REASON).sum()),
            "rejected": {str(k): v for k, v in sorted(front.rejected.items())},
            "never_ran": front.next_id - len(req), "server_overhead_ms": _overhead(req)}


def _serve_http(spec: ServeSpec, sock: socket.socket, stop: HttpStop, say: Callable[[str], None],
                ready: Callable[[HttpReady], None] | None) -> tuple[ServeResult, _Runner]:
    _, max_seq = load_source(spec)
    served = build_served(spec, max_seq, say)
    plan, built = served.plan, served.built
    try:
        tok = load_tokenizer(plan.source, say)
    except BaseException:
        served.nvml.stop()
        raise
    sched = built.sched
    limits = Limits(spec.served_model_name or plan.source.spec, max_seq, sched.pool.capacity, sched.bs,
                    plan.source.args.vocab_size, spec.max_body_bytes, spec.queue_limit)
    front = Front(ServeLoop(built.engine, sched, _no_prompt), tok, limits, start_end_ranges(plan.nvtx))
    runner = _Runner(spec, sock, front, stop, say, ready, plan.cfg.device)
    return run_served(served, front.loop, runner.drive), runner


def execute_http(spec: ServeSpec, stop: HttpStop | None = None, say: Callable[[str], None] | None = None,
                 ready: Callable[[HttpReady], None] | None = None) -> HttpServeRun | None:
    """Serve `spec` over HTTP until `stop` is asked (see the module docstring), then write the run folder; None
    (and no folder) when no request reached the engine. KvscopeError for bad input, or a socket that cannot be
    bound, before any model loads."""
    check_spec(spec)
    if not spec.http:
        raise KvscopeError("execute_http: the spec does not ask for --http")
    say = say or (lambda _m: None)
    sock = bind(spec.host, spec.port)
    try:
        model = spec.model or "default"
        out = AtomicFolder(Path(spec.out) if spec.out else default_out_dir(model, spec.policy), OUT_LABEL)
        try:
            out.open()
            result, runner = _serve_http(spec, sock, stop or HttpStop(), say, ready)
            if not result.sequences:
                say("the server stopped without a request reaching the engine: no folder written")
                out.discard()
                return None
            tables = frames(result, out.final.name)
            tables[REQUESTS_FILE] = with_http_columns(tables[REQUESTS_FILE], runner.front.http_times)
            result.meta["http"] = _http_meta(spec, runner, tables[REQUESTS_FILE], runner.front.limits.max_seq)
            try:
                write_serve_run(result, tables, result.nvml, out.tmp)
            except OSError as exc:
                raise KvscopeError(f"cannot write the serve folder {out.final}: {os_reason(exc)}; nothing was kept"
                                   ) from None
            return HttpServeRun(out.commit(), result, tables, runner.front)
        except BaseException:
            out.discard()
            raise
    finally:
        sock.close()
