"""`kvscope serve`: parse the load's flags, run it (`kvscope.measure.serve.execute`), print its summary and folder.
SIGINT and SIGTERM during the load end it at the next iteration: what finished is written, the rest recorded as cut
(the handlers are this command's while it runs, and restored after). With `--http`, the server
(`kvscope.measure.serve.http_run`) runs until SIGINT/SIGTERM: the first stops accepting and drains (--drain-s), a
second cuts what still runs; the records are written either way."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console

from kvscope.commands.json_out import folder_files, json_line
from kvscope.measure.serve.execute import execute_serve, execute_sweep
from kvscope.measure.serve.progress import Progress
from kvscope.measure.serve.spec import ServeSpec, serve_points

KEY_COLUMNS = ("requests_finished", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "e2e_p99_ms",
               "output_tok_s", "goodput_req_s", "little_ratio")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set the returned event instead of unwinding (a second one unwinds as before)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            previous = saved[signal.Signals(signum)]
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        stop.set()
        print(f"kvscope: {signal.Signals(signum).name}: ending the load after this iteration (again to abort)",
              file=sys.stderr)

    for s in saved:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def command(ns: argparse.Namespace) -> int:
    points = serve_points(ns)
    base = points[0]
    err = Console(stderr=True)

    def say(msg: str) -> None:
        err.print(f"kvscope: {msg}", highlight=False)

    if base.http:  # its lines unwrapped: scripts read the address from "listening on http://..."
        return _http(base, lambda msg: err.print(f"kvscope: {msg}", highlight=False, soft_wrap=True), ns.json)

    with _stop_on_signals() as stop:
        bar = Progress(base.requests, base.duration_s, enabled=ns.progress and err.is_terminal)
        try:
            if len(points) == 1:
                run = execute_serve(points[0], stop.is_set, say, bar.update)
                out, summary = run.out_dir, run.summary
                if run.result.cut_reason:
                    cut = int((run.requests["status"] == "cut").sum())
                    say(f"{run.result.cut_reason}: {cut} requests cut, every finished one written")
            else:
                out, summary = execute_sweep(points, Path(base.out), stop.is_set, say, bar.update)
        finally:
            bar.close()
    _print(out, summary, ns.json)
    return 0


def _print(out: Path, summary: object, as_json: bool, extra: dict[str, object] | None = None) -> None:
    import pandas as pd

    df = summary if isinstance(summary, pd.DataFrame) else pd.DataFrame()
    cols = [c for c in ("policy", "rps", "concurrency", *KEY_COLUMNS) if c in df.columns]
    Console().print(df[cols].to_string(index=False) if cols else "", highlight=False)
    files = folder_files(out)
    print(f"serve folder: {out} ({', '.join(files)})")
    if as_json:
        first = df.iloc[0] if len(df) == 1 else None
        numbers = {c: (None if first is None else first[c]) for c in cols} if first is not None else {}
        print(json_line({"serve_folder": out, "files": files, **numbers, **(extra or {})}))


@contextlib.contextmanager
def _signals_to(request: Callable[[], None]) -> Iterator[None]:
    """SIGINT and SIGTERM call `request` while the server runs (the first: drain; the second: cut); a third aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    count = [0]

    def handler(signum: int, _frame: object) -> None:
        count[0] += 1
        if count[0] > 2:
            raise KeyboardInterrupt  # a third: abort (nothing written)
        request()
        what = "stopping: no new requests, the running ones drain" if count[0] == 1 else "cutting what still runs"
        print(f"kvscope: {signal.Signals(signum).name}: {what} (the records are written either way)",
              file=sys.stderr)

    for s in saved:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _http(spec: ServeSpec, say: Callable[[str], None], as_json: bool) -> int:
    from kvscope.measure.serve.http_run import HttpStop, execute_http  # starlette and uvicorn: only here

    stop = HttpStop()
    with _signals_to(stop.request):
        run = execute_http(spec, stop, say)
    if run is None:
        return 0
    if run.result.cut_reason:
        cut = int((run.requests["status"] == "cut").sum())
        say(f"{run.result.cut_reason}: {cut} requests cut, every finished one written")
    http = run.http
    o = http.get("server_overhead_ms", {})
    rejected = ", ".join(f"{n} x {code}" for code, n in http.get("rejected", {}).items()) or "none"
    if o.get("n"):
        say(f"server overhead per finished request (HTTP end to end - engine end to end): p50 {o['p50']:.2f} ms, "
            f"p99 {o['p99']:.2f} ms, mean {o['mean']:.2f} ms over {o['n']}; rejected before the engine: {rejected}")
    _print(run.out_dir, run.summary, as_json, {"http": http} if as_json else None)
    return 0
