"""The "why" of a sweep: sentences computed from a sweep file's rows, each with the numbers it used.

A sweep (rows as `kvscope.analysis.sweep_file.read_sweep` gives them: one model, numbers checked) is read as groups
along one axis: a *seq sweep* (batch fixed, prompt length varies) and a *batch sweep* (prompt length fixed, batch
varies), per engine (`engine` column; a file without it is kvscope's loop; a file of two engines' sweeps is two).
Configurations flagged `oom` are left out. Each finding either says something (`sentence`, with `values`, the numbers
it was computed from) or names what it lacks (`missing`); nothing is written from data that is not there.

Findings and their rules:
- `class_growth`: the decode kernel class (`decode_<class>_ms`, attribution columns of `kvscope sweep --nsys`) whose
  share of the step's kernel time grows most from the smallest to the largest point (by `MIN_GROWTH_PP` points at
  least; otherwise no class is said to grow and the largest is named); its achieved GB/s where its bytes are known
  (attention reads the KV cache, gemm the weights).
- `kv_bound`: where the KV cache read per decode step exceeds the weights read (KV bytes: `decode_bytes -
  weights_bytes`, or from the model facts `kv_predicted_bytes / (batch * (seq_len + gen_tokens))` per token at the
  decode steps' mean context `seq_len + gen_tokens / 2`); the crossover is interpolated linearly between the two
  points around it (KV bytes are linear in both axes). Whether the measured step time bends there: with step time
  = bytes / bandwidth, the log-log slope of step time against the axis is the KV share of the bytes, 0.5 at the
  crossover, so the bend is the first measured segment whose slope reaches `KV_BEND_SLOPE`; it is "there" when that
  segment's geometric middle lies within `BEND_MATCH_FACTOR` of the crossover.
- `prefill_launch_bound`: the smallest prompt from which every prefill is no longer launch-bound
  (`prefill_launch_bound`, with `prefill_idle_pct`); `prefill_mfu`: the first prompt whose MFU reaches
  `COMPUTE_BOUND_MFU_PCT`; `prefill_attention_share`: attention's share of the largest prefill's kernel time.
- `batching_free`: the first batch whose decode step is more than `BATCH_FREE_PCT` slower than the smallest batch's,
  and decode tokens/s against linear scaling from the smallest batch.
- `decode_idle`, `prefill_idle`: the GPU idle share of the phase's span at the smallest and largest point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kvscope.analysis.inputs import numeric_column
from kvscope.schema import ATTRIBUTION_CLASS_WORDS, BYTES_PER_GB, KVSCOPE_ENGINE, MS_PER_S, is_oom

MIN_GROWTH_PP = 1.0  # a class whose share grows less than this (percentage points) is not said to grow
BATCH_FREE_PCT = 10.0  # a step more than this much slower than the smallest batch's: batching is no longer free
COMPUTE_BOUND_MFU_PCT = 50.0  # a prefill at or above this MFU is called compute-bound
KV_BEND_SLOPE = 0.5  # log-log slope of step time vs the axis at which KV bytes equal weight bytes
BEND_MATCH_FACTOR = 2.0  # the bend is "at" the crossover when within this factor of it
NSYS_HINT = "(attribution columns of `kvscope sweep --nsys`)"
FINDING_COLUMNS = ("engine", "axis", "fixed", "finding", "sentence", "values", "missing")


@dataclass(frozen=True)
class Finding:
    finding: str
    sentence: str = ""
    values: dict[str, float | int | str] = field(default_factory=dict)
    missing: str = ""


@dataclass(frozen=True)
class SweepGroup:
    """Rows of one engine along one axis (`seq_len` or `batch`), the other key fixed at `fixed`; sorted by axis."""

    engine: str
    axis: str
    fixed: int
    rows: pd.DataFrame

    @property
    def label(self) -> str:
        other = "batch" if self.axis == "seq_len" else "prompt"
        kind = "seq sweep" if self.axis == "seq_len" else "batch sweep"
        return f"{kind} at {other} {self.fixed:,} ({self.engine})"


def engines(df: pd.DataFrame) -> pd.Series:
    """The engine of every row (`kvscope` where the column is absent or empty)."""
    if "engine" not in df.columns:
        return pd.Series(KVSCOPE_ENGINE, index=df.index)
    e = df["engine"].astype("string").fillna("").str.strip()
    return e.where(e != "", KVSCOPE_ENGINE).astype(str)


def not_oom(df: pd.DataFrame) -> pd.DataFrame:
    if "flag" not in df.columns:
        return df
    return df[~df["flag"].map(is_oom).to_numpy(bool)]


def sweep_groups(df: pd.DataFrame) -> list[SweepGroup]:
    """Every (engine, axis, fixed value) with at least two distinct points, out-of-memory rows left out."""
    ok = not_oom(df)
    eng = engines(ok)
    out = []
    for engine in dict.fromkeys(eng):
        rows = ok[(eng == engine).to_numpy()]
        for axis, other in (("seq_len", "batch"), ("batch", "seq_len")):
            for fixed, g in rows.groupby(other, sort=True):
                g = g.drop_duplicates(subset=[axis]).sort_values(axis)
                if len(g) >= 2:
                    out.append(SweepGroup(engine, axis, int(fixed), g.reset_index(drop=True)))
    return out


# ---- column access ------------------------------------------------------------------------------------------------
def column(rows: pd.DataFrame, col: str) -> np.ndarray | None:
    """`rows[col]` as float64 (NaN where missing), or None when absent or holding text."""
    if col not in rows.columns:
        return None
    num = numeric_column(rows, col)
    if num.values is None:
        return None
    return num.values.to_numpy(np.float64, na_value=np.nan)


def bool_column(rows: pd.DataFrame, col: str) -> np.ndarray | None:
    """`rows[col]` as 1.0 (true), 0.0 (false) or NaN (missing / not a truth value); None when absent."""
    if col not in rows.columns:
        return None
    out = np.full(len(rows), np.nan)
    for i, v in enumerate(rows[col]):
        text = str(v).strip().lower()
        if isinstance(v, bool | np.bool_) or text in ("true", "false", "1", "0", "1.0", "0.0"):
            out[i] = 1.0 if text in ("true", "1", "1.0") else 0.0
    return out


def first_of(rows: pd.DataFrame, *cols: str) -> tuple[str, np.ndarray] | None:
    """The first of `cols` present with at least one finite value."""
    for c in cols:
        v = column(rows, c)
        if v is not None and np.isfinite(v).any():
            return c, v
    return None


def step_ms(rows: pd.DataFrame) -> tuple[str, np.ndarray] | None:
    return first_of(rows, "decode_p50_ms_per_tok", "tpot_p50_ms")


def class_ms(rows: pd.DataFrame, phase: str) -> dict[str, np.ndarray]:
    """The kernel-class time columns of `phase` that the rows have (NaN as 0 where another class is present)."""
    found = {c: column(rows, f"{phase}_{c}_ms") for c in ATTRIBUTION_CLASS_WORDS}
    return {c: v for c, v in found.items() if v is not None}


def kv_read_bytes(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(KV bytes read per decode step, weight bytes read per step, how they were found), or None without the
    columns. KV from the model facts (`kv_predicted_bytes` per token at the decode steps' mean context) where the
    file has them, the weights then as `decode_bytes` less that KV (or `weights_bytes`); otherwise the KV as
    `decode_bytes - weights_bytes`."""
    total, w = column(rows, "decode_bytes"), column(rows, "weights_bytes")
    has_total = total is not None and bool(np.isfinite(total).all())
    pred, gen = column(rows, "kv_predicted_bytes"), column(rows, "gen_tokens")
    if pred is not None and gen is not None:
        seq, batch = rows["seq_len"].to_numpy(np.float64), rows["batch"].to_numpy(np.float64)
        per_token = pred / (batch * (seq + gen))  # per token of one sequence
        kv = batch * (seq + gen / 2) * per_token
        if np.isfinite(kv).all():
            how = "kv_predicted_bytes per token at the mean decode context seq_len + gen_tokens / 2"
            if has_total:
                return kv, total - kv, how + "; weights: decode_bytes less that"
            if w is not None and np.isfinite(w).all():
                return kv, w, how + "; weights: weights_bytes"
    if has_total and w is not None and np.isfinite(w).all():
        return total - w, w, "decode_bytes - weights_bytes"
    return None


