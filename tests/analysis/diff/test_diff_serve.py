"""`kvscope diff` of served loads (kvscope/analysis/diff/serve_rows.py): the real CPU serve run of tests/data against
itself, against copies with one iteration kind or the requests' TTFT slowed 1.5x (the tables rewritten with their
metadata kept), against a load of another rate or policy, against a run folder and a serve sweep folder (refused);
and the large-sample path of the interval (tens of thousands of inter-token gaps a side)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from paths import DATA

import kvscope
from kvscope.analysis.diff import stats
from kvscope.analysis.diff.compare import diff
from kvscope.analysis.diff.stats import kth_difference, ratio_interval
from kvscope.cli import main
from kvscope.errors import KvscopeError
from kvscope.io import read_metadata, write_parquet

SERVE_RUN = DATA / "serve_run"
RUN = DATA / "nsys" / "qwen25-05b-run"
SERVE_ROWS = ["ttft", "tpot", "e2e", "queue", "itl", "decode iteration", "mixed iteration", "prefill iteration",
              "iteration host", "requests_per_s", "output_tok_s", "goodput_fraction", "little_ratio"]


def _line(table: pd.DataFrame, row: str) -> pd.Series:
    hits = table[table["row"] == row]
    assert len(hits) == 1, row
    return hits.iloc[0]


def _copy(tmp_path: Path, name: str = "b") -> Path:
    out = tmp_path / name
    shutil.copytree(SERVE_RUN, out)
    return out


def _rewrite(folder: Path, name: str, change: Any = None, meta_change: Any = None) -> None:
    """folder/name rewritten through `change` (a frame -> frame), its metadata kept (or changed by `meta_change`)."""
    path = folder / name
    meta = read_metadata(path)
    if meta_change is not None:
        meta_change(meta)
    df = pd.read_parquet(path)
    write_parquet(change(df) if change is not None else df, path, meta)


def _set_serve(folder: Path, **values: Any) -> None:
    """Every file's `serve` metadata entry updated (the files of one run agree)."""
    for path in sorted(folder.glob("*.parquet")):
        _rewrite(folder, path.name, meta_change=lambda m: m["serve"].update(values))


def test_a_served_load_against_itself_is_the_same_on_every_row() -> None:
    result = diff(SERVE_RUN, SERVE_RUN)
    t = result.table
    assert result.kind == "served load"
    assert sorted(t["row"]) == sorted(SERVE_ROWS)
    assert t["verdict"].value_counts().to_dict() == {"same": 13}
    assert set(t["reason"]) == {"identical samples on both sides"}
    assert result.notes == []
    assert result.headline_row() == "e2e"
    assert (t["a"] == t["b"]).all()
    requests = pd.read_parquet(SERVE_RUN / "requests.parquet")
    iterations = pd.read_parquet(SERVE_RUN / "iterations.parquet")
    finished = requests[requests["status"] == "finished"]
    assert _line(t, "ttft")["a_samples"] == len(finished) == 16
    assert _line(t, "ttft")["a"] == pytest.approx(float(finished["ttft_ms"].median()))
    assert _line(t, "itl")["a_samples"] == sum(len(g) for g in finished["itl_ms"]) == 105
    for row, kind in (("decode iteration", "decode"), ("mixed iteration", "mixed"), ("prefill iteration", "prefill")):
        durations = iterations.loc[iterations["kind"] == kind, "dur_ms"]
        assert _line(t, row)["a_samples"] == len(durations)
        assert _line(t, row)["a"] == pytest.approx(float(durations.median()))
    summary = pd.read_parquet(SERVE_RUN / "summary.parquet").iloc[0]
    for column in ("requests_per_s", "output_tok_s", "goodput_fraction", "little_ratio"):
        line = _line(t, column)
        assert line["a"] == pytest.approx(float(summary[column]))
        assert (line["family"], line["a_samples"]) == ("load", 1)
    assert _line(t, "goodput_fraction")["better"] == "higher"
    assert _line(t, "e2e")["better"] == "lower"
    assert result.waterfall.empty


def test_decode_iterations_slowed_are_slower_and_nothing_else_moves(tmp_path: Path) -> None:
    b = _copy(tmp_path)
    _rewrite(b, "iterations.parquet",
             lambda df: df.assign(dur_ms=df["dur_ms"].where(df["kind"] != "decode", df["dur_ms"] * 1.5)))
    t = diff(SERVE_RUN, b).table
    line = _line(t, "decode iteration")
    assert line["verdict"] == "slower"
    assert line["diff_pct"] == pytest.approx(50.0)
    assert line["ci_low_pct"] > 2.0
    assert t["verdict"].value_counts().to_dict() == {"same": 12, "slower": 1}


