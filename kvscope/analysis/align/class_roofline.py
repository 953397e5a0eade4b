"""Every kernel class of a prefill and a decode step against its roofline: the class's median GPU time per step, the
bytes and FLOPs the model says it must move and do, the rates that makes and their share of the calibrated ceilings
(`class_roofline.parquet` of `kvscope align`).

Input: an aligned export whose prefill and decode steps are labelled (kvscope's loop, transformers' loop under
`kvscope run --engine transformers`, or any program whose ranges `--phase-map` labels), and the facts the counts
need: the model (`ModelArgs`), the dtype, the batch B and prompt length S, optionally the decode context, and the
GPU's ceilings (`--ceilings` on the command line, else, for a kvscope run folder, the calibration cache's entry for
the run's GPU: `kvscope calibrate` on that GPU writes it).

Time: per step (steps told apart by process, run, repetition, phase and step number), the summed duration of the
step's GPU operations of each class (kernel_classes.py); per phase and class the median over the phase's steps
(a step without an operation of the class counts 0 ms).

Shape of a step: a prefill runs T = B * S tokens through the layers; a decode step T = B tokens at context C
(positions in the cache, the new one included): `--ctx` when given, else S + N for decode step N (kvscope's
numbering), and for the phase the low median of its steps' contexts (an integer, so the counts stay exact); it reads
`attended(C)` positions (roofline.py: C, or the sliding window's last ones). The head (final norm, lm_head) runs on
R = B rows, each sequence's last position, as kvscope's loop does.

Counting rule (exact integers from `ModelArgs`; weights and activations at the dtype's width w, the KV cache at the
same width; L layers, D = dim, I = intermediate size, q = query width n_heads * head_dim, kv = n_kv_heads * head_dim,
V = vocabulary, P = KV bytes per token over all layers). Each operand is read once and each result written once (a
fused kernel's minimum traffic); token ids, masks, RoPE tables, logits' upcasts and sampling are not counted:

- gemm: weights: every layer's q/k/v, o, gate, up and down matrices with their biases, and lm_head (V x D, the
  embedding matrix when tied); activations: each product's input read and output written, 4D + 2q + 2kv + 3I per
  token and layer, D + V per head row; FLOPs: 2 per multiply-add, 2 T L (matmul params of a layer) + 2 R D V;
- attention: KV cache: a decode step reads K and V of B * attended(C) positions (B * attended(C) * P), a prefill
  reads none; activations: q read and output written, 2q per token and layer (a prefill also reads its k and v,
  2q + 2kv); FLOPs: 4 * n_heads * head_dim per (query, key) pair and layer, B * attended(C) pairs per decode step,
  B * causal_pairs(S) per prefill (roofline.py);
- norm: weights: the 2L + 1 norm vectors of D; activations: 2D per normed row (read, written), 2L rows per token and
  one per head row; FLOPs not counted;
- elementwise: activations per token and layer: RoPE reads and writes q and k (2q + 2kv), SiLU*up reads 2I and
  writes I, the two residual adds read 2D and write D each: 2q + 2kv + 3I + 6D; FLOPs not counted;
- copy/memset: weights: the embedding rows of the step's tokens (a gather), T * D; activations: those rows written,
  T * D; and the KV write where the engine does it as a copy (below);
- the KV write: the new positions' K and V, T * P bytes of KV cache, and their source read, T * L * 2kv elements
  of activations;
- communication and other: not modelled (NA).

The KV write is modelled in the class of the kernel that does it: kvscope's fused RoPE + K/V write (`kvscope_rope_kv*`,
elementwise by the built-in rules) where the step's kernels include it, else copy/memset (torch's index_copy and
scatter, transformers' `cat`, vLLM's `reshape_and_cache`, FlashInfer's append). Summed over the classes, weight and
KV-cache bytes are roofline.py's step bytes (`prefill_cost`, `decode_cost`) exactly, and FLOPs its step FLOPs
exactly; activation bytes are on top (roofline.py, a whole-step count, leaves them out: they stay in caches or
registers when kernels are fused).

Rates and shares: GB/s = bytes / time, TFLOP/s = FLOPs / time (NaN where the time is 0 or the class has no counted
FLOPs); `mbu_pct` = GB/s against the calibrated copy bandwidth, `mfu_pct` = TFLOP/s against the calibrated bf16
matmul rate (bfloat16 and float16 only, as attribution.py); both NaN without ceilings. `flop_per_byte` is the
arithmetic intensity; `bound` is `memory` below the ridge (bf16 rate / copy bandwidth, in FLOP per byte) and
`compute` at or above it, `memory` for a class with no counted FLOPs, NA where the ridge is unknown (no ceilings,
another dtype) or the class is not modelled; `roof_pct` is the share of that bound's ceiling (`mbu_pct` or
`mfu_pct`).

What the numbers mean: the class's time includes work the model leaves out (casts, RoPE's concatenations, masks), so
a class's rate is a lower bound of what its modelled work achieved. A kernel fused across classes files all its
time under one class (kvscope's gemv with an RMSNorm prologue is gemm; eager attention's two matrix products are
gemm and only its softmax attention): the bytes stay with the class of the rule, so such a class can show more than
its ceiling and its neighbour less; op granularity says which op ran where.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from kvscope.analysis.align.attribution import MATMUL_DTYPES, run_keys
from kvscope.analysis.align.kernel_classes import CLASSES, COPY
from kvscope.analysis.align.pipeline import AlignResult
from kvscope.analysis.inputs import file_metadata
from kvscope.analysis.kv_math import DTYPE_BYTES, kv_bytes_per_token
from kvscope.analysis.roofline import attended, causal_pairs, layer_matmul_params
from kvscope.calibration_cache import load_ceilings
from kvscope.errors import KvscopeError
from kvscope.model.config import ModelArgs, RopeScaling
from kvscope.model.source import resolve_model
from kvscope.schema import (
    BYTES_PER_GB,
    CLASS_ROOFLINE_COLUMNS,
    CLASS_ROOFLINE_FILE,
    FLOPS_PER_TFLOP,
    MS_PER_S,
    NS_PER_MS,
    PHASES,
    TIMINGS_FILE,
    Ceilings,
)

GEMM, ATTENTION, NORM, ELEMENTWISE = "gemm", "attention", "norm", "elementwise"
MODELLED = (GEMM, ATTENTION, NORM, ELEMENTWISE, COPY)  # communication and other: not modelled (NA)
MEMORY, COMPUTE = "memory", "compute"
# kvscope's fused RoPE + K/V-cache write kernels (kvscope/kernels/cuda/rope_kv.cu), by name
KV_WRITE_KERNEL = re.compile(r"kvscope_rope_kv", re.IGNORECASE)
# the keys that tell one step from another in steps.parquet and kernels.parquet
STEP_KEYS = ("pid", "run", "rep", "phase", "step")
# dtype spellings the counts take (kv_math's), by their run name
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_COUNT_COLUMNS = ("weight_bytes", "kv_bytes", "act_bytes", "flops")
INT64_MAX = 2**63 - 1  # the counts are written as 64-bit integers


@dataclass(frozen=True)
class RooflineFacts:
    """What the counts need: the model, the dtype's name (float32, bfloat16, float16 or fp8), the batch and prompt
    length, the decode context (None: S + N for decode step N) and the GPU's ceilings (None: not calibrated)."""

    args: ModelArgs
    dtype: str
    batch: int
    seq: int
    ctx: int | None = None
    ceilings: Ceilings | None = None

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class RooflineRequest:
    """What the command line says before the export is read: the model (from `--model`, or the run folder's
    metadata; None when neither names one), the dtype, the shape flags (None: not given) and the ceilings."""

    args: ModelArgs | None
    dtype: str | None
    batch: int | None = None
    seq: int | None = None
    ctx: int | None = None
    ceilings: Ceilings | None = None
    model_from: str = ""  # `--model X` or the run folder, for messages
    ceilings_from: str = ""  # `--ceilings`, or the calibration cache entry of the run's GPU; "" for none


