"""Issue 16's end-to-end figures in one process, configurations interleaved: qwen2.5-3b (random weights), bf16, CUDA
graphs and kvscope's kernels on.

Decode: at each (batch, context) point, the decode step with `--attn kvscope` (the split-KV kernel) in each of its
variants (`ATTN_VARIANTS`: separate merge kernel or the merge fused into the last split block, the split rule of
`decode_splits` or `decode_splits_long`; each engine built with its `EngineOptions.attention`) against
`--attn sdpa` (flash attention over the cache in place); `--rounds` rounds, every engine once per round (a prefill,
then `--steps` graph-replayed steps between two CUDA events, one named sync per round); median ms per step, tokens/s
and MBU (bytes of `analysis.roofline.decode_cost` over the calibrated copy bandwidth).

Prefill: at each prompt length, the prefill replayed from a CUDA graph (`prefill_graphs=True`) against the eager
prefill; per round the host time from the call to the logits on the device (`torch.cuda.synchronize`, a named sync:
this is what TTFT measures) and the CUDA-event time; GPU busy time (the union of the prefill's kernel intervals) from
one profiled prefill (torch profiler, CUPTI) per configuration; MFU from `prefill_cost` over the calibrated matmul rate.

    python3 benchmarks/decode_step_attention_and_prefill_graphs.py [--decode 1x512,1x32000,16x4096,64x512]
        [--prefill 512,4096] [--steps 32] [--rounds 7] [--variants "kvscope default,sdpa"] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from kvscope.analysis.nsys.projection import union_length
from kvscope.analysis.roofline import decode_cost, prefill_cost
from kvscope.engine.loop import Engine
from kvscope.engine.options import AttentionOptions, EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model
from kvscope.profiler.calibrate import load_ceilings
from kvscope.schema import NS_PER_MS

DT = torch.bfloat16
W_BYTES = KV_BYTES = 2  # bf16 weights and cache
MS_PER_S = 1e3
# label: (attn, options of kvscope.kernels.decode_attention.split_kv_decode)
ATTN_VARIANTS: dict[str, tuple[str, dict[str, bool]]] = {
    "kvscope default": ("kvscope", {}),  # the kernel's own defaults (DECODE_ATTENTION_* of kernels.decode_attention)
    "kvscope": ("kvscope", {"fused_merge": False, "long_splits": False}),
    "kvscope fused": ("kvscope", {"fused_merge": True, "long_splits": False}),
    "kvscope long": ("kvscope", {"fused_merge": False, "long_splits": True}),
    "kvscope fused long": ("kvscope", {"fused_merge": True, "long_splits": True}),
    "sdpa": ("sdpa", {}),
}


def _points(text: str) -> list[tuple[int, int]]:
    return [(int(b), int(s)) for b, s in (p.split("x") for p in text.split(",") if p)]


def busy_ms(fn: object) -> float:
    """Union of the GPU kernel intervals of one call of `fn`, in ms (torch profiler)."""
    torch.cuda.synchronize()  # named sync: the profiler window holds this call only
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()  # type: ignore[operator]
        torch.cuda.synchronize()  # named sync: every kernel recorded before the window closes
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # the profiler's times are µs with ns resolution: whole ns for the union
    starts = np.array([round(e.time_range.start * 1e3) for e in kernels], dtype=np.int64)
    ends = np.array([round(e.time_range.end * 1e3) for e in kernels], dtype=np.int64)
    return union_length(starts, ends) / NS_PER_MS


def decode_ab(model: torch.nn.Module, points: list[tuple[int, int]], steps: int, rounds: int,
              copy_gb_s: float | None, variants: list[str]) -> list[dict]:
    dev = torch.device("cuda")
    a = model.args
    engines: dict[tuple[int, int, str], tuple[Engine, torch.Tensor]] = {}
    for b, s in points:
        tokens = torch.randint(0, a.vocab_size, (b, s), device=dev)
        for label in variants:
            attn, options = ATTN_VARIANTS[label]
            eng = Engine(model, RunConfig(b, s + steps + 8, DT, dev, attn=attn),
                         options=EngineOptions(graphs=True, kernels=True, attention=AttentionOptions(**options)))
            eng.prefill(tokens, [s] * b)
            eng.decode_n(3)  # captures the step
            engines[(b, s, label)] = (eng, tokens)
    times: dict[tuple[int, int, str], list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for key, (eng, tokens) in engines.items():
            eng.prefill(tokens, [key[1]] * key[0])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            eng.decode_n(steps)
            end.record()
            end.synchronize()  # named sync: one per round and engine, outside the timed events
            times[key].append(start.elapsed_time(end) / steps)
    rows = []
    for (b, s, attn), ts in times.items():
        ms = statistics.median(ts)
        moved, _ = decode_cost(a, b, s + steps // 2, W_BYTES, KV_BYTES)
        gb_s = moved / (ms / MS_PER_S) / 1e9
        rows.append({"phase": "decode", "batch": b, "context": s, "attn": attn, "step_ms": ms,
                     "step_ms_min": min(ts), "step_ms_max": max(ts), "tok_s": b / (ms / MS_PER_S),
                     "gb_s": gb_s, "mbu_pct": 100 * gb_s / copy_gb_s if copy_gb_s else None})
    engines.clear()  # the engines' caches and graphs, freed before the next measurement
    torch.cuda.empty_cache()
    return rows


def prefill_ab(model: torch.nn.Module, lengths: list[int], rounds: int, tflop_s: float | None) -> list[dict]:
    dev = torch.device("cuda")
    a = model.args
    engines: dict[tuple[int, bool], tuple[Engine, torch.Tensor]] = {}
    for s in lengths:
        tokens = torch.randint(0, a.vocab_size, (1, s), device=dev)
        for graphs in (True, False):
            eng = Engine(model, RunConfig(1, s + 8, DT, dev, prefill_graphs=graphs),
                         options=EngineOptions(graphs=True, kernels=True))
            for _ in range(3):  # warm-up; the graph of the bucket is captured here
                eng.prefill(tokens, [s])
            torch.cuda.synchronize()  # named sync: warm-up done
            engines[(s, graphs)] = (eng, tokens)
    host: dict[tuple[int, bool], list[float]] = {k: [] for k in engines}
    gpu: dict[tuple[int, bool], list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for key, (eng, tokens) in engines.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            eng.prefill(tokens, [key[0]])
            end.record()
            torch.cuda.synchronize()  # named sync: the logits are on the device (what TTFT measures)
            host[key].append((time.perf_counter() - t0) * MS_PER_S)
            gpu[key].append(start.elapsed_time(end))
    rows = []
    for key, (eng, tokens) in engines.items():
        s, graphs = key
        busy = busy_ms(lambda e=eng, t=tokens, n=s: e.prefill(t, [n]))
        _, flops = prefill_cost(a, 1, s, W_BYTES, KV_BYTES)
        h, g = statistics.median(host[key]), statistics.median(gpu[key])
        rows.append({"phase": "prefill", "batch": 1, "context": s, "prefill_graphs": graphs, "ttft_host_ms": h,
                     "ttft_host_ms_min": min(host[key]), "ttft_host_ms_max": max(host[key]), "events_ms": g,
                     "gpu_busy_ms": busy, "ttft_over_busy": h / busy, "tflop_s": flops / (g / MS_PER_S) / 1e12,
                     "mfu_pct": 100 * flops / (g / MS_PER_S) / 1e12 / tflop_s if tflop_s else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-3b")
    p.add_argument("--decode", default="1x512,1x32000,16x4096,64x512")
    p.add_argument("--prefill", default="512,4096")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--variants", default=",".join(ATTN_VARIANTS), help="decode attention variants (ATTN_VARIANTS)")
    p.add_argument("--json", default=None)
    ns = p.parse_args()
    dev = torch.device("cuda")
    model, _ = load_model(resolve_model(ns.model), dev, DT, seed=0)
    ceilings = load_ceilings(torch.cuda.get_device_name(dev))
    variants = [v for v in ns.variants.split(",") if v]
    unknown = [v for v in variants if v not in ATTN_VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(ATTN_VARIANTS)}")
    rows = prefill_ab(model, [int(x) for x in ns.prefill.split(",") if x], ns.rounds,
                      ceilings.bf16_tflop_s if ceilings else None)
    rows += decode_ab(model, _points(ns.decode), ns.steps, ns.rounds, ceilings.copy_gb_s if ceilings else None,
                      variants)
    head = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "model": ns.model,
            "copy_gb_s": ceilings.copy_gb_s if ceilings else None,
            "bf16_tflop_s": ceilings.bf16_tflop_s if ceilings else None, "rows": rows}
    for r in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(head, f, indent=1)


if __name__ == "__main__":
    main()
