"""Decode-only iterations of the served engine (paged KV cache, block tables, CUDA graph per batch bucket) against
the static engine's decode step (contiguous cache, one CUDA graph) at the same batch and context, interleaved in one
process: qwen2.5-3b (random weights) bf16, kernels and graphs on, kvscope's split-KV attention in both.

Per (batch, context) point both engines are built once. The static engine prefills `context` tokens per sequence;
the served engine's sequences get `context` positions of blocks (physical block ids shuffled, so the tables are not
contiguous runs) and their K/V are filled with random values (a decode step's time does not depend on them). Each
round times `--steps` steps of each engine between two CUDA events (one named sync per engine and round), the order
alternating between rounds. The served step includes what a served iteration really does on the host side of the
region: its inputs (tokens, positions, slots, lengths, block tables) copied from page-locked memory, then the replay;
the sampled tokens are not read back here (the scheduler's sync is measured by `kvscope serve`). Positions stay
fixed across the steps of a round (both engines): the same keys are read each step.

    python3 benchmarks/serve_decode_vs_static.py [--points 1x512,1x4096,16x512,16x4096,64x512,64x4096]
        [--steps 32] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from kvscope.engine.loop import Engine
from kvscope.engine.options import EngineOptions
from kvscope.engine.plan import RunConfig
from kvscope.engine.served import IterationBatch, ServeConfig, ServedEngine
from kvscope.model.paged_kv_cache import PagedKVCache, blocks_for
from kvscope.model.source import resolve_model
from kvscope.model.weights import load_model

DT = torch.bfloat16
BLOCK = 16


def _points(text: str) -> list[tuple[int, int]]:
    return [(int(b), int(s)) for b, s in (p.split("x") for p in text.split(",") if p)]


def static_engine(model: torch.nn.Module, b: int, ctx: int, steps: int) -> Engine:
    eng = Engine(model, RunConfig(b, ctx + steps + 2, DT, torch.device("cuda"), "kvscope"),
                 options=EngineOptions(graphs=True, kernels=True))
    tokens = torch.randint(0, model.args.vocab_size, (b, ctx), device="cuda")
    eng.prefill(tokens, [ctx] * b)
    eng.decode_step()  # captures the graph
    return eng


def served_engine(model: torch.nn.Module, b: int, ctx: int, seed: int) -> tuple[ServedEngine, IterationBatch]:
    per_seq = blocks_for(ctx + 1, BLOCK)
    n_blocks = b * per_seq + 1
    cache = PagedKVCache(model.args, n_blocks, BLOCK, DT, torch.device("cuda"))
    cache.data.normal_(0, 1)
    eng = ServedEngine(model, cache, ServeConfig(ctx + 2, b, DT, torch.device("cuda")),
                       options=EngineOptions(graphs=True, kernels=True))
    eng.capture_graphs()
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, n_blocks))  # shuffled physical blocks
    tables = np.zeros((b, eng.max_blocks), dtype=np.int32)
    tables[:, :per_seq] = ids.reshape(b, per_seq)
    pos = np.full(b, ctx, dtype=np.int64)
    slots = tables[:, ctx // BLOCK].astype(np.int64) * BLOCK + ctx % BLOCK
    batch = IterationBatch(rng.integers(0, model.args.vocab_size, b), pos, slots, b, tables, [],
                           np.arange(b, dtype=np.int64))
    return eng, batch


def time_steps(step: object, steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()  # type: ignore[operator]
    end.record()
    end.synchronize()  # named sync: once per engine and round
    return start.elapsed_time(end) / steps


def measure_point(model: torch.nn.Module, b: int, ctx: int, steps: int, rounds: int) -> dict[str, object]:
    """Both engines at one (batch, context), `rounds` interleaved rounds of `steps` steps each."""
    st = static_engine(model, b, ctx, steps)
    sv, batch = served_engine(model, b, ctx, seed=b * 100003 + ctx)
    with torch.inference_mode():
        for _ in range(3):
            sv.forward(batch, 0)
    torch.cuda.synchronize()

    def s_step() -> None:
        st.decode_step()
        st.cache.lengths.sub_(1)  # the positions stay fixed (one tiny kernel, counted against static)
        st.cache._host_lengths = [n - 1 for n in st.cache._host_lengths]

    def p_step() -> None:
        sv.forward(batch, 0)

    static_ms: list[float] = []
    paged_ms: list[float] = []
    order = [(s_step, static_ms), (p_step, paged_ms)]
    for r in range(rounds):
        for fn, acc in (order if r % 2 == 0 else order[::-1]):
            acc.append(time_steps(fn, steps))
    ratios = [p / s for p, s in zip(paged_ms, static_ms, strict=True)]
    return {"batch": b, "context": ctx, "static_ms": statistics.median(static_ms),
            "paged_ms": statistics.median(paged_ms), "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "static_rounds": static_ms, "paged_rounds": paged_ms,
            "device": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-3b")
    ap.add_argument("--points", default="1x512,1x4096,16x512,16x4096,64x512,64x4096")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model, _ = load_model(resolve_model(a.model), torch.device("cuda"), DT)
    out = []
    print(f"{'batch':>5} {'ctx':>6} {'static ms':>10} {'paged ms':>9} {'paged/static':>12} {'ratio range':>16}")
    for b, ctx in _points(a.points):
        row = measure_point(model, b, ctx, a.steps, a.rounds)
        out.append(row)
        print(f"{b:>5} {ctx:>6} {row['static_ms']:>10.4f} {row['paged_ms']:>9.4f} {row['ratio']:>12.4f} "
              f"[{row['ratio_min']:.4f}, {row['ratio_max']:.4f}]", flush=True)
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