# ---- the counting rule ---------------------------------------------------------------------------------------------
def class_costs(a: ModelArgs, phase: str, batch: int, seq: int, context: int, w_bytes: int, kv_bytes: int,
                kv_write_class: str = COPY) -> pd.DataFrame:
    """Per kernel class (index: CLASSES), the modelled weight, KV-cache and activation bytes and the FLOPs of one
    step (the module docstring's rule) as nullable integers, NA for a class that is not modelled. `phase` is
    `prefill` (B * S tokens) or `decode` (B tokens at `context` positions); `kv_write_class`: the class the KV write
    is counted in (one of MODELLED)."""
    if phase not in PHASES:
        raise KvscopeError(f"class roofline: phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if kv_write_class not in MODELLED:
        raise KvscopeError(f"class roofline: the KV write's class must be one of {', '.join(MODELLED)}, got "
                           f"{kv_write_class!r}")
    L, D, I, V = a.n_layers, a.dim, a.intermediate_size, a.vocab_size  # noqa: E741
    q, kv = a.q_size, a.kv_size
    prefill = phase == "prefill"
    tokens = batch * seq if prefill else batch
    rows = batch  # the head's rows: each sequence's last position
    per_tok_kv = kv_bytes_per_token(a, kv_bytes)
    seen = attended(a, context)
    bias = (q + 2 * kv if a.qkv_bias else 0) + (D if a.o_bias else 0)
    pair_flops = 4 * a.n_heads * a.head_dim * L
    counts: dict[str, dict[str, int]] = {
        GEMM: {"weight_bytes": (L * (layer_matmul_params(a) + bias) + V * D) * w_bytes, "kv_bytes": 0,
               "act_bytes": (tokens * L * (4 * D + 2 * q + 2 * kv + 3 * I) + rows * (D + V)) * w_bytes,
               "flops": 2 * tokens * L * layer_matmul_params(a) + 2 * rows * D * V},
        ATTENTION: {"weight_bytes": 0, "kv_bytes": 0 if prefill else batch * seen * per_tok_kv,
                    "act_bytes": tokens * L * (2 * q + (2 * kv if prefill else 0)) * w_bytes,
                    "flops": pair_flops * batch * (causal_pairs(a, seq) if prefill else seen)},
        NORM: {"weight_bytes": (2 * L + 1) * D * w_bytes, "kv_bytes": 0,
               "act_bytes": 2 * D * (2 * L * tokens + rows) * w_bytes, "flops": 0},
        ELEMENTWISE: {"weight_bytes": 0, "kv_bytes": 0,
                      "act_bytes": tokens * L * (2 * q + 2 * kv + 3 * I + 6 * D) * w_bytes, "flops": 0},
        COPY: {"weight_bytes": tokens * D * w_bytes, "kv_bytes": 0, "act_bytes": tokens * D * w_bytes, "flops": 0},
    }
    kv_write = counts[kv_write_class]
    kv_write["kv_bytes"] += tokens * per_tok_kv
    kv_write["act_bytes"] += tokens * L * 2 * kv * w_bytes  # the K and V the write reads
    if max(v for c in counts.values() for v in c.values()) > INT64_MAX:
        raise KvscopeError(f"class roofline: the counts of {a.name} at batch {batch}, seq {seq}, context {context} "
                           "exceed 64-bit integers")
    out = pd.DataFrame(index=pd.Index(CLASSES, name="kernel_class"))
    for col in _COUNT_COLUMNS:
        out[col] = pd.array([counts[c][col] if c in counts else pd.NA for c in CLASSES], dtype="Int64")
    return out


def kv_write_class(kernels: pd.DataFrame) -> str:
    """The class the KV write is counted in: that of kvscope's fused RoPE + K/V write where `kernels` hold it (the
    class its rule gave it, elementwise by the built-in rules), else copy/memset."""
    if not len(kernels):
        return COPY
    names = kernels["name"].astype("string").fillna("")
    fused = kernels.loc[names.str.contains(KV_WRITE_KERNEL).to_numpy(bool), "kernel_class"].dropna()
    if not len(fused):
        return COPY
    cls = str(fused.astype(str).mode().iloc[0])
    return cls if cls in MODELLED else COPY


# ---- time per step and class ---------------------------------------------------------------------------------------
def step_class_times(steps: pd.DataFrame, kernels: pd.DataFrame) -> pd.DataFrame:
    """One row per prefill and decode step of `steps` (steps.parquet's table) and kernel class: phase, step, the
    step's key (`step_id`, 0, 1, ... in the steps' order), kernel_class, the summed time (`time_ns`, an integer) and
    the count of its GPU operations of that class (0 where it has none)."""
    cols = ["step_id", "phase", "step", "kernel_class", "time_ns", "kernels"]
    keys = [k for k in STEP_KEYS if k in steps.columns and k in kernels.columns]
    is_step = steps["phase"].isin(PHASES).fillna(False).to_numpy(bool)
    own = steps.loc[is_step, keys].drop_duplicates().reset_index(drop=True)
    if not len(own):
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    own["step_id"] = np.arange(len(own))
    k = kernels[[*keys, "kernel_class", "dur_ns"]]
    k = k[k["phase"].isin(PHASES).fillna(False).to_numpy(bool)]
    matched = k.merge(own, on=keys, how="inner")
    sums = matched.groupby(["step_id", "kernel_class"], observed=True)["dur_ns"].agg(["sum", "size"])
    grid = pd.MultiIndex.from_product([own["step_id"], CLASSES], names=["step_id", "kernel_class"])
    sums = sums.reindex(grid, fill_value=0)
    out = pd.DataFrame({
        "step_id": grid.get_level_values(0).to_numpy(np.int64),
        "kernel_class": grid.get_level_values(1).to_numpy(object),
        "time_ns": sums["sum"].to_numpy(np.int64),
        "kernels": sums["size"].to_numpy(np.int64),
    })
    out = out.merge(own[["step_id", "phase", "step"]], on="step_id", how="left")
    return out[cols]


# ---- the table -----------------------------------------------------------------------------------------------------
def phase_context(facts: RooflineFacts, phase: str, step_numbers: pd.Series) -> int:
    """The context modelled for a phase: S for the prefill; for decode `facts.ctx`, else the low median of
    S + N over its steps N (an integer)."""
    if phase == "prefill":
        return facts.seq
    if facts.ctx is not None:
        return facts.ctx
    numbers = [int(n) for n in step_numbers.dropna()]
    return facts.seq + statistics.median_low(numbers) if numbers else facts.seq + 1


def class_roofline(steps: pd.DataFrame, kernels: pd.DataFrame, facts: RooflineFacts) -> pd.DataFrame:
    """class_roofline.parquet's table (CLASS_ROOFLINE_COLUMNS): per phase with steps (prefill, then decode) and
    kernel class (CLASSES' order), the median time per step against the class's modelled bytes and FLOPs (the module
    docstring)."""
    times = step_class_times(steps, kernels)
    parts = []
    for phase in PHASES:
        ph = times[times["phase"] == phase]
        if not len(ph):
            continue
        ids = ph["step_id"].unique()
        numbers = ph.drop_duplicates("step_id")["step"]
        context = phase_context(facts, phase, numbers)
        phase_kernels = _kernels_of(steps, kernels, phase)
        costs = class_costs(facts.args, phase, facts.batch, facts.seq, context, facts.itemsize, facts.itemsize,
                            kv_write_class(phase_kernels))
        med = ph.groupby("kernel_class", observed=True)[["time_ns", "kernels"]].median().reindex(list(CLASSES))
        part = pd.DataFrame({
            "phase": phase, "kernel_class": list(CLASSES), "steps": len(ids),
            "kernels": med["kernels"].to_numpy(np.float64),
            "time_ms": med["time_ns"].to_numpy(np.float64) / NS_PER_MS,
            "batch": facts.batch, "tokens": facts.batch * facts.seq if phase == "prefill" else facts.batch,
            "context": context,
        })
        for col in _COUNT_COLUMNS:
            part[col] = costs[col].reset_index(drop=True)
        parts.append(part)
    if not parts:
        return _empty()
    df = pd.concat(parts, ignore_index=True)
    for col in ("phase", "kernel_class"):
        df[col] = df[col].astype("string")
    for col in ("steps", "batch", "tokens", "context"):
        df[col] = df[col].astype("Int64")
    df["bytes"] = df["weight_bytes"] + df["kv_bytes"] + df["act_bytes"]
    return _rates(df, facts)[list(CLASS_ROOFLINE_COLUMNS)]


def _kernels_of(steps: pd.DataFrame, kernels: pd.DataFrame, phase: str) -> pd.DataFrame:
    keys = [k for k in STEP_KEYS if k in steps.columns and k in kernels.columns]
    own = steps.loc[(steps["phase"] == phase).fillna(False).to_numpy(bool), keys].drop_duplicates()
    return kernels.merge(own, on=keys, how="inner")


def _rates(df: pd.DataFrame, facts: RooflineFacts) -> pd.DataFrame:
    """GB/s, TFLOP/s, their shares of the ceilings, FLOP/byte, the bound and the share of its ceiling."""
    sec = df["time_ms"].astype("float64") / MS_PER_S
    sec = sec.where(sec > 0)
    moved = df["bytes"].astype("Float64").astype("float64")
    flops = df["flops"].astype("Float64").astype("float64")
    df["flop_per_byte"] = (flops / moved).where(moved > 0)
    df["gb_s"] = moved / sec / BYTES_PER_GB
    df["tflop_s"] = (flops / sec / FLOPS_PER_TFLOP).where(flops > 0)
    c = facts.ceilings
    copy_gb_s = c.copy_gb_s if c is not None and c.copy_gb_s > 0 else math.nan
    peak = c.bf16_tflop_s if c is not None and c.bf16_tflop_s > 0 and facts.dtype in MATMUL_DTYPES else math.nan
    df["mbu_pct"] = 100 * df["gb_s"] / copy_gb_s
    df["mfu_pct"] = 100 * df["tflop_s"] / peak
    ridge = peak * FLOPS_PER_TFLOP / (copy_gb_s * BYTES_PER_GB)  # FLOP per byte; NaN without both ceilings
    bound = pd.Series(pd.NA, index=df.index, dtype="string")
    modelled = (moved > 0).to_numpy(bool)
    no_flops = modelled & (flops == 0).to_numpy(bool)
    bound[no_flops] = MEMORY
    if not math.isnan(ridge):
        rest = modelled & ~no_flops
        bound[rest & (df["flop_per_byte"] < ridge).to_numpy(bool)] = MEMORY
        bound[rest & (df["flop_per_byte"] >= ridge).to_numpy(bool)] = COMPUTE
    df["bound"] = bound
    is_compute = (bound == COMPUTE).fillna(False).to_numpy(bool)
    is_memory = (bound == MEMORY).fillna(False).to_numpy(bool)
    df["roof_pct"] = np.where(is_compute, df["mfu_pct"], np.where(is_memory, df["mbu_pct"], np.nan))
    return df


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in CLASS_ROOFLINE_COLUMNS})