def test_ttft_slowed_is_slower_and_none_faster(tmp_path: Path) -> None:
    b = _copy(tmp_path)

    def slower_first_token(df: pd.DataFrame) -> pd.DataFrame:  # the request ends as much later (its TPOT kept)
        return df.assign(ttft_ms=df["ttft_ms"] * 1.5, e2e_ms=df["e2e_ms"] + df["ttft_ms"] * 0.5)

    _rewrite(b, "requests.parquet", slower_first_token)
    result = kvscope.diff(SERVE_RUN, b, fail_if="slower:3%:ttft")
    t = result.table
    assert _line(t, "ttft")["verdict"] == "slower"
    assert _line(t, "ttft")["diff_pct"] == pytest.approx(50.0)
    assert _line(t, "tpot")["verdict"] == "same"
    assert "faster" not in set(t["verdict"])
    assert _line(t, "e2e")["verdict"] in ("slower", "cannot tell")
    for row in ("queue", "itl", "decode iteration", "mixed iteration", "prefill iteration", "iteration host"):
        assert _line(t, row)["verdict"] == "same", row
    assert result.exit_code == 1
    assert result.gates[0].row == "ttft"


def test_the_gate_reads_e2e_on_served_loads(tmp_path: Path) -> None:
    b = _copy(tmp_path)
    _rewrite(b, "requests.parquet", lambda df: df.assign(e2e_ms=df["e2e_ms"] * 1.5))
    result = kvscope.diff(SERVE_RUN, b, fail_if="slower:3%")
    assert _line(result.table, "e2e")["verdict"] == "slower"
    assert result.gates[0].row == "e2e"
    assert result.exit_code == 1
    assert kvscope.diff(SERVE_RUN, SERVE_RUN, fail_if="slower:3%").exit_code == 0


def test_another_policy_is_a_note_another_rate_is_refused(tmp_path: Path) -> None:
    b = _copy(tmp_path, "policy")
    _set_serve(b, policy="prefill-first")
    result = diff(SERVE_RUN, b)
    assert result.notes == ["settings that differ: policy (chunked vs prefill-first)"]
    assert set(result.table["verdict"]) == {"same"}

    c = _copy(tmp_path, "rate")
    _set_serve(c, rps=80.0)
    with pytest.raises(KvscopeError, match=r"different measurements: rps \(40\.0 vs 80\.0\); kvscope diff compares "
                                           r"served loads of one model, dtype and load"):
        diff(SERVE_RUN, c)
    shown = diff(SERVE_RUN, c, allow_different=True).table
    assert set(shown["verdict"]) == {"cannot tell"}
    assert set(shown["reason"]) == {"different rps (40.0 vs 80.0)"}


def test_a_served_load_against_a_run_folder_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(SERVE_RUN), str(RUN)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "mismatched kinds" in err and "served load" in err and "run folder" in err
    with pytest.raises(KvscopeError, match=r"^mismatched kinds: A .* is a run folder and B .* a served load"):
        diff(RUN, SERVE_RUN)


def test_a_serve_sweep_folder_is_refused_naming_what_to_pass(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    shutil.copytree(SERVE_RUN, sweep / "p00-chunked-rps40")
    pd.DataFrame({"policy": ["chunked"], "rps": [40.0], "concurrency": [np.nan], "point": ["p00-chunked-rps40"]}
                 ).to_parquet(sweep / "serve_sweep.parquet")
    assert main(["diff", str(sweep), str(SERVE_RUN)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "serve sweep folder" in err and "pass two points' run folders" in err
    assert diff(sweep / "p00-chunked-rps40", SERVE_RUN).table["verdict"].eq("same").all()


def test_the_interval_of_large_samples_is_found_without_every_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    a, b = np.sort(rng.normal(size=300)), np.sort(rng.normal(size=250) + 0.1)
    d = np.sort((b[None, :] - a[:, None]).ravel())
    for k in (1, 2, 101, d.size // 2, d.size - 1, d.size):
        assert kth_difference(a, b, k) == pytest.approx(d[k - 1], abs=1e-9)
    x, y = rng.lognormal(size=300), rng.lognormal(size=250)
    whole = ratio_interval(x, y)
    monkeypatch.setattr(stats, "MAX_PAIRS", 10)
    selected = ratio_interval(x, y)
    assert whole is not None and selected is not None
    for field in ("estimate", "low", "high", "level"):
        assert getattr(selected, field) == pytest.approx(getattr(whole, field), rel=1e-9)
    monkeypatch.undo()
    big = ratio_interval(rng.lognormal(size=40_000), rng.lognormal(size=40_000) * 1.1)  # 1.6e9 pairs: not held
    assert big is not None and big.low < 1.1 < big.high
