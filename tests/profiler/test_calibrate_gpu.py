"""`kvscope calibrate` pieces on the GPU (marked `gpu`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvscope.model.config import PRESETS
from kvscope.profiler.calibrate import calibrate, load_ceilings, save

pytestmark = pytest.mark.gpu


def test_calibrate_small(tmp_path: Path) -> None:
    res = calibrate(torch.device("cuda"), PRESETS["qwen2.5-0.5b"], copy_bytes=2**26, n=2048)
    chain = res["matvec_chain"]
    assert chain["products"] == 4 * 24 + 1
    assert res["copy_gb_s"] > 100 and res["bf16_tflop_s"] > 10 and chain["ms"] > 0
    path = save(res, tmp_path / "c.json")
    assert load_ceilings(res["gpu"], path).copy_gb_s == res["copy_gb_s"]


# published peaks (vendor datasheets, SXM parts): memory bandwidth in GB/s and dense bf16 TFLOP/s
_PEAKS = {"H200": (4800, 989), "H100": (3350, 989), "A100": (2039, 312)}


def test_calibrated_ceilings_are_plausible_fractions_of_the_published_peaks() -> None:
    """The default calibration of this GPU: copy bandwidth (read + written) between 50% and 100% of the memory
    bandwidth the vendor publishes, the bf16 matmul rate between 40% and 100% of the dense bf16 peak, and the decode
    matvec chain slower than the copy."""
    name = torch.cuda.get_device_name()
    peaks = next((v for k, v in _PEAKS.items() if k in name), None)
    if peaks is None:
        pytest.skip(f"no published peaks on record for {name}")
    res = calibrate(torch.device("cuda"), PRESETS["qwen2.5-3b"])
    print(f"{name}: copy {res['copy_gb_s']:.0f} GB/s ({res['copy_gb_s'] / peaks[0]:.0%} of {peaks[0]}), bf16 "
          f"{res['bf16_tflop_s']:.0f} TFLOP/s ({res['bf16_tflop_s'] / peaks[1]:.0%} of {peaks[1]}), matvec chain "
          f"{res['matvec_chain']['gb_s']:.0f} GB/s")
    assert 0.5 * peaks[0] <= res["copy_gb_s"] <= peaks[0]
    assert 0.4 * peaks[1] <= res["bf16_tflop_s"] <= peaks[1]
    assert 0.2 * res["copy_gb_s"] <= res["matvec_chain"]["gb_s"] <= 1.05 * res["copy_gb_s"]
