"""Capacity planning from a measured batch sweep: how many requests of `prompt + output` tokens a GPU holds, how many
meet the latency targets, and what that sustains (`kvscope capacity`).

Inputs: a batch sweep (one prompt length, two batch sizes or more, one engine) with its TPOT (`tpot_p50_ms`, else
`decode_p50_ms_per_tok`) and TTFT (`ttft_ms`, else `prefill_p50_ms`) per batch, and the model's facts (architecture,
dtype, `weights_bytes`).

Rules, each number labelled with its source (`SOURCES`):
- latency at a batch: `measured` at a swept batch, `interpolated` (linearly in the batch) between two swept batches;
  never extrapolated: beyond the largest swept batch nothing is claimed, and the output says so;
- memory (`computed`, kv_math's budget): a batch b fits when weights + reserve + b * (decode workspace of one sequence
  + KV bytes of one request) <= the GPU's memory. KV bytes of one request:
  - `contiguous`: its whole context, prompt + output tokens, reserved from its start (kvscope's own cache);
  - `paged`: the blocks of the tokens it holds (prompt + tokens generated so far, rounded up to whole blocks of
    `block_tokens`), averaged over its decode with requests spread evenly over their output (steady state); a
    batch of requests all at their last token needs up to ceil((prompt + output) / block) blocks each;
  - `fp8`: one byte per K/V element instead of the run's dtype; latencies are those measured with the run's
    cache (fp8's own step time is not measured);
  - `window` (a model with a sliding window W only): a ring cache of each request's last min(context, W)
    positions, the most attention reads; kvscope's own cache keeps every position (`contiguous`), and the
    latencies are those it measured;
- the batch meeting the targets: the largest b from the smallest swept batch on such that every batch up to b has
  TPOT <= target and TTFT <= target; the operating batch is the smaller of that and the memory limit;
- at the operating batch b (`computed`): decode tokens/s = b / TPOT; request latency = TTFT + output * TPOT; by
  Little's law (L = lambda * W) with b requests in flight, the request rate is b / latency; the concurrency is b.
  This assumes a continuously refilled batch whose prefills do not stall the decode steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.explain import engines, not_oom
from kvscope.analysis.inputs import numeric_column, shown_value
from kvscope.analysis.kv_math import decode_workspace_bytes, dtype_bytes, kv_bytes_per_token
from kvscope.analysis.sweep_file import read_sweep
from kvscope.errors import KvscopeError
from kvscope.model.config import ModelArgs
from kvscope.model.source import ModelSource, resolve_model
from kvscope.schema import GIB_BYTES, MS_PER_S

MEASURED, INTERPOLATED, COMPUTED = "measured", "interpolated", "computed"
SOURCES = (MEASURED, INTERPOLATED, COMPUTED)
DEFAULT_BLOCK_TOKENS = 16
FP8_BYTES = 1
TPOT_COLUMNS = ("tpot_p50_ms", "decode_p50_ms_per_tok")
TTFT_COLUMNS = ("ttft_ms", "prefill_p50_ms")
ROW_COLUMNS = ("scenario", "quantity", "value", "unit", "source", "note")


@dataclass(frozen=True)
class CapacityQuery:
    gpu_mem_bytes: int
    tpot_slo_ms: float
    ttft_slo_ms: float
    prompt: int
    output: int
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    reserve_bytes: int = GIB_BYTES


@dataclass(frozen=True)
class BatchCurve:
    """A batch sweep's latencies: swept batches (ascending), TPOT and TTFT in ms, the columns they came from."""

    batches: np.ndarray
    tpot_ms: np.ndarray
    ttft_ms: np.ndarray
    tpot_column: str
    ttft_column: str
    seq_len: int
    oom_batches: tuple[int, ...] = ()

    def at(self, b: int) -> tuple[float, float, str]:
        """(TPOT, TTFT, source) at batch b, inside the swept range."""
        hit = np.flatnonzero(self.batches == b)
        if len(hit):
            return float(self.tpot_ms[hit[0]]), float(self.ttft_ms[hit[0]]), MEASURED
        return (float(np.interp(b, self.batches, self.tpot_ms)), float(np.interp(b, self.batches, self.ttft_ms)),
                INTERPOLATED)


