"""Kernel-boundary checks of the attention switch and the fused residual product: bad shapes, dtypes and strides
raise ValueError naming the shapes; the masked decode path equals a dense reference."""

from __future__ import annotations

import pytest
import torch

from kvscope.model.attention import DecodeMeta, decode_attention
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
    (lambda q, k, v, m: (q, k, v, DecodeMeta(span=S + 1)), r"span 7 outside"),
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
