"""benchmarks/kernels.py on the CPU, each kernel stood in for by its torch reference: every kernel is checked against
its reference before it is timed, and one that fails the check gets no time."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
import torch
from paths import ROOT

from kvscope.kernels import rms_norm as k_rms_norm
from kvscope.kernels import rope_kv as k_rope_kv
from kvscope.kernels import silu_mul as k_silu_mul
from kvscope.model.config import PRESETS
from kvscope.model.layers import rope_tables

CPU = torch.device("cpu")
BENCH = ROOT / "benchmarks" / "kernels.py"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/kernels.py as a module (registered while the test runs: its dataclass needs sys.modules)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("b", "s"), [(2, 1), (1, 5)])
def test_a_kernel_that_fails_its_reference_check_gets_no_time(bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                               b: int, s: int) -> None:
    monkeypatch.setattr(k_rms_norm, "rms_norm",
                        lambda x, w, eps, stamp=None: k_rms_norm.rms_norm_ref(x, w, eps) * 1.1)  # off
    monkeypatch.setattr(k_silu_mul, "silu_mul", k_silu_mul.silu_mul_ref)
    monkeypatch.setattr(k_rope_kv, "rope_kv_", k_rope_kv.rope_kv_ref_)
    a = PRESETS["tiny"]
    tables = rope_tables(a, 32, CPU, torch.bfloat16)
    timed: list[object] = []

    def time_us(fn: object) -> float:
        timed.append(fn)
        return 2.0

    rows = bench.measure("shape", bench.shape_cases(a, b, s, 32, tables), time_us, copy_gb_s=100.0)
    assert [r["op"] for r in rows] == ["rms_norm", "silu_mul", "rope_kv"]
    assert rows[0]["check"].startswith("out: Tensor-likes are not close") and "kernel_us" not in rows[0]
    assert all(r["check"] == "passed" and r["kernel_us"] == r["torch_us"] == 2.0 for r in rows[1:])
    assert len(timed) == 4  # kernel and torch of the two that passed, nothing of the one that failed


def test_mismatch_names_the_output(bench: ModuleType) -> None:
    x = torch.ones(4, dtype=torch.float16)
    assert bench.mismatch({"a": (x, x.clone())}) is None
    assert bench.mismatch({"a": (x, x.clone()), "k_cache": (x + 0.01, x)}).startswith("k_cache: ")
