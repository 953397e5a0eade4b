"""`kvscope serve`: parse the load's flags, run it (`kvscope.measure.serve.execute`), print its summary and folder.
SIGINT and SIGTERM during the load end it at the next iteration: what finished is written, the rest recorded as cut
(the handlers are this command's while it runs, and restored after)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

from kvscope.commands.json_out import folder_files, json_line
from kvscope.measure.serve.execute import execute_serve, execute_sweep
from kvscope.measure.serve.progress import Progress
from kvscope.measure.serve.spec import serve_points

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


def _print(out: Path, summary: object, as_json: bool) -> None:
    import pandas as pd

    df = summary if isinstance(summary, pd.DataFrame) else pd.DataFrame()
    cols = [c for c in ("policy", "rps", "concurrency", *KEY_COLUMNS) if c in df.columns]
    Console().print(df[cols].to_string(index=False) if cols else "", highlight=False)
    files = folder_files(out)
    print(f"serve folder: {out} ({', '.join(files)})")
    if as_json:
        first = df.iloc[0] if len(df) == 1 else None
        numbers = {c: (None if first is None else first[c]) for c in cols} if first is not None else {}
        print(json_line({"serve_folder": out, "files": files, **numbers}))
