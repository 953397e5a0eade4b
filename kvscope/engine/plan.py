"""The plan of a run: what was asked (`RunSpec`) checked and resolved into what will run (`RunPlan`), before any
weights load.

`prepare(spec)` makes every check that needs no weights, in this order: sizes, seed, granularity, NVML interval and
--out (`RunSpec` values), the device, the warm-up on CUDA, --graphs, the model, the dtype, --kernels, the context
against the model's maximum, and on CUDA the calibration cache. `kvscope run`, `sweep`, `nsys` and `generate` all
plan through it. `RunConfig` is the budget the engine runs under (batch, context, dtype, device, attention path), kept
apart from `ModelArgs` (architecture) so one model can be run under many budgets.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from kvscope.argtypes import INT64_MAX, NVML_INTERVAL_MAX_MS, UINT64_MAX
from kvscope.errors import KvscopeError
from kvscope.kernels.common import DTYPE_NAMES, supported
from kvscope.kernels.decode_attention import DECODE_ATTENTION_HEAD_DIMS, split_kv_decode_supported
from kvscope.kernels.launch import kernels_unavailable
from kvscope.kernels.loader import CUPY_HINT, CUPY_INSTALL
from kvscope.model import dtypes
from kvscope.model.attention import ATTN_IMPLS
from kvscope.model.config import ModelArgs
from kvscope.model.source import ModelSource, resolve_model
from kvscope.profiler.calibrate import load_ceilings
from kvscope.profiler.nvtx import nvtx_enabled_by_env
from kvscope.schema import ENGINES, GRANULARITIES, HF_COMPILED_ENGINE, KVSCOPE_ENGINE, Ceilings

DEFAULT_MODEL_CUDA = "qwen2.5-3b"
DEFAULT_MODEL_CPU = "tiny"


def parse_dtype(name: str | None, device: torch.device | None = None) -> torch.dtype:
    """A dtype by name or alias; no name: bfloat16 on a CUDA `device`, float32 elsewhere."""
    if not name:
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    return dtypes.from_name(name).torch_dtype


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
    prefill_graphs: bool = False  # prefills replayed from CUDA graphs per length bucket (engine.prefill_graphs)

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
        if self.attn == "kvscope" and not (self.device.type == "cuda" and split_kv_decode_supported(
                self.dtype, args.head_dim, args.n_heads, args.n_kv_heads)):
            raise KvscopeError(f"--attn kvscope needs a CUDA device, {'/'.join(DTYPE_NAMES)} and head_dim "
                               f"{' or '.join(map(str, DECODE_ATTENTION_HEAD_DIMS))}, got {self.device} "
                               f"{dtypes.dtype_name(self.dtype)} head_dim {args.head_dim} (use --attn sdpa)")


@dataclass(frozen=True)
class RunSpec:
    """What a run asks for, as the command line gives it (None: the default for the device)."""

    model: str | None = None
    batch_size: int = 1
    seq: int = 512
    gen_tokens: int = 32
    warmup: int = 2
    reps: int = 5
    granularity: str = "phase"
    attn: str | None = None  # None: default_attn decides (prepare)
    dtype: str | None = None
    device: str | None = None
    out: str | None = None
    nvtx: bool | None = None  # None: KVSCOPE_NVTX decides
    nvml_interval_ms: float = 20.0
    seed: int = 0
    graphs: bool | None = None  # decode steps replayed from a CUDA graph; None: on for CUDA
    kernels: bool | None = None  # kvscope's CUDA kernels (RMSNorm, SiLU*up, RoPE + cache write); None: on for CUDA
    prefill_graphs: bool | None = None  # prefills replayed from CUDA graphs per length; None: on where graphs are
    engine: str = KVSCOPE_ENGINE  # the loop: kvscope's, or transformers' (eager or compiled): schema.ENGINES


@dataclass(frozen=True)
class RunPlan:
    """A checked `RunSpec` resolved for its device: the model source, the engine's budget, the switches as they
    apply here, and the calibrated ceilings of the GPU (None on a CPU, for a GPU never calibrated, or a generation)."""

    spec: RunSpec
    source: ModelSource
    cfg: RunConfig
    device_name: str  # the GPU's name, or "cpu"
    graphs: bool
    kernels: bool
    nvtx: bool
    ceilings: Ceilings | None


def prepare(spec: RunSpec, prompts: Sequence[Sequence[int]] | None = None) -> RunPlan:
    """Check `spec` and resolve it (see the module docstring); KvscopeError for the first problem, before any weights
    load. `prompts`: the prompts of `kvscope generate`, whose number is the batch and whose longest sets the sequence
    (in place of `spec.batch_size` and `spec.seq`; their token ids are not looked at here:
    `engine.greedy.check_prompts`); a generation is not timed, so it needs no warm-up and no calibrated ceilings."""
    if prompts is not None:
        spec = replace(spec, batch_size=len(prompts), seq=max((len(p) for p in prompts), default=0))
        if spec.engine == HF_COMPILED_ENGINE and len({len(p) for p in prompts}) > 1:
            raise KvscopeError(f"--engine {HF_COMPILED_ENGINE} needs prompts of one length (a static cache and "
                               "compiled shapes); use --engine transformers for a ragged batch")
    _check_spec(spec)
    device = resolve_device(spec.device)
    if prompts is None:
        check_warmup(spec, device)
    graphs = use_graphs(spec.graphs, device) if spec.engine == KVSCOPE_ENGINE else hf_graphs(spec, device)
    source = resolve_model(spec.model or (DEFAULT_MODEL_CUDA if device.type == "cuda" else DEFAULT_MODEL_CPU))
    dtype = parse_dtype(spec.dtype, device)
    # a generation runs one prefill: capturing its graph would cost more than it saves, so only on request there
    prefill_graphs = use_prefill_graphs(spec.prefill_graphs, device, graphs and prompts is None,
                                        spec.engine == KVSCOPE_ENGINE)
    cfg = RunConfig(spec.batch_size, spec.seq + spec.gen_tokens, dtype, device, spec.attn, prefill_graphs)
    kernels = use_kernels(spec.kernels, device, dtype) if spec.engine == KVSCOPE_ENGINE else False
    if spec.attn is None:  # the plan's spec names the attention that runs (run metadata, sweep settings)
        spec = replace(spec, attn=default_attn(spec.engine, device, dtype, kernels, source.args))
        cfg = replace(cfg, attn=spec.attn)
    elif spec.attn == "kvscope" and spec.engine != KVSCOPE_ENGINE:
        raise KvscopeError(f"--attn kvscope is a decode kernel of kvscope's own loop; --engine {spec.engine} takes "
                           "sdpa or eager")
    if spec.seq > source.args.max_position_embeddings:
        what = f"prompt of {spec.seq} tokens" if prompts is not None else f"--seq {spec.seq}"
        raise KvscopeError(f"{what} exceeds {source.args.name}'s maximum context of "
                           f"{source.args.max_position_embeddings}")
    cfg.check(source.args)
    name = device_name(device)
    ceilings = None
    if device.type == "cuda" and prompts is None:
        ceilings = load_ceilings(name)  # an unusable calibration cache stops the run here, not after it
    return RunPlan(spec, source, cfg, name, graphs, kernels, _nvtx(spec.nvtx), ceilings)


def default_attn(engine: str, device: torch.device, dtype: torch.dtype, kernels: bool, args: ModelArgs) -> str:
    """The attention of a run that names none: `kvscope` (its split-KV decode kernel, prefills as sdpa) for kvscope's
    loop on CUDA in bfloat16/float16 with kernels on, where the kernel takes the model (head_dim 64 or 128); else
    `sdpa`. On the H200 it beat sdpa's flash decode at batch 1 with 512, 4k and 32k positions and at batch 16 with 4k
    (docs/benchmarks.md, "Decode attention")."""
    if (engine == KVSCOPE_ENGINE and kernels and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and split_kv_decode_supported(dtype, args.head_dim, args.n_heads, args.n_kv_heads)):
        return "kvscope"
    return "sdpa"


def _check_spec(spec: RunSpec) -> None:
    for name, value, low in (("--batch-size", spec.batch_size, 1), ("--seq", spec.seq, 1),
                             ("--gen-tokens", spec.gen_tokens, 1), ("--reps", spec.reps, 1),
                             ("--warmup", spec.warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise KvscopeError(f"{name} must be an integer >= {low}, got {value!r}")
        if value > INT64_MAX:
            raise KvscopeError(f"{name} must fit in 64 bits (at most {INT64_MAX}), got {value}")
    if not isinstance(spec.seed, int) or not 0 <= spec.seed <= UINT64_MAX:
        raise KvscopeError(f"--seed must be an integer from 0 to {UINT64_MAX}, got {spec.seed!r}")
    if spec.granularity not in GRANULARITIES:
        raise KvscopeError(f"unknown granularity {spec.granularity!r}; choose from {', '.join(GRANULARITIES)}")
    if not spec.nvml_interval_ms > 0:
        raise KvscopeError(f"--nvml-interval-ms must be positive, got {spec.nvml_interval_ms}")
    if not spec.nvml_interval_ms <= NVML_INTERVAL_MAX_MS:  # also inf; nan failed above
        raise KvscopeError(f"--nvml-interval-ms must be at most {NVML_INTERVAL_MAX_MS:,.0f} ms, got "
                           f"{spec.nvml_interval_ms}")
    if spec.engine not in ENGINES:
        raise KvscopeError(f"unknown engine {spec.engine!r}; choose from {', '.join(ENGINES)}")
    if spec.engine != KVSCOPE_ENGINE:
        _check_hf_spec(spec)
    if spec.out is not None and not str(spec.out).strip():
        raise KvscopeError(f"--out must not be empty, got {spec.out!r} (leave it out for the default folder)")


def _check_hf_spec(spec: RunSpec) -> None:
    """What a transformers engine cannot do (see kvscope.engine.hf): op regions, layer regions when compiled,
    kvscope's kernels, and kvscope's CUDA graphs for the eager loop."""
    compiled = spec.engine == HF_COMPILED_ENGINE
    if spec.granularity == "op" or (compiled and spec.granularity == "layer"):
        most = "phase" if compiled else "layer"
        raise KvscopeError(f"--engine {spec.engine} times regions down to --granularity {most}, not "
                           f"{spec.granularity} (its forward has no hook points there)")
    if spec.kernels:
        raise KvscopeError(f"--kernels on is kvscope's own loop; --engine {spec.engine} runs transformers' modules")
    if spec.graphs and not compiled:
        raise KvscopeError("--graphs on needs --engine kvscope or transformers-compiled (torch.compile's CUDA "
                           "graphs); the eager transformers loop has none")


def hf_graphs(spec: RunSpec, device: torch.device) -> bool:
    """CUDA graphs of a transformers engine: torch.compile's (mode reduce-overhead) for the compiled loop on CUDA,
    unless `--graphs off`; never for the eager loop."""
    if spec.engine != HF_COMPILED_ENGINE:
        return False
    if spec.graphs and device.type != "cuda":
        raise KvscopeError("--graphs on needs a CUDA device")
    return device.type == "cuda" if spec.graphs is None else spec.graphs


def check_warmup(spec: RunSpec, device: torch.device) -> None:
    """On CUDA the first repetition would hold the kernels' compilation and the decode graph's capture: at least one
    warm-up repetition is required there."""
    if device.type == "cuda" and spec.warmup < 1:
        raise KvscopeError("--warmup 0 on CUDA would time the kernels' compilation and the CUDA-graph capture in the "
                           "first repetition; use --warmup 1 or more")


def use_graphs(graphs: bool | None, device: torch.device) -> bool:
    """Whether decode steps replay a CUDA graph: `--graphs on|off` (True/False), by default (None) on for CUDA. At
    layer or op granularity the graph carries marks for those regions: timestamps the kernels write, or event-record
    nodes with kernels off (see Engine._capture)."""
    if graphs is None:
        return device.type == "cuda"
    if graphs and device.type != "cuda":
        raise KvscopeError("--graphs on needs a CUDA device")
    return graphs


def use_prefill_graphs(prefill_graphs: bool | None, device: torch.device, graphs: bool, own_loop: bool = True
                       ) -> bool:
    """Whether prefills replay CUDA graphs captured per length bucket (`--prefill-graphs on|off`): by default (None)
    where decode steps replay graphs (`graphs`, on for CUDA) in kvscope's own loop (`own_loop`); never on a CPU."""
    if prefill_graphs is None:
        return graphs and own_loop and device.type == "cuda"
    if prefill_graphs and device.type != "cuda":
        raise KvscopeError("--prefill-graphs on needs a CUDA device")
    if prefill_graphs and not own_loop:
        raise KvscopeError("--prefill-graphs on is kvscope's own loop (--engine kvscope)")
    return prefill_graphs