def _need(*cols: str) -> str:
    return f"needs column(s) {', '.join(cols)}"


def _pct(x: float) -> str:
    return f"{x:.0f}%" if abs(x) >= 10 else f"{x:.1f}%"


def _size(n: float) -> str:
    """Bytes in GB, MB or kB (powers of 10), whichever keeps three significant figures readable."""
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _at(axis: str, x: float) -> str:
    return f"{x:,.0f} tokens" if axis == "seq_len" else f"batch {x:,.0f}"


# ---- findings -----------------------------------------------------------------------------------------------------
def class_growth(g: SweepGroup) -> Finding:
    name = "class_growth"
    classes = class_ms(g.rows, "decode")
    if not classes:
        return Finding(name, missing=_need(*(f"decode_{c}_ms" for c in ATTRIBUTION_CLASS_WORDS)) + " " + NSYS_HINT)
    table = np.vstack([np.nan_to_num(v, nan=0.0) for v in classes.values()])  # (classes, points)
    present = np.vstack([np.isfinite(v) for v in classes.values()]).any(axis=0)
    total = table.sum(axis=0)
    keep = np.flatnonzero(present & (total > 0))
    if len(keep) < 2:
        return Finding(name, missing="needs kernel-class times at two points or more")
    i0, i1 = int(keep[0]), int(keep[-1])
    share0, share1 = table[:, i0] / total[i0] * 100, table[:, i1] / total[i1] * 100
    k = int(np.argmax(share1 - share0))
    cls = list(classes)[k]
    x = g.rows[g.axis].to_numpy()
    vals: dict[str, float | int | str] = {
        "class": cls, "from": int(x[i0]), "to": int(x[i1]), "share_from_pct": float(share0[k]),
        "share_to_pct": float(share1[k]), "class_ms_from": float(table[k, i0]), "class_ms_to": float(table[k, i1])}
    what = "context" if g.axis == "seq_len" else "batch"
    if share1[k] - share0[k] < MIN_GROWTH_PP:
        k = int(np.argmax(share1))
        cls = list(classes)[k]
        vals.update({"class": cls, "share_from_pct": float(share0[k]), "share_to_pct": float(share1[k]),
                     "class_ms_from": float(table[k, i0]), "class_ms_to": float(table[k, i1])})
        sentence = (f"No kernel class gains {MIN_GROWTH_PP:g} point(s) of the decode step's kernel time with {what}; "
                    f"the largest, {cls}, is {_pct(share0[k])} at {_at(g.axis, x[i0])} and {_pct(share1[k])} at "
                    f"{_at(g.axis, x[i1])}")
    else:
        sentence = (f"{cls.capitalize()} grows most with {what}: {_pct(share0[k])} of the decode step's kernel time "
                    f"at {_at(g.axis, x[i0])}, {_pct(share1[k])} at {_at(g.axis, x[i1])}")
    moved = _class_bytes(g.rows, cls)
    if moved is not None and table[k, i1] > 0:
        gb_s = float(moved[i1] / (table[k, i1] / MS_PER_S) / BYTES_PER_GB)
        vals["class_gb_s_to"] = gb_s
        sentence += f", where it moves {'the KV cache' if cls == 'attention' else 'the weights'} at {gb_s:,.0f} GB/s"
        copy = calibrated_copy_gb_s(g.rows, i1)
        if copy is not None:
            vals["copy_gb_s"] = copy
            sentence += f" ({_pct(gb_s / copy * 100)} of the calibrated copy bandwidth)"
    return Finding(name, sentence + ".", vals)


