"""The calibration cache read without torch: `kvscope calibrate`'s ceilings per GPU name, as `kvscope run` and the
analyses (`kvscope align`'s class roofline) look them up. JSON at `$XDG_CACHE_HOME/kvscope/calibration.json`
(default `~/.cache/kvscope/calibration.json`); written by `kvscope.profiler.calibrate.save`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kvscope.errors import KvscopeError
from kvscope.io import check_path, os_reason
from kvscope.schema import Ceilings


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvscope" / "calibration.json"


def read_cache(p: Path) -> dict[str, Any]:
    """The calibration cache as a dict: empty when there is no file; a one-line KvscopeError when there is one that
    cannot be used (it is left in place, never overwritten)."""
    if check_path(p, "calibration cache") is None:  # a name too long, a loop of links: one line
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        why = os_reason(e) if isinstance(e, OSError) else str(e).splitlines()[0]
        raise KvscopeError(f"calibration cache {p} cannot be read ({why}); move it away and run `kvscope calibrate` "
                           "again") from None
    if not isinstance(data, dict):
        raise KvscopeError(f"calibration cache {p} is not a JSON object; move it away and run `kvscope calibrate` "
                           "again")
    return data


def load_ceilings(gpu: str, path: Path | None = None) -> Ceilings | None:
    """Cached ceilings of this GPU, or None when it was never calibrated. A cache that exists but cannot be used
    raises KvscopeError (see `read_cache`)."""
    p = path or cache_path()
    entry = read_cache(p).get(gpu)
    if entry is None:
        return None
    try:
        return Ceilings(gpu, float(entry["copy_gb_s"]), float(entry["bf16_tflop_s"]))
    except (TypeError, KeyError, ValueError):
        raise KvscopeError(f"calibration cache {p}: the entry for {gpu!r} lacks numeric copy_gb_s / bf16_tflop_s; "
                           "run `kvscope calibrate` again") from None
