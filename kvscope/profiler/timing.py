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


def graph_ms(fn: Callable[[], object], calls: int = 1, reps: int = 20, warmup: int = 2) -> float:
    """Median device time of one call of `fn`, from a CUDA graph of `calls` back-to-back calls replayed `reps`
    times (after `warmup` eager calls on a side stream, and 3 untimed replays), divided by `calls`. A graph keeps
    the host's launch cost out of the figure."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_event_ms(graph.replay, reps) / calls
