"""kvscope's CUDA kernels against their torch references and the measured copy ceiling, at the shapes of a model's
decode step (batch 1 and 64) and of a long prefill.

Before a kernel is timed at a shape, its output there is checked against its torch reference (the `*_ref` functions
of `kvscope.kernels.ops`) within the dtype's tolerance (`kvscope.kernels.ops.REF_TOLERANCE`); a kernel that fails the
check gets no time: its row says why, and the script exits with status 1 after the other rows.

Each figure is the median over `--reps` CUDA-event timings of a CUDA graph of `--launches` back-to-back calls
(graph replay keeps the launch cost of the host out of it), divided by the launch count. Bytes are the least each
operation must move (every input read once, every output written once), the same count for the kernel and for the
same work in torch operations (`torch_us`), so GB/s is effective bandwidth; `% copy` is against a device-to-device
copy measured in the same process.

    python3 benchmarks/kernels.py [--model qwen2.5-3b] [--seq 4096] [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
import torch.nn.functional as F

from kvscope.io import write_json
from kvscope.kernels import ops as kops
from kvscope.model.config import PRESETS, ModelArgs
from kvscope.model.dtypes import NAMES, from_name, itemsize
from kvscope.model.layers import apply_rope, rope_tables
from kvscope.profiler.timing import graph_ms, median_event_ms


@dataclass
class Case:
    """One kernel at one shape: the kernel call and the same work in torch operations (both timed), the bytes they
    must move, and `check()`, the kernel against its reference on fresh copies of the inputs (None: within tolerance,
    else what differs)."""

    op: str
    kernel: Callable[[], object]
    torch_op: Callable[[], object]
    nbytes: int
    check: Callable[[], str | None]


def mismatch(outputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str | None:
    """The first output whose kernel value is outside the dtype's tolerance of its reference, in one line; None when
    every one is within it. `outputs`: name -> (kernel's, reference's)."""
    for name, (got, want) in outputs.items():
        try:
            torch.testing.assert_close(got, want, **kops.REF_TOLERANCE[want.dtype])
        except AssertionError as exc:
            return f"{name}: {' '.join(str(exc).split())[:300]}"
    return None


def rms_norm_case(n: int, dim: int, dt: torch.dtype, g: torch.Generator) -> Case:
    dev = g.device
    x = torch.randn(n, dim, device=dev, generator=g).to(dt)  # (N, dim)
    w = (torch.rand(dim, device=dev, generator=g) + 0.5).to(dt)  # (dim,)
    return Case("rms_norm", lambda: kops.rms_norm(x, w, 1e-6), lambda: F.rms_norm(x, (dim,), w, 1e-6),
                itemsize(dt) * (2 * n * dim + dim),
                lambda: mismatch({"out": (kops.rms_norm(x, w, 1e-6), kops.rms_norm_ref(x, w, 1e-6))}))


def silu_mul_case(n: int, ff: int, fused: bool, dt: torch.dtype, g: torch.Generator) -> Case:
    """fused: gate and up are the strided halves of one (N, 2F) product (decode); else two contiguous (N, F)."""
    w13 = (torch.randn(n, 2 * ff, device=g.device, generator=g) * 3).to(dt)  # (N, 2F)
    gate, up = w13.split(ff, dim=-1) if fused else (w13[:, :ff].contiguous(), w13[:, ff:].contiguous())  # (N, F)
    return Case("silu_mul", lambda: kops.silu_mul(gate, up), lambda: F.silu(gate) * up, itemsize(dt) * 3 * n * ff,
                lambda: mismatch({"out": (kops.silu_mul(gate, up), kops.silu_mul_ref(gate, up))}))


def rope_kv_case(a: ModelArgs, b: int, s: int, s_max: int, tables: tuple[torch.Tensor, torch.Tensor],
                 g: torch.Generator) -> Case:
    """A prefill (positions 0..S-1) or, with S = 1, a decode step at position 7 of every sequence."""
    h, hkv, d = a.n_heads, a.n_kv_heads, a.head_dim
    cos, sin_rot = tables  # (S_max, D) each
    dev, dt = cos.device, cos.dtype
    qkv = torch.randn(b, s, h + 2 * hkv, d, device=dev, generator=g).to(dt)  # (B, S, H+2H_kv, D)
    kc, vc = (torch.zeros(b, s_max, hkv, d, device=dev, dtype=dt) for _ in range(2))  # (B, S_max, H_kv, D)
    lengths = torch.full((b,), 7, dtype=torch.int64, device=dev) if s == 1 else None  # (B,)
    pos = (lengths.view(b, 1) if lengths is not None else 0) + torch.arange(s, device=dev).view(1, s)  # (B, S)
    c, sr = cos[pos].unsqueeze(2), sin_rot[pos].unsqueeze(2)  # (B, S, 1, D)
    kv = torch.stack((kc, vc))  # (2, B, S_max, H_kv, D)
    widx = pos.view(1, b, s, 1, 1).expand(2, b, s, hkv, d)  # (2, B, S, H_kv, D)

    def torch_op() -> None:
        r = apply_rope(qkv[:, :, :h + hkv], c, sr)  # (B, S, H+H_kv, D)
        qkv[:, :, :h + hkv].copy_(r)
        kv.scatter_(2, widx, qkv[:, :, h:].unflatten(2, (2, hkv)).permute(2, 0, 1, 3, 4))  # (2, B, S, H_kv, D)

    def check() -> str | None:
        ours, ref = qkv.clone(), qkv.clone()
        caches = [torch.zeros_like(kc) for _ in range(4)]
        kops.rope_kv_(ours, cos, sin_rot, caches[0], caches[1], h, lengths)
        kops.rope_kv_ref_(ref, cos, sin_rot, caches[2], caches[3], h, lengths)
        return mismatch({"qkv": (ours, ref), "k_cache": (caches[0], caches[2]), "v_cache": (caches[1], caches[3])})

    nbytes = itemsize(dt) * b * s * ((h + 2 * hkv) * d + (h + hkv) * d + 2 * hkv * d + 2 * d)
    return Case("rope_kv", lambda: kops.rope_kv_(qkv, cos, sin_rot, kc, vc, h, lengths), torch_op, nbytes, check)


def measure(label: str, cases: list[Case], time_us: Callable[[Callable[[], object]], float], copy_gb_s: float
            ) -> list[dict[str, Any]]:
    """One row per case: checked first; timed (kernel and torch) only when the check passed."""
    rows = []
    for case in cases:
        bad = case.check()
        row: dict[str, Any] = {"shape": label, "op": case.op, "bytes": case.nbytes, "check": bad or "passed"}
        if bad is not None:
            print(f"{label:>14} {case.op:9} FAILED its reference check, no time reported: {bad}")
            rows.append(row)
            continue
        us_k, us_t = time_us(case.kernel), time_us(case.torch_op)
        gbs = case.nbytes / (us_k / 1e6) / 1e9
        row.update({"kernel_us": us_k, "torch_us": us_t, "kernel_gb_s": gbs, "pct_copy": 100 * gbs / copy_gb_s,
                    "speedup": us_t / us_k})
        rows.append(row)
        print(f"{label:>14} {case.op:9} {case.nbytes / 1e6:9.2f} MB  kernel {us_k:8.2f} us {gbs:7.0f} GB/s "
              f"({row['pct_copy']:5.1f}% of copy)  torch {us_t:8.2f} us  {row['speedup']:5.2f}x")
    return rows


def copy_bandwidth_gb_s(dev: torch.device, nbytes: int = 2**30) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes` (as `kvscope calibrate` measures)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_event_ms(lambda: dst.copy_(src), reps=20) / 1e3) / 1e9


def shape_cases(a: ModelArgs, b: int, s: int, s_max: int, tables: tuple[torch.Tensor, torch.Tensor]) -> list[Case]:
    dt = tables[0].dtype
    g = torch.Generator(device=tables[0].device).manual_seed(b * s)
    return [rms_norm_case(b * s, a.dim, dt, g), silu_mul_case(b * s, a.intermediate_size, s == 1, dt, g),
            rope_kv_case(a, b, s, s_max, tables, g)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-3b", choices=sorted(PRESETS))
    p.add_argument("--seq", type=int, default=4096, help="prefill tokens")
    p.add_argument("--dtype", default="bfloat16", choices=NAMES)
    p.add_argument("--launches", type=int, default=50)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the rows here")
    ns = p.parse_args()
    dev, dt = torch.device("cuda"), from_name(ns.dtype)
    a = PRESETS[ns.model]
    copy_gb_s = copy_bandwidth_gb_s(dev)
    name = torch.cuda.get_device_name(dev)
    print(f"{name}: {ns.model} shapes, {dt.name}; device-to-device copy {copy_gb_s:.0f} GB/s")
    s_max = ns.seq + 64
    tables = rope_tables(a, s_max, dev, dt.torch_dtype)  # (S_max, D) each

    def time_us(fn: Callable[[], object]) -> float:
        """Median device time of one call in µs, from a CUDA graph of `--launches` calls."""
        return graph_ms(fn, calls=ns.launches, reps=ns.reps, warmup=3) * 1e3

    rows = []
    for label, b, s in (("decode bs1", 1, 1), ("decode bs64", 64, 1), (f"prefill {ns.seq}", 1, ns.seq)):
        rows += measure(label, shape_cases(a, b, s, s_max, tables), time_us, copy_gb_s)
    if ns.json:
        write_json({"device": name, "date": datetime.now(UTC).date().isoformat(), "torch": torch.__version__,
                    "model": ns.model, "dtype": dt.name, "copy_gb_s": copy_gb_s, "launches": ns.launches,
                    "rows": rows}, ns.json)
    failed = [f"{r['shape']} {r['op']}" for r in rows if r["check"] != "passed"]
    if failed:
        raise SystemExit(f"reference check failed, no time reported: {', '.join(failed)}")


if __name__ == "__main__":
    main()
