"""kvscope's CUDA kernels against their torch references and the measured copy ceiling, at the shapes of a model's
decode step (batch 1 and 64) and of a long prefill.

Each figure is the median over `--reps` CUDA-event timings of a CUDA graph of `--launches` back-to-back calls
(graph replay keeps the launch cost of the host out of it), divided by the launch count. Bytes are the least each
operation must move (every input read once, every output written once), the same count for the kernel and for the
torch reference, so GB/s is effective bandwidth; `% copy` is against a device-to-device copy measured in the same
process.

    python3 benchmarks/kernels.py [--model qwen2.5-3b] [--seq 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime

import torch

from kvscope.io import write_json
from kvscope.kernels import ops as kops
from kvscope.model.config import PRESETS
from kvscope.model.layers import apply_rope, rope_tables
from kvscope.profiler.timing import graph_ms, median_event_ms


def graph_us(fn: Callable[[], object], launches: int, reps: int) -> float:
    """Median device time of one call in µs, from a CUDA graph of `launches` calls (the first eager calls compile
    the kernels)."""
    return graph_ms(fn, calls=launches, reps=reps, warmup=3) * 1e3


def copy_bandwidth_gb_s(dev: torch.device, nbytes: int = 2**30) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes` (as `kvscope calibrate` measures)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_event_ms(lambda: dst.copy_(src), reps=20) / 1e3) / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-3b", choices=sorted(PRESETS))
    p.add_argument("--seq", type=int, default=4096, help="prefill tokens")
    p.add_argument("--launches", type=int, default=50)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the rows here")
    ns = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    a = PRESETS[ns.model]
    el = torch.finfo(dt).bits // 8
    copy_gb_s = copy_bandwidth_gb_s(dev)
    name = torch.cuda.get_device_name(dev)
    print(f"{name}: {ns.model} shapes, {str(dt).removeprefix('torch.')}; device-to-device copy {copy_gb_s:.0f} GB/s")
    h, hkv, d, dim, ff = a.n_heads, a.n_kv_heads, a.head_dim, a.dim, a.intermediate_size
    s_max = ns.seq + 64
    cos, sin_rot = rope_tables(a, s_max, dev, dt)
    rows = []
    for label, b, s in (("decode bs1", 1, 1), ("decode bs64", 64, 1), (f"prefill {ns.seq}", 1, ns.seq)):
        n = b * s
        g = torch.Generator(device=dev).manual_seed(n)
        x = torch.randn(n, dim, device=dev, generator=g).to(dt)
        w = torch.ones(dim, device=dev, dtype=dt)
        w13 = torch.randn(n, 2 * ff, device=dev, generator=g).to(dt)
        gate, up = (w13.split(ff, dim=-1) if s == 1 else (w13[:, :ff].contiguous(), w13[:, ff:].contiguous()))
        qkv = torch.randn(b, s, h + 2 * hkv, d, device=dev, generator=g).to(dt)
        kc, vc = (torch.zeros(b, s_max, hkv, d, device=dev, dtype=dt) for _ in range(2))
        lengths = torch.full((b,), 7, dtype=torch.int64, device=dev) if s == 1 else None
        pos = (lengths.view(b, 1) if lengths is not None else 0) + torch.arange(s, device=dev).view(1, s)  # (B, S)
        c, sr = cos[pos].unsqueeze(2), sin_rot[pos].unsqueeze(2)  # (B, S, 1, D)
        kv = torch.stack((kc, vc))  # (2, B, S_max, H_kv, D)
        widx = pos.view(1, b, s, 1, 1).expand(2, b, s, hkv, d)

        def rope_torch(qkv=qkv, c=c, sr=sr, kv=kv, widx=widx) -> None:
            r = apply_rope(qkv[:, :, :h + hkv], c, sr)  # (B, S, H+H_kv, D)
            qkv[:, :, :h + hkv].copy_(r)
            kv.scatter_(2, widx, qkv[:, :, h:].unflatten(2, (2, hkv)).permute(2, 0, 1, 3, 4))

        cases = {
            "rms_norm": (lambda x=x, w=w: kops.rms_norm(x, w, 1e-6),
                         lambda x=x, w=w: torch.nn.functional.rms_norm(x, (dim,), w, 1e-6),
                         el * (2 * n * dim + dim)),
            "silu_mul": (lambda gate=gate, up=up: kops.silu_mul(gate, up),
                         lambda gate=gate, up=up: torch.nn.functional.silu(gate) * up, el * 3 * n * ff),
            "rope_kv": (lambda qkv=qkv, kc=kc, vc=vc, lengths=lengths: kops.rope_kv_(qkv, cos, sin_rot, kc, vc, h,
                                                                                    lengths),
                        rope_torch, el * n * ((h + 2 * hkv) * d + (h + hkv) * d + 2 * hkv * d + 2 * d)),
        }
        for op, (ours, ref, nbytes) in cases.items():
            us_k = graph_us(ours, ns.launches, ns.reps)
            us_t = graph_us(ref, ns.launches, ns.reps)
            gbs = nbytes / (us_k / 1e6) / 1e9
            rows.append({"shape": label, "op": op, "bytes": nbytes, "kernel_us": us_k, "torch_us": us_t,
                         "kernel_gb_s": gbs, "pct_copy": 100 * gbs / copy_gb_s, "speedup": us_t / us_k})
            r = rows[-1]
            print(f"{label:>14} {op:9} {nbytes / 1e6:9.2f} MB  kernel {us_k:8.2f} us {gbs:7.0f} GB/s "
                  f"({r['pct_copy']:5.1f}% of copy)  torch {us_t:8.2f} us  {r['speedup']:5.2f}x")
    if ns.json:
        write_json({"device": name, "date": datetime.now(UTC).date().isoformat(), "torch": torch.__version__,
                    "model": ns.model, "copy_gb_s": copy_gb_s, "launches": ns.launches, "rows": rows}, ns.json)


if __name__ == "__main__":
    main()