def _class_bytes(rows: pd.DataFrame, cls: str) -> np.ndarray | None:
    """Bytes a kernel class must move per decode step, where known: attention the KV cache, gemm the weights."""
    kv = kv_read_bytes(rows)
    if kv is None:
        return None
    return kv[0] if cls == "attention" else kv[1] if cls == "gemm" else None


def calibrated_copy_gb_s(rows: pd.DataFrame, i: int) -> float | None:
    """The calibrated copy bandwidth behind row i's MBU: `decode_span_gb_s / decode_mbu_pct * 100`, or the run
    summary's `decode_gb_s / decode_mbu` (a fraction)."""
    for gb_col, col, scale in (("decode_span_gb_s", "decode_mbu_pct", 100.0), ("decode_gb_s", "decode_mbu", 1.0)):
        gb, mbu = column(rows, gb_col), column(rows, col)
        if gb is not None and mbu is not None and np.isfinite(gb[i]) and np.isfinite(mbu[i]) and mbu[i] > 0:
            return float(gb[i] / (mbu[i] / scale))
    return None


def kv_bound(g: SweepGroup) -> Finding:
    name = "kv_bound"
    kv = kv_read_bytes(g.rows)
    if kv is None:
        return Finding(name, missing=_need("weights_bytes", "decode_bytes") + " (or kv_predicted_bytes and "
                                                                             "gen_tokens)")
    read, w, how = kv
    x = g.rows[g.axis].to_numpy(np.float64)
    what = "context" if g.axis == "seq_len" else "batch"
    vals: dict[str, float | int | str] = {"kv_bytes_from": float(read[0]), "kv_bytes_to": float(read[-1]),
                                          "weights_bytes": float(w[-1]), "kv_bytes_source": how}
    over = np.flatnonzero(read > w)
    if len(over) == 0:
        vals["kv_over_weights_pct_to"] = float(read[-1] / w[-1] * 100)
        return Finding(name, f"The decode step stays weight-bound over the whole {what} range: at {_at(g.axis, x[-1])} "
                             f"it reads {_size(read[-1])} of KV cache against "
                             f"{_size(w[-1])} of weights "
                             f"({_pct(read[-1] / w[-1] * 100)}).", vals)
    i = int(over[0])
    if i == 0:
        vals["crossover"] = float("nan")
        return Finding(name, f"The decode step is KV-bound from the smallest point on: at {_at(g.axis, x[0])} it "
                             f"reads {_size(read[0])} of KV cache against {_size(w[0])} of weights.", vals)
    cross = float(x[i - 1] + (w[i] - read[i - 1]) * (x[i] - x[i - 1]) / (read[i] - read[i - 1]))
    vals["crossover"] = cross
    sentence = (f"The decode step turns from weight-bound to KV-bound at about {_at(g.axis, cross)}: there the KV "
                f"cache read per step ({_size(read[i])} at {_at(g.axis, x[i])}) passes the weights "
                f"({_size(w[i])})")
    st = step_ms(g.rows)
    if st is None:
        return Finding(name, sentence + "; the step time is not in the file, so no bend is looked for.", vals)
    t = st[1]
    ok = np.isfinite(t) & (t > 0)
    xs, ts = x[ok], t[ok]
    if len(xs) < 2:
        return Finding(name, sentence + "; fewer than two step times, so no bend is looked for.", vals)
    slopes = np.log(ts[1:] / ts[:-1]) / np.log(xs[1:] / xs[:-1])
    vals["slope_first"], vals["slope_last"] = float(slopes[0]), float(slopes[-1])
    steep = np.flatnonzero(slopes >= KV_BEND_SLOPE)
    if len(steep) == 0:
        vals["bend"] = float("nan")
        return Finding(name, sentence + f"; the measured step time does not bend: its log-log slope against {what} "
                                        f"stays below {KV_BEND_SLOPE} (last segment {slopes[-1]:.2f}).", vals)
    j = int(steep[0])
    bend = float(math.sqrt(xs[j] * xs[j + 1]))
    vals["bend"], vals["bend_slope"] = bend, float(slopes[j])
    there = cross / BEND_MATCH_FACTOR <= bend <= cross * BEND_MATCH_FACTOR
    vals["bends_there"] = int(there)
    verdict = "bends there" if there else "bends elsewhere"
    return Finding(name, sentence + f"; the measured step time {verdict}: its log-log slope against {what} first "
                                    f"reaches {KV_BEND_SLOPE} between {_at(g.axis, xs[j])} and "
                                    f"{_at(g.axis, xs[j + 1])} ({slopes[j]:.2f}; {slopes[0]:.2f} on the first "
                                    "segment).", vals)


