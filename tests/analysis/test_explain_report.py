"""`kvscope report` on sweeps with attribution columns: each plot checked against the CSV it was drawn from, the PNGs
decode, the "why" section is explain's, and `--compare` sets two sweeps side by side."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from paths import DATA
from test_explain import BATCH_STEP_MS, BATCHES, seq_sweep

from kvscope.analysis.explain import explain
from kvscope.analysis.report.sweep import sweep_report
from kvscope.cli import main
from kvscope.schema import ATTRIBUTION_CLASS_WORDS


def with_roofline(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["decode_span_ms"] = df["decode_p50_ms_per_tok"]
    df["decode_busy_ms"] = df["decode_span_ms"] * (1 - df["decode_idle_pct"] / 100)
    df["prefill_bytes"] = 6e9 + df["seq_len"] * 1e6
    df["prefill_flops"] = df["seq_len"] * 6e9
    df["prefill_span_tflop_s"] = df["prefill_flops"] / (df["prefill_span_ms"] / 1e3) / 1e12
    df["prefill_mfu_pct"] = df["prefill_span_tflop_s"] / 1000.0 * 100  # a 1,000 TFLOP/s matmul ceiling
    return df


def attributed_batch_sweep() -> pd.DataFrame:
    b = np.array(BATCHES, dtype=np.float64)
    return pd.DataFrame({"seq_len": 512, "batch": BATCHES, "decode_p50_ms_per_tok": BATCH_STEP_MS, "flag": "",
                         "model": "synthetic", "decode_gemm_ms": 8.0 + b / 16, "decode_attention_ms": b / 8,
                         "decode_norm_ms": 0.2, "decode_elementwise_ms": 0.3, "decode_copy_ms": 0.1,
                         "decode_communication_ms": 0.0, "decode_other_ms": 0.05,
                         "decode_idle_pct": np.linspace(20, 4, len(BATCHES)), "decode_kernels": 400})


def axes_of(rep, name: str):
    return rep.figures[name].axes


def test_seq_sweep_plots_equal_the_csv(tmp_path: Path) -> None:
    df = with_roofline(seq_sweep())
    path = tmp_path / "seq.csv"
    df.to_csv(path, index=False)
    rep = sweep_report(path)
    assert {"decode_classes_vs_seq_len.png", "prefill_classes_vs_seq_len.png", "idle_vs_seq_len.png",
            "prefill_vs_tokens.png", "roofline.png"} <= set(rep.figures)
    # stacked bars: one container per class, its heights the CSV's column, each stacked on the classes before it
    (ax,) = axes_of(rep, "decode_classes_vs_seq_len.png")
    assert [c.get_label() for c in ax.containers] == list(ATTRIBUTION_CLASS_WORDS)
    bottom = np.zeros(len(df))
    for cls, container in zip(ATTRIBUTION_CLASS_WORDS, ax.containers, strict=True):
        np.testing.assert_allclose([p.get_height() for p in container], df[f"decode_{cls}_ms"])
        np.testing.assert_allclose([p.get_y() for p in container], bottom)
        bottom += df[f"decode_{cls}_ms"].to_numpy()
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{s:,}" for s in df["seq_len"]]
    # idle share: the two phases' columns
    (ax,) = axes_of(rep, "idle_vs_seq_len.png")
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    np.testing.assert_array_equal(lines["decode step"].get_ydata(), df["decode_idle_pct"])
    np.testing.assert_array_equal(lines["prefill"].get_ydata(), df["prefill_idle_pct"])
    np.testing.assert_array_equal(lines["launch-bound (30%)"].get_ydata(), [30.0, 30.0])
    # prefill: the span against tokens, one shaded band per launch-bound prompt (128 .. 2,048: five)
    (ax,) = axes_of(rep, "prefill_vs_tokens.png")
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), df["prefill_span_ms"])
    spans = sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches)
    assert len(spans) == 5
    assert spans[0][0] == pytest.approx(128 / 1.5) and spans[-1][1] == pytest.approx(np.sqrt(2048 * 4096))
    # roofline: decode (GB, GB/s) and prefill (FLOP/byte, TFLOP/s) points, the copy and matmul ceilings
    dec, pre = axes_of(rep, "roofline.png")
    np.testing.assert_allclose(dec.collections[0].get_offsets(),
                               np.column_stack([df["decode_bytes"] / 1e9, df["decode_span_gb_s"]]))
    assert dec.get_lines()[0].get_ydata()[0] == pytest.approx(4000.0)
    np.testing.assert_allclose(pre.collections[0].get_offsets(),
                               np.column_stack([df["prefill_flops"] / df["prefill_bytes"],
                                                df["prefill_span_tflop_s"]]))
    roof = pre.get_lines()[0]
    assert np.max(roof.get_ydata()) == pytest.approx(1000.0)


def test_written_report_pngs_decode_and_why_is_explains(tmp_path: Path) -> None:
    path = tmp_path / "seq.csv"
    df = with_roofline(seq_sweep())
    df.to_csv(path, index=False)
    out = tmp_path / "rep"
    assert main(["report", str(path), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        pixels = imread(out / img)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert "## Why" in md and "### Seq sweep at batch 1 (kvscope)" in md
    for sentence in explain(pd.read_csv(path, keep_default_na=False, na_values=[""]))["sentence"]:
        assert sentence and f"- {sentence}" in md


def test_batch_sweep_bars_and_why(tmp_path: Path) -> None:
    df = attributed_batch_sweep()
    path = tmp_path / "batch.csv"
    df.to_csv(path, index=False)
    rep = sweep_report(path)
    (ax,) = axes_of(rep, "decode_classes_vs_batch.png")
    np.testing.assert_allclose([p.get_height() for p in ax.containers[1]], df["decode_attention_ms"])
    assert "idle_vs_batch.png" in rep.figures and "prefill_vs_tokens.png" not in rep.figures
    md = rep.markdown()
    assert "### Batch sweep at prompt 512 (kvscope)" in md
    assert "- Batching is free up to batch 8" in md
    assert "- not said (kv_bound): needs column(s) weights_bytes, decode_bytes" in md


def test_classic_sweep_says_what_the_why_lacks(tmp_path: Path) -> None:
    path = tmp_path / "seq.csv"
    seq_sweep()[["seq_len", "batch", "decode_p50_ms_per_tok", "flag"]].to_csv(path, index=False)
    rep = sweep_report(path)
    md = rep.markdown()
    assert "The file has no attribution columns" in md
    assert "- not said (class_growth): needs column(s) decode_gemm_ms" in md
    assert not any("classes" in n or "roofline" in n for n in rep.figures)


def _pair(tmp_path: Path, b: pd.DataFrame | None = None) -> tuple[Path, Path]:
    a_df = with_roofline(seq_sweep())
    b_df = a_df.copy() if b is None else b
    if b is None:
        b_df["engine"] = "transformers"
        b_df["decode_p50_ms_per_tok"] = a_df["decode_p50_ms_per_tok"] * 2
        b_df["decode_span_ms"] = b_df["decode_p50_ms_per_tok"]
        b_df["decode_busy_ms"] = a_df["decode_busy_ms"]  # the extra time is all idle
        b_df["decode_kernels"] = 900
        b_df = b_df.iloc[2:]  # two points fewer: only the common ones are compared
    a, bp = tmp_path / "a.csv", tmp_path / "b.csv"
    a_df.to_csv(a, index=False)
    b_df.to_csv(bp, index=False)
    return a, bp


def test_compare_point_by_point(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    rep = sweep_report(a, compare=b)
    md = rep.markdown()
    assert "## Side by side: kvscope vs transformers" in md
    side = md.split("## Side by side")[1].splitlines()
    rows = [ln for ln in side if ln.startswith("| 512 | 1 | ")]
    step = seq_sweep()["decode_p50_ms_per_tok"].iloc[2]
    idle_gain = step * 2 - step  # B's span doubles, its busy time is A's
    assert rows[0] == (f"| 512 | 1 | {step:.3f} | {step * 2:.3f} | 2.00 | 35.0 | 35.0 | 400 | 900 | "
                       f"nothing (largest change gemm +0.000 ms) | idle +{idle_gain:.3f} ms |")
    assert not any(ln.startswith("| 128 | 1 | ") for ln in side)  # only in A
    (ax,) = axes_of(rep, "compare_step_time.png")
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), seq_sweep()["decode_p50_ms_per_tok"].iloc[2:] * 2)


@pytest.mark.parametrize(("change", "message"), [
    ({"model": "other"}, "their model differ (synthetic vs other)"),
    ({"seq_len": 7}, "no (seq_len, batch) point in common"),
])
def test_compare_refuses_mismatched_sweeps(tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict,
                                           message: str) -> None:
    a, b = _pair(tmp_path, with_roofline(seq_sweep()).assign(**change).drop_duplicates(subset=["seq_len", "batch"]))
    assert main(["report", str(a), "--compare", str(b), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_compare_needs_two_sweep_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = _pair(tmp_path)
    assert main(["report", str(a), "--compare", str(tmp_path / "absent.csv")]) == 2
    assert "--compare: not found:" in capsys.readouterr().err
    assert main(["report", str(a), "--compare", str(tmp_path)]) == 2
    assert "--compare sets two sweep files side by side" in capsys.readouterr().err


def test_every_attribution_column_read_is_in_the_contract() -> None:
    from kvscope.schema import ATTRIBUTION_COLUMNS

    read = {"decode_idle_pct", "prefill_idle_pct", "decode_kernels", "prefill_kernels", "prefill_launch_bound",
            "decode_bytes", "prefill_bytes", "prefill_flops", "decode_span_gb_s", "decode_mbu_pct",
            "prefill_span_tflop_s", "prefill_mfu_pct", "decode_span_ms", "decode_busy_ms", "prefill_span_ms",
            *(f"{p}_{c}_ms" for p in ("decode", "prefill") for c in ATTRIBUTION_CLASS_WORDS)}
    assert read <= set(ATTRIBUTION_COLUMNS)


def test_rows_of_real_captures_explain_and_report(tmp_path: Path) -> None:
    """The attribution of the stored qwen2.5-0.5b capture (batch 1, 32 tokens: eager steps, GPU idle most of each)
    as two rows of a seq sweep whose bytes are those of 32 and 64 tokens: every sentence that needs no second
    measurement is written, from the columns as the sweep writes them."""
    from kvscope.analysis.align.attribution import PointFacts, aligned, attribution
    from kvscope.model.config import PRESETS
    from kvscope.schema import Ceilings

    result = aligned(DATA / "nsys" / "qwen25-05b.sqlite")
    rows = []
    for seq in (32, 64):
        got = attribution(result, PointFacts(PRESETS["qwen2.5-0.5b"], 1, seq, 2, "bfloat16",
                                             Ceilings("test GPU", 2000.0, 500.0)))
        rows.append({"seq_len": seq, "batch": 1, "flag": "", "model": "qwen2.5-0.5b", **got})
    path = tmp_path / "seq.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    found = explain(pd.read_csv(path, keep_default_na=False, na_values=[""])).set_index("finding")
    assert found.loc["decode_idle", "values"]["idle_pct_from"] == pytest.approx(rows[0]["decode_idle_pct"])
    assert found.loc["prefill_launch_bound", "sentence"].startswith(
        "The prefill is launch-bound at every measured point up to 64 tokens")
    assert found.loc["class_growth", "values"]["share_from_pct"] == pytest.approx(
        rows[0][f"decode_{found.loc['class_growth', 'values']['class']}_ms"]
        / sum(rows[0][f"decode_{c}_ms"] for c in ATTRIBUTION_CLASS_WORDS) * 100)
    rep = sweep_report(path)
    assert {"decode_classes_vs_seq_len.png", "idle_vs_seq_len.png", "prefill_vs_tokens.png",
            "roofline.png"} <= set(rep.figures)
    dec, _ = axes_of(rep, "roofline.png")
    np.testing.assert_allclose(dec.collections[0].get_offsets()[:, 1], [r["decode_span_gb_s"] for r in rows])


def test_a_file_of_two_engines_draws_each_apart(tmp_path: Path) -> None:
    a, b = seq_sweep(), seq_sweep("transformers")
    b["decode_p50_ms_per_tok"] = a["decode_p50_ms_per_tok"] * 2
    path = tmp_path / "both.csv"
    pd.concat([a, b]).to_csv(path, index=False)
    rep = sweep_report(path)
    (ax,) = axes_of(rep, "decode_p50_ms_per_tok_vs_seq_len.png")
    lines = {ln.get_label(): ln.get_ydata() for ln in ax.get_lines()}
    assert set(lines) == {"batch 1 (kvscope)", "batch 1 (transformers)"}
    np.testing.assert_allclose(lines["batch 1 (transformers)"], b["decode_p50_ms_per_tok"])
    assert {"decode_classes_vs_seq_len_kvscope.png", "decode_classes_vs_seq_len_transformers.png"} <= set(rep.figures)
    assert "### Seq sweep at batch 1 (transformers)" in rep.markdown()