# ---- what the command line gives -----------------------------------------------------------------------------------
def parse_ceilings(text: str) -> Ceilings:
    """`--ceilings COPY_GB_S,BF16_TFLOP_S` (what `kvscope calibrate` prints: copy bandwidth in GB/s, bytes read +
    written, and the dense bf16 matmul rate in TFLOP/s), both finite and positive."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise KvscopeError(f"--ceilings must be COPY_GB_S,BF16_TFLOP_S (two numbers, e.g. 2800,760), got {text!r}")
    values = []
    for part, what in zip(parts, ("copy GB/s", "bf16 TFLOP/s"), strict=True):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise KvscopeError(f"--ceilings: the {what} must be a positive number, got {part!r}")
        values.append(value)
    return Ceilings("--ceilings", values[0], values[1])


def dtype_name(name: str) -> str:
    """The dtype's run name (bf16 -> bfloat16, ...); one the counts cannot size is a one-line KvscopeError."""
    key = str(name).strip().lower()
    key = DTYPE_NAMES.get(key, key)
    if key not in DTYPE_BYTES:
        raise KvscopeError(f"--dtype {name!r}: not one of float32, bfloat16, float16, fp8 (or bf16, fp16, fp32)")
    return key


def args_from_metadata(meta: dict[str, Any], where: str) -> ModelArgs | None:
    """The run's `ModelArgs` from its metadata's `model.args` (as the run wrote them), None where it has none."""
    model = meta.get("model")
    saved = model.get("args") if isinstance(model, dict) else None
    if not isinstance(saved, dict):
        return None
    init = {f.name for f in fields(ModelArgs) if f.init}
    kw = {k: v for k, v in saved.items() if k in init}
    try:
        if isinstance(kw.get("rope_scaling"), dict):
            kw["rope_scaling"] = RopeScaling(**kw["rope_scaling"])
        return ModelArgs(**kw)
    except (TypeError, ValueError, KvscopeError) as exc:  # ModelArgs' own checks are KvscopeErrors
        raise KvscopeError(f"{where}: its metadata's model args cannot be read ({exc}); pass --model") from None