@dataclass
class CapacityPlan:
    rows: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def add(self, scenario: str, quantity: str, value: float | int | str, unit: str, source: str,
            note: str = "") -> None:
        self.rows.append(dict(zip(ROW_COLUMNS, (scenario, quantity, value, unit, source, note), strict=True)))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(ROW_COLUMNS))

    def value(self, scenario: str, quantity: str) -> Any:
        hits = [r for r in self.rows if r["scenario"] == scenario and r["quantity"] == quantity]
        if len(hits) != 1:
            raise KeyError((scenario, quantity))
        return hits[0]["value"]


def _first_present(df: pd.DataFrame, cols: tuple[str, ...]) -> str | None:
    return next((c for c in cols if c in df.columns), None)


def batch_curve(df: pd.DataFrame, path: Path) -> BatchCurve:
    """The latencies of a batch sweep file, checked: one engine, one prompt length, two batches or more, finite
    positive TPOT and TTFT at every batch that did not run out of memory."""
    tpot_col, ttft_col = _first_present(df, TPOT_COLUMNS), _first_present(df, TTFT_COLUMNS)
    if tpot_col is None or ttft_col is None:
        lacks = [" or ".join(cs) for c, cs in ((tpot_col, TPOT_COLUMNS), (ttft_col, TTFT_COLUMNS)) if c is None]
        raise KvscopeError(f"{path} lacks column(s) {', '.join(lacks)}: not a kvscope sweep file with latencies")
    eng = sorted(set(engines(df)))
    if len(eng) > 1:
        raise KvscopeError(f"{path} holds the rows of several engines ({', '.join(eng)}): plan from one engine's sweep")
    ok = not_oom(df)
    oom = tuple(int(b) for b in df.loc[~df.index.isin(ok.index), "batch"])
    seqs = sorted({int(s) for s in ok["seq_len"]})
    if len(seqs) != 1:
        shown = ", ".join(f"{s:,}" for s in seqs) or "none (every configuration ran out of memory)"
        raise KvscopeError(f"{path} is not a batch sweep: it holds prompt lengths {shown}; a batch sweep has one")
    if ok["batch"].nunique() < 2:
        raise KvscopeError(f"{path} is not a batch sweep: it holds one batch size ({int(ok['batch'].iloc[0])})")
    if ok["batch"].duplicated().any():
        raise KvscopeError(f"{path} holds batch {int(ok['batch'][ok['batch'].duplicated()].iloc[0])} twice")
    ok = ok.sort_values("batch")
    values = []
    for col in (tpot_col, ttft_col):
        num = numeric_column(ok, col)
        if num.values is None:
            raise KvscopeError(f"{path}: {num.problem}")
        v = num.values.to_numpy(np.float64, na_value=np.nan)
        bad = ~(np.isfinite(v) & (v > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise KvscopeError(f"{path}: column {col} holds {shown_value(ok[col].iloc[i])} at batch "
                               f"{int(ok['batch'].iloc[i])}; latencies must be finite and positive")
        values.append(v)
    return BatchCurve(ok["batch"].to_numpy(np.int64), values[0], values[1], tpot_col, ttft_col, seqs[0], oom)


def weights_from_sweep(df: pd.DataFrame, path: Path, args: ModelArgs, w_bytes: int) -> int:
    """`weights_bytes` of the sweep (every row the same), or the model's parameters times the dtype's size."""
    if "weights_bytes" not in df.columns:
        return args.param_count() * w_bytes
    num = numeric_column(df, "weights_bytes")
    if num.values is None:
        raise KvscopeError(f"{path}: {num.problem}")
    v = num.values.dropna().to_numpy(np.float64)
    if not len(v):
        return args.param_count() * w_bytes
    if not (np.isfinite(v).all() and (v > 0).all() and (v == v[0]).all()):
        raise KvscopeError(f"{path}: column weights_bytes holds {', '.join(sorted({shown_value(x) for x in v}))}; "
                           "one finite positive value expected")
    return int(v[0])


def check_kv_facts(df: pd.DataFrame, path: Path, per_token: int, model: str) -> None:
    """The sweep's `kv_predicted_bytes` (per token of prompt + generated, times the batch) must agree with the model's
    KV bytes per token: otherwise the planner would size another model's cache."""
    if not {"kv_predicted_bytes", "gen_tokens"} <= set(df.columns):
        return
    ok = not_oom(df)
    for col in ("kv_predicted_bytes", "gen_tokens"):
        if numeric_column(ok, col).values is None:
            return
    pred = numeric_column(ok, "kv_predicted_bytes").values.to_numpy(np.float64, na_value=np.nan)
    gen = numeric_column(ok, "gen_tokens").values.to_numpy(np.float64, na_value=np.nan)
    expected = per_token * ok["batch"].to_numpy(np.float64) * (ok["seq_len"].to_numpy(np.float64) + gen)
    bad = np.isfinite(pred) & np.isfinite(expected) & (pred != expected)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise KvscopeError(f"{path}: kv_predicted_bytes {pred[i]:,.0f} at batch {int(ok['batch'].iloc[i])} does not "
                           f"match {model}'s {per_token:,} KV bytes per token; pass the sweep's own --model")


def paged_block_sum(prompt: int, output: int, block: int) -> int:
    """Sum over a request's output tokens k = 1..output of the blocks it holds after token k: ceil((prompt+k)/block).
    Divided by `output`, the mean blocks a request holds over its decode."""
    return sum(-(-(prompt + k) // block) for k in range(1, output + 1))


def max_batch_memory(fixed_bytes: int, kv_request_num: int, kv_request_den: int, workspace_one: int) -> int:
    """Largest b with b * (kv_request_num / kv_request_den + workspace_one) <= fixed_bytes (0 when none), in
    integers: b = floor(fixed * den / (num + workspace * den))."""
    if fixed_bytes <= 0:
        return 0
    return int(fixed_bytes * kv_request_den // (kv_request_num + workspace_one * kv_request_den))


def slo_batch(curve: BatchCurve, q: CapacityQuery) -> tuple[int, str]:
    """(largest batch from the smallest swept one on whose every batch meets both targets, what limits it); 0 when
    the smallest swept batch misses them."""
    best, why = 0, ""
    for b in range(int(curve.batches[0]), int(curve.batches[-1]) + 1):
        tpot, ttft, _ = curve.at(b)
        if tpot > q.tpot_slo_ms or ttft > q.ttft_slo_ms:
            missed = []
            if tpot > q.tpot_slo_ms:
                missed.append(f"TPOT {tpot:,.3f} ms > {q.tpot_slo_ms:g} ms")
            if ttft > q.ttft_slo_ms:
                missed.append(f"TTFT {ttft:,.3f} ms > {q.ttft_slo_ms:g} ms")
            why = f"at batch {b}: " + " and ".join(missed)
            break
        best = b
    else:
        why = f"the largest swept batch ({int(curve.batches[-1])}); larger batches are not measured (not extrapolated)"
    return best, why


def plan_capacity(curve: BatchCurve, args: ModelArgs, dtype: str, weights: int, q: CapacityQuery) -> CapacityPlan:
    """The capacity table of the four scenarios ({run dtype, fp8} x {contiguous, paged}), six under a sliding window
    (and `window`, a ring cache of its positions); see the module docstring."""
    _check_query(q, args)
    plan = CapacityPlan()
    w_bytes = dtype_bytes(dtype)
    ctx = q.prompt + q.output
    workspace = decode_workspace_bytes(args, 1, w_bytes)
    fixed = q.gpu_mem_bytes - weights - q.reserve_bytes
    blocks = paged_block_sum(q.prompt, q.output, q.block_tokens)
    if q.prompt != curve.seq_len:
        plan.warnings.append(f"latencies were measured at a prompt of {curve.seq_len:,} tokens, not at --prompt "
                             f"{q.prompt:,}: they are used as they are")
    for b in curve.oom_batches:
        plan.warnings.append(f"batch {b} ran out of memory in the sweep (at prompt {curve.seq_len:,})")
    plan.assumptions += [
        f"memory: weights {weights:,} B + reserve {q.reserve_bytes:,} B + per request a decode workspace of "
        f"{workspace:,} B and its KV cache, within {q.gpu_mem_bytes:,} B",
        f"contiguous: each request reserves its whole context ({ctx:,} tokens) from its start",
        f"paged: blocks of {q.block_tokens} tokens for the tokens a request holds (prompt + tokens generated so far), "
        f"requests spread evenly over their {q.output:,} output tokens: {blocks / q.output:,.3f} blocks on average "
        f"(up to {-(-ctx // q.block_tokens):,} at the last token)",
        "fp8: one byte per K/V element; latencies are those measured with the sweep's own cache",
        f"latencies: {curve.tpot_column} as TPOT, {curve.ttft_column} as TTFT, measured at batches "
        f"{', '.join(str(int(b)) for b in curve.batches)}, interpolated linearly in between, never extrapolated; "
        "TTFT at batch b is the sweep's, b prompts prefilled together",
        "Little's law with the batch as the requests in flight: rate = batch / (TTFT + output * TPOT); a continuously "
        "refilled batch whose prefills do not stall the decode steps",
    ]
    window = args.sliding_window
    layouts = ("contiguous", "paged") + (("window",) if window is not None else ())
    if window is not None:
        plan.assumptions.append(
            f"sliding window: {args.name} attends each token's last {window:,} positions; contiguous and paged keep "
            f"every position (as kvscope's cache does); window: a ring cache of the last {min(ctx, window):,} "
            "positions per request (kvscope has none: its latencies are those measured with the sweep's own cache)")
    slo_b, slo_why = slo_batch(curve, q)
    for kv_name, kvb in ((dtype, w_bytes), ("fp8", FP8_BYTES)):
        per_token = kv_bytes_per_token(args, kvb)
        for layout in layouts:
            scenario = f"{layout} {kv_name} KV"
            if layout == "contiguous":
                num, den = per_token * ctx, 1
            elif layout == "window":
                num, den = per_token * min(ctx, window), 1
            else:
                num, den = per_token * q.block_tokens * blocks, q.output
            plan.add(scenario, "kv_bytes_per_request", num / den, "B", COMPUTED,
                     {"contiguous": "whole context", "window": "the window's positions"}.get(layout,
                                                                                            "mean over the decode"))
            mem_b = max_batch_memory(fixed, num, den, workspace)
            plan.add(scenario, "max_batch_memory", mem_b, "requests", COMPUTED)
            _operating_point(plan, scenario, curve, q, mem_b, slo_b, slo_why)
    return plan


def _operating_point(plan: CapacityPlan, scenario: str, curve: BatchCurve, q: CapacityQuery, mem_b: int, slo_b: int,
                     slo_why: str) -> None:
    b_min = int(curve.batches[0])
    if mem_b < b_min:
        note = ("memory holds no request at this context" if mem_b == 0 else
                f"memory holds {mem_b}, below the smallest swept batch {b_min}: its latency is not measured")
        plan.add(scenario, "max_batch_slo", 0, "requests", COMPUTED, note)
        return
    if slo_b == 0:
        plan.add(scenario, "max_batch_slo", 0, "requests", MEASURED,
                 f"targets not met even at the smallest swept batch ({slo_why})")
        return
    b = min(slo_b, mem_b)
    why = f"memory (max_batch_memory {mem_b})" if mem_b < slo_b else f"targets: stops {slo_why}"
    tpot, ttft, source = curve.at(b)
    latency_s = (ttft + q.output * tpot) / MS_PER_S
    plan.add(scenario, "max_batch_slo", b, "requests", source, f"limited by {why}")
    plan.add(scenario, "tpot_ms", tpot, "ms", source)
    plan.add(scenario, "ttft_ms", ttft, "ms", source)
    plan.add(scenario, "decode_tok_s", b / tpot * MS_PER_S, "tokens/s", COMPUTED, "batch / TPOT")
    plan.add(scenario, "request_latency_s", latency_s, "s", COMPUTED, "TTFT + output * TPOT")
    plan.add(scenario, "concurrency", b, "requests", COMPUTED, "requests in flight (Little's L)")
    plan.add(scenario, "request_rate_per_s", b / latency_s, "requests/s", COMPUTED, "concurrency / latency")


def _check_query(q: CapacityQuery, args: ModelArgs) -> None:
    for name, v in (("--tpot-slo-ms", q.tpot_slo_ms), ("--ttft-slo-ms", q.ttft_slo_ms)):
        if not (math.isfinite(v) and v > 0):
            raise KvscopeError(f"{name} must be a finite positive number, got {v}")
    for name, n in (("--prompt", q.prompt), ("--output", q.output), ("--block-tokens", q.block_tokens)):
        if n < 1:
            raise KvscopeError(f"{name} must be >= 1, got {n}")
    if q.gpu_mem_bytes <= 0:
        raise KvscopeError(f"--gpu-mem-gb must be positive, got {q.gpu_mem_bytes / GIB_BYTES:g} GiB "
                           f"({q.gpu_mem_bytes:,} bytes)")
    if q.reserve_bytes < 0:
        raise KvscopeError(f"--reserve-gb must be >= 0, got {q.reserve_bytes / GIB_BYTES:g} GiB "
                           f"({q.reserve_bytes:,} bytes)")
    if q.prompt + q.output > args.max_position_embeddings:
        raise KvscopeError(f"--prompt + --output = {q.prompt + q.output:,} exceeds {args.name}'s maximum context of "
                           f"{args.max_position_embeddings:,}")


@dataclass(frozen=True)
class SweepCapacity:
    """A capacity plan made from a sweep file, with the model and dtype it was made for."""

    plan: CapacityPlan
    model: str
    dtype: str


def plan_from_sweep(sweep: Path, q: CapacityQuery, model: str | None = None) -> SweepCapacity:
    """Read `sweep` (`kvscope.analysis.sweep_file.read_sweep`: one model, dtype and device in every row, numbers
    checked), find its model (`model`, else the sweep's `model_source`, else its `model` as a preset name) and dtype
    (the sweep's `dtype`, else the model's), check the sweep's KV facts against the model, and plan."""
    if not sweep.exists():
        raise KvscopeError(f"not found: {sweep}")
    df = read_sweep(sweep)
    source = _model(df, sweep, model)
    dtype = _one_text(df, "dtype") or source.dtype_name()
    w_bytes = dtype_bytes(dtype)
    curve = batch_curve(df, sweep)
    check_kv_facts(df, sweep, kv_bytes_per_token(source.args, w_bytes), source.args.name)
    plan = plan_capacity(curve, source.args, dtype, weights_from_sweep(df, sweep, source.args, w_bytes), q)
    return SweepCapacity(plan, source.args.name, dtype)


def _one_text(df: pd.DataFrame, col: str) -> str | None:
    """The one value of setting `col` (the reader refuses a file whose rows differ in it: rows of two models), or
    None where the file does not record it."""
    if col not in df.columns:
        return None
    values = [str(v).strip() for v in df[col].dropna() if str(v).strip()]
    return values[0] if values else None


def _model(df: pd.DataFrame, sweep: Path, given: str | None) -> ModelSource:
    """`--model`, else the sweep's `model_source` (`preset:NAME`, `checkpoint:PATH`, `config:PATH`), else its
    `model` as a preset name."""
    if given:
        return resolve_model(given, need_weights=False)
    recorded = _one_text(df, "model_source")
    spec = recorded.split(":", 1)[1] if recorded and ":" in recorded else _one_text(df, "model")
    if not spec:
        raise KvscopeError(f"{sweep} names no model (no model_source or model column): pass --model")
    try:
        return resolve_model(spec, need_weights=False)
    except KvscopeError as exc:
        raise KvscopeError(f"the sweep's model {spec!r} cannot be resolved here ({exc}): pass --model") from None
