"""Sweeps on the CPU: resume, simulated out-of-memory, collapse flags, bad input, nothing finished is lost."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from kvscope.cli import main
from kvscope.measure import sweep as sweep_mod
from kvscope.schema import CLASSIC_COLUMNS

BASE = ["sweep", "--model", "tiny", "--device", "cpu", "--gen-tokens", "3", "--warmup", "0", "--reps", "2"]


def _sweep(out: Path, seqs: str = "8,16", batches: str = "1,2", *extra: str) -> int:
    return main([*BASE, "--seq", seqs, "--batch-sizes", batches, "--out", str(out), *extra])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_sweep_writes_every_pair_with_classic_columns_first(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"s{suffix}"
    assert _sweep(out) == 0
    df = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(df.columns[: len(CLASSIC_COLUMNS)]) == list(CLASSIC_COLUMNS)
    assert list(zip(df["seq_len"], df["batch"], strict=True)) == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert (df["model"] == "tiny").all() and df["decode_p50_ms_per_tok"].gt(0).all()


def test_resume_skips_finished_and_rewrites_nothing(tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    assert _sweep(out, "8", "1,2") == 0
    before = pd.read_csv(out)
    assert _sweep(out, "8,16", "1,2", "--resume") == 0
    after = pd.read_csv(out)
    assert len(after) == 4
    pd.testing.assert_frame_equal(after.iloc[:2].drop(columns="flag"), before.drop(columns="flag"))
    assert _sweep(out, "8,16", "1,2", "--resume") == 0  # nothing left to run
    pd.testing.assert_frame_equal(pd.read_csv(out), after)


def test_oom_is_recorded_and_the_sweep_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = sweep_mod.measure

    def fake(model, plan, *a, **k):
        if plan.spec.batch_size == 2 and plan.spec.seq == 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, plan, *a, **k)

    monkeypatch.setattr(sweep_mod, "measure", fake)
    out = tmp_path / "s.csv"
    assert _sweep(out) == 0
    df = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert len(df) == 4
    oom = df[(df["seq_len"] == 8) & (df["batch"] == 2)].iloc[0]
    assert oom["flag"] == "oom" and pd.isna(oom["decode_tok_s"])
    assert df.loc[df["flag"] != "oom", "decode_tok_s"].notna().all()


def test_a_crash_loses_no_finished_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = sweep_mod.measure
    calls = {"n": 0}

    def crash_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "measure", crash_third)
    out = tmp_path / "s.parquet"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _sweep(out)
    assert len(pd.read_parquet(out)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]  # no temporary file left


def test_collapse_flags() -> None:
    df = pd.DataFrame({"seq_len": [128, 256, 512, 128, 128], "batch": [1, 1, 1, 2, 4],
                       "decode_p50_ms_per_tok": [10.0, 12.0, 25.0, 11.0, 40.0],
                       "decode_tok_s": [100.0, 83.0, 40.0, 180.0, 80.0], "flag": ["", "", "", "", ""]})
    assert sweep_mod.collapse_flags(df, 2.0) == ["", "", "latency-collapse", "", "throughput-collapse"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--seq", "", "--batch-sizes", "1"], "--seq: empty list"),
    (["--seq", "8", "--batch-sizes", "1,-2"], "--batch-sizes: sizes must be positive, got -2"),
    (["--seq", "8,0", "--batch-sizes", "1"], "--seq: sizes must be positive, got 0"),
    (["--seq", "4096", "--batch-sizes", "1"], "exceeds tiny's maximum context"),
    (["--seq", "8", "--batch-sizes", "1", "--collapse-factor", "1"], "--collapse-factor must be > 1"),
])
def test_bad_sweep_input(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BASE, *argv, "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_output_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _sweep(tmp_path / "missing" / "s.csv") == 2
    assert "does not exist" in capsys.readouterr().err
    assert _sweep(tmp_path / "s.txt") == 2
    assert "must end in .csv or .parquet" in capsys.readouterr().err
    out = tmp_path / "s.csv"
    assert _sweep(out, "8", "1") == 0
    capsys.readouterr()
    assert _sweep(out, "8", "1") == 2
    assert "pass --resume" in capsys.readouterr().err


def test_resume_refuses_another_models_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.csv"
    assert _sweep(out, "8", "1") == 0
    df = pd.read_csv(out)
    df["model"] = "qwen2.5-3b"
    df.to_csv(out, index=False)
    before = out.read_bytes()
    capsys.readouterr()
    assert _sweep(out, "8,16", "1", "--resume") == 2
    assert "is a sweep of model=qwen2.5-3b" in capsys.readouterr().err
    assert out.read_bytes() == before
