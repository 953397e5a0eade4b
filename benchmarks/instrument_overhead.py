"""Cost of instrumentation on decode steps: each granularity against none, same process, same engine.

For every (batch, attention) pair the engine is prefilled with a 512-token prompt and then runs `--steps` decode
steps; the time of those steps is taken with a synchronised host clock around all of them (so the measurement
does not depend on the instrumentation being measured). Configurations are interleaved round by round (a different
order each round) and the median over rounds is reported, with its ratio to `none`; the minimum over rounds (the
least disturbed measurement) and the spread of `none` (interquartile range over rounds, in % of its median) are
reported too, because the eager loop is bound by the host and its speed drifts with the host.

    python3 benchmarks/instrument_overhead.py --model qwen2.5-3b --batches 1,32 --attn sdpa,eager
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from datetime import UTC, datetime

import torch

from kvscope.profiler.engine import Engine
from kvscope.profiler.instrument import Instrument
from kvscope.profiler.runconfig import RunConfig, parse_dtype
from kvscope.profiler.weights import load_model, resolve_model

CONFIGS = ("none", "phase", "layer", "op")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-3b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--attn", default="sdpa,eager")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", default=None, help="also write the rows here")
    ns = p.parse_args()
    dev = torch.device("cuda")
    src = resolve_model(ns.model)
    dtype = parse_dtype(ns.dtype)
    model, _ = load_model(src, dev, dtype)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {ns.model} {ns.dtype}, "
          f"prompt {ns.seq}, {ns.steps} decode steps x {ns.rounds} rounds, NVTX off (no tool attached)")
    print("| batch | attn | none ms/step | phase | layer | op | phase % | layer % | op % | min-based % (phase / layer "
          "/ op) | none IQR % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in [int(b) for b in ns.batches.split(",")]:
        for attn in ns.attn.split(","):
            cfg = RunConfig(batch, ns.seq + ns.steps + 1, dtype, dev, attn)
            instruments = {g: Instrument(g, dev, nvtx=False) for g in CONFIGS}
            engine = Engine(model, cfg, instruments["none"])
            tokens = torch.randint(0, src.args.vocab_size, (batch, ns.seq), device=dev)
            lengths = [ns.seq] * batch
            samples: dict[str, list[float]] = {g: [] for g in CONFIGS}
            for rnd in range(ns.rounds + 1):  # round 0 warms every configuration up and is dropped
                order = CONFIGS[rnd % 4:] + CONFIGS[: rnd % 4]
                for g in order:
                    ins = instruments[g]
                    engine.ins = ins
                    engine.prefill(tokens, lengths)
                    gc.collect()
                    ins.start_clock()  # synchronises
                    t0 = time.perf_counter_ns()
                    for _ in range(ns.steps):
                        engine.decode_step()
                    torch.cuda.synchronize()  # named sync: ends the host-clock measurement
                    ms = (time.perf_counter_ns() - t0) / 1e6 / ns.steps
                    ins.collect()
                    if rnd:
                        samples[g].append(ms)
            med = {g: statistics.median(v) for g, v in samples.items()}
            low = {g: min(v) for g, v in samples.items()}
            pct = {g: (med[g] / med["none"] - 1) * 100 for g in CONFIGS}
            pct_min = {g: (low[g] / low["none"] - 1) * 100 for g in CONFIGS}
            q = statistics.quantiles(samples["none"], n=4)
            spread = (q[2] - q[0]) / med["none"] * 100
            rows.append({"batch": batch, "attn": attn, **{f"{g}_ms": med[g] for g in CONFIGS},
                         **{f"{g}_overhead_pct": pct[g] for g in CONFIGS[1:]},
                         **{f"{g}_min_ms": low[g] for g in CONFIGS},
                         **{f"{g}_overhead_min_pct": pct_min[g] for g in CONFIGS[1:]},
                         "none_iqr_pct": spread, "samples_ms": samples})
            print(f"| {batch} | {attn} | {med['none']:.3f} | {med['phase']:.3f} | {med['layer']:.3f} | "
                  f"{med['op']:.3f} | {pct['phase']:+.2f} | {pct['layer']:+.2f} | {pct['op']:+.2f} | "
                  f"{pct_min['phase']:+.2f} / {pct_min['layer']:+.2f} / {pct_min['op']:+.2f} | {spread:.1f} |")
            del engine
            torch.cuda.empty_cache()
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": datetime.now(UTC).date().isoformat(),
                       "model": ns.model, "dtype": ns.dtype, "seq": ns.seq, "steps": ns.steps,
                       "rounds": ns.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
