"""The contract between what kvscope writes and what its analysis reads: region names, level and op names, file and
column names, clock names. Torch-free; the engine, the instruments and the commands import it (downward), the
analysis reads by it.

Region names (the NVTX range message and the `name` column of timings.parquet):

| level | name | keys |
| --- | --- | --- |
| run | `run bs=B seq=S gen=G` | |
| rep | `rep R` | rep |
| phase | `prefill`, `decode` | phase (the prefill is step 0) |
| step | `decode step N` | phase=decode, step |
| layer | `L07` (two digits at least), `embed`, `lm_head`, `sample` | layer (numbered ones) |
| op | `L07.attn` (an op of OPS) | layer, op |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NVTX_DOMAIN = "kvscope"
# `clock` of timings rows: CUDA events, the host clock (a CPU run), or marks inside a replayed CUDA graph (such a
# region has no NVTX range of its own)
CUDA_CLOCK = "cuda"
HOST_CLOCK = "host"
GRAPH_CLOCK = "cuda-graph"
# units: timings.parquet holds ms (float64); nsys exports and the host clock count ns (int64); rates are decimal
# (GB/s, TFLOP/s), memory sizes binary (MiB columns named *_mib / *_mb, GiB budgets)
NS_PER_US = 1_000  # an int: NVML's µs timestamps stay integers in ns
NS_PER_MS = 1e6
NS_PER_S = 1_000_000_000
US_PER_MS = 1e3
MS_PER_S = 1e3
MIB_BYTES = 2**20
GIB_BYTES = 2**30
BYTES_PER_GB = 1e9
FLOPS_PER_TFLOP = 1e12
# the loops `--engine` chooses between (torch-free, so the command line lists them without importing torch):
# `kvscope` (the hand-written loop, kvscope.engine.loop), `transformers` (transformers' model and its forward over a
# DynamicCache) and `transformers-compiled` (a StaticCache and the decode forward transformers' `generate` compiles);
# the two transformers loops are kvscope.engine.hf. A row without an `engine` column is kvscope's.
KVSCOPE_ENGINE = "kvscope"
HF_EAGER_ENGINE = "transformers"
HF_COMPILED_ENGINE = "transformers-compiled"
ENGINES = (KVSCOPE_ENGINE, HF_EAGER_ENGINE, HF_COMPILED_ENGINE)
GRANULARITIES = ("none", "phase", "layer", "op")
LEVELS = ("run", "rep", "phase", "step", "layer", "op")
PHASES = ("prefill", "decode")
# ops of a decoder layer, in the order they run (with kvscope's kernels `rope` includes the cache write and there is
# no `kv_write`)
OPS = ("norm", "qkv", "rope", "kv_write", "attn", "o_proj", "mlp")
# ops of a tensor-parallel layer's collectives (kvscope.engine.tp): the all-reduce after `o_proj` and the one after
# the MLP's down product (`L07.allreduce_attn`, `L07.allreduce_mlp`; `L*.allreduce*` matches both)
COLLECTIVE_OPS = ("allreduce_attn", "allreduce_mlp")
# layer-level regions that are not decoder layers
NAMED_LAYERS = ("embed", "lm_head", "sample")

SUMMARY_FILE = "summary.parquet"
TIMINGS_FILE = "timings.parquet"
NVML_FILE = "nvml.parquet"
RANK_SUMMARY_FILE = "rank_summary.parquet"  # `kvscope run --tp N`: one summary row per rank
TRACE_FILE = "trace.json"
# the run folder inside a `kvscope nsys` output folder
NSYS_RUN_SUBFOLDER = "run"
# what `kvscope align` writes (and `kvscope nsys` beside its run folder)
RANGES_FILE = "ranges.parquet"
KERNELS_FILE = "kernels.parquet"
ALIGN_FILE = "align.parquet"
STEPS_FILE = "steps.parquet"
KERNEL_CLASSES_FILE = "kernel_classes.parquet"
RANGE_SUMMARY_FILE = "range_summary.parquet"  # per process and range name, like nsys's nvtx_gpu_proj_sum
# per phase and kernel class: median time per step against the class's modelled bytes and FLOPs (written by
# `kvscope align` when the model and the shape are known; kvscope.analysis.align.class_roofline)
CLASS_ROOFLINE_FILE = "class_roofline.parquet"
OVERLAP_FILE = "overlap.parquet"  # per step: consecutive kernels of one stream overlapping (analysis/align/overlap.py)
ALIGN_OUTPUT_FILES = (RANGES_FILE, KERNELS_FILE, RANGE_SUMMARY_FILE, ALIGN_FILE, STEPS_FILE, KERNEL_CLASSES_FILE,
                      OVERLAP_FILE, CLASS_ROOFLINE_FILE)
# class_roofline.parquet's columns, in order: what ran (phase, class, steps, median kernels and time per step), the
# shape modelled (batch, tokens through the layers, context), the modelled bytes (weights, KV cache, activations; their
# sum) and FLOPs as exact integers (NA where the class is not modelled), FLOP/byte, the achieved rates, their share of
# the calibrated ceilings (%), the bound and the share of that bound's ceiling (%)
CLASS_ROOFLINE_COLUMNS = ("phase", "kernel_class", "steps", "kernels", "time_ms", "batch", "tokens", "context",
                          "weight_bytes", "kv_bytes", "act_bytes", "bytes", "flops", "flop_per_byte", "gb_s",
                          "tflop_s", "mbu_pct", "mfu_pct", "bound", "roof_pct")
# columns of summary.parquet that every sweep shares, in this order
CLASSIC_COLUMNS = ("seq_len", "batch", "prefill_p50_ms", "prefill_ms_per_tok", "prefill_tok_s",
                   "decode_p50_ms_per_tok", "decode_tok_s", "total_tok_s", "vram_reserved_mb", "flag")
TIMING_COLUMNS = ("run_id", "rep", "level", "phase", "step", "layer", "op", "name", "start_ms", "dur_ms",
                  "host_enqueue_ms", "clock", "batch", "seq_len", "gen_tokens", "context_len", "tokens")
# what `kvscope sweep --nsys` adds to each row, after every other column (kvscope.analysis.align.attribution computes
# them): per phase (`decode`: per decode step, `prefill`: per prefill) the GPU span, busy time, idle share, kernels,
# time by kernel class (kernel_classes.CLASSES, `copy/memset` as `copy`), launch-bound or not, bytes, GB/s over the
# span and MBU; the prefill's FLOPs, TFLOP/s over the span and MFU; the capture kept for the row
ATTRIBUTION_CLASS_WORDS = ("gemm", "attention", "norm", "elementwise", "copy", "communication", "other")
NSYS_REPORT_COLUMN = "nsys_report"


def attribution_phase_columns(prefix: str) -> tuple[str, ...]:
    """The attribution columns of one phase (`decode` or `prefill`), in their order."""
    return (f"{prefix}_span_ms", f"{prefix}_busy_ms", f"{prefix}_idle_pct", f"{prefix}_kernels",
            *(f"{prefix}_{w}_ms" for w in ATTRIBUTION_CLASS_WORDS), f"{prefix}_launch_bound", f"{prefix}_bytes",
            f"{prefix}_span_gb_s", f"{prefix}_mbu_pct")


ATTRIBUTION_COLUMNS = (*attribution_phase_columns("decode"), *attribution_phase_columns("prefill"), "prefill_flops",
                       "prefill_span_tflop_s", "prefill_mfu_pct", NSYS_REPORT_COLUMN)
NVML_COLUMNS = ("t_ms", "gpu_util_pct", "mem_util_pct", "mem_used_mib", "sm_clock_mhz", "mem_clock_mhz", "power_w",
                "temp_c", "clock_event_reasons")


# ---- region names --------------------------------------------------------------------------------------------------
def run_name(batch: int, seq: int, gen_tokens: int) -> str:
    return f"run bs={batch} seq={seq} gen={gen_tokens}"


def rep_name(rep: int) -> str:
    return f"rep {rep}"


def step_name(step: int) -> str:
    return f"decode step {step}"


def layer_name(layer: int, n_layers: int) -> str:
    """`L07`: zero-padded to the width of the last layer's index, two digits at least, so names sort."""
    width = max(2, len(str(n_layers - 1)))
    return f"L{layer:0{width}d}"


