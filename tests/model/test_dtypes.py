"""The one table of run dtypes (kvscope/model/dtypes.py): names, aliases, torch dtypes and sizes agree with torch,
with the kernels' and with kv-math's torch-free sizes."""

from __future__ import annotations

import pytest
import torch

from kvscope.analysis.kv_math import DTYPE_BYTES
from kvscope.errors import KvscopeError
from kvscope.kernels import common as k_common
from kvscope.kernels.launch import DTYPE_MACROS
from kvscope.model import dtypes


def test_table_agrees_with_torch_kernels_and_kv_math() -> None:
    assert dtypes.NAMES == ("float32", "bfloat16", "float16")
    for d in dtypes.DTYPES:
        assert str(d.torch_dtype) == f"torch.{d.name}" and d.nbytes == d.torch_dtype.itemsize
        assert dtypes.itemsize(d.torch_dtype) == d.nbytes and dtypes.of(d.torch_dtype) is d
        assert DTYPE_BYTES[d.name] == d.nbytes  # kv-math sizes the same names alike (its aliases too)
        for alias in (d.name, *d.aliases):
            assert dtypes.from_name(alias.upper()) is d
            assert DTYPE_BYTES.get(alias, d.nbytes) == d.nbytes
    assert set(DTYPE_MACROS) == set(k_common.REF_TOLERANCE) == {d.torch_dtype for d in dtypes.DTYPES}
    assert k_common.DTYPE_NAMES == dtypes.NAMES


def test_names_of_other_dtypes_and_refusals() -> None:
    assert dtypes.dtype_name(torch.bfloat16) == "bfloat16" and dtypes.dtype_name(torch.int64) == "int64"
    with pytest.raises(KvscopeError, match="unknown dtype 'fp8'; choose from float32, bfloat16, float16"):
        dtypes.from_name("fp8")
    with pytest.raises(ValueError, match="dtype float64 is not one of float32, bfloat16, float16"):
        dtypes.itemsize(torch.float64)
