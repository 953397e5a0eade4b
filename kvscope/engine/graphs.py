"""Decode steps captured in CUDA graphs: capture, replay, and the alternation of two graphs when they carry marks.

The engine captures its first decode step (`DecodeGraphs.capture`) and replays it for every step after. At phase
granularity one graph is captured, with the instrument paused: events and the NVTX range of `decode step N` sit
around the replay. When layers or ops are timed, their regions become marks inside the graph (timestamp slots that
kvscope's kernels write with kernels on, event-record nodes without), and two graphs (one memory pool) are captured
and replayed alternately: each graph's marks are read (one named sync, `Instrument.before_replay`) just before its
next replay, two steps later, while the other graph's step keeps the GPU busy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvscope.profiler.instrument import GraphTimer, Instrument


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (B, V), written by every replay
    timer: GraphTimer | None  # marks (timestamp slots or event-record nodes) of the timed regions inside, or None


class DecodeGraphs:
    """The captured decode steps of one engine and how many replays ran (which graph is next).

    `marks`: timestamp slots one step can need (`Instrument.graph_marks_bound`); `stamps`: the engine's kernels write
    timestamps (kernels on), else marks are event-record nodes."""

    def __init__(self, ins: Instrument, device: torch.device, marks: int, stamps: bool) -> None:
        self.ins = ins
        self.device = device
        self.marks = marks
        self.stamps = stamps
        self.steps: list[CapturedStep] = []  # one captured step, or two alternating ones with timing marks
        self.replays = 0

    @property
    def captured(self) -> bool:
        return bool(self.steps)

    def capture(self, forward: Callable[[], torch.Tensor], tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """Capture one decode step (fixed shapes): `forward()` is the step's device work over static buffers (it reads
        `tokens` (B,) and `lengths` (B,), writes K/V and `tokens`, returns its logits buffer (B, V)); each graph also
        advances `lengths` after it.

        Warm-up runs execute a real step's forward twice on a side stream without advancing the lengths, from the
        same input tokens (restored before and after), so the K/V they write at the current positions are the ones
        the first replay writes again. Regions are paused while warming up, and while capturing at phase
        granularity: timing and NVTX happen around replays."""
        saved = tokens.clone()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with self.ins.paused(), torch.cuda.stream(side):
            for _ in range(2):
                tokens.copy_(saved)
                forward()
        current.wait_stream(side)
        tokens.copy_(saved)
        timed = self.ins.graph_timed()
        pool = None
        for _ in range(2 if timed else 1):
            graph = torch.cuda.CUDAGraph()
            stamps, host = self._stamp_buffers() if timed else (None, None)
            mode = self.ins.capturing(stamps, host) if timed else self.ins.paused()
            with torch.cuda.graph(graph, pool=pool):
                with mode as timer:  # closes (its last timestamp written) before the length update below
                    logits = forward()  # this graph's own output buffer, rewritten by each of its replays
                lengths.add_(1)
            pool = graph.pool()  # graphs replayed one after the other can share intermediates
            self.steps.append(CapturedStep(graph, logits, timer if timed else None))

    def _stamp_buffers(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """With kernels on, the timed regions are timestamp slots written by the RMSNorm kernel or a one-thread
        kernel, copied by the graph's last node into page-locked memory; otherwise (None, None): event-record nodes."""
        if not self.stamps:
            return None, None
        stamps = torch.zeros(self.marks, dtype=torch.int64, device=self.device)  # (n,) written by the graph
        host = torch.zeros(self.marks, dtype=torch.int64, pin_memory=True)  # (n,) where they are read
        return stamps, host

    def next_step(self) -> CapturedStep:
        """The graph the next step replays; its marks of two steps back are read first (a named sync inside
        `Instrument.before_replay`). Call it outside the step's region."""
        step = self.steps[self.replays % len(self.steps)]
        if step.timer is not None:
            self.ins.before_replay(step.timer)  # reads its marks of two steps back (a named sync inside)
        return step

    def replay(self, step: CapturedStep) -> torch.Tensor:
        """Replay `step` inside the step's region; returns its logits buffer (B, V)."""
        step.graph.replay()  # forward, K/V write, greedy token and length update, as captured
        if step.timer is not None:
            self.ins.replayed(step.timer)
        self.replays += 1
        return step.logits
