"""What an engine runs, fixed when it is built: `EngineOptions`, a frozen dataclass the engine keeps as it was given
(`Engine.options`; nothing switches an engine's implementation afterwards: a benchmark that compares two choices
builds two engines).

- `graphs`: decode steps replayed from a CUDA graph (`kvscope.engine.graphs`).
- `kernels`: kvscope's hand-written kernels for RMSNorm, SiLU*up and RoPE fused with the K/V cache write.
- `gemv`: with kernels on, the products of up to `gemv_max_rows` rows (decode steps, any lm_head, short prefills) run
  kvscope's gemv kernels instead of cuBLAS (`kvscope.engine.layer_ops`); None: `kernels and GEMV_BY_DEFAULT` on one
  device (a tensor-parallel engine runs cuBLAS products; asking it for gemv is an error).
- `gemv_launch`: the launch choice of the gemv kernels (`GemvLaunchOptions`; unset fields: the kernels' defaults).
- `attention`: keyword options of kvscope's split-KV decode attention (`--attn kvscope` only; `AttentionOptions`).

Values are checked when the options are made: a bad one raises `ValueError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kvscope.errors import KvscopeError
from kvscope.kernels import gemv as k_gemv

# rows up to which the engine runs the gemv kernels at all (CUDA cores; beyond, cuBLAS's tensor cores are faster:
# docs/benchmarks.md, "Decode-step products"); `EngineOptions.gemv_max_rows` moves the bound for one engine
GEMV_ENGINE_MAX_ROWS = 4
# whether an engine with kernels on runs gemv when its options leave `gemv` unset: off until a gemv step measures
# faster than cuBLAS's (on the H200, qwen2.5-3b batch 1 ctx 512: 2.879 ms with gemv against 2.872 ms without,
# docs/benchmarks.md)
GEMV_BY_DEFAULT = False


def _check_flag(owner: str, name: str, value: object, optional: bool = False) -> None:
    """`value` is a bool (or None where `optional`); else ValueError naming the field and the value."""
    if not (isinstance(value, bool) or (optional and value is None)):
        want = "True, False or None" if optional else "True or False"
        raise ValueError(f"{owner}.{name} must be {want}, got {value!r}")


def _set_kwargs(options: object) -> dict[str, Any]:
    """The fields of a frozen options dataclass that are set (not None), as keyword arguments of a kernel call."""
    return {f.name: getattr(options, f.name) for f in fields(options)  # type: ignore[arg-type]
            if getattr(options, f.name) is not None}


@dataclass(frozen=True)
class GemvLaunchOptions:
    """The launch choice of kvscope's gemv kernels (`kvscope.kernels.gemv.gemv_launch`); None: the kernels' own
    default (GEMV_PIPELINED, GEMV_SPLIT_BLOCKS_PER_SM)."""

    pipelined: bool | None = None  # the next trip's loads issued before this trip's arithmetic
    split_blocks_per_sm: int | None = None  # K split while there are fewer blocks than this many per SM

    def __post_init__(self) -> None:
        _check_flag("GemvLaunchOptions", "pipelined", self.pipelined, optional=True)
        per_sm = self.split_blocks_per_sm
        if per_sm is not None and (isinstance(per_sm, bool) or not isinstance(per_sm, int) or per_sm < 1):
            raise ValueError(f"GemvLaunchOptions.split_blocks_per_sm must be an int >= 1 or None, got {per_sm!r}")

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments every gemv call gets (only the fields that are set: {} keeps the defaults)."""
        return _set_kwargs(self)


@dataclass(frozen=True)
class AttentionOptions:
    """Keyword options of kvscope's split-KV decode attention (`kvscope.kernels.decode_attention.split_kv_decode`,
    `--attn kvscope`); None: the kernel's own default (DECODE_ATTENTION_FUSED_MERGE, DECODE_ATTENTION_LONG_SPLITS)."""

    fused_merge: bool | None = None  # the last split block of each head group merges (no merge launch)
    long_splits: bool | None = None  # the split count of `decode_splits_long` (True) or `decode_splits` (False)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_flag("AttentionOptions", f.name, getattr(self, f.name), optional=True)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments every decode attention call gets (only the fields that are set)."""
        return _set_kwargs(self)


@dataclass(frozen=True)
class EngineOptions:
    """What one engine runs (see the module docstring); frozen, checked when made."""

    graphs: bool = False
    kernels: bool = False
    gemv: bool | None = None  # None: kernels and GEMV_BY_DEFAULT, on one device
    gemv_max_rows: int = GEMV_ENGINE_MAX_ROWS  # rows up to which products run the gemv kernels (with gemv on)
    gemv_launch: GemvLaunchOptions = field(default_factory=GemvLaunchOptions)
    attention: AttentionOptions = field(default_factory=AttentionOptions)

    def __post_init__(self) -> None:
        _check_flag("EngineOptions", "graphs", self.graphs)
        _check_flag("EngineOptions", "kernels", self.kernels)
        _check_flag("EngineOptions", "gemv", self.gemv, optional=True)
        if self.gemv and not self.kernels:
            raise ValueError(f"EngineOptions: gemv={self.gemv} needs kernels=True (got kernels={self.kernels})")
        rows, most = self.gemv_max_rows, k_gemv.GEMV_MAX_ROWS
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= most:
            raise ValueError(f"EngineOptions.gemv_max_rows must be an int in [1, {most}] (the rows the gemv kernels "
                             f"take), got {rows!r}")
        if not isinstance(self.gemv_launch, GemvLaunchOptions):
            raise ValueError(f"EngineOptions.gemv_launch must be a GemvLaunchOptions, got {self.gemv_launch!r}")
        if not isinstance(self.attention, AttentionOptions):
            raise ValueError(f"EngineOptions.attention must be an AttentionOptions, got {self.attention!r}")

    def gemv_wanted(self, tensor_parallel: bool) -> bool:
        """Whether products may run the gemv kernels: `gemv`, or where it is None, kernels and GEMV_BY_DEFAULT on
        one device. KvscopeError for gemv=True with tensor parallelism (its row-parallel products are cuBLAS's)."""
        if self.gemv and tensor_parallel:
            raise KvscopeError("the gemv kernels run on one device: a tensor-parallel engine takes gemv=None or "
                               f"False, got gemv={self.gemv}")
        if self.gemv is not None:
            return self.gemv
        return self.kernels and GEMV_BY_DEFAULT and not tensor_parallel
