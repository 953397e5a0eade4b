"""The dtypes kvscope runs a model in, in one table: name, torch dtype, bytes per element, aliases.

Everything that names, sizes or accepts a run dtype reads it from here. kv-math's what-if sizes
(`kvscope.analysis.kv_math.DTYPE_BYTES`, torch-free, with fp8 for a KV cache kvscope does not run) are checked
against this table in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.errors import KvscopeError
from kvscope.model.config import RUN_DTYPE_BYTES


@dataclass(frozen=True)
class DType:
    """One supported dtype. `name` is torch's own name (also the config.json `torch_dtype` and `--dtype` spelling)."""

    name: str
    torch_dtype: torch.dtype
    nbytes: int  # bytes per element
    aliases: tuple[str, ...] = ()


DTYPES: tuple[DType, ...] = (
    DType("float32", torch.float32, RUN_DTYPE_BYTES["float32"], ("fp32",)),
    DType("bfloat16", torch.bfloat16, RUN_DTYPE_BYTES["bfloat16"], ("bf16",)),
    DType("float16", torch.float16, RUN_DTYPE_BYTES["float16"], ("fp16", "half")),
)
NAMES: tuple[str, ...] = tuple(d.name for d in DTYPES)
_BY_NAME: dict[str, DType] = {n: d for d in DTYPES for n in (d.name, *d.aliases)}
_BY_TORCH: dict[torch.dtype, DType] = {d.torch_dtype: d for d in DTYPES}


def from_name(name: str) -> DType:
    """The dtype of a name or alias (any case); an unknown one is a one-line KvscopeError naming the choices."""
    found = _BY_NAME.get(name.lower()) if isinstance(name, str) else None
    if found is None:
        raise KvscopeError(f"unknown dtype {name!r}; choose from {', '.join(NAMES)}")
    return found


def of(dtype: torch.dtype) -> DType:
    """The table's row of a torch dtype; ValueError for one kvscope does not run in."""
    found = _BY_TORCH.get(dtype)
    if found is None:
        raise ValueError(f"dtype {dtype_name(dtype)} is not one of {', '.join(NAMES)}")
    return found


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a supported dtype."""
    return of(dtype).nbytes


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as messages and metadata spell it: `bfloat16` (torch's name without `torch.`), for any torch dtype."""
    found = _BY_TORCH.get(dtype)
    return found.name if found is not None else str(dtype).removeprefix("torch.")