def op_name(layer: int, n_layers: int, op: str) -> str:
    return f"{layer_name(layer, n_layers)}.{op}"


# (level, pattern) in the order a name is tried; the groups are read by `parse` and by vectorised readers
# (kvscope.analysis.align.join.label_ranges)
NAME_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("run", re.compile(r"^run bs=(\d+) seq=(\d+) gen=(\d+)$")),
    ("rep", re.compile(r"^rep (\d+)$")),
    ("phase", re.compile(r"^(prefill|decode)$")),
    ("step", re.compile(r"^decode step (\d+)$")),
    ("op", re.compile(r"^L(\d+)\.(\w+)$")),
    ("layer", re.compile(r"^L(\d+)$|^(embed|lm_head|sample)$")),
)


@dataclass(frozen=True)
class RegionKeys:
    """What a region name says by itself (keys it inherits from enclosing regions are not in its name)."""

    level: str
    rep: int | None = None
    phase: str | None = None
    step: int | None = None
    layer: int | None = None
    op: str | None = None


def parse(name: str) -> RegionKeys | None:
    """The level and keys of a kvscope region name, or None for a name kvscope does not write."""
    for level, pattern in NAME_PATTERNS:
        m = pattern.match(name)
        if m is None:
            continue
        if level == "rep":
            return RegionKeys(level, rep=int(m[1]))
        if level == "phase":
            return RegionKeys(level, phase=m[1], step=0 if m[1] == "prefill" else None)
        if level == "step":
            return RegionKeys(level, phase="decode", step=int(m[1]))
        if level == "op":
            return RegionKeys(level, layer=int(m[1]), op=m[2])
        if level == "layer":
            return RegionKeys(level, layer=int(m[1]) if m[1] is not None else None)
        return RegionKeys(level)
    return None


