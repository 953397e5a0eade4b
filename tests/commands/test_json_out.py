"""`--json` (commands.json_out): one JSON object on the last line of stdout, with the paths a command wrote and its key
numbers; and the MiB columns it reports named `_mib` (the classic sweep column `vram_reserved_mb` kept beside
`vram_reserved_mib`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from paths import DATA

from kvscope.cli import main

DATA = DATA / "nsys"
TINY = ["--model", "tiny", "--device", "cpu", "--gen-tokens", "3", "--warmup", "0", "--reps", "2"]


def _last_json(out: str) -> dict:
    lines = out.strip().splitlines()
    payload = json.loads(lines[-1])
    assert isinstance(payload, dict)
    return payload


def test_run_json_and_mib_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", *TINY, "--seq", "8", "--out", str(out), "--json"]) == 0
    payload = _last_json(capsys.readouterr().out)
    assert payload["run_folder"] == str(out)
    assert payload["files"] == ["summary.parquet", "timings.parquet", "trace.json"]
    s = pd.read_parquet(out / "summary.parquet").iloc[0]
    assert payload["decode_tok_s"] == pytest.approx(s["decode_tok_s"])
    assert payload["seq_len"] == 8 and payload["clock"] == "host"
    assert payload["peak_reserved_mib"] is None  # NaN on a CPU: null, never a bare NaN
    cols = set(s.index)
    assert {"peak_allocated_mib", "peak_reserved_mib", "vram_reserved_mib", "vram_reserved_mb"} <= cols
    assert not {"peak_allocated_mb", "peak_reserved_mb"} & cols
    assert list(s.index).index("vram_reserved_mib") == list(s.index).index("flag") + 1


def test_sweep_json_and_the_classic_column_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.csv"
    assert main(["sweep", *TINY, "--seq", "8,16", "--batch-sizes", "1", "--out", str(out), "--json"]) == 0
    payload = _last_json(capsys.readouterr().out)
    assert payload["sweep_file"] == str(out) and payload["configurations"] == 2
    assert [(r["seq_len"], r["batch"]) for r in payload["rows"]] == [(8, 1), (16, 1)]
    header = out.read_text().splitlines()[0].split(",")
    assert header.index("vram_reserved_mb") == 8  # the published schema's position
    assert "vram_reserved_mib" in header and "peak_reserved_mib" in header and "peak_reserved_mb" not in header


def test_report_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    assert main(["report", str(DATA / "qwen25-05b-run"), "--out", str(out), "--json"]) == 0
    payload = _last_json(capsys.readouterr().out)
    assert Path(payload["report"]).parent == out and payload["folder"] == str(out)
    assert payload["files"] == sorted(p.name for p in out.iterdir())


def test_align_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "al"
    assert main(["align", str(DATA / "qwen25-05b.sqlite"), "--out", str(out), "--json"]) == 0
    payload = _last_json(capsys.readouterr().out)
    kernels = pd.read_parquet(out / "kernels.parquet")
    k = kernels[kernels["kind"] == "kernel"]
    assert payload["out"] == str(out) and payload["kernels"] == len(k) and payload["gpu_ops"] == len(kernels)
    assert payload["kernel_time_ms"] == pytest.approx(k["dur_ns"].sum() / 1e6)
    assert sum(payload["kernel_time_ms_by_class"].values()) == pytest.approx(payload["kernel_time_ms"])
    assert set(payload["files"]) >= {"ranges.parquet", "kernels.parquet"}