def prefill_launch_bound(g: SweepGroup) -> Finding:
    name = "prefill_launch_bound"
    lb, idle = bool_column(g.rows, "prefill_launch_bound"), column(g.rows, "prefill_idle_pct")
    if lb is None or idle is None:
        return Finding(name, missing=_need("prefill_launch_bound", "prefill_idle_pct") + " " + NSYS_HINT)
    ok = np.isfinite(lb)
    x, lb, idle = g.rows[g.axis].to_numpy()[ok], lb[ok], idle[ok]
    if len(x) < 2:
        return Finding(name, missing="needs prefill_launch_bound at two points or more")
    vals: dict[str, float | int | str] = {"idle_pct_from": float(idle[0]), "idle_pct_to": float(idle[-1])}
    if lb.all():
        return Finding(name, f"The prefill is launch-bound at every measured point up to {_at(g.axis, x[-1])} (GPU "
                             f"idle {_pct(idle[-1])} of its span there).", vals)
    if not lb.any():
        return Finding(name, f"The prefill is not launch-bound at any measured point, from {_at(g.axis, x[0])} "
                             f"(GPU idle {_pct(idle[0])} of its span).", vals)
    last_lb = int(np.flatnonzero(lb)[-1])
    if last_lb == len(x) - 1:
        return Finding(name, f"The prefill is launch-bound again at the largest point, {_at(g.axis, x[-1])} (GPU "
                             f"idle {_pct(idle[-1])}).", vals)
    k = last_lb + 1
    vals.update({"turns_at": int(x[k]), "last_launch_bound": int(x[last_lb]), "idle_pct_last_launch_bound":
                 float(idle[last_lb]), "idle_pct_turns_at": float(idle[k])})
    return Finding(name, f"The prefill stops being launch-bound at {_at(g.axis, x[k])}: GPU idle "
                         f"{_pct(idle[last_lb])} of its span at {_at(g.axis, x[last_lb])}, {_pct(idle[k])} at "
                         f"{_at(g.axis, x[k])}.", vals)


