"""The built-in sdpa backend against attention written out in plain math, in every mode it serves."""

import math

import pytest
import torch

from keye_moe.attention.sdpa import SdpaAttention, causal_mask
from keye_moe.hookspecs import AttentionBackend, AttentionInputs


def naive_attention(q, k, v, mask):
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def _inputs(b, t, **kw):
    return AttentionInputs(
        hidden_states=torch.zeros(b, t, 8), position_ids=torch.zeros(b, t), scale=16**-0.5, **kw
    )


def _qkv(b, tq, tk, hq=6, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, tq, hq, d, generator=g, dtype=torch.float64),
        torch.randn(b, tk, hkv, d, generator=g, dtype=torch.float64),
        torch.randn(b, tk, hkv, d, generator=g, dtype=torch.float64),
    )


def test_satisfies_protocol():
    assert isinstance(SdpaAttention(None), AttentionBackend)
    assert SdpaAttention(None).make_layer_module(0) is None


@pytest.mark.parametrize("tq,tk", [(7, 7), (1, 9), (3, 11)])
def test_causal_with_cache_prefix(tq, tk):
    q, k, v = _qkv(2, tq, tk)
    out = SdpaAttention().attention(q, k, v, _inputs(2, tq), None)
    mask = causal_mask(tq, tk, None, q.device)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask), rtol=1e-10, atol=1e-10)


def test_left_padding_matches_unpadded_rows():
    q, k, v = _qkv(2, 6, 6, seed=1)
    pad = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    out = SdpaAttention().attention(q, k, v, _inputs(2, 6, key_padding_mask=pad), None)
    alone = SdpaAttention().attention(q[:1, 2:], k[:1, 2:], v[:1, 2:], _inputs(1, 4), None)
    torch.testing.assert_close(out[:1, 2:], alone, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()


def test_packed_sequences_never_attend_across():
    q, k, v = _qkv(1, 9, 9, seed=2)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    out = SdpaAttention().attention(q, k, v, _inputs(1, 9, cu_seqlens=cu), None)
    for s, e in [(0, 4), (4, 9)]:
        alone = SdpaAttention().attention(q[:, s:e], k[:, s:e], v[:, s:e], _inputs(1, e - s), None)
        torch.testing.assert_close(out[:, s:e], alone, rtol=1e-10, atol=1e-10)


def test_gradients_flow_like_the_naive_form():
    q, k, v = (x.requires_grad_() for x in _qkv(1, 5, 5, seed=3))
    SdpaAttention().attention(q, k, v, _inputs(1, 5), None).square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    naive_attention(q, k, v, causal_mask(5, 5, None, q.device)).square().sum().backward()
    for got, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, x.grad, rtol=1e-9, atol=1e-9)


def test_clear_errors():
    q, k, v = _qkv(1, 4, 4, hq=5, hkv=2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        SdpaAttention().attention(q, k, v, _inputs(1, 4), None)
    q, k, v = _qkv(1, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens ends at 3"):
        SdpaAttention().attention(
            q, k, v, _inputs(1, 4, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), None
        )