def roofline_request(model: str | None = None, dtype: str | None = None, batch: int | None = None,
                     seq: int | None = None, ctx: int | None = None, ceilings: str | Ceilings | None = None,
                     run_dir: str | Path | None = None) -> RooflineRequest:
    """The class roofline's inputs from the command line, checked before the export is read: `--model` (a preset,
    a checkpoint folder or a config.json, resolved without torch) else the run folder's metadata; `--dtype` else the
    run's dtype else the config's (bfloat16 for a preset); `--batch`, `--seq`, `--ctx` (>= 1); `--ceilings`.
    Shape flags or ceilings without a model are an error."""
    for flag, value in (("--batch", batch), ("--seq", seq), ("--ctx", ctx)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KvscopeError(f"{flag} must be an integer >= 1, got {value!r}")
    cl = ceilings if isinstance(ceilings, Ceilings) or ceilings is None else parse_ceilings(ceilings)
    source = resolve_model(model, need_weights=False) if model is not None else None
    args, where = (source.args, f"--model {model}") if source is not None else (None, "")
    meta = file_metadata(Path(run_dir) / TIMINGS_FILE) if run_dir is not None else None
    run_dtype = meta.get("dtype") if meta is not None and isinstance(meta.get("dtype"), str) else None
    if meta is not None and args is None:
        args = args_from_metadata(meta, str(Path(run_dir) / TIMINGS_FILE))
        where = f"the run folder {run_dir}" if args is not None else where
    if args is None:
        given = [f for f, v in (("--batch", batch), ("--seq", seq), ("--ctx", ctx), ("--dtype", dtype),
                                ("--ceilings", ceilings)) if v is not None]
        if given:
            raise KvscopeError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} a model for the class "
                               "roofline: pass --model (a preset, a checkpoint folder or a config.json)")
        return RooflineRequest(None, None, ceilings=cl)
    if dtype is None:  # the run's, else the config.json's (bfloat16 for a preset)
        dtype = run_dtype or (source.dtype_name() if source is not None else "bfloat16")
    ceilings_from = "--ceilings" if cl is not None else ""
    device = meta.get("device") if meta is not None else None
    if cl is None and isinstance(device, str) and device:  # the run's GPU, as `kvscope calibrate` cached it
        cl = load_ceilings(device)
        ceilings_from = f"the calibration cache ({device})" if cl is not None else ""
    return RooflineRequest(args, dtype_name(dtype), batch, seq, ctx, cl, where, ceilings_from)


