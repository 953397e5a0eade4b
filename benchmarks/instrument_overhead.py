"""Cost of instrumentation on decode steps: each granularity against none, same process, same engine.

The eager decode loop is bound by the host, whose speed drifts (on the lent H100 the spread between rounds of the
same configuration reached tens of percent). So configurations are interleaved step by step: one decode sequence
runs `--steps` steps per configuration, step k under configuration k mod 4, each step timed by a synchronised host
clock (the same sync for every configuration, so it cancels in the ratios). Drift then hits every configuration
alike. Reported: the median step time per configuration and its ratio to `none`, with a bootstrap 95% interval of
that ratio.

With `--graphs on`, every configuration has its own engine (its own captured decode graph and KV cache, all over
the same weights), and step k runs on engine k mod 4: the same interleaving, one graph replay per step.

`--block K` times blocks of K consecutive steps instead of single steps (block j under configuration j mod 4, a
sync before and after each block, the block's time divided by K). A sync after every step (K = 1) serialises the
host and the GPU, so any host work of a configuration (reading its in-graph timestamps, for instance) adds to its
step time in full; with K > 1 the host runs ahead of the GPU inside a block as it does in `kvscope run`, and the
figure is the steady-state cost per step.

    python3 benchmarks/instrument_overhead.py --model qwen2.5-3b --batches 1,32 --attn sdpa,eager
    python3 benchmarks/instrument_overhead.py --model qwen2.5-3b --batches 1,32 --attn sdpa --graphs on

`--kernels on` (the default) runs kvscope's CUDA kernels; in graph mode its layer and op regions are then timed by
global-timer stamps that the RMSNorm kernel (or a one-thread kernel) writes inside the graph, instead of
event-record nodes (`--kernels off`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import UTC, datetime

import torch

from kvscope.io import write_json
from kvscope.profiler.engine import Engine
from kvscope.profiler.instrument import Instrument
from kvscope.profiler.run import regions_per_rep
from kvscope.profiler.runconfig import RunConfig, parse_dtype
from kvscope.profiler.weights import load_model, resolve_model

CONFIGS = ("none", "phase", "layer", "op")


def _ratio_ci(a: list[float], b: list[float], n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of median(a) / median(b) - 1, in percent."""
    rng = random.Random(0)
    vals = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b))) - 1
                  for _ in range(n))
    return vals[int(0.025 * n)] * 100, vals[int(0.975 * n)] * 100


def _step(engines: dict[str, Engine], instruments: dict[str, Instrument], g: str) -> None:
    engine = engines[g]
    engine.ins = instruments[g]
    engine.decode_step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-3b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--attn", default="sdpa,eager")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=60, help="decode steps per configuration")
    p.add_argument("--block", type=int, default=1, help="consecutive steps per timed block (see above)")
    p.add_argument("--graphs", default="off", choices=["on", "off"], help="decode steps replayed from CUDA graphs")
    p.add_argument("--kernels", default="on", choices=["on", "off"],
                   help="kvscope's CUDA kernels (on: in-graph regions are timed by timestamps the kernels write)")
    p.add_argument("--json", default=None, help="also write the rows here")
    ns = p.parse_args()
    if ns.block < 1 or ns.steps < ns.block:
        raise SystemExit(f"--block must be in [1, --steps], got {ns.block} with --steps {ns.steps}")
    dev = torch.device("cuda")
    src = resolve_model(ns.model)
    dtype = parse_dtype(ns.dtype)
    model, _ = load_model(src, dev, dtype)
    total = ns.steps * len(CONFIGS)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {ns.model} {ns.dtype}, prompt "
          f"{ns.seq}, {ns.steps} decode steps per configuration interleaved, NVTX off (no tool attached), "
          f"CUDA graphs {ns.graphs}, kernels {ns.kernels}, timed blocks of {ns.block} step(s)")
    print("| batch | attn | none ms/step | phase | layer | op | phase % | layer % | op % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in [int(b) for b in ns.batches.split(",")]:
        for attn in ns.attn.split(","):
            cfg = RunConfig(batch, ns.seq + total + 8 + 1, dtype, dev, attn)
            instruments = {g: Instrument(g, dev, nvtx=False) for g in CONFIGS}
            graphs, kernels = ns.graphs == "on", ns.kernels == "on"
            if graphs:
                engines = {g: Engine(model, cfg, instruments[g], graphs=True, kernels=kernels) for g in CONFIGS}
            else:
                shared = Engine(model, cfg, instruments["none"], kernels=kernels)
                engines = dict.fromkeys(CONFIGS, shared)
            tokens = torch.randint(0, src.args.vocab_size, (batch, ns.seq), device=dev)
            for engine in {id(e): e for e in engines.values()}.values():
                engine.prefill(tokens, [ns.seq] * batch)

            for ins in instruments.values():
                ins.start_clock()
                ins.reserve(regions_per_rep(ins, src.args.n_layers, ns.steps + 3, graphs))
            for k in range(8):  # warm-up, every configuration twice (captures the graphs)
                _step(engines, instruments, CONFIGS[k % 4])
            samples: dict[str, list[float]] = {g: [] for g in CONFIGS}
            torch.cuda.synchronize()
            for k in range(total // ns.block):
                g = CONFIGS[k % 4]
                t0 = time.perf_counter_ns()
                for _ in range(ns.block):
                    _step(engines, instruments, g)
                torch.cuda.synchronize()  # named sync: ends this block's host-clock measurement
                samples[g].append((time.perf_counter_ns() - t0) / 1e6 / ns.block)
            for ins in instruments.values():
                ins.collect()
            med = {g: statistics.median(v) for g, v in samples.items()}
            pct = {g: (med[g] / med["none"] - 1) * 100 for g in CONFIGS}
            ci = {g: _ratio_ci(samples[g], samples["none"]) for g in CONFIGS[1:]}
            rows.append({"batch": batch, "attn": attn, "graphs": graphs, "kernels": kernels, "block": ns.block,
                         **{f"{g}_ms": med[g] for g in CONFIGS},
                         **{f"{g}_overhead_pct": pct[g] for g in CONFIGS[1:]},
                         **{f"{g}_overhead_ci95_pct": ci[g] for g in CONFIGS[1:]}, "samples_ms": samples})
            cells = " | ".join(f"{pct[g]:+.2f} [{ci[g][0]:+.1f}, {ci[g][1]:+.1f}]" for g in CONFIGS[1:])
            print(f"| {batch} | {attn} | {med['none']:.3f} | {med['phase']:.3f} | {med['layer']:.3f} | "
                  f"{med['op']:.3f} | {cells} |")
            del engines
            torch.cuda.empty_cache()
    if ns.json:
        write_json({"device": torch.cuda.get_device_name(), "date": datetime.now(UTC).date().isoformat(),
                    "model": ns.model, "dtype": ns.dtype, "seq": ns.seq, "steps_per_config": ns.steps,
                    "rows": rows}, ns.json, indent=1)


if __name__ == "__main__":
    main()
