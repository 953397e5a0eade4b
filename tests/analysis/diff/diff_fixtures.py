"""The tests' slowdowns on purpose, made by rewriting real files (never a switch in the engine): a run folder whose
one op (or every region) takes longer, an align folder whose one kernel class does, a sweep whose column does; and
a small kvscope capture with enough repetitions for intervals, built as an nsys SQLite export."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from paths import TESTS
from synthetic_export import Synth

from kvscope.io import read_metadata, write_parquet
from kvscope.schema import KERNELS_FILE, NS_PER_MS, STEPS_FILE, SUMMARY_FILE, TIMINGS_FILE

DIFF_DATA = TESTS / "analysis" / "diff" / "data"
CPU_A, CPU_B = DIFF_DATA / "cpu-a", DIFF_DATA / "cpu-b"
_ENCLOSING = (("layer", ("rep", "phase", "step", "layer")), ("step", ("rep", "step")), ("phase", ("rep", "phase")),
              ("rep", ("rep",)))


def slowed_run(src: Path, out: Path, factor: float, op: str | None = None) -> Path:
    """A copy of the run folder `src` at `out`: every region of op `op` (every layer, both phases) takes `factor`
    times as long, and each region around one (its layer, step, phase, repetition, the run) as much longer as its
    ops did, the host clock's TTFT and decode phase too. `op` None: every region and host time times `factor`."""
    out.mkdir(parents=True)
    t = pd.read_parquet(src / TIMINGS_FILE)
    if op is None:
        t["dur_ms"] = t["dur_ms"] * factor
        extra = None
    else:
        hit = (t["level"] == "op") & (t["op"] == op)
        added = t["dur_ms"].where(hit, 0.0) * (factor - 1.0)
        t["dur_ms"] = t["dur_ms"] + added
        extra = t.loc[hit].assign(added=added[hit])
        for level, keys in _ENCLOSING:
            sums = extra.groupby(list(keys), dropna=False)["added"].sum()
            rows = t["level"] == level
            idx = pd.MultiIndex.from_frame(t.loc[rows, list(keys)])
            t.loc[rows, "dur_ms"] += sums.reindex(idx).fillna(0.0).to_numpy()
        t.loc[t["level"] == "run", "dur_ms"] += float(extra["added"].sum())
    write_parquet(t, out / TIMINGS_FILE, read_metadata(src / TIMINGS_FILE))
    meta = read_metadata(src / SUMMARY_FILE)
    for key, phase in (("host_ttft_ms", "prefill"), ("host_decode_ms", "decode")):
        if key not in meta:  # a run of an earlier kvscope (tests/data/nsys)
            continue
        values = np.asarray(meta[key], dtype=np.float64)
        if extra is None:
            meta[key] = (values * factor).tolist()
        else:
            per_rep = extra[extra["phase"] == phase].groupby("rep")["added"].sum()
            meta[key] = (values + per_rep.reindex(range(len(values))).fillna(0.0).to_numpy()).tolist()
    write_parquet(pd.read_parquet(src / SUMMARY_FILE), out / SUMMARY_FILE, meta)
    return out


def slowed_capture(src: Path, out: Path, kernel_class: str, factor: float) -> Path:
    """A copy of the align folder `src` at `out` in which every kernel of `kernel_class` takes `factor` times as
    long, each step's GPU span and busy time as much longer (its kernels run one after another)."""
    shutil.copytree(src, out)
    k = pd.read_parquet(src / KERNELS_FILE)
    hit = (k["kernel_class"].astype(str) == kernel_class).to_numpy()
    added = np.where(hit, np.rint(k["dur_ns"].to_numpy(np.float64) * (factor - 1.0)), 0.0).astype(np.int64)
    k["dur_ns"] = k["dur_ns"] + added
    k["end_ns"] = k["end_ns"] + added
    write_parquet(k, out / KERNELS_FILE, read_metadata(src / KERNELS_FILE))
    per_step = pd.Series(added, index=k.index)[hit].groupby([k.loc[hit, "rep"], k.loc[hit, "phase"],
                                                             k.loc[hit, "step"]]).sum() / NS_PER_MS
    s = pd.read_parquet(src / STEPS_FILE)
    idx = pd.MultiIndex.from_frame(s[["rep", "phase", "step"]])
    more = per_step.reindex(idx).fillna(0.0).to_numpy()
    s["gpu_busy_ms"] = s["gpu_busy_ms"] + more
    s["gpu_span_ms"] = s["gpu_span_ms"] + more
    write_parquet(s, out / STEPS_FILE, read_metadata(src / STEPS_FILE))
    return out


def slowed_sweep(src: Path, out: Path, column: str, factor: float) -> Path:
    """A copy of the sweep CSV `src` at `out` with `column` times `factor` in every row."""
    df = pd.read_csv(src)
    df[column] = df[column] * factor
    df.to_csv(out, index=False)
    return out


def synthetic_capture(path: Path, reps: int, gemm_factor: float = 1.0, seed: int = 0, norm_offset_ns: int = 0
                      ) -> Path:
    """A kvscope capture as an nsys SQLite export: `run bs=1 seq=8 gen=3`, `reps` repetitions, each a prefill and
    decode steps 1 and 2 (NVTX domain `kvscope`), every step one gemm kernel and one norm kernel launched back to
    back. Kernel times vary by repetition (seeded, within ±5%); the gemm kernels take `gemm_factor` times as long.
    `norm_offset_ns`: the norm kernel starts this long after the gemm kernel ends (the GPU idle in between), or
    when negative this long before it (on a second stream: the two overlap)."""
    rng = np.random.default_rng(seed)
    x = Synth()
    x.domain(1, 1, 1, "kvscope")
    t, corr = 1_000, 1
    run_start = t
    for rep in range(reps):
        rep_start = t
        jitter = 1.0 + rng.uniform(-0.05, 0.05)
        for name in ("prefill", "decode step 1", "decode step 2"):
            gemm = round(20_000 * jitter * gemm_factor)
            norm = round(5_000 * jitter)
            start, norm_start = t, t + 100 + gemm + norm_offset_ns
            x.launch(1, 1, t + 10, t + 20, corr, [(t + 100, t + 100 + gemm, 7)], kernel_name="nvjet_sm90_gemm")
            x.launch(1, 1, t + 30, t + 40, corr + 1, [(norm_start, norm_start + norm, 7 if norm_offset_ns >= 0 else 8)],
                     kernel_name="rms_norm_kernel")
            corr += 2
            t += 100 + gemm + norm_offset_ns + norm + 1_000
            x.range(1, 1, start, t - 500, name, 1)
        x.range(1, 1, rep_start, t, f"rep {rep}", 1)
        t += 1_000
    x.range(1, 1, run_start - 500, t, "run bs=1 seq=8 gen=3", 1)
    return x.write(path)
