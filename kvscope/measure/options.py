"""The run options of the command line (`kvscope.cli`) as the engine's `RunSpec`: one place that maps flags to
fields, for `run`, `sweep`, `nsys` and `generate`."""

from __future__ import annotations

import argparse
from dataclasses import replace

from kvscope.engine.plan import RunSpec


def on_off(value: str | None) -> bool | None:
    """An `on|off` flag: True / False, or None when not given (the default then depends on the device)."""
    return None if value is None else value == "on"


def model_options(ns: argparse.Namespace) -> RunSpec:
    """A RunSpec of the model options every command that loads the model shares (--model, --dtype, --device, --seed,
    --attn, --graphs, --kernels, --engine, --prefill-graphs); its other fields are the defaults."""
    return RunSpec(model=ns.model, dtype=ns.dtype, device=ns.device, seed=ns.seed, attn=ns.attn,
                   graphs=on_off(ns.graphs), kernels=on_off(ns.kernels), engine=ns.engine,
                   prefill_graphs=on_off(ns.prefill_graphs))


def run_options(ns: argparse.Namespace) -> RunSpec:
    """A RunSpec of the options every measuring command shares (`run`, `sweep`, the run arguments of `nsys`): the
    model options, --gen-tokens, --warmup, --reps, --granularity."""
    return replace(model_options(ns), gen_tokens=ns.gen_tokens, warmup=ns.warmup, reps=ns.reps,
                   granularity=ns.granularity)


def run_spec(ns: argparse.Namespace) -> RunSpec:
    """The RunSpec of `kvscope run`'s arguments (also those after `kvscope nsys --`)."""
    return replace(run_options(ns), batch_size=ns.batch_size, seq=ns.seq, out=ns.out,
                   nvtx=False if ns.no_nvtx else None, nvml_interval_ms=ns.nvml_interval_ms)
