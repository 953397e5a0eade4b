"""Kernel-boundary checks of the attention switch and the fused residual product: bad shapes, dtypes and strides
raise ValueError naming the shapes; the masked decode path equals a dense reference."""

from __future__ import annotations

import pytest
import torch

from kvscope.model.attention import DecodeMeta, decode_attention, prefill_attention, prefill_mask
from kvscope.model.layers import linear_residual_

B, H, H_KV, S, D = 2, 4, 2, 6, 8


def _cache() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g)  # (B, H, D)
    k = torch.randn(B, S, H_KV, D, generator=g)  # (B, S, H_kv, D)
    v = torch.randn(B, S, H_KV, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_masked_decode_equals_a_dense_reference(impl: str) -> None:
    q, k, v = _cache()
    lengths = torch.tensor([3, 5])
    mask = (torch.arange(S).view(1, S) < lengths.view(B, 1)).view(B, 1, 1, S)  # (B, 1, 1, S)
    out = decode_attention(q, k, v, DecodeMeta(span=S, key_mask=mask), impl)  # (B, H, D)
    for b in range(B):
        n = int(lengths[b])
        for h in range(H):
            kh, vh = k[b, :n, h // (H // H_KV)], v[b, :n, h // (H // H_KV)]  # (n, D): query head h -> KV head
            ref = torch.softmax(kh @ q[b, h] / D**0.5, dim=0) @ vh
            torch.testing.assert_close(out[b, h], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("change", "message"), [
    (lambda q, k, v, m: (q.unsqueeze(2), k, v, m), r"q must be \(B, H, D\)"),
    (lambda q, k, v, m: (q, k, v[:, :-1], m), r"k/v caches"),
    (lambda q, k, v, m: (q[:, :3], k, v, m), r"does not fit"),
    (lambda q, k, v, m: (q.double(), k, v, m), r"dtypes differ"),
    (lambda q, k, v, m: (q, k, v, DecodeMeta(span=S + 1)), r"keys \[0, 7\) outside \[0, 6\] or empty"),
    (lambda q, k, v, m: (q, k, v, DecodeMeta(span=3, start=3)), r"keys \[3, 3\) outside \[0, 6\] or empty"),
    (lambda q, k, v, m: (q, k, v, DecodeMeta(span=S, start=2, key_mask=torch.ones(B, 1, 1, S, dtype=torch.bool))),
     r"key_mask must be bool \(B, 1, 1, L\)=\(2, 1, 1, 4\), got torch.bool \(2, 1, 1, 6\)"),
    (lambda q, k, v, m: (q, k, v, DecodeMeta(span=S, key_mask=torch.ones(B, 1, 1, S - 1, dtype=torch.bool))),
     r"key_mask must be bool"),
    (lambda q, k, v, m: (q, k, v, DecodeMeta(span=S, seqused=torch.ones(B, dtype=torch.int64), cu_q=None,
                                             cu_k=None)), r"seqused must be int32"),
    (lambda q, k, v, m: (q, k.transpose(1, 2).contiguous().transpose(1, 2), v,
                         DecodeMeta(span=S, seqused=torch.ones(B, dtype=torch.int32))), r"must be contiguous"),
])
def test_decode_attention_rejects_bad_inputs(change, message: str) -> None:
    q, k, v = _cache()
    args = change(q, k, v, DecodeMeta(span=S))
    with pytest.raises(ValueError, match=message):
        decode_attention(*args, "sdpa")


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """One query (H, D) against the keys `keys` of one sequence's cache (S, H_kv, D), float64: (H, D)."""
    out = []
    for h in range(q.shape[0]):
        kh, vh = k[keys, h // (H // H_KV)].double(), v[keys, h // (H // H_KV)].double()  # (n, D)
        out.append(torch.softmax(kh @ q[h].double() / D**0.5, dim=0) @ vh)
    return torch.stack(out)  # (H, D)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_windowed_decode_reads_only_the_last_window_keys(impl: str, window: int) -> None:
    """Keys start .. span - 1 with a window mask: sequence b (L keys) sees exactly max(0, L - W) .. L - 1."""
    q, k, v = _cache()
    lengths, start = [3, 6], max(0, 3 - window)
    pos = torch.arange(start, S).view(1, -1)  # (1, L)
    n = torch.tensor(lengths).view(B, 1)
    mask = ((pos < n) & (pos >= n - window)).view(B, 1, 1, S - start)
    out = decode_attention(q, k, v, DecodeMeta(span=S, start=start, key_mask=mask), impl)  # (B, H, D)
    for b, n_b in enumerate(lengths):
        ref = _dense(q[b], k[b], v[b], list(range(max(0, n_b - window), n_b)))
        torch.testing.assert_close(out[b].double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "eager", "kvscope"])
@pytest.mark.parametrize("window", [1, 3, 5])
def test_windowed_prefill_sees_exactly_window_keys(impl: str, window: int) -> None:
    """Query i of a prompt sees keys i - W + 1 .. i (transformers' `kv_idx > q_idx - sliding_window`)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, S, D, generator=g)  # (B, H, S, D)
    k, v = torch.randn(2, B, H_KV, S, D, generator=g)  # (B, H_kv, S, D) each
    mask = prefill_mask(S, window, q.device)
    assert mask.tolist() == [[i - window < j <= i for j in range(S)] for i in range(S)]
    out = prefill_attention(q, k, v, impl, mask)  # (B, H, S, D)
    for b in range(B):
        for i in range(S):
            ref = _dense(q[b, :, i], k[b].transpose(0, 1), v[b].transpose(0, 1), list(range(max(0, i - window + 1),
                                                                                            i + 1)))
            torch.testing.assert_close(out[b, :, i].double(), ref, rtol=1e-5, atol=1e-6)


def test_prefill_mask_is_none_where_the_window_covers_the_prompt() -> None:
    assert prefill_mask(S, None, torch.device("cpu")) is None
    assert prefill_mask(S, S, torch.device("cpu")) is None
    assert prefill_mask(S, 4096, torch.device("cpu")) is None
    with pytest.raises(ValueError, match=r"prefill_mask: window 0 must be >= 1"):
        prefill_mask(S, 0, torch.device("cpu"))
    q, k = torch.randn(1, H, S, D), torch.randn(1, H_KV, S, D)
    with pytest.raises(ValueError, match=r"mask must be bool \(6, 6\), got torch.bool \(5, 5\)"):
        prefill_attention(q, k, k, "sdpa", torch.ones(5, 5, dtype=torch.bool))


def test_unknown_attention_implementation() -> None:
    q, k, v = _cache()
    with pytest.raises(ValueError, match="unknown attention implementation"):
        decode_attention(q, k, v, DecodeMeta(span=S), "flashy")


def test_linear_residual_adds_in_place_and_checks_shapes() -> None:
    lin = torch.nn.Linear(8, 4, bias=True)
    h, x = torch.randn(3, 4), torch.randn(3, 8)
    expect = h + lin(x)
    out = linear_residual_(h, x, lin)
    assert out is h
    torch.testing.assert_close(h, expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"h\(3, 4\) \+= x\(3, 7\)"):
        linear_residual_(h, torch.randn(3, 7), lin)
