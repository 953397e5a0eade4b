"""Run budgets: how big a batch, how long a context, which dtype, device and attention path.

Kept apart from `ModelArgs` (architecture) so one model can be run under many budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.errors import KvscopeError
from kvscope.model.attention import ATTN_IMPLS
from kvscope.model.config import ModelArgs

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def parse_dtype(name: str | None, device: torch.device | None = None) -> torch.dtype:
    """A dtype by name or alias; no name: bfloat16 on a CUDA `device`, float32 elsewhere."""
    if not name:
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise KvscopeError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_device(name: str | None) -> torch.device:
    """`None`/`auto`: the best device present (CUDA if available, else CPU)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise KvscopeError(f"unknown device {name!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KvscopeError("--device cuda was asked for, but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise KvscopeError(f"unsupported device {name!r}; use cpu or cuda")
    return dev


@dataclass(frozen=True)
class RunConfig:
    batch_size: int
    max_seq: int
    dtype: torch.dtype
    device: torch.device
    attn: str = "sdpa"

    def check(self, args: ModelArgs) -> None:
        if self.batch_size <= 0:
            raise KvscopeError(f"batch size must be positive, got {self.batch_size}")
        if self.max_seq <= 0:
            raise KvscopeError(f"context length must be positive, got {self.max_seq}")
        if self.max_seq > args.max_position_embeddings:
            raise KvscopeError(
                f"context of {self.max_seq} tokens exceeds {args.name}'s maximum of {args.max_position_embeddings}")
        if self.attn not in ATTN_IMPLS:
            raise KvscopeError(f"unknown attention implementation {self.attn!r}; choose from {', '.join(ATTN_IMPLS)}")
