"""What the instruments cost: TTFT and TPOT of a bare engine against every instrumented configuration, interleaved.

The host's speed drifts (on the lent GPUs a launch-bound prefill moved 2x between calls), so every configuration
runs inside one process, round-robin: each round runs every configuration once, in an order rotated by one each
round, and each run is one prefill (TTFT: host clock from the call to the first tokens on the host, the prefill
synchronised before) followed by `--steps` decode steps (TPOT: host clock over the steps, synchronised at both ends,
divided by the steps). Drift then hits every configuration alike. Reported per configuration and prompt length: the
median, and the median of the per-round ratios to the bare engine's run of the same round (paired: the two ran
seconds apart, so the host's slow drift cancels), with a bootstrap 95% interval over the rounds, and the count.

Each timed run follows an untimed one of the same configuration (`--prime`), so that what ran before it (another
configuration, the start of a sampler, a collect) has left no idle GPU or cold host behind. Configurations whose
decode graph holds no marks share one engine (only the Instrument is swapped): their differences are the instruments'
alone. Layer and op granularity in graph mode capture marks into the graph, so each has its own engine (its own graph
and KV cache, over the same weights).

Configurations:
- `bare`: no NVTX, no events, no NVML (granularity none, the instrument does nothing);
- `phase`, `layer`, `op`: CUDA events at that granularity, NVTX off;
- `phase+nvtx`, `layer+nvtx` (not in the default set): the same with NVTX requested. Without a tool attached the
  nvtx package hands out a do-nothing domain and the Instrument takes the same code path as with NVTX off, so these
  measure something only under `nsys profile -t cuda,nvtx`;
- `default`: what `kvscope run` switches on by default: phase events, NVTX requested, the NVML sampler (a child
  process, started before the round's prefill and stopped after its decode, as a run keeps it around the measured
  repetitions);
- `phase+nvml-thread`: phase events with NVML sampled by a thread of this process (the design kvscope had before,
  kept here to show what it cost).

    python3 benchmarks/instrument_overhead.py --model qwen2.5-3b --seqs 128,512,2048 --rounds 40 \\
        --graphs on,off --json docs/benchmarks/instrument_overhead.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kvscope.analysis.diff.stats import paired_interval
from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig, parse_dtype
from kvscope.io import write_json
from kvscope.measure.run import regions_per_rep
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model
from kvscope.profiler.instrument import Instrument
from kvscope.profiler.nvml import NvmlSampler

# name -> (granularity, nvtx requested, nvml: None | "child" | "thread")
CONFIGS: dict[str, tuple[str, bool, str | None]] = {
    "bare": ("none", False, None),
    "phase": ("phase", False, None),
    "phase+nvtx": ("phase", True, None),
    "layer": ("layer", False, None),
    "layer+nvtx": ("layer", True, None),
    "op": ("op", False, None),
    "default": ("phase", True, "child"),
    "phase+nvml-thread": ("phase", False, "thread"),
}


class ThreadSampler:
    """NVML queries every `interval_ms` from a thread of this process (kvscope's sampler before issue 11)."""

    def __init__(self, interval_ms: float) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nv = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.interval_s = interval_ms / 1000
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.samples = 0

    def _loop(self) -> None:
        nv, h = self.nv, self.handle
        next_t = time.perf_counter()
        while not self.stop_event.is_set():
            nv.nvmlDeviceGetUtilizationRates(h)
            nv.nvmlDeviceGetMemoryInfo(h)
            nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)
            nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)
            nv.nvmlDeviceGetPowerUsage(h)
            nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
            self.samples += 1
            next_t += self.interval_s
            self.stop_event.wait(max(0.0, next_t - time.perf_counter()))

    def start(self) -> None:
        self.stop_event.clear()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join()


@dataclass
class Sample:
    ttft_ms: list[float]
    tpot_ms: list[float]


def paired_ratio(a: list[float], b: list[float], n: int = 2000) -> tuple[float, float, float]:
    """Median over rounds of a[i] / b[i] - 1 (a and b measured in the same round), and its 95% bootstrap interval
    over rounds, all in percent."""
    ratios = [x / y - 1 for x, y in zip(a, b, strict=True)]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return statistics.median(ratios) * 100, boot[int(0.025 * n)] * 100, boot[int(0.975 * n)] * 100


def _one(engine: Engine, ins: Instrument, tokens: torch.Tensor, lengths: list[int], steps: int
         ) -> tuple[float, float]:
    """One prefill and `steps` decode steps: (TTFT ms, TPOT ms) on the host clock."""
    torch.cuda.synchronize()  # named sync: the GPU is idle when the prefill is called
    with ins.region("rep", "rep", rep=0):
        t0 = time.perf_counter_ns()
        first = engine.prefill(tokens, lengths)
        first.to("cpu")  # named sync: the first tokens on the host end TTFT
        t1 = time.perf_counter_ns()
        engine.decode_n(steps)
        torch.cuda.synchronize()  # named sync: ends the decode phase's host clock
        t2 = time.perf_counter_ns()
    return (t1 - t0) / 1e6, (t2 - t1) / 1e6 / steps


