"""Every kernel class against its roofline (kvscope.analysis.align.class_roofline, `class_roofline.parquet` of
`kvscope align`): the counting rule against roofline.py's whole-step counts and against figures written out by hand
from the architecture's numbers, and the table on real exports: kvscope's loop (qwen2.5-0.5b on an H100, with its
run folder) and transformers' loop (tests/data/foreign/hf, labelled by a phase map), each class's time checked
against the fixture's kernels grouped by another path; then the bad inputs, each one line and exit code 2."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_checks import fail
from paths import DATA

from kvscope.analysis.align.class_roofline import (
    MODELLED,
    RooflineFacts,
    args_from_metadata,
    class_costs,
    class_roofline,
    kv_write_class,
    parse_ceilings,
    roofline_facts,
    roofline_request,
    step_class_times,
)
from kvscope.analysis.align.kernel_classes import CLASSES, COPY
from kvscope.analysis.align.pipeline import analyse
from kvscope.analysis.roofline import decode_cost, prefill_cost
from kvscope.cli import main
from kvscope.errors import KvscopeError
from kvscope.io import read_metadata
from kvscope.model.config import PRESETS, ModelArgs
from kvscope.schema import CLASS_ROOFLINE_COLUMNS, CLASS_ROOFLINE_FILE, Ceilings

NSYS = DATA / "nsys"
FOREIGN = DATA / "foreign"
QWEN = PRESETS["qwen2.5-0.5b"]
# tests/data/foreign/programs.py's `hf` model (transformers' Qwen2Config with these numbers, float32)
HF_CONFIG = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 256,
             "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 1024, "max_position_embeddings": 512}
CEILINGS = "2800,760"  # GB/s, TFLOP/s: an H100's calibration of about that size (docs/benchmarks.md)
UNMODELLED = ("communication", "other")


def _shapes() -> list[tuple[str, str, int, int, int]]:
    """(model, phase, batch, seq, context) over presets, a sliding window shorter and longer than the context, both
    phases, small and large shapes."""
    out = []
    for name in ("tiny", "qwen2.5-0.5b", "qwen2.5-7b", "llama-3.2-1b", "llama-3.1-8b", "mistral-7b", "mistral-w64"):
        for phase, batch, seq, ctx in (("prefill", 1, 32, 32), ("prefill", 8, 1000, 1000), ("decode", 1, 32, 34),
                                       ("decode", 16, 4096, 4100), ("decode", 3, 40, 41)):
            out.append((name, phase, batch, seq, ctx))
    return out


def _args(name: str) -> ModelArgs:
    if name == "mistral-w64":  # a sliding window of 64 positions: decode reads at most 64, prefill counts fewer pairs
        return dataclasses.replace(PRESETS["mistral-7b"], name=name, sliding_window=64)
    return PRESETS[name]


@pytest.mark.parametrize(("name", "phase", "batch", "seq", "ctx"), _shapes())
@pytest.mark.parametrize("kv_class", [COPY, "elementwise"])
@pytest.mark.parametrize("width", [2, 4])
def test_classes_sum_to_the_whole_step(name: str, phase: str, batch: int, seq: int, ctx: int, kv_class: str,
                                       width: int) -> None:
    """Weight + KV-cache bytes summed over the classes are roofline.py's step bytes, FLOPs its step FLOPs: exactly,
    wherever the KV write is counted; activation bytes are on top, and only communication and other are NA."""
    a = _args(name)
    c = class_costs(a, phase, batch, seq, ctx, width, width, kv_class)
    want_bytes, want_flops = (prefill_cost(a, batch, seq, width, width) if phase == "prefill"
                              else decode_cost(a, batch, ctx, width, width))
    modelled = c.loc[list(MODELLED)]
    assert int(modelled["weight_bytes"].sum() + modelled["kv_bytes"].sum()) == want_bytes
    assert int(modelled["flops"].sum()) == want_flops
    assert (modelled["act_bytes"] > 0).all()
    assert c.loc[list(UNMODELLED)].isna().all().all()
    assert list(c.index) == list(CLASSES) and all(str(c[col].dtype) == "Int64" for col in c.columns)


def test_qwen_decode_counts_by_hand() -> None:
    """qwen2.5-0.5b (D 896, 24 layers, 14 heads of 64, 2 KV heads, I 4864, V 151936, q/k/v bias), bf16, one
    sequence at context 34, the KV write a copy: every count written out from those numbers."""
    c = class_costs(QWEN, "decode", 1, 32, 34, 2, 2)
    matmul = 896 * (896 + 2 * 128) + 896 * 896 + 3 * 896 * 4864  # per token and layer
    kv_token = 24 * 2 * 128 * 2  # K and V of one position over all layers, bytes
    want = {
        "gemm": ((24 * (matmul + 896 + 2 * 128) + 151936 * 896) * 2, 0,
                 (24 * (4 * 896 + 2 * 896 + 2 * 128 + 3 * 4864) + 896 + 151936) * 2,
                 2 * 24 * matmul + 2 * 896 * 151936),
        "attention": (0, 34 * kv_token, 24 * 2 * 896 * 2, 4 * 14 * 64 * 24 * 34),
        "norm": ((2 * 24 + 1) * 896 * 2, 0, 2 * 896 * (2 * 24 + 1) * 2, 0),
        "elementwise": (0, 0, 24 * (2 * 896 + 2 * 128 + 3 * 4864 + 6 * 896) * 2, 0),
        COPY: (896 * 2, kv_token, (896 + 24 * 2 * 128) * 2, 0),
    }
    for cls, (weights, kv, act, flops) in want.items():
        assert c.loc[cls, ["weight_bytes", "kv_bytes", "act_bytes", "flops"]].tolist() == [weights, kv, act, flops]
    assert c.loc["gemm", "weight_bytes"] == 987_977_728


def test_prefill_attention_counts_causal_pairs() -> None:
    c = class_costs(QWEN, "prefill", 2, 32, 32, 2, 2, "elementwise")
    assert c.loc["attention", "flops"] == 4 * 14 * 64 * 24 * 2 * (32 * 33 // 2)
    assert c.loc["attention", "kv_bytes"] == 0  # a prefill reads no cache
    assert c.loc["elementwise", "kv_bytes"] == 2 * 32 * 24 * 2 * 128 * 2 and c.loc[COPY, "kv_bytes"] == 0


def test_bad_phase_or_kv_class_is_refused() -> None:
    with pytest.raises(KvscopeError, match="phase must be one of prefill, decode"):
        class_costs(QWEN, "serve", 1, 1, 1, 2, 2)
    with pytest.raises(KvscopeError, match="the KV write's class must be one of"):
        class_costs(QWEN, "decode", 1, 1, 1, 2, 2, "other")


def test_kv_write_goes_with_kvscopes_fused_rope_kernel() -> None:
    k = pd.DataFrame({"name": ["kvscope_rope_kv_vec", "kvscope_rope_kv_vec", "index_copy_kernel"],
                      "kernel_class": ["elementwise", "elementwise", COPY]})
    assert kv_write_class(k) == "elementwise"
    assert kv_write_class(k.iloc[2:]) == COPY
    assert kv_write_class(k.iloc[:0]) == COPY


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama-3.1-8b", "mistral-7b"])
def test_args_from_a_runs_metadata(name: str) -> None:
    a = PRESETS[name]
    assert args_from_metadata({"model": {"args": a.as_dict()}}, "x") == a
    assert args_from_metadata({"model": {"spec": name}}, "x") is None
    with pytest.raises(KvscopeError, match=r"x: its metadata's model args cannot be read .*dim must be an integer"):
        args_from_metadata({"model": {"args": {**a.as_dict(), "dim": None}}}, "x")


def _class_times_by_rep_and_step(kernels: pd.DataFrame, phase: str) -> pd.DataFrame:
    """Per class, the median over the phase's steps of its summed ns, from the kernels' own rep and step keys."""
    k = kernels[(kernels["phase"] == phase).fillna(False) & kernels["step"].notna()]
    g = k.groupby([k["rep"].astype("int64"), k["step"].astype("int64"), "kernel_class"])["dur_ns"].sum()
    return g.unstack(fill_value=0).reindex(columns=list(CLASSES), fill_value=0).median()


def test_kvscope_loop_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """qwen2.5-0.5b, `run bs=1 seq=32 gen=4`, 2 repetitions (H100, eager loop): the model, dtype and shape from the
    run folder, the ceilings given; per class the median time of the fixture, the exact counts, the rates."""
    out = tmp_path / "al"
    assert main(["align", str(NSYS / "qwen25-05b.sqlite"), "--timings", str(NSYS / "qwen25-05b-run"),
                 "--ceilings", CEILINGS, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Kernel classes against the roofline" in text and "class_roofline.parquet" in text.splitlines()[-1]
    df = pd.read_parquet(out / CLASS_ROOFLINE_FILE)
    assert list(df.columns) == list(CLASS_ROOFLINE_COLUMNS)
    meta = read_metadata(out / CLASS_ROOFLINE_FILE)["class_roofline"]
    assert {k: meta[k] for k in ("model", "dtype", "batch", "seq", "ctx")} == {
        "model": "qwen2.5-0.5b", "dtype": "bfloat16", "batch": 1, "seq": 32, "ctx": None}
    assert meta["ceilings"]["copy_gb_s"] == 2800.0
    assert df["phase"].tolist() == ["prefill"] * 7 + ["decode"] * 7 and df["kernel_class"].tolist() == [*CLASSES] * 2
    kernels = analyse(NSYS / "qwen25-05b.sqlite").kernels
    for phase, steps, tokens, context in (("prefill", 2, 32, 32), ("decode", 6, 1, 34)):
        rows = df[df["phase"] == phase].set_index("kernel_class")
        assert (rows["steps"] == steps).all() and (rows["tokens"] == tokens).all()
        assert (rows["context"] == context).all()  # decode: seq 32 + step 2, the low median of steps 1..3
        want_ns = _class_times_by_rep_and_step(kernels, phase)
        np.testing.assert_array_equal(rows["time_ms"].to_numpy(), want_ns.to_numpy() / 1e6)
        costs = class_costs(QWEN, phase, 1, 32, context, 2, 2)
        for col in ("weight_bytes", "kv_bytes", "act_bytes", "flops"):
            assert rows[col].astype("Int64").tolist() == costs[col].tolist(), (phase, col)
        assert rows.loc[list(UNMODELLED), "bytes"].isna().all()
    # the fixture's figures: median ns per step of a class, written out
    dec, pre = df[df["phase"] == "decode"].set_index("kernel_class"), df[df["phase"] == "prefill"].set_index(
        "kernel_class")
    assert dec.loc["gemm", "time_ms"] == 679_221 / 1e6 and pre.loc["gemm", "time_ms"] == 722_581.5 / 1e6
    assert dec.loc["attention", "time_ms"] == 107_425.5 / 1e6 and dec.loc["other", "time_ms"] == 9_168 / 1e6
    assert dec.loc["gemm", "kernels"] == 121 and dec.loc["elementwise", "kernels"] == 436
    gemm = dec.loc["gemm"]
    assert gemm["bytes"] == 987_977_728 + 1_276_416
    assert gemm["gb_s"] == pytest.approx(gemm["bytes"] / (679_221 / 1e9) / 1e9, rel=1e-12)
    assert gemm["mbu_pct"] == pytest.approx(100 * gemm["gb_s"] / 2800, rel=1e-12)
    assert gemm["mfu_pct"] == pytest.approx(100 * gemm["tflop_s"] / 760, rel=1e-12)
    # ridge 760e12 / 2800e9 = 271 FLOP/byte: every modelled class of this batch-1 run is memory-bound
    assert (df.loc[df["bytes"].notna(), "bound"] == "memory").all() and df.loc[df["bytes"].isna(), "bound"].isna().all()
    assert (df.loc[df["bound"] == "memory", "roof_pct"] == df.loc[df["bound"] == "memory", "mbu_pct"]).all()
    assert 40 < gemm["roof_pct"] < 60  # about half the copy bandwidth streaming the weights at batch 1
    assert pre.loc["gemm", "flop_per_byte"] == pytest.approx(pre.loc["gemm", "flops"] / pre.loc["gemm", "bytes"])


def test_the_same_on_the_export_alone_with_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without the run folder the shape comes from the export's `run bs=1 seq=32 gen=4` range and the model from
    --model: the same table; no ceilings: shares empty, flop-less classes still memory-bound."""
    out = tmp_path / "al"
    assert main(["align", str(NSYS / "qwen25-05b.parquetdir"), "--model", "qwen2.5-0.5b", "--out", str(out)]) == 0
    capsys.readouterr()
    df = pd.read_parquet(out / CLASS_ROOFLINE_FILE)
    assert df["mbu_pct"].isna().all() and df["mfu_pct"].isna().all() and df["roof_pct"].isna().all()
    assert df.set_index(["phase", "kernel_class"]).loc[("decode", "norm"), "bound"] == "memory"
    assert pd.isna(df.set_index(["phase", "kernel_class"]).loc[("decode", "gemm"), "bound"])  # no ridge known
    assert df.loc[df["phase"] == "decode", "context"].unique().tolist() == [34]


