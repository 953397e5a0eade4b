"""`--phase-map prefill=RE,decode=RE,step=RE,layer=RE`: another engine's ranges labelled as kvscope's levels, so
the step table and the kernel-class breakdown work on them.

Each key's regular expression is searched (`re.search`) in the message of every range of any domain; the first key
that matches, in the order prefill, decode, step, layer, labels the range:

| key | labelled as | keys it gives |
| --- | --- | --- |
| prefill | phase `prefill` (also a step: the prefill is step 0, as in kvscope runs) | phase=prefill, step=0 |
| decode | phase `decode`; with no `step` key, each match is also one decode step | phase=decode (step) |
| step | step | phase=decode unless an enclosing labelled range says otherwise; step |
| layer | layer | layer |

Step and layer numbers come from the expression's first group when it captures digits (`step=^step (\\d+)`),
otherwise steps are numbered 1, 2, ... in start order per process and layers are left empty. Labelled ranges
inherit the keys they lack from their nearest labelled enclosing range.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kvscope.analysis.nsys.filters import search_mask, wrong_value
from kvscope.errors import KvscopeError

PHASE_MAP_KEYS = ("prefill", "decode", "step", "layer")
_SPLIT = re.compile(r",(?=\s*(?:" + "|".join(PHASE_MAP_KEYS) + r")\s*=)")


@dataclass(frozen=True)
class PhaseMap:
    """key -> compiled pattern, for the keys given."""

    patterns: tuple[tuple[str, re.Pattern[str]], ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.patterns)


def parse_phase_map(spec: str | Mapping[str, str] | PhaseMap) -> PhaseMap:
    """`prefill=RE,decode=RE,...` (commas inside an expression are kept unless followed by `KEY=`), or a mapping
    of key to expression. Unknown or repeated keys, empty or invalid expressions, and values of another type (the
    Python API passes them unparsed) are a one-line KvscopeError."""
    if isinstance(spec, PhaseMap):
        return spec
    if not isinstance(spec, (str, Mapping)):
        raise KvscopeError("--phase-map must be KEY=RE,... (text) or a mapping of key to regular expression, got "
                           f"{wrong_value(spec)}")
    pairs = list(spec.items()) if isinstance(spec, Mapping) else [_pair(part) for part in _SPLIT.split(spec)]
    seen: dict[str, re.Pattern[str]] = {}
    for key, pattern in pairs:
        if key not in PHASE_MAP_KEYS:
            raise KvscopeError(f"--phase-map: unknown key {key!r} (keys: {', '.join(PHASE_MAP_KEYS)})")
        if key in seen:
            raise KvscopeError(f"--phase-map: {key} given twice")
        if not isinstance(pattern, str):
            raise KvscopeError(f"--phase-map: {key}= must be a regular expression (text), got {wrong_value(pattern)}")
        if not pattern:
            raise KvscopeError(f"--phase-map: {key}= needs a regular expression")
        try:
            seen[key] = re.compile(pattern)
        except re.error as exc:
            raise KvscopeError(f"--phase-map: {key}={pattern[:60]!r} is not a regular expression ({exc})") from None
    if not seen:
        raise KvscopeError("--phase-map needs at least one of " + ", ".join(f"{k}=RE" for k in PHASE_MAP_KEYS))
    return PhaseMap(tuple((k, seen[k]) for k in PHASE_MAP_KEYS if k in seen))


def _pair(part: str) -> tuple[str, str]:
    key, eq, pattern = part.partition("=")
    if not eq:
        raise KvscopeError(f"--phase-map: {part.strip()[:60]!r} is not KEY=RE (keys: {', '.join(PHASE_MAP_KEYS)})")
    return key.strip(), pattern


def mapped_keys(r: pd.DataFrame, pm: PhaseMap) -> pd.DataFrame:
    """Per range of `r` (columns name, pid, start_ns): kind (phase, step, layer or NA), phase, step, layer as the
    phase map labels it, before inheritance."""
    names = r["name"].fillna("").astype(str)
    kind = pd.Series(pd.NA, index=r.index, dtype="object")
    phase = pd.Series(pd.NA, index=r.index, dtype="object")
    step = pd.Series(pd.NA, index=r.index, dtype="Int64")
    layer = pd.Series(pd.NA, index=r.index, dtype="Int64")
    per_step = "step" not in pm.keys
    for key, pat in pm.patterns:
        hit = search_mask(names, pat) & kind.isna().to_numpy()
        if not hit.any():
            continue
        number = _first_group_int(names[hit], pat)
        if key == "prefill":
            kind[hit], phase[hit], step[hit] = "phase", "prefill", 0
        elif key == "decode" and not per_step:
            kind[hit], phase[hit] = "phase", "decode"
        elif key in ("decode", "step"):
            kind[hit] = "step"
            if key == "decode":
                phase[hit] = "decode"
            step[hit] = number.where(number.notna(), _ordinal(r.loc[hit]))
        else:
            kind[hit], layer[hit] = "layer", number
    return pd.DataFrame({"kind": kind, "phase": phase, "step": step, "layer": layer})


def _first_group_int(names: pd.Series, pat: re.Pattern[str]) -> pd.Series:
    if not pat.groups:
        return pd.Series(pd.NA, index=names.index, dtype="Int64")
    first = names.str.extract(pat, expand=True)[0]
    return pd.to_numeric(first.where(first.str.fullmatch(r"\d{1,18}", na=False)), errors="coerce").astype("Int64")


def _ordinal(rows: pd.DataFrame) -> pd.Series:
    """1, 2, ... in start order within each process."""
    order = rows.sort_values(["pid", "start_ns"], kind="stable")
    n = order.groupby("pid").cumcount().to_numpy(np.int64) + 1
    return pd.Series(n, index=order.index, dtype="Int64").reindex(rows.index)
