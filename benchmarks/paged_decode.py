"""Split-KV decode attention over a paged KV cache against the same kernel over the token-major cache
(`kvscope.kernels.decode_attention.split_kv_decode` with and without `block_table`), at qwen2.5-3b's attention shape
(16 query heads over 2 KV heads, d=128, bfloat16 by default), batch 1 / 16 / 64 x context 512 / 4,096, block size 16,
each sequence's blocks at shuffled places of the pools (one random permutation of all blocks).

Every sequence holds `context` positions of a cache of context + 64 (the room the engine keeps for the tokens still to
come; a multiple of the block size, so both layouts have the same S_max and the kernel the same split count). Before
anything is timed, each configuration's output (poisoned first) is checked against `split_kv_decode_ref` within
`DECODE_ATTENTION_TOLERANCE`; a configuration that fails gets no time, and the script exits with status 1.

Timing: one call per CUDA-graph replay with the L2 flushed before each (as `benchmarks/kernels.py` times decode
attention: the decode step's other layers evict the cache's lines between two attention calls), CUDA events around
the replay, `--reps` replays per configuration and round, their median the round's figure. The configurations of a
shape and kernel (the tensor-core `mma` one and the CUDA-core one) are interleaved: each of `--rounds` rounds times
every configuration once, in an order rotated by one each round. The configurations: `contiguous` (no table),
`contiguous-again` (the same call as a second configuration: the A/A spread, the noise), `paged`, and, with
`--baseline-cu FILE` (a copy of an earlier `cuda/decode_attention.cu`, e.g. `git show HEAD:...`), `baseline`, that
source compiled with NVRTC and launched with its own arguments over the token-major cache (the contiguous path before
and after a change in one process). Reported per configuration: the median over rounds of the round medians, with
[min, max] over rounds; achieved GB/s of K and V read (the attended positions' bytes, each once) against the copy
ceiling (the calibration cache's `copy_gb_s` for this GPU, else measured here as `kvscope calibrate` does, or
`--copy-gb-s`); paged / contiguous per round, median [min, max]; the noise, max over rounds of |contiguous-again /
contiguous - 1|; and whether paged stays within it ("never slower than contiguous by more than its noise").

    python3 benchmarks/paged_decode.py [--batches 1,16,64] [--contexts 512,4096] [--block-size 16] [--rounds 7]
                                       [--reps 30] [--copy-gb-s GBS] [--baseline-cu FILE] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvscope.io import write_json
from kvscope.kernels import decode_attention as k_decode_attention
from kvscope.kernels import loader
from kvscope.kernels.launch import DTYPE_MACROS
from kvscope.model.dtypes import NAMES, from_name, itemsize
from kvscope.profiler import calibrate
from kvscope.profiler.timing import median_event_ms

HEADS = (16, 2, 128)  # qwen2.5-3b: query heads, KV heads, head size
ROOM = 64  # cache positions past the context (the engine's room for the tokens still to come)
FLUSH_MIN_BYTES = 256 * 2**20
KERNELS = {"mma": True, "cuda-core": False}  # kernel family -> split_kv_decode's tensor_cores


@dataclass
class Shape:
    """One (batch, context): q, the token-major caches, the same positions in shuffled pools, the lengths."""

    b: int
    ctx: int
    q: torch.Tensor  # (B, H, D)
    k: torch.Tensor  # (B, S_max, H_kv, D)
    v: torch.Tensor
    k_pool: torch.Tensor  # (n_blocks, block_size, H_kv, D)
    v_pool: torch.Tensor
    table: torch.Tensor  # (B, max_blocks) int32
    lengths: torch.Tensor  # (B,) int64

    @property
    def kv_bytes(self) -> int:
        """K and V of the attended positions, each read once."""
        return 2 * self.b * self.ctx * HEADS[1] * HEADS[2] * self.q.element_size()


def make_shape(b: int, ctx: int, block_size: int, dt: torch.dtype, dev: torch.device) -> Shape:
    """Random q and caches of S_max = ctx + ROOM positions (a multiple of `block_size`), every sequence at `ctx`;
    pools of B * max_blocks blocks holding the same rows, sequence b's block j at table[b, j] of a random
    permutation."""
    h, hkv, d = HEADS
    s_max = ctx + ROOM
    if s_max % block_size:
        raise SystemExit(f"context {ctx} + {ROOM} is not a multiple of the block size {block_size}")
    g = torch.Generator(device=dev).manual_seed(b * ctx)
    q = torch.randn(b, h, d, device=dev, generator=g).to(dt)
    k, v = (torch.randn(b, s_max, hkv, d, device=dev, generator=g).to(dt) for _ in range(2))
    max_blocks = s_max // block_size
    perm = torch.randperm(b * max_blocks, device=dev, generator=g)  # (B * max_blocks,)
    table = perm.view(b, max_blocks).to(torch.int32)  # (B, max_blocks)
    pools = []
    for c in (k, v):
        pool = torch.empty(b * max_blocks, block_size, hkv, d, device=dev, dtype=dt)
        pool[perm] = c.view(b * max_blocks, block_size, hkv, d)  # (B * max_blocks, block_size, H_kv, D)
        pools.append(pool)
    lengths = torch.full((b,), ctx, dtype=torch.int64, device=dev)
    return Shape(b, ctx, q, k, v, pools[0], pools[1], table, lengths)


def l2_flusher(dev: torch.device) -> Callable[[], None]:
    """Writes four times the L2 (at least FLUSH_MIN_BYTES), then reads as much, so that the timed call finds none of
    its lines in the L2 and none of the flush's dirty lines left to write back."""
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)
    n = max(4 * l2, FLUSH_MIN_BYTES)
    wbuf = torch.empty(n, dtype=torch.uint8, device=dev)
    rbuf = torch.ones(n // 4, dtype=torch.float32, device=dev)
    sink = torch.empty((), dtype=torch.float32, device=dev)

    def flush() -> None:
        wbuf.fill_(1)
        torch.sum(rbuf, dim=0, out=sink)
    return flush


def baseline_call(src: Path, s: Shape, out: torch.Tensor, tensor_cores: bool, splits: int) -> Callable[[], None]:
    """The kernel of an earlier `decode_attention.cu` (its arguments: out, part_o, part_lse, counters, q, k, v,
    lengths, q strides, H, H_kv, S_max, splits, window, scale * log2 e), compiled with NVRTC as kvscope's loader
    does, over the token-major cache, with its own merge kernel when `splits` > 1."""
    h, hkv, d = HEADS
    code = (loader.CUDA_DIR / "common.cuh").read_text() + "\n" + src.read_text()
    mod = loader.import_cupy().RawModule(code=code, options=(f"-D{DTYPE_MACROS[s.q.dtype]}", *loader.NVRTC_OPTIONS))
    gp, chunks = k_decode_attention.decode_group_chunk(h // hkv, tensor_cores)
    shared = k_decode_attention.DECODE_ATTENTION_MMA_SHARED_BYTES_PER_DIM * d if tensor_cores else 0
    fn = mod.get_function(f"kvscope_decode_attention_{'mma_d' + str(d) if tensor_cores else f'd{d}_g{gp}'}")
    if shared:
        fn.max_dynamic_shared_size_bytes = shared
    merge = mod.get_function("kvscope_decode_attention_merge")
    part_o = torch.empty(s.b, h, splits, d, dtype=torch.float32, device=s.q.device)
    part_lse = torch.empty(s.b, h, splits, dtype=torch.float32, device=s.q.device)
    args = (out.data_ptr(), part_o.data_ptr(), part_lse.data_ptr(), 0, s.q.data_ptr(), s.k.data_ptr(),
            s.v.data_ptr(), s.lengths.data_ptr(), np.int64(s.q.stride(0)), np.int64(s.q.stride(1)), np.int32(h),
            np.int32(hkv), np.int32(s.k.shape[1]), np.int32(splits), np.int32(0),
            np.float32(d**-0.5 * 1.4426950408889634))

    def call() -> None:
        stream = loader.external_stream(torch.cuda.current_stream().cuda_stream)
        fn((splits, hkv * chunks, s.b), (32 * k_decode_attention.DECODE_ATTENTION_WARPS, 1, 1), args,
           shared_mem=shared, stream=stream)
        if splits > 1:
            merge((s.b * h, 1, 1), (k_decode_attention.DECODE_ATTENTION_MERGE_THREADS, 1, 1),
                  (out.data_ptr(), part_o.data_ptr(), part_lse.data_ptr(), np.int32(splits), np.int32(d)),
                  stream=stream)
    return call


def configs(s: Shape, tensor_cores: bool, baseline: Path | None) -> tuple[dict[str, Callable[[], object]], int]:
    """The calls of one shape and kernel family, by configuration name, each writing its own output (B, H, D), and
    the split count they share (the default rule's, at S_max = context + ROOM)."""
    h, hkv, _ = HEADS
    n_groups = s.b * hkv * k_decode_attention.decode_group_chunk(h // hkv, tensor_cores)[1]
    s_max = s.k.shape[1]
    rule = (k_decode_attention.decode_splits_long if k_decode_attention.prefers_long_splits(n_groups, s_max)
            else k_decode_attention.decode_splits)
    splits = rule(n_groups, s_max, torch.cuda.get_device_properties(s.q.device).multi_processor_count)
    outs = {name: torch.empty_like(s.q) for name in ("contiguous", "contiguous-again", "paged", "baseline")}
    calls: dict[str, Callable[[], object]] = {
        name: (lambda o=outs[name]: k_decode_attention.split_kv_decode(
            s.q, s.k, s.v, s.lengths, splits=splits, out=o, tensor_cores=tensor_cores))
        for name in ("contiguous", "contiguous-again")}
    calls["paged"] = lambda: k_decode_attention.split_kv_decode(
        s.q, s.k_pool, s.v_pool, s.lengths, splits=splits, out=outs["paged"], tensor_cores=tensor_cores,
        block_table=s.table)
    if baseline is not None:
        calls["baseline"] = baseline_call(baseline, s, outs["baseline"], tensor_cores, splits)
    calls = {name: _returning(fn, outs[name]) for name, fn in calls.items()}
    return calls, splits


def _returning(fn: Callable[[], object], out: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        fn()
        return out
    return call


def check(calls: dict[str, Callable[[], torch.Tensor]], ref: torch.Tensor) -> dict[str, str]:
    """Each call's output, poisoned with NaN first, against the reference: name -> "passed" or what differs."""
    result = {}
    for name, fn in calls.items():
        fn().fill_(float("nan"))
        got = fn()
        try:
            torch.testing.assert_close(got, ref, **k_decode_attention.DECODE_ATTENTION_TOLERANCE[ref.dtype])
            result[name] = "passed"
        except AssertionError as exc:
            result[name] = " ".join(str(exc).split())[:300]
    return result


def captured(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """One call in a CUDA graph (compiled and warmed on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def rounds_us(graphs: dict[str, torch.cuda.CUDAGraph], flush: Callable[[], None], rounds: int, reps: int
              ) -> dict[str, list[float]]:
    """Per configuration, one figure per round (the median of `reps` cold replays, µs); the configurations
    interleaved, their order rotated by one each round. One named sync per round, after its events."""
    names = list(graphs)
    per: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # untimed replays: the first replays of a graph are slower
        for _ in range(3):
            flush()
            graphs[name].replay()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                         for _ in range(reps)] for name in order}
        for name in order:
            for start, end in events[name]:
                flush()
                start.record()
                graphs[name].replay()
                end.record()
        torch.cuda.synchronize()  # named sync: the round's events are read after it
        for name in order:
            per[name].append(statistics.median(s.elapsed_time(e) for s, e in events[name]) * 1e3)
    return per


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def shape_rows(s: Shape, family: str, baseline: Path | None, flush: Callable[[], None], ns: argparse.Namespace,
               copy_gb_s: float) -> list[dict[str, Any]]:
    """The rows of one shape and kernel family: every configuration checked, then timed in interleaved rounds."""
    calls, splits = configs(s, KERNELS[family], baseline)
    label = f"bs{s.b} ctx{s.ctx} {family}"
    checks = check(calls, k_decode_attention.split_kv_decode_ref(s.q, s.k, s.v, s.lengths))
    failed = {name: why for name, why in checks.items() if why != "passed"}
    if failed:
        for name, why in failed.items():
            print(f"{label:>22} {name:16} FAILED its reference check, no time reported: {why}")
        return [{"shape": label, "config": name, "check": why} for name, why in checks.items()]
    per = rounds_us({name: captured(fn) for name, fn in calls.items()}, flush, ns.rounds, ns.reps)
    ratio = [p / c for p, c in zip(per["paged"], per["contiguous"], strict=True)]
    aa = [a / c for a, c in zip(per["contiguous-again"], per["contiguous"], strict=True)]
    noise = max(abs(x - 1) for x in aa)
    rows = []
    for name, us in per.items():
        med = statistics.median(us)
        gbs = s.kv_bytes / (med / 1e6) / 1e9
        row: dict[str, Any] = {"shape": label, "batch": s.b, "context": s.ctx, "kernel": family, "config": name,
                               "splits": splits, "block_size": ns.block_size, "check": "passed", "us": spread(us),
                               "rounds_us": us, "kv_bytes": s.kv_bytes, "kv_gb_s": gbs,
                               "pct_copy": 100 * gbs / copy_gb_s}
        if name == "paged":
            row.update({"paged_over_contiguous": spread(ratio), "noise": noise,
                        "within_noise": statistics.median(ratio) - 1 <= noise})
        if name == "baseline":
            row["contiguous_over_baseline"] = spread([c / b for c, b in zip(per["contiguous"], us, strict=True)])
        rows.append(row)
        print(f"{label:>22} {name:16} splits {splits:4} {med:8.2f} us [{min(us):8.2f}, {max(us):8.2f}] "
              f"{gbs:6.0f} GB/s ({row['pct_copy']:5.1f}% of copy)")
    r = spread(ratio)
    print(f"{label:>22} paged / contiguous {r['median']:.4f} [{r['min']:.4f}, {r['max']:.4f}], noise (A/A) "
          f"{noise:.4f}: {'within noise' if r['median'] - 1 <= noise else 'SLOWER than the noise'}")
    return rows


def copy_ceiling(dev: torch.device, given: float | None) -> tuple[float, str]:
    """The copy ceiling in GB/s (bytes read + written) and where it comes from."""
    if given is not None:
        return given, "--copy-gb-s"
    name = torch.cuda.get_device_name(dev)
    cached = calibrate.load_ceilings(name)
    if cached is not None:
        return cached.copy_gb_s, f"calibration cache ({calibrate.cache_path()})"
    src = torch.empty(calibrate.COPY_BYTES, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = median_event_ms(lambda: dst.copy_(src), reps=20)
    return 2 * calibrate.COPY_BYTES / (ms / 1e3) / 1e9, "measured here as `kvscope calibrate` does"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--contexts", default="512,4096", help="comma-separated positions per sequence")
    p.add_argument("--block-size", type=int, default=16, help="positions per block of the paged cache")
    p.add_argument("--kernels", default="mma,cuda-core", help="kernel families: mma (tensor cores), cuda-core")
    p.add_argument("--dtype", default="bfloat16", choices=NAMES)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per shape and kernel")
    p.add_argument("--reps", type=int, default=30, help="cold replays per configuration and round")
    p.add_argument("--copy-gb-s", type=float, default=None, help="the copy ceiling (default: calibration cache)")
    p.add_argument("--baseline-cu", type=Path, default=None, help="an earlier decode_attention.cu to time as well")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ns = p.parse_args()
    dev, dt = torch.device("cuda"), from_name(ns.dtype).torch_dtype
    if not k_decode_attention.paged_block_size_ok(ns.block_size):
        raise SystemExit(f"block size {ns.block_size} is not served ({k_decode_attention.PAGED_BLOCK_SIZES})")
    copy_gb_s, source = copy_ceiling(dev, ns.copy_gb_s)
    gpu = torch.cuda.get_device_name(dev)
    print(f"{gpu}: heads {HEADS}, {ns.dtype} ({itemsize(dt)} B), block size {ns.block_size}; copy {copy_gb_s:.0f} "
          f"GB/s ({source})")
    flush = l2_flusher(dev)
    rows = []
    for b in (int(x) for x in ns.batches.split(",")):
        for ctx in (int(x) for x in ns.contexts.split(",")):
            s = make_shape(b, ctx, ns.block_size, dt, dev)
            for family in ns.kernels.split(","):
                rows += shape_rows(s, family, ns.baseline_cu, flush, ns, copy_gb_s)
    if ns.json:
        write_json({"device": gpu, "date": datetime.now(UTC).date().isoformat(), "torch": torch.__version__,
                    "dtype": ns.dtype, "heads": HEADS, "block_size": ns.block_size, "rounds": ns.rounds,
                    "reps": ns.reps, "copy_gb_s": copy_gb_s, "copy_source": source,
                    "baseline_cu": str(ns.baseline_cu) if ns.baseline_cu else None, "rows": rows}, ns.json)
    failed = sorted({r["shape"] for r in rows if r["check"] != "passed"})
    if failed:
        raise SystemExit(f"reference check failed, no time reported: {', '.join(failed)}")


if __name__ == "__main__":
    main()