def roofline_facts(result: AlignResult, request: RooflineRequest) -> tuple[RooflineFacts | None, str | None]:
    """The facts of the class roofline of `result`, or None and why it is skipped (no model named, no labelled
    step). The shape comes from the export's kvscope run range (`run bs=B seq=S gen=G`), else `--batch` and `--seq`,
    which a foreign export needs (a KvscopeError without them); flags that disagree with the run's range, or an
    export of several runs, are an error."""
    if result.steps is None or not result.steps["phase"].isin(PHASES).fillna(False).any():
        if request.args is None:
            return None, None
        return None, f"skipped {CLASS_ROOFLINE_FILE}: no labelled prefill or decode step in the export"
    if request.args is None:
        return None, (f"skipped {CLASS_ROOFLINE_FILE}: no model (pass --model, or --timings with the run folder; a "
                      "foreign export also --batch and --seq)")
    runs = run_keys(result)
    if len(runs) > 1:
        shown = ", ".join(f"bs={b} seq={s}" for b, s, _ in runs[:4])
        raise KvscopeError(f"the export holds {len(runs)} kvscope runs ({shown}{', ...' if len(runs) > 4 else ''}): "
                           "the class roofline models one shape; keep one run's ranges with --start/--end")
    batch, seq = request.batch, request.seq
    if runs:
        b, s, g = runs[0]
        for flag, given, known in (("--batch", batch, b), ("--seq", seq, s)):
            if given is not None and given != known:
                raise KvscopeError(f"{flag} {given} disagrees with the export's run range 'run bs={b} seq={s} "
                                   f"gen={g}'")
        batch, seq = b, s
    if batch is None or seq is None:
        lacks = " and ".join(f for f, v in (("--batch", batch), ("--seq", seq)) if v is None)
        raise KvscopeError(f"the class roofline of a foreign export needs {lacks} (the shape it ran: sequences per "
                           f"batch and prompt tokens; --ctx for the decode context) beside {request.model_from}")
    return RooflineFacts(request.args, request.dtype or "bfloat16", batch, seq, request.ctx, request.ceilings), None