def test_no_model_skips_it_with_a_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "al"
    assert main(["align", str(NSYS / "tiny.sqlite"), "--out", str(out)]) == 0
    assert "align: skipped class_roofline.parquet: no model (pass --model" in capsys.readouterr().out
    assert not (out / CLASS_ROOFLINE_FILE).exists()
    out2 = tmp_path / "plain"  # no labelled step and no model: nothing said about it
    assert main(["align", str(FOREIGN / "plain.sqlite"), "--out", str(out2)]) == 0
    assert "class_roofline" not in capsys.readouterr().out


def _hf_config(tmp_path: Path) -> Path:
    path = tmp_path / "hf-config.json"
    path.write_text(json.dumps(HF_CONFIG))
    return path


def test_transformers_loop_with_a_phase_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """transformers' generate (float32, prompt of 16 tokens) with each call labelled a decode step: the model from
    its config.json, the shape from the flags. A generate call holds its prefill and three decode steps, so the
    counts are those of one decode step at the given context: what the phase map says, not what ran."""
    out = tmp_path / "al"
    assert main(["align", str(FOREIGN / "hf.sqlite"), "--phase-map", "decode=^generate", "--model",
                 str(_hf_config(tmp_path)), "--dtype", "float32", "--batch", "1", "--seq", "16", "--ceilings",
                 CEILINGS, "--out", str(out)]) == 0
    capsys.readouterr()
    df = pd.read_parquet(out / CLASS_ROOFLINE_FILE).set_index("kernel_class")
    assert (df["phase"] == "decode").all() and (df["steps"] == 2).all()
    assert (df["context"] == 17).all()  # seq 16 + the low median of steps 1 and 2
    k = analyse(FOREIGN / "hf.sqlite", phase_map="decode=^generate").kernels
    k = k[(k["phase"] == "decode").fillna(False)]
    per_step = k.groupby([k["step"].astype("int64"), "kernel_class"])["dur_ns"].sum().unstack(fill_value=0)
    np.testing.assert_array_equal(df["time_ms"].to_numpy(),
                                  per_step.reindex(columns=list(CLASSES), fill_value=0).median().to_numpy() / 1e6)
    assert df["kernels"].sum() == 547  # every operation of a generate call, each in one class
    # D 256, 2 layers, 4 heads of 64, 2 KV heads, I 512, V 1024 (untied), q/k/v bias; float32
    matmul = 256 * (256 + 2 * 128) + 256 * 256 + 3 * 256 * 512
    assert df.loc["gemm", "weight_bytes"] == (2 * (matmul + 256 + 2 * 128) + 1024 * 256) * 4
    assert df.loc["gemm", "flops"] == 2 * 2 * matmul + 2 * 256 * 1024
    assert df.loc["attention", "kv_bytes"] == 17 * 2 * 2 * 128 * 4
    assert df.loc["attention", "flops"] == 4 * 4 * 64 * 2 * 17
    # float32: no bf16 ridge applies, so only the flop-less classes have a bound; the bandwidth share stays
    assert pd.isna(df.loc["gemm", "bound"]) and pd.isna(df.loc["gemm", "mfu_pct"])
    assert df.loc["norm", "bound"] == "memory" and df.loc["gemm", "mbu_pct"] == pytest.approx(
        100 * df.loc["gemm", "gb_s"] / 2800)
    out2 = tmp_path / "al2"
    assert main(["align", str(FOREIGN / "hf.sqlite"), "--phase-map", "decode=^generate", "--model",
                 str(_hf_config(tmp_path)), "--batch", "1", "--seq", "16", "--ctx", "19", "--out", str(out2)]) == 0
    capsys.readouterr()
    d2 = pd.read_parquet(out2 / CLASS_ROOFLINE_FILE).set_index("kernel_class")
    assert (d2["context"] == 19).all() and d2.loc["attention", "kv_bytes"] == 19 * 2 * 2 * 128 * 2  # bfloat16


