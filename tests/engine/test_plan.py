"""engine.plan: the checks a run's plan makes before any model loads."""

from __future__ import annotations

import pytest
import torch

from kvscope.engine.plan import RunSpec, check_warmup
from kvscope.errors import KvscopeError


def test_cuda_needs_a_warmup() -> None:
    check_warmup(RunSpec(warmup=0), torch.device("cpu"))  # nothing to compile or capture on the CPU
    check_warmup(RunSpec(warmup=1), torch.device("cuda"))
    with pytest.raises(KvscopeError, match="--warmup 0 on CUDA"):
        check_warmup(RunSpec(warmup=0), torch.device("cuda"))
