"""Kernel classes by name: one ordered rule table, first match wins.

The class comes from the kernel's (demangled) name alone, so it says what kind of kernel ran, not which model op
launched it: RMSNorm, for instance, runs as a pow, a mean, an rsqrt and two multiplies, of which only the mean,
pow and rsqrt are recognisably a norm. For the op, use op granularity and the NVTX range of each kernel.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

CLASSES = ("gemm", "attention", "norm", "elementwise", "copy/memset", "communication", "other")

# (class, pattern, what it catches); memcpy and memset operations are copy/memset whatever their name
KERNEL_CLASS_RULES: tuple[tuple[str, str, str], ...] = (
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|sendrecv", "NCCL collectives"),
    # before gemm: flash and memory-efficient attention kernels carry cutlass types in their names
    ("attention", r"flash|fmha|sdpa|attention|softmax",
     "flash / memory-efficient / cuDNN SDPA kernels, softmax of eager attention"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|cublas|xmma|splitKreduce|matmul",
     "cuBLAS / cuBLASLt (nvjet on Hopper), CUTLASS, split-K reductions"),
    ("norm", r"rms_?norm|layer_?norm|MeanOps|rsqrt|pow_tensor_scalar", "fused norms; the mean, rsqrt, pow of RMSNorm"),
    ("copy/memset", r"copy|Copy|scatter|gather|index|Cat[A-Z]|fill",
     "casts and copies, torch.cat, KV-cache scatter, index/gather (embedding, RoPE tables)"),
    ("elementwise", r"elementwise|silu|gelu|relu|neg_|add|mul|rope",
     "remaining pointwise kernels (SiLU, adds, multiplies; kvscope's SiLU*up and RoPE + cache write)"),
)
_COMPILED = tuple((cls, re.compile(pat)) for cls, pat, _ in KERNEL_CLASS_RULES)


def classify_name(name: str | None) -> str:
    if not name:
        return "other"
    for cls, pat in _COMPILED:
        if pat.search(name):
            return cls
    return "other"


def classify(kind: pd.Series, name: pd.Series) -> pd.Series:
    """Class of every GPU operation (kind: kernel, memcpy, memset, graph; name: kernel name)."""
    uniq = pd.unique(name.fillna(""))
    lookup = {n: classify_name(n) for n in uniq}
    out = name.fillna("").map(lookup).to_numpy(dtype=object)
    out = np.where(kind.isin(["memcpy", "memset"]).to_numpy(), "copy/memset", out)
    return pd.Series(pd.Categorical(out, categories=CLASSES), index=name.index)