def test_step_times_cover_every_step_and_class() -> None:
    res = analyse(FOREIGN / "hf.sqlite", phase_map="decode=^generate")
    t = step_class_times(res.steps, res.kernels)
    assert len(t) == 2 * len(CLASSES) and t.groupby("step_id")["kernels"].sum().tolist() == [547, 547]
    assert t.loc[t["kernel_class"] == "communication", "time_ns"].tolist() == [0, 0]


def test_no_ceilings_and_no_time() -> None:
    """A class modelled but without kernels (fused away): no rate, never inf."""
    res = analyse(FOREIGN / "hf.sqlite", phase_map="decode=^generate")
    kernels = res.kernels[res.kernels["kernel_class"] != "norm"]
    facts = RooflineFacts(PRESETS["tiny"], "bfloat16", 1, 16, None, Ceilings("g", 1000.0, 100.0))
    df = class_roofline(res.steps, kernels, facts).set_index("kernel_class")
    assert df.loc["norm", "time_ms"] == 0 and math.isnan(df.loc["norm", "gb_s"]) and df.loc["norm", "bytes"] > 0
    assert np.isfinite(df["gb_s"].dropna()).all()


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "no-such-model"], "unknown preset 'no-such-model'"),
    (["--model", "qwen2.5-0.5b", "--seq", "16"], "the class roofline of a foreign export needs --batch (the shape"),
    (["--model", "qwen2.5-0.5b"], "needs --batch and --seq"),
    (["--batch", "1", "--seq", "16"], "--batch, --seq need a model for the class roofline: pass --model"),
    (["--ceilings", CEILINGS], "--ceilings needs a model"),
    (["--model", "qwen2.5-0.5b", "--batch", "0", "--seq", "16"], "--batch must be an integer >= 1, got 0"),
    (["--model", "qwen2.5-0.5b", "--batch", "1", "--seq", "16", "--ctx", "-1"], "--ctx must be an integer >= 1"),
    (["--model", "qwen2.5-0.5b", "--dtype", "int4"], "--dtype 'int4': not one of float32, bfloat16"),
    (["--model", "qwen2.5-0.5b", "--ceilings", "2800"], "--ceilings must be COPY_GB_S,BF16_TFLOP_S"),
    (["--model", "qwen2.5-0.5b", "--ceilings", "2800,nan"], "--ceilings: the bf16 TFLOP/s must be a positive"),
    (["--model", "qwen2.5-0.5b", "--ceilings", "-1,760"], "--ceilings: the copy GB/s must be a positive number"),
    (["--model", "missing/config.json"], "model folder or file not found: missing/config.json"),
])
def test_bad_input_is_one_line(argv: list[str], message: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    line = fail(["align", str(FOREIGN / "hf.sqlite"), "--phase-map", "decode=^generate", "--out",
                 str(tmp_path / "o"), *argv], capsys)
    assert message in line, line
    assert not (tmp_path / "o").exists()


def test_flags_that_disagree_with_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fail(["align", str(NSYS / "qwen25-05b.sqlite"), "--model", "qwen2.5-0.5b", "--batch", "4", "--out",
                 str(tmp_path / "o")], capsys)
    assert "--batch 4 disagrees with the export's run range 'run bs=1 seq=32 gen=4'" in line
    assert not (tmp_path / "o").exists()


def test_request_and_facts_in_python() -> None:
    """The functions the command calls, with what they return on their own."""
    req = roofline_request(run_dir=NSYS / "qwen25-05b-run")
    assert req.args == QWEN and req.dtype == "bfloat16" and req.ceilings is None
    assert roofline_request().args is None
    assert roofline_request("qwen2.5-0.5b", dtype="bf16").dtype == "bfloat16"
    assert parse_ceilings(" 2800 , 760 ") == Ceilings("--ceilings", 2800.0, 760.0)
    facts, note = roofline_facts(analyse(NSYS / "tiny.sqlite"), roofline_request("tiny"))
    assert note is None and facts is not None and (facts.batch, facts.seq) == (1, 32)
    facts, note = roofline_facts(analyse(FOREIGN / "plain.sqlite"), roofline_request("tiny"))
    assert facts is None and note == "skipped class_roofline.parquet: no labelled prefill or decode step in the export"


def test_ceilings_from_the_calibration_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Without --ceilings, a kvscope run's GPU is looked up in `kvscope calibrate`'s cache (no torch needed): the
    shares are those of --ceilings with the same figures, and the metadata says where they came from."""
    home = tmp_path / "cache"
    (home / "kvscope").mkdir(parents=True)
    (home / "kvscope" / "calibration.json").write_text(
        '{"NVIDIA H100 80GB HBM3": {"gpu": "NVIDIA H100 80GB HBM3", "copy_gb_s": 2800, "bf16_tflop_s": 760}}')
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    argv = ["align", str(NSYS / "qwen25-05b.sqlite"), "--timings", str(NSYS / "qwen25-05b-run")]
    assert main([*argv, "--out", str(tmp_path / "cached")]) == 0
    assert main([*argv, "--ceilings", CEILINGS, "--out", str(tmp_path / "given")]) == 0
    capsys.readouterr()
    cached = pd.read_parquet(tmp_path / "cached" / CLASS_ROOFLINE_FILE)
    given = pd.read_parquet(tmp_path / "given" / CLASS_ROOFLINE_FILE)
    pd.testing.assert_frame_equal(cached, given)
    assert cached["mbu_pct"].notna().any()
    meta = read_metadata(tmp_path / "cached" / CLASS_ROOFLINE_FILE)["class_roofline"]
    assert meta["ceilings_from"] == "the calibration cache (NVIDIA H100 80GB HBM3)"
    assert read_metadata(tmp_path / "given" / CLASS_ROOFLINE_FILE)["class_roofline"]["ceilings_from"] == "--ceilings"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))  # never calibrated: no shares, no error
    assert main([*argv, "--out", str(tmp_path / "none")]) == 0
    assert pd.read_parquet(tmp_path / "none" / CLASS_ROOFLINE_FILE)["mbu_pct"].isna().all()