def reanalyse(path: str) -> None:
    """Print the tables of a JSON this script wrote, the paired ratios recomputed from its samples (no GPU needed)."""
    data = json.loads(Path(path).read_text())
    print(f"{data['device']}, {data['date']}, torch {data['torch']}, {data['model']} {data['dtype']}, batch "
          f"{data['batch']}, {data['rounds']} rounds; command: {data.get('command', 'n/a')}")
    for graphs in sorted({r["graphs"] for r in data["rows"]}, reverse=True):
        rows = [r for r in data["rows"] if r["graphs"] == graphs]
        print(f"\n### CUDA graphs {'on' if graphs else 'off'} ({rows[0]['decode_steps']} decode steps a round)\n")
        print("| seq | configuration | TTFT ms | TTFT vs bare % [95% CI] | TPOT ms | TPOT vs bare % [95% CI] | n |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            base = next(b for b in rows if b["seq"] == r["seq"] and b["config"] == "bare")
            cells = ["", ""]
            if r["config"] != "bare":
                for i, key in enumerate(("ttft", "tpot")):
                    pct, lo, hi = paired_ratio(r[f"{key}_samples_ms"], base[f"{key}_samples_ms"])
                    cells[i] = f"{pct:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            print(f"| {r['seq']} | {r['config']} | {r['ttft_ms']:.3f} | {cells[0]} | {r['tpot_ms']:.4f} | "
                  f"{cells[1]} | {r['rounds']} |")


def _rounds(ns: argparse.Namespace, dev: torch.device, names: list[str], seqs: list[int], steps: int,
            engines: dict[str, Any], instruments: dict[str, Instrument], prompts: dict[int, torch.Tensor]
            ) -> tuple[dict[tuple[str, int], Sample], int]:
    """Every configuration at every prompt length, round-robin (the order rotated each round), after two warm-up
    rounds; the host-clock samples per (configuration, length), and the NVML thread's sample count."""
    samples = {(n, s): Sample([], []) for n in names for s in seqs}
    thread_samples = 0
    for r in range(-2, ns.rounds):  # two warm-up rounds (compiles, graph captures), not kept
        order = names[r % len(names):] + names[:r % len(names)]
        for s in seqs:
            for n in order:
                ins, nvml_kind = instruments[n], CONFIGS[n][2]
                sampler: Any = None
                if nvml_kind == "child":
                    sampler = NvmlSampler(dev, ns.nvml_interval_ms)
                    time.sleep(0.15)  # the child starts (a run starts it before the model loads)
                    sampler.start(time.perf_counter_ns())
                elif nvml_kind == "thread":
                    sampler = ThreadSampler(ns.nvml_interval_ms)
                    sampler.start()
                try:
                    engines[n].ins = ins
                    with ins.paused():
                        for _ in range(ns.prime):
                            _one(engines[n], ins, prompts[s], [s] * ns.batch, steps)
                    ttft, tpot = _one(engines[n], ins, prompts[s], [s] * ns.batch, steps)
                finally:
                    if sampler is not None:
                        sampler.stop()
                if nvml_kind == "thread":
                    thread_samples += sampler.samples
                ins.collect()
                if r >= 0:
                    samples[(n, s)].ttft_ms.append(ttft)
                    samples[(n, s)].tpot_ms.append(tpot)
    return samples, thread_samples


