"""Where a long prefill's time goes: one `qwen2.5-3b` prefill (batch 1, 4,096 tokens by default) timed with CUDA
events, then its kernels by total time from the torch profiler (CUDA activity only).

    python3 benchmarks/prefill_profile.py [--model qwen2.5-3b] [--seq 4096] [--kernels on|off]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model
from kvscope.profiler.timing import median_event_ms


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-3b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--kernels", default="on", choices=["on", "off"], help="kvscope's CUDA kernels")
    ns = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    model, _ = load_model(resolve_model(ns.model), dev, dt, seed=0)
    p_kernels = ns.kernels == "on"
    eng = Engine(model, RunConfig(1, ns.seq + 8, dt, dev), options=EngineOptions(kernels=p_kernels))
    tokens = torch.randint(0, 1000, (1, ns.seq), device=dev)  # (1, S)
    ms = median_event_ms(lambda: eng.prefill(tokens, [ns.seq]), reps=5, warmup=3)
    print(f"{torch.cuda.get_device_name()}: {ns.model} prefill of {ns.seq} tokens (kernels {ns.kernels}), "
          f"median {ms:.2f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.prefill(tokens, [ns.seq])
        torch.cuda.synchronize()  # named sync: the profiled prefill is complete
    calls: dict[str, int] = defaultdict(int)
    us: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            calls[e.name[:90]] += 1
            us[e.name[:90]] += e.device_time_total
    total = sum(us.values())
    for name in sorted(us, key=us.get, reverse=True)[:ns.top]:
        print(f"{us[name] / 1e3:8.3f} ms {100 * us[name] / total:5.1f}% x{calls[name]:4d} {name}")
    print(f"total kernel time {total / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
