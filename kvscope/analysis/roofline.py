"""Roofline of prefill and decode steps: the bytes each must move and the FLOPs it must do, against measured
ceilings (`kvscope calibrate`).

Counting rules (exact integers from `ModelArgs`):
- Weights are read once per step: every layer's matrices, biases and norms, the final norm, the output projection
  (vocab x dim, the embedding matrix itself when tied), and the embedding rows of the step's tokens.
- A decode step at context C (positions in the cache, the new one included) reads K and V of the positions it
  attends, `attended(C)` = C, or min(C, W) under a sliding window W (Mistral's: the cache keeps every position, a
  step reads only its last W), for every sequence and writes one position.
- A prefill of S tokens per sequence writes K and V of S positions; it reads no cache.
- FLOPs: 2 per multiply-add of every matrix product (the output projection at the last position only, as the
  engine does), plus attention: QK^T and PV, 2 * 2 * H * D per (query, key) pair; causal prefill has S(S+1)/2
  pairs per sequence and head, not S^2 (with a window W < S: W(W+1)/2 + (S - W) * W, each query its last W keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from kvscope.analysis.kv_math import kv_bytes_per_token
from kvscope.schema import BYTES_PER_GB, FLOPS_PER_TFLOP, MS_PER_S, Ceilings

if TYPE_CHECKING:  # for annotations only: analysis imports no torch (kvscope.model.config does)
    from kvscope.model.config import ModelArgs



def layer_matmul_params(a: ModelArgs) -> int:
    """Multiply-adds per token of one layer's matrix products (q, k, v, o, gate, up, down)."""
    return a.dim * (a.q_size + 2 * a.kv_size) + a.q_size * a.dim + 3 * a.dim * a.intermediate_size


def weights_read_bytes(a: ModelArgs, batch: int, w_bytes: int) -> int:
    layer = layer_matmul_params(a) + 2 * a.dim
    layer += (a.q_size + 2 * a.kv_size) if a.qkv_bias else 0
    layer += a.dim if a.o_bias else 0
    return (a.n_layers * layer + a.dim + a.vocab_size * a.dim + batch * a.dim) * w_bytes


def attended(a: ModelArgs, context: int) -> int:
    """Positions a decode step at `context` positions reads: all of them, or the sliding window's last ones."""
    return context if a.sliding_window is None else min(context, a.sliding_window)


def causal_pairs(a: ModelArgs, seq: int) -> int:
    """(query, key) pairs of a causal prefill of `seq` positions, per sequence and head: query i sees keys 0 .. i,
    or only its last `sliding_window` of them."""
    w = a.sliding_window
    if w is None or seq <= w:
        return seq * (seq + 1) // 2
    return w * (w + 1) // 2 + (seq - w) * w


def decode_cost(a: ModelArgs, batch: int, context: int, w_bytes: int, kv_bytes: int) -> tuple[int, int]:
    """(bytes, FLOPs) of one decode step of `batch` sequences at `context` positions (`attended(context)` read)."""
    per_tok = kv_bytes_per_token(a, kv_bytes)
    seen = attended(a, context)
    moved = weights_read_bytes(a, batch, w_bytes) + batch * seen * per_tok + batch * per_tok
    flops = 2 * batch * (a.n_layers * layer_matmul_params(a) + a.dim * a.vocab_size)
    flops += a.n_layers * 4 * batch * a.n_heads * a.head_dim * seen
    return moved, flops


def prefill_cost(a: ModelArgs, batch: int, seq: int, w_bytes: int, kv_bytes: int) -> tuple[int, int]:
    """(bytes, FLOPs) of a prefill of `batch` prompts of `seq` tokens (logits at the last position only)."""
    moved = weights_read_bytes(a, batch * seq, w_bytes) + batch * seq * kv_bytes_per_token(a, kv_bytes)
    flops = 2 * batch * seq * a.n_layers * layer_matmul_params(a) + 2 * batch * a.dim * a.vocab_size
    flops += a.n_layers * 4 * batch * a.n_heads * a.head_dim * causal_pairs(a, seq)
    return moved, flops


def roofline(timings: pd.DataFrame, a: ModelArgs, w_bytes: int, kv_bytes: int, ceilings: Ceilings | None
             ) -> pd.DataFrame:
    """Per prefill and decode step of a run's timings: bytes, FLOPs, achieved GB/s and TFLOP/s, and their share of
    the ceilings (MBU, MFU; NaN without ceilings, and where a step's time or a ceiling is not positive)."""
    t = timings
    rows = t[(t["level"] == "step") | ((t["level"] == "phase") & (t["phase"] == "prefill"))]
    out = []
    for r in rows.itertuples(index=False):
        if r.phase == "prefill":
            moved, flops = prefill_cost(a, int(r.batch), int(r.seq_len), w_bytes, kv_bytes)
        else:
            moved, flops = decode_cost(a, int(r.batch), int(r.context_len), w_bytes, kv_bytes)
        out.append((r.rep, r.phase, r.step, r.dur_ms, moved, flops))
    df = pd.DataFrame(out, columns=["rep", "phase", "step", "dur_ms", "bytes", "flops"])
    sec = df["dur_ms"].astype(float) / MS_PER_S
    sec = sec.where(sec > 0)  # a step timed at 0 ms (or less) has no rate: NaN, not inf
    df["achieved_gb_s"] = df["bytes"] / sec / BYTES_PER_GB
    df["achieved_tflop_s"] = df["flops"] / sec / FLOPS_PER_TFLOP
    df["mbu"] = df["achieved_gb_s"] / ceilings.copy_gb_s if ceilings and ceilings.copy_gb_s > 0 else np.nan
    df["mfu"] = df["achieved_tflop_s"] / ceilings.bf16_tflop_s if ceilings and ceilings.bf16_tflop_s > 0 else np.nan
    return df
