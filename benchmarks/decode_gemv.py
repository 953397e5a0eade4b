"""A decode step with kvscope's gemv kernels against the same step with cuBLAS (issue 16): qwen2.5-3b (random
weights), bf16, CUDA graphs on, prompt `--seq`, batch `--batch`. Engines: kernels off; kernels on with cuBLAS
products; kernels on with gemv in each launch choice (one trip of loads at a time or pipelined; K split below 1 or 2
blocks per SM). Each engine captures its step with its choice baked in; then `--rounds` rounds, the engines
interleaved, each round a prefill and `--steps` decode steps between two CUDA events (one named sync per round).
Kernels per step: the torch profiler (CUPTI) over one replayed decode step.

    python3 benchmarks/decode_gemv.py [--model qwen2.5-3b] [--batch 1] [--seq 512] [--steps 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions, GemvLaunchOptions
from kvscope.engine.plan import RunConfig
from kvscope.kernels import gemv as k_gemv
from kvscope.model.config import PRESETS
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model

# name: (kernels, gemv, pipelined, K split below this many blocks per SM)
CONFIGS = {"kernels off": (False, False, False, 1), "kernels on, cuBLAS": (True, False, False, 1),
           "gemv, one trip": (True, True, False, 1), "gemv, pipelined": (True, True, True, 1),
           "gemv, pipelined, split 2": (True, True, True, 2)}


def kernels_per_step(eng: Engine) -> int:
    """GPU kernels of one decode step (a graph replay), counted by the torch profiler (memcpy/memset left out)."""
    torch.cuda.synchronize()  # named sync: the profiler window holds this step only
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.decode_step()
        torch.cuda.synchronize()  # named sync: the step's kernels are recorded before the window closes
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for n in names if "memcpy" not in n.lower() and "memset" not in n.lower())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-3b", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    ns = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    model, _ = load_model(resolve_model(ns.model), dev, dt, seed=0)
    tokens = torch.randint(0, model.args.vocab_size, (ns.batch, ns.seq), device=dev)
    lengths = [ns.seq] * ns.batch
    engines: dict[str, Engine] = {}
    counts: dict[str, int] = {}
    for label, (kernels, gemv, pipelined, per_sm) in CONFIGS.items():
        options = EngineOptions(graphs=True, kernels=kernels, gemv=gemv,
                                gemv_max_rows=k_gemv.GEMV_MAX_ROWS,  # measure every batch the kernels take
                                gemv_launch=GemvLaunchOptions(pipelined=pipelined, split_blocks_per_sm=per_sm))
        eng = Engine(model, RunConfig(ns.batch, ns.seq + ns.steps + 16, dt, dev), options=options)
        eng.prefill(tokens, lengths)
        eng.decode_n(3)  # captures the step, this launch choice baked in
        counts[label] = kernels_per_step(eng)
        engines[label] = eng
    times: dict[str, list[float]] = {label: [] for label in CONFIGS}
    for _ in range(ns.rounds):
        for label, eng in engines.items():
            eng.prefill(tokens, lengths)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            eng.decode_n(ns.steps)
            end.record()
            end.synchronize()  # named sync: one per round
            times[label].append(start.elapsed_time(end) / ns.steps)
    print(f"{torch.cuda.get_device_name(dev)}: {ns.model} bf16, batch {ns.batch}, prompt {ns.seq}, "
          f"{ns.steps} steps x {ns.rounds} rounds")
    for label, ts in times.items():
        print(f"{label:26} decode step median {statistics.median(ts):.4f} ms (rounds {min(ts):.4f}-{max(ts):.4f}), "
              f"{counts[label]} kernels per step")


if __name__ == "__main__":
    main()