# ---- printing ------------------------------------------------------------------------------------------------------
def class_roofline_table(df: pd.DataFrame) -> Table:
    """The class roofline as a terminal table: per phase and class with GPU time, time, modelled MB and GFLOP,
    the rates, the bound and the share of its ceiling."""
    t = Table(title=f"Kernel classes against the roofline (median per step; all columns in {CLASS_ROOFLINE_FILE})")
    for col in ("phase", "class", "ms/step", "MB", "GFLOP", "GB/s", "TFLOP/s", "bound", "% of roof"):
        t.add_column(col, justify="left" if col in ("phase", "class", "bound") else "right")
    for r in df.itertuples(index=False):
        if not (r.time_ms > 0 or _present(r.bytes)):
            continue  # neither ran nor modelled
        t.add_row(str(r.phase), str(r.kernel_class), f"{r.time_ms:.3f}",
                  _num(r.bytes, 1e6, "{:,.2f}", "not modelled"), _num(r.flops, 1e9, "{:,.3f}", "-"),
                  _num(r.gb_s, 1, "{:,.1f}", "n/a"), _num(r.tflop_s, 1, "{:,.2f}", "-"),
                  str(r.bound) if _present(r.bound) else "n/a", _num(r.roof_pct, 1, "{:.3g}%", "n/a"))
    return t


def _present(value: object) -> bool:
    return value is not None and value is not pd.NA and not (isinstance(value, float) and math.isnan(value))


def _num(value: object, scale: float, fmt: str, missing: str) -> str:
    """`value / scale` formatted, or `missing` where it is NA, NaN or 0 (a count of nothing, a rate of no time)."""
    if not _present(value) or float(value) == 0:  # type: ignore[arg-type]
        return missing
    return fmt.format(float(value) / scale)  # type: ignore[arg-type]
