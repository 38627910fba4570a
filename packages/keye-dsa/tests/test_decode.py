"""``select_topk_decode``: the static-cache decode path equals ``select_topk`` on the filled part."""

import pytest
import torch

from keye_dsa import select_topk, select_topk_decode, sparse_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(b, t, cap, h, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g, dtype=dtype).to(DEVICE)
    k = torch.randn(b, cap, d, generator=g, dtype=dtype).to(DEVICE)
    w = torch.randn(b, t, h, generator=g, dtype=dtype).to(DEVICE)
    return q, k, w


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("t", [1, 3])
def test_matches_select_topk_on_the_filled_part(force_impl, impl, t):
    force_impl(impl)
    q, k, w = _cache(4, t, 53, 4, 16, seed=t)
    lengths = torch.tensor([53, 30, 9, 12], dtype=torch.int32, device=DEVICE)  # 9 and 12: all visible
    start = torch.tensor([0, 4, 2, 0], dtype=torch.int32, device=DEVICE)
    got = select_topk_decode(q, k, w, 10, lengths, key_start=start)
    assert got.shape == (4, t, 10) and got.dtype == torch.int32
    for b, n in enumerate(lengths.tolist()):
        want = select_topk(q[b : b + 1], k[b : b + 1, :n], w[b : b + 1], 10, key_start=start[b : b + 1])
        assert torch.equal(got[b : b + 1].sort(-1).values, want.sort(-1).values), f"row {b}"


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_capacity_within_topk_lists_every_visible_key(force_impl, impl):
    force_impl(impl)
    q, k, w = _cache(2, 1, 6, 2, 16, seed=1)
    got = select_topk_decode(q, k, w, 8, torch.tensor([6, 3], device=DEVICE))
    want = torch.tensor([[0, 1, 2, 3, 4, 5, -1, -1], [0, 1, 2, -1, -1, -1, -1, -1]], dtype=torch.int32)
    assert torch.equal(got[:, 0].cpu(), want)


def test_a_decode_step_on_the_static_cache_equals_attention_on_the_filled_part(force_impl):
    force_impl("triton")
    cap, b, hq, hkv, d = 70, 2, 8, 2, 16
    q, ki, w = _cache(b, 1, cap, 4, 16, seed=3)
    g = torch.Generator().manual_seed(4)
    qa = torch.randn(b, 1, hq, d, generator=g).to(DEVICE)
    kv = torch.randn(2, b, cap, hkv, d, generator=g).to(DEVICE)
    lengths = torch.tensor([70, 41], dtype=torch.int32, device=DEVICE)
    idx = select_topk_decode(q, ki, w, 16, lengths)
    out = sparse_attention(qa, kv[0], kv[1], idx, validate_indices=False)
    for r, n in enumerate(lengths.tolist()):
        sel = select_topk(q[r : r + 1], ki[r : r + 1, :n], w[r : r + 1], 16)
        want = sparse_attention(qa[r : r + 1], kv[0, r : r + 1, :n], kv[1, r : r + 1, :n], sel)
        torch.testing.assert_close(out[r : r + 1], want, rtol=1e-5, atol=1e-5)


def test_clear_errors():
    q, k, w = _cache(2, 1, 20, 2, 16, seed=0)
    with pytest.raises(ValueError, match="lengths must have rank 1"):
        select_topk_decode(q, k, w, 4, torch.tensor([[20, 20]]))
    with pytest.raises(ValueError, match=r"lengths.shape\[0\] \(3\) must equal batch \(2\)"):
        select_topk_decode(q, k, w, 4, torch.tensor([20, 20, 20]))
    with pytest.raises(TypeError, match="lengths must be int32 or int64"):
        select_topk_decode(q, k, w, 4, torch.tensor([20.0, 20.0]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 20\]"):
        select_topk_decode(q, k, w, 4, torch.tensor([21, 5]))
    with pytest.raises(ValueError, match="topk must be a positive int"):
        select_topk_decode(q, k, w, 0, torch.tensor([20, 5]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_captured_decode_step_replays_for_new_lengths():
    cap, b = 4096, 3
    q, ki, w = _cache(b, 1, cap, 4, 128, seed=5, dtype=torch.bfloat16)
    lengths = torch.tensor([3000, 2100, 4000], dtype=torch.int32, device=DEVICE)
    select_topk_decode(q, ki, w, 2048, lengths)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx = select_topk_decode(q, ki, w, 2048, lengths, validate=False)
    for new in ([3001, 2101, 4000], [2500, 4096, 2049]):
        lengths.copy_(torch.tensor(new))
        graph.replay()
        want = select_topk_decode(q, ki, w, 2048, lengths)
        assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
