"""Each request's share of the GPU on the hand-built load (serving_frames): the byte model and nsys kernel classes,
shares worked out by hand, the rows summing back to the iterations' total."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from serving_frames import META, batches, iterations, requests

from kvscope.analysis.serving.request_cost import REQUEST_COST_COLUMNS, iteration_split, request_gpu_cost
from kvscope.errors import KvscopeError


def _by_id(df: pd.DataFrame) -> dict[int, pd.Series]:
    return {int(r["request_id"]): r for _, r in df.iterrows()}


def test_model_split_sums_back() -> None:
    cost = request_gpu_cost(batches(), iterations(), None, META, requests())
    assert list(cost.columns) == list(REQUEST_COST_COLUMNS)
    total = iterations()["dur_ms"].sum()  # every iteration carried a request
    assert cost["gpu_ms"].sum() == pytest.approx(total, rel=1e-12)
    assert (cost["attention_ms"] + cost["other_ms"]).sum() == pytest.approx(total, rel=1e-12)
    assert (cost["prefill_gpu_ms"] + cost["decode_gpu_ms"]).to_numpy() == pytest.approx(cost["gpu_ms"].to_numpy())
    assert cost.attrs["assigned_ms"] == pytest.approx(total) and cost.attrs["unassigned_ms"] == 0
    assert set(cost["source"]) == {"model", ""}  # the refused request ran nowhere


def test_model_attention_share() -> None:
    """Iteration 0 carries r1 alone: 8 keys x 1,000 B against 100,000 B of weights."""
    split = iteration_split(batches(), iterations(), None, META).set_index("iteration")
    assert split.loc[0, "attention_ms"] == pytest.approx(100 * 8_000 / 108_000)
    assert split.loc[1, "attention_ms"] == pytest.approx(150 * 25_000 / 125_000)  # contexts 9 + 16
    assert (split["source"] == "model").all()


def test_nsys_split_exact_shares() -> None:
    """Iteration 1 (r1 decode ctx 9 x 1 token, r2 prefill ctx 16 x 16 tokens) measured by nsys: attention 10 ms,
    gemm 20 ms, norm 4 ms; the other iterations by the model."""
    kc = pd.DataFrame({"iteration": [1, 1, 1], "class": ["attention", "gemm", "norm"], "ms": [10.0, 20.0, 4.0]})
    split = iteration_split(batches(), iterations(), kc, META).set_index("iteration")
    assert split.loc[1, "source"] == "nsys" and split.loc[1, "gpu_ms"] == 34.0
    assert (split.drop(index=1)["source"] == "model").all()
    cost = _by_id(request_gpu_cost(batches(), iterations(), kc, META, requests()))
    # r1 in iteration 1: attention 10 x 9/25, the rest 24 x 1/17; r2: 10 x 16/25, 24 x 16/17
    r1_it1 = 10 * 9 / 25 + 24 / 17
    r2_it1 = 10 * 16 / 25 + 24 * 16 / 17
    assert r2_it1 + r1_it1 == pytest.approx(34.0)
    cost_model = _by_id(request_gpu_cost(batches(), iterations(), None, META, requests()))
    model_it1 = split_model_share(1)
    assert cost[1]["gpu_ms"] == pytest.approx(cost_model[1]["gpu_ms"] - model_it1[1] + r1_it1)
    assert cost[2]["gpu_ms"] == pytest.approx(cost_model[2]["gpu_ms"] - model_it1[2] + r2_it1)
    assert cost[1]["source"] == "nsys+model" and cost[3]["source"] == "model"
    total = sum(r["gpu_ms"] for r in cost.values())
    assert total == pytest.approx(iterations()["dur_ms"].sum() - 150.0 + 34.0, rel=1e-12)


def split_model_share(iteration: int) -> dict[int, float]:
    """Each request's model-split GPU time in one iteration, by hand."""
    split = iteration_split(batches(), iterations(), None, META).set_index("iteration").loc[iteration]
    rows = batches()[batches()["iteration"] == iteration]
    ctx, tok = rows["context_len"].sum(), rows["tokens"].sum()
    return {int(r.request_id): split["attention_ms"] * r.context_len / ctx + split["other_ms"] * r.tokens / tok
            for r in rows.itertuples()}


def test_nsys_everywhere_needs_no_model_facts() -> None:
    kc = pd.DataFrame({"iteration": [0, 1, 2, 3, 4] * 2, "kernel_class": ["attention"] * 5 + ["gemm"] * 5,
                       "time_ms": [1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0]})
    cost = request_gpu_cost(batches(), iterations(), kc, {}, None)
    assert cost["gpu_ms"].sum() == pytest.approx(165.0, rel=1e-12)
    assert cost["attention_ms"].sum() == pytest.approx(15.0) and (cost["source"] == "nsys").all()
    assert cost["e2e_ms"].isna().all() and cost["own_gpu_share"].isna().all()  # no requests given


def test_e2e_shares() -> None:
    """r3 (e2e 250 ms) was carried by iterations 2 and 3 (120 + 80 ms): own + others = 200 ms, idle/queue 50."""
    r3 = _by_id(request_gpu_cost(batches(), iterations(), None, META, requests()))[3]
    assert r3["iterations"] == 2
    assert r3["own_gpu_share"] + r3["others_gpu_share"] == pytest.approx(200 / 250)
    assert r3["idle_queue_share"] == pytest.approx(50 / 250)
    assert r3["gpu_ms_per_output_token"] == pytest.approx(r3["gpu_ms"] / 2)
    refused = _by_id(request_gpu_cost(batches(), iterations(), None, META, requests()))[4]
    assert refused["gpu_ms"] == 0 and refused["iterations"] == 0 and math.isnan(refused["own_gpu_share"])


def test_unassigned_iterations() -> None:
    it = iterations()
    extra = it.iloc[[-1]].assign(iteration=5, dur_ms=7.0)
    cost = request_gpu_cost(batches(), pd.concat([it, extra], ignore_index=True), None, META)
    assert cost.attrs["unassigned_ms"] == 7.0 and cost["gpu_ms"].sum() == pytest.approx(500.0)


def test_model_needs_its_facts() -> None:
    with pytest.raises(KvscopeError, match=r"serve\.kv_bytes_per_token and serve\.weights_bytes") as e:
        request_gpu_cost(batches(), iterations(), None, {"serve": {"policy": "chunked"}})
    assert "\n" not in str(e.value)
    kc = pd.DataFrame({"iteration": [1], "klass": ["gemm"], "ms": [1.0]})
    with pytest.raises(KvscopeError, match="class or kernel_class"):
        request_gpu_cost(batches(), iterations(), kc, META)
