"""CUDA-event timing of a callable, for calibration and benchmarks (not for the engine's regions, which use
`Instrument`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def event_ms(fn: Callable[[], object]) -> float:
    """Device time of `fn`'s work between two CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()  # named sync: after the timed pair
    return start.elapsed_time(end)


def median_event_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median of `reps` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(event_ms(fn) for _ in range(reps))
