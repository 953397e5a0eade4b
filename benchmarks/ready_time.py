"""Time to get ready (build + random init on the device) and a first look at prefill / decode-step latency of the
eager loop, per preset. CUDA events, medians after warm-up.

    python3 benchmarks/ready_time.py --presets qwen2.5-3b,llama-3.1-8b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch

from kvscope.engine.greedy import pad_prompts
from kvscope.engine.loop import Engine
from kvscope.engine.plan import RunConfig, parse_dtype
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model
from kvscope.profiler.timing import median_event_ms


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="qwen2.5-0.5b,qwen2.5-3b,llama-3.1-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    ns = p.parse_args()
    dev = torch.device("cuda")
    dtype = parse_dtype(ns.dtype)
    t0 = time.perf_counter()
    torch.cuda.init()
    torch.empty(1, device=dev)  # CUDA context and allocator up, timed on its own
    torch.cuda.synchronize()
    context_s = time.perf_counter() - t0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {ns.dtype}, "
          f"batch {ns.batch}, prompt {ns.seq}; CUDA context start {context_s:.2f} s (not in 'ready')")
    print("| preset | params (B) | ready s | prefill ms (median) | eager decode ms/step (median) |")
    print("| --- | --- | --- | --- | --- |")
    for name in ns.presets.split(","):
        torch.cuda.empty_cache()
        src = resolve_model(name)
        model, ready_s = load_model(src, dev, dtype)
        eng = Engine(model, RunConfig(ns.batch, ns.seq + ns.steps + 8, dtype, dev))
        tokens, lengths = pad_prompts([list(range(1, ns.seq + 1))] * ns.batch, src.args.vocab_size, dev)
        prefill_ms = median_event_ms(lambda e=eng, t=tokens, ln=lengths: e.prefill(t, ln), reps=5, warmup=2)
        # decode: time `steps` steps after one prefill, report per step
        eng.prefill(tokens, lengths)
        decode_ms = median_event_ms(eng.decode_step, reps=ns.steps, warmup=3)
        print(f"| {name} | {src.args.param_count() / 1e9:.2f} | {ready_s:.2f} | {prefill_ms:.2f} | "
              f"{decode_ms:.2f} |")
        del eng, model


if __name__ == "__main__":
    main()