def use_kernels(kernels: bool | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the engine runs kvscope's hand-written CUDA kernels (RMSNorm, SiLU*up, RoPE fused with the cache
    write) instead of the same maths in torch operations: `--kernels on|off`, by default (None) on for CUDA when
    CuPy is installed (without it the default is off, with a note on stderr; `--kernels on` is a one-line error)."""
    on = device.type == "cuda" if kernels is None else kernels
    if on and not supported(device, dtype):
        raise KvscopeError(f"--kernels on needs a CUDA device and {'/'.join(dtypes.NAMES)}, got {device} "
                           f"{dtypes.dtype_name(dtype)}")
    missing = kernels_unavailable() if on else None
    if missing is not None:
        if kernels:
            raise KvscopeError(f"--kernels on needs CuPy ({missing}); {CUPY_HINT}")
        _note_once(f"kvscope: note: kvscope's CUDA kernels are off, CuPy is missing ({missing}); {CUPY_INSTALL} "
                   "to run them")
        return False
    return on


_NOTES_SHOWN: set[str] = set()


def _note_once(message: str) -> None:
    """Print `message` on stderr once per process (a sweep plans many runs)."""
    if message not in _NOTES_SHOWN:
        _NOTES_SHOWN.add(message)
        print(message, file=sys.stderr)


def device_name(device: torch.device) -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _nvtx(requested: bool | None) -> bool:
    """NVTX ranges on or off: as requested, or by KVSCOPE_NVTX when not (on unless it says 0/false/off/no)."""
    return nvtx_enabled_by_env() if requested is None else requested