@dataclass(frozen=True)
class Ceilings:
    """Measured ceilings of one GPU (`kvscope calibrate` measures them; the roofline and the summary divide by them)."""

    gpu: str
    copy_gb_s: float  # device-to-device copy, bytes read + written per second / 1e9
    bf16_tflop_s: float  # dense bf16 matmul


# a sweep row's `flag`: marks joined by ";" (`oom`, `latency-collapse`, `throughput-collapse`)
OOM_FLAG = "oom"


def is_oom(flag: object) -> bool:
    """Whether a sweep row's `flag` holds the `oom` mark (as a whole mark: a hand-written `zoom` is not one)."""
    return isinstance(flag, str) and OOM_FLAG in (mark.strip() for mark in flag.split(";"))



# ---- a served load (`kvscope serve`): continuous batching over a paged KV cache ------------------------------------
# One region per scheduler iteration, `iter N` (level "step", phase "serve"); its keys carry the composition.
SERVE_PHASE = "serve"
POLICIES = ("prefill-first", "chunked")  # the scheduler's policies (--policy)
PREEMPT_MODES = ("recompute", "swap")  # how a sequence leaves the KV pool when blocks run out (--preempt)
REQUESTS_FILE = "requests.parquet"
ITERATIONS_FILE = "iterations.parquet"
# one row per (iteration, request) the iteration carried: what the request put into it (kind `prefill` or `decode`,
# its tokens and its context length: keys its attention read, its own tokens included)
BATCHES_FILE = "batches.parquet"
LEDGER_FILE = "memory.parquet"  # the memory ledger: one row per item (weights, KV pool, graph pool, ...)
SERVE_SWEEP_FILE = "serve_sweep.parquet"  # a sweep over --rps / --policy: one summary row per point
# request status: finished, cut (SIGINT/SIGTERM or --duration ended it), refused (it could never fit the pool)
REQUEST_STATUSES = ("finished", "cut", "refused")
# requests.parquet. Times `*_s` in seconds since the load's start on the host clock (NaN where it never happened);
# durations `*_ms`; `itl_ms` is the list of the request's inter-token gaps (output tokens - 1 of them, finished ones);
# `token_iterations` the iteration that produced each output token
REQUEST_COLUMNS = ("request_id", "status", "reason", "arrival_s", "admitted_s", "first_token_s", "finish_s",
                   "queue_ms", "ttft_ms", "tpot_ms", "e2e_ms", "prompt_tokens", "output_tokens", "generated_tokens",
                   "preemptions", "preempt_recompute", "preempt_swap", "itl_ms", "token_iterations")
# requests.parquet of a load served over HTTP (`kvscope serve --http`): REQUEST_COLUMNS, then these. http_arrival_s:
# when the front's ASGI app received the request (request line and headers parsed, body not yet read); arrival_s is
# then when it was parsed, tokenised and handed to the loop; http_last_byte_s: when the last byte of the response was
# handed to the server's transport (NaN when the client went away first). server_overhead_ms: the request's
# end-to-end time as the server sent it, (http_last_byte_s - http_arrival_s), minus the engine's, e2e_ms: body read,
# JSON, tokenising before the engine, the last token's detokenising and writing after it (NaN unless finished)
HTTP_REQUEST_COLUMNS = ("http_arrival_s", "http_last_byte_s", "server_overhead_ms")
# iterations.parquet. start_s / end_s on the host clock (launch, and the named sync that reads the tokens);
# dur_ms by CUDA events (host clock on the CPU), gpu_gap_ms the device idle time since the previous iteration's end
# event (NaN on the CPU and for the first), host_ms the scheduler's host time before the launch (plan + inputs);
# kind: `prefill`, `decode` or `mixed`; graph_batch: the CUDA-graph bucket replayed (0: eager)
ITERATION_COLUMNS = ("iteration", "kind", "start_s", "end_s", "dur_ms", "gpu_gap_ms", "host_ms", "prefill_tokens",
                     "prefill_seqs", "decode_seqs", "tokens", "context_tokens", "running", "waiting", "swapped",
                     "blocks_used", "blocks_free", "token_slots_used", "block_slots_held", "swap_out_bytes",
                     "swap_in_bytes", "preempted", "graph_batch")
BATCH_COLUMNS = ("iteration", "request_id", "kind", "tokens", "context_len")
LEDGER_COLUMNS = ("item", "bytes", "note")


def iteration_name(iteration: int) -> str:
    return f"iter {iteration}"
