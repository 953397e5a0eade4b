"""Timestamps (`cuda/stamp.cu`, `kvscope_stamp`): the GPU's global timer written from a one-thread kernel, the
marks of a captured graph that no RMSNorm kernel writes (`kvscope.profiler.graph`)."""

from __future__ import annotations

import torch

from kvscope.kernels.launch import launch, ptr


def stamp(slot: torch.Tensor) -> None:
    """Write the GPU's global timer (ns) into `slot` (one int64 on a CUDA device) from a one-thread kernel."""
    if slot.device.type != "cuda" or slot.dtype != torch.int64 or slot.numel() != 1:
        raise ValueError(f"stamp: slot must be one int64 on a CUDA device, got {slot.dtype} {tuple(slot.shape)} "
                         f"on {slot.device}")
    launch("kvscope_stamp", "", torch.float32, slot.device, (1, 1, 1), (1, 1, 1), [ptr(slot)])
