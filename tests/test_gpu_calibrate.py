"""`kvscope calibrate` pieces on the GPU (marked `gpu`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvscope.profiler.calibrate import calibrate, load_ceilings, save
from kvscope.profiler.model import PRESETS

pytestmark = pytest.mark.gpu


def test_calibrate_small(tmp_path: Path) -> None:
    res = calibrate(torch.device("cuda"), PRESETS["qwen2.5-0.5b"], copy_bytes=2**26, n=2048)
    chain = res["matvec_chain"]
    assert chain["products"] == 4 * 24 + 1
    assert res["copy_gb_s"] > 100 and res["bf16_tflop_s"] > 10 and chain["ms"] > 0
    path = save(res, tmp_path / "c.json")
    assert load_ceilings(res["gpu"], path).copy_gb_s == res["copy_gb_s"]
