"""Decode attention when the key length changes every step (eager decode over the valid cache prefix): first call
at a new length vs repeated calls, per SDPA backend. Shapes of qwen2.5-3b decode, bf16, grouped-query layout.

    python3 benchmarks/sdpa_decode_shapes.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvscope.profiler.timing import event_ms


def main() -> None:
    dev = torch.device("cuda")
    b, h_kv, n_rep, d, s_max = 1, 2, 8, 128, 1024
    q = torch.randn(b, h_kv, n_rep, d, device=dev, dtype=torch.bfloat16)  # (B, H_kv, n_rep, D)
    k = torch.randn(b, h_kv, s_max, d, device=dev, dtype=torch.bfloat16)  # (B, H_kv, S_max, D)
    v = torch.randn_like(k)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| backend | first call at a new key length, median ms | repeated length, median ms |")
    print("| --- | --- | --- |")
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
    for i, (name, backend) in enumerate(backends.items()):
        lengths = range(300 + 100 * i, 340 + 100 * i)  # lengths no backend has seen

        def call(n: int, bk: SDPBackend | None = backend) -> None:
            if bk is None:
                F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n])
            else:
                with sdpa_kernel([bk]):
                    F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n])

        try:
            first = [event_ms(lambda n=n: call(n)) for n in lengths]
            again = [event_ms(lambda n=lengths[0]: call(n)) for _ in range(20)]
        except RuntimeError as exc:
            print(f"| {name} | unavailable: {str(exc).splitlines()[0][:80]} | |")
            continue
        print(f"| {name} | {statistics.median(first):.3f} | {statistics.median(again):.3f} |")


if __name__ == "__main__":
    main()