def prefill_mfu(g: SweepGroup) -> Finding:
    name = "prefill_mfu"
    col = first_of(g.rows, "prefill_mfu_pct", "prefill_mfu")
    if col is None:
        return Finding(name, missing=_need("prefill_mfu_pct") + " (or prefill_mfu; needs `kvscope calibrate`)")
    mfu = col[1] * (100.0 if col[0] == "prefill_mfu" else 1.0)
    ok = np.isfinite(mfu)
    if ok.sum() < 2:
        return Finding(name, missing="needs prefill MFU at two points or more (`kvscope calibrate` on the GPU)")
    x, mfu = g.rows[g.axis].to_numpy()[ok], mfu[ok]
    vals: dict[str, float | int | str] = {"threshold_pct": COMPUTE_BOUND_MFU_PCT, "mfu_pct_from": float(mfu[0]),
                                          "mfu_pct_to": float(mfu[-1]), "mfu_column": col[0]}
    hit = np.flatnonzero(mfu >= COMPUTE_BOUND_MFU_PCT)
    if len(hit) == 0:
        return Finding(name, f"The prefill's MFU stays below {COMPUTE_BOUND_MFU_PCT:.0f}% (from {_pct(mfu[0])} at "
                             f"{_at(g.axis, x[0])} to {_pct(mfu[-1])} at {_at(g.axis, x[-1])}).", vals)
    k = int(hit[0])
    vals.update({"reaches_at": int(x[k]), "mfu_pct_there": float(mfu[k])})
    if k == 0:
        return Finding(name, f"The prefill is compute-bound from the smallest measured point, {_at(g.axis, x[0])}: "
                             f"its MFU is {_pct(mfu[0])} there (threshold {COMPUTE_BOUND_MFU_PCT:.0f}%) and "
                             f"{_pct(mfu[-1])} at {_at(g.axis, x[-1])}.", vals)
    return Finding(name, f"The prefill turns compute-bound at {_at(g.axis, x[k])}: its MFU reaches "
                         f"{_pct(mfu[k])} there (threshold {COMPUTE_BOUND_MFU_PCT:.0f}%; {_pct(mfu[0])} at "
                         f"{_at(g.axis, x[0])}).", vals)


