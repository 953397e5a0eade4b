"""A served load, or a sweep of them, measured and written: the run folder made whole or not at all
(`kvscope.io.AtomicFolder`); a sweep writes one subfolder per point and `serve_sweep.parquet` (one summary row per
point, `policy`, `rps`, `concurrency` first), the file rewritten after each point so that a stop keeps the points
done. A stop (SIGINT/SIGTERM, `stop()` true) ends the load at the next iteration: the requests finished are written,
the rest recorded as cut, and the sweep ends after that point."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from kvscope.errors import KvscopeError
from kvscope.io import AtomicFolder, os_reason, write_parquet
from kvscope.measure.serve.output import default_out_dir, frames, write_serve_run
from kvscope.measure.serve.run import ServeResult, serve
from kvscope.measure.serve.spec import ServeSpec, check_spec
from kvscope.schema import REQUESTS_FILE, SERVE_SWEEP_FILE, SUMMARY_FILE

OUT_LABEL = "serve folder"
SWEEP_KEYS = ("policy", "rps", "concurrency")


@dataclass
class ServeRun:
    out_dir: Path
    result: ServeResult
    tables: dict[str, pd.DataFrame]

    @property
    def summary(self) -> pd.DataFrame:
        return self.tables[SUMMARY_FILE]

    @property
    def requests(self) -> pd.DataFrame:
        return self.tables[REQUESTS_FILE]


def execute_serve(spec: ServeSpec, stop: Callable[[], bool] | None = None, say: Callable[[str], None] | None = None,
                  progress: Callable[[int, int, int, float], None] | None = None) -> ServeRun:
    """Check, run and write one served load. KvscopeError for bad input before any file is made."""
    check_spec(spec)
    model = spec.model or "default"
    out = AtomicFolder(Path(spec.out) if spec.out else default_out_dir(model, spec.policy), OUT_LABEL)
    try:
        out.open()
        result = serve(spec, stop, say, progress)
        tables = frames(result, out.final.name)
        try:
            write_serve_run(result, tables, result.nvml, out.tmp)
        except OSError as exc:
            raise KvscopeError(f"cannot write the serve folder {out.final}: {os_reason(exc)}; nothing was kept"
                               ) from None
        return ServeRun(out.commit(), result, tables)
    except BaseException:
        out.discard()
        raise


def point_name(i: int, p: ServeSpec) -> str:
    load = f"rps{p.rps:g}" if p.rps is not None else (f"c{p.concurrency}" if p.concurrency is not None else "file")
    return f"p{i:02d}-{p.policy}-{load}"


def execute_sweep(points: list[ServeSpec], out: Path, stop: Callable[[], bool] | None = None,
                  say: Callable[[str], None] | None = None,
                  progress: Callable[[int, int, int, float], None] | None = None) -> tuple[Path, pd.DataFrame]:
    """Every point into `out/<point>/`, and `out/serve_sweep.parquet` after each."""
    say = say or (lambda _m: None)
    if out.exists() and any(out.iterdir()):
        raise KvscopeError(f"serve sweep folder {out} exists and is not empty; give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, point in enumerate(points):
        say(f"point {i + 1}/{len(points)}: {point_name(i, point)}")
        run = execute_serve(replace(point, out=str(out / point_name(i, point))), stop, say, progress)
        row = run.summary.copy()
        for k in reversed(SWEEP_KEYS):
            if k in row.columns:
                row = row.drop(columns=k)
            row.insert(0, k, getattr(point, k))
        row.insert(len(SWEEP_KEYS), "point", run.out_dir.name)
        rows.append(row)
        table = pd.concat(rows, ignore_index=True)
        write_parquet(table, out / SERVE_SWEEP_FILE, {**run.result.meta, "sweep": [point_name(j, p) for j, p in
                                                                                   enumerate(points)]})
        if stop is not None and stop():
            say(f"stopped after point {i + 1} of {len(points)}")
            break
    return out, pd.concat(rows, ignore_index=True)