def _table(names: list[str], seqs: list[int], samples: dict[tuple[str, int], Sample], graphs: bool, steps: int
           ) -> list[dict[str, Any]]:
    """The Markdown table of one mode (graphs on or off), each configuration against `bare`; its JSON rows."""
    rows: list[dict[str, Any]] = []
    print("| seq | configuration | TTFT ms | TTFT vs bare % [95% CI] | TPOT ms | TPOT vs bare % [95% CI] | n |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s in seqs:
        base = samples[("bare", s)] if "bare" in names else None
        for n in names:
            smp = samples[(n, s)]
            med_t, med_d = statistics.median(smp.ttft_ms), statistics.median(smp.tpot_ms)
            row: dict[str, Any] = {"graphs": graphs, "seq": s, "config": n, "granularity": CONFIGS[n][0],
                                   "nvtx": CONFIGS[n][1], "nvml": CONFIGS[n][2], "ttft_ms": med_t,
                                   "tpot_ms": med_d, "rounds": len(smp.ttft_ms), "decode_steps": steps,
                                   "ttft_samples_ms": smp.ttft_ms, "tpot_samples_ms": smp.tpot_ms}
            cells = ["", ""]
            if base is not None and n != "bare":
                for i, (key, a, b) in enumerate((("ttft", smp.ttft_ms, base.ttft_ms),
                                                 ("tpot", smp.tpot_ms, base.tpot_ms))):
                    pct, lo, hi = paired_ratio(a, b)
                    row |= {f"{key}_vs_bare_pct": pct, f"{key}_vs_bare_ci95_pct": [lo, hi]}
                    cells[i] = f"{pct:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                    iv = paired_interval(b, a)  # kvscope diff's paired interval (Hodges-Lehmann, Wilcoxon)
                    if iv is not None:
                        hl = [(iv.estimate - 1) * 100, (iv.low - 1) * 100, (iv.high - 1) * 100]
                        row |= {f"{key}_vs_bare_hl_pct": hl}
                        cells[i] += f" HL {hl[0]:+.2f} [{hl[1]:+.2f}, {hl[2]:+.2f}]"
            rows.append(row)
            print(f"| {s} | {n} | {med_t:.3f} | {cells[0]} | {med_d:.4f} | {cells[1]} | {len(smp.ttft_ms)} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-3b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqs", default="128,512,2048")
    p.add_argument("--steps", type=int, default=16, help="decode steps after each prefill")
    p.add_argument("--eager-steps", type=int, default=8, help="decode steps after each prefill with graphs off")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--graphs", default="on,off", help="on, off or both: CUDA-graph decode, or the eager loop")
    p.add_argument("--prefill-graphs", default="on", choices=["on", "off"],
                   help="with graphs on, prefills replayed from CUDA graphs per length (what `kvscope run` does by "
                        "default) or eager")
    p.add_argument("--configs", default="bare,phase,layer,op,default,phase+nvml-thread")
    p.add_argument("--prime", type=int, default=1, help="untimed runs of a configuration right before its timed one")
    p.add_argument("--nvml-interval-ms", type=float, default=20.0)
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", default=None, help="only print the tables of an earlier run's JSON")
    ns = p.parse_args()
    if ns.from_json:
        reanalyse(ns.from_json)
        return
    dev = torch.device("cuda")
    src = resolve_model(ns.model)
    dtype = parse_dtype(ns.dtype)
    model, _ = load_model(src, dev, dtype)
    seqs = [int(x) for x in ns.seqs.split(",")]
    names = ns.configs.split(",")
    rows: list[dict[str, Any]] = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {ns.model} {ns.dtype}, batch "
          f"{ns.batch}, {ns.rounds} rounds, configurations round-robin (rotated each round), host clock")
    for mode in ns.graphs.split(","):
        graphs = mode == "on"
        steps = ns.steps if graphs else ns.eager_steps
        prefill_graphs = graphs and ns.prefill_graphs == "on"
        cfg = RunConfig(ns.batch, max(seqs) + steps + 2, dtype, dev, "sdpa", prefill_graphs)
        instruments = {n: Instrument(CONFIGS[n][0], dev, nvtx=CONFIGS[n][1]) for n in names}
        shared = Engine(model, cfg, Instrument("none", dev, nvtx=False), EngineOptions(graphs=graphs, kernels=True))
        engines = {n: (Engine(model, cfg, instruments[n], options=EngineOptions(graphs=True, kernels=True))
                       if graphs and instruments[n].graph_timed() else shared) for n in names}
        for n in names:
            instruments[n].start_clock()
            instruments[n].reserve(regions_per_rep(instruments[n], src.args.n_layers, steps + 1, graphs) + 2)
        prompts = {s: torch.randint(0, src.args.vocab_size, (ns.batch, s), device=dev) for s in seqs}
        samples, thread_samples = _rounds(ns, dev, names, seqs, steps, engines, instruments, prompts)
        print(f"\n### CUDA graphs {mode}, prefill graphs {'on' if prefill_graphs else 'off'} ({steps} decode steps "
              "a round)\n")
        rows += [r | {"prefill_graphs": prefill_graphs} for r in _table(names, seqs, samples, graphs, steps)]
        if thread_samples:
            print(f"\n(the in-process NVML thread took {thread_samples} samples in all)")
        if ns.json:  # after each mode, so a run stopped later keeps what it measured
            nvtx_attached = any(ins.nvtx_active for ins in instruments.values())
            write_json({"device": torch.cuda.get_device_name(), "date": datetime.now(UTC).date().isoformat(),
                        "torch": torch.__version__, "model": ns.model, "dtype": ns.dtype, "batch": ns.batch,
                        "rounds": ns.rounds, "prime": ns.prime, "nvtx_tool_attached": nvtx_attached,
                        "command": " ".join(sys.argv),
                        "rows": rows}, ns.json, indent=1)
        del engines, shared
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