def prefill_attention_share(g: SweepGroup) -> Finding:
    name = "prefill_attention_share"
    classes = class_ms(g.rows, "prefill")
    if "attention" not in classes:
        return Finding(name, missing=_need("prefill_attention_ms", "and the other prefill_<class>_ms") + " " +
                       NSYS_HINT)
    total = np.vstack([np.nan_to_num(v, nan=0.0) for v in classes.values()]).sum(axis=0)
    att = classes["attention"]
    ok = np.flatnonzero(np.isfinite(att) & (total > 0))
    if len(ok) < 2:
        return Finding(name, missing="needs prefill kernel-class times at two points or more")
    i0, i1 = int(ok[0]), int(ok[-1])
    x = g.rows[g.axis].to_numpy()
    s0, s1 = att[i0] / total[i0] * 100, att[i1] / total[i1] * 100
    return Finding(name, f"Attention is {_pct(s1)} of the prefill's kernel time at {_at(g.axis, x[i1])}, against "
                         f"{_pct(s0)} at {_at(g.axis, x[i0])}.",
                   {"share_from_pct": float(s0), "share_to_pct": float(s1), "from": int(x[i0]), "to": int(x[i1])})


def batching_free(g: SweepGroup) -> Finding:
    name = "batching_free"
    st = step_ms(g.rows)
    if st is None:
        return Finding(name, missing=_need("decode_p50_ms_per_tok"))
    b = g.rows["batch"].to_numpy(np.float64)
    t = st[1]
    ok = np.isfinite(t) & (t > 0)
    b, t = b[ok], t[ok]
    if len(b) < 2:
        return Finding(name, missing="needs decode step times at two batch sizes or more")
    tok = b / t * MS_PER_S  # decode tokens/s of the batch
    ideal = tok[0] * b / b[0]
    eff = tok / ideal * 100
    growth = (t / t[0] - 1) * 100
    vals: dict[str, float | int | str] = {"base_batch": int(b[0]), "base_step_ms": float(t[0]),
                                          "threshold_pct": BATCH_FREE_PCT, "largest_batch": int(b[-1]),
                                          "linear_pct_largest": float(eff[-1]), "step_ms_largest": float(t[-1])}
    over = np.flatnonzero(growth > BATCH_FREE_PCT)
    tail = (f"; at batch {b[-1]:,.0f} the step takes {t[-1]:,.2f} ms and decode runs at {tok[-1]:,.0f} tokens/s, "
            f"{_pct(eff[-1])} of linear scaling from batch {b[0]:,.0f}")
    if len(over) == 0:
        return Finding(name, f"Batching stays free over the sweep: every decode step is within {BATCH_FREE_PCT:.0f}% "
                             f"of batch {b[0]:,.0f}'s {t[0]:,.2f} ms" + tail + ".", vals)
    k = int(over[0])
    vals.update({"stops_at": int(b[k]), "step_ms_there": float(t[k]), "growth_pct_there": float(growth[k]),
                 "linear_pct_there": float(eff[k]), "free_up_to": int(b[k - 1]) if k > 0 else 0})
    if k > 1:
        upto = (f"Batching is free up to batch {b[k - 1]:,.0f} (decode step within {BATCH_FREE_PCT:.0f}% of batch "
                f"{b[0]:,.0f}'s {t[0]:,.2f} ms) and stops being free")
    else:
        upto = f"Batching stops being free at once (batch {b[0]:,.0f}'s decode step takes {t[0]:,.2f} ms)"
    return Finding(name, upto + f" at batch {b[k]:,.0f}: the step takes {t[k]:,.2f} ms "
                                f"(+{growth[k]:.0f}%) and decode runs at {tok[k]:,.0f} tokens/s, {_pct(eff[k])} of "
                                "linear scaling" + (tail if k < len(b) - 1 else "") + ".", vals)


def idle_trend(phase: str) -> Callable[[SweepGroup], Finding]:
    def find(g: SweepGroup) -> Finding:
        name = f"{phase}_idle"
        idle = column(g.rows, f"{phase}_idle_pct")
        if idle is None:
            return Finding(name, missing=_need(f"{phase}_idle_pct") + " " + NSYS_HINT)
        ok = np.flatnonzero(np.isfinite(idle))
        if len(ok) < 2:
            return Finding(name, missing=f"needs {phase}_idle_pct at two points or more")
        x = g.rows[g.axis].to_numpy()
        i0, i1 = int(ok[0]), int(ok[-1])
        move = "falls to" if idle[i1] < idle[i0] else "rises to" if idle[i1] > idle[i0] else "stays at"
        kernels = column(g.rows, f"{phase}_kernels")
        extra = ""
        vals: dict[str, float | int | str] = {"idle_pct_from": float(idle[i0]), "idle_pct_to": float(idle[i1]),
                                              "from": int(x[i0]), "to": int(x[i1])}
        if kernels is not None and np.isfinite(kernels[[i0, i1]]).all():
            vals.update({"kernels_from": float(kernels[i0]), "kernels_to": float(kernels[i1])})
            extra = f" ({kernels[i0]:,.0f} and {kernels[i1]:,.0f} kernels{' per step' if phase == 'decode' else ''})"
        what = "decode step" if phase == "decode" else "prefill"
        return Finding(name, f"The GPU is idle {_pct(idle[i0])} of the {what}'s span at {_at(g.axis, x[i0])}; the "
                             f"share {move} {_pct(idle[i1])} at {_at(g.axis, x[i1])}{extra}.", vals)
    return find


SEQ_FINDINGS: tuple[Callable[[SweepGroup], Finding], ...] = (
    class_growth, kv_bound, prefill_launch_bound, prefill_mfu, prefill_attention_share, idle_trend("decode"),
    idle_trend("prefill"))
BATCH_FINDINGS: tuple[Callable[[SweepGroup], Finding], ...] = (
    batching_free, class_growth, kv_bound, idle_trend("decode"))


def explain_group(g: SweepGroup) -> list[Finding]:
    return [f(g) for f in (SEQ_FINDINGS if g.axis == "seq_len" else BATCH_FINDINGS)]


def explain(df: pd.DataFrame) -> pd.DataFrame:
    """The findings of every group of a sweep (see `sweep_groups`): columns `FINDING_COLUMNS`; `sentence` empty and
    `missing` saying what is lacking where a finding cannot be computed."""
    rows = [(g.engine, g.axis, g.fixed, f.finding, f.sentence, f.values, f.missing)
            for g in sweep_groups(df) for f in explain_group(g)]
    return pd.DataFrame(rows, columns=list(FINDING_COLUMNS))
