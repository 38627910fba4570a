"""``select_topk_decode``: the static-cache decode path equals ``select_topk`` on the filled part."""

import pytest
import torch

from keye_dsa import DSACache, DSAttention, select_topk, select_topk_decode, sparse_attention
from keye_dsa.ops.indexer_topk import decode_kernel
from keye_dsa.ops.indexer_topk.decode import dequantize_index_keys, quantize_index_keys
from keye_dsa.ops.indexer_topk.decode_kernel import decode_topk
from keye_dsa.ops.indexer_topk.reference import select_topk_reference
from keye_dsa.ops.sparse_attention import triton_kernel as sparse_kernel
from keye_dsa.ops.sparse_attention.reference import sparse_attention_reference
from keye_dsa.testing import rel_err

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


def _decode_kernels(q, k, w, topk, lengths, start=None):
    """The decode kernels themselves (what ``select_topk_decode`` runs on CUDA for every key dtype)."""
    start = None if start is None else start.to(torch.int32)
    return decode_topk(q, k, w, lengths.to(torch.int32), start, topk)


def _reference_sets(q, k, w, topk, lengths, start):
    """Row by row ``select_topk_reference`` on the filled part, sorted (positions form a set)."""
    rows = []
    for b, n in enumerate(lengths.tolist()):
        s = None if start is None else start[b : b + 1]
        rows.append(select_topk_reference(q[b : b + 1], k[b : b + 1, :n], w[b : b + 1], topk, key_start=s))
    return torch.cat(rows).sort(-1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 2])
def test_decode_kernel_equals_the_reference_on_odd_shapes(force_impl, dtype, t):
    """Several key segments, compaction blocks and select steps per row; lengths off every tile size,
    left padding, one row under top-k and one with no visible key past its start."""
    force_impl("triton")
    q, k, w = _cache(5, t, 211, 3, 24, seed=11 + t, dtype=dtype)
    lengths = torch.tensor([211, 150, 97, 40, 60], dtype=torch.int32, device=DEVICE)
    start = torch.tensor([0, 7, 0, 19, 60 - t], dtype=torch.int32, device=DEVICE)
    want = _reference_sets(q, k, w, 37, lengths, start)
    assert torch.equal(_decode_kernels(q, k, w, 37, lengths, start).sort(-1).values, want)
    assert torch.equal(select_topk_decode(q, k, w, 37, lengths, key_start=start).sort(-1).values, want)


@pytest.mark.parametrize(
    "case", ["30 copies of each key", "10 copies of each key", "distinct keys", "negative gates"]
)
def test_decode_kernel_takes_the_lowest_positions_among_tied_scores(force_impl, case):
    """Repeated keys tie exactly, and so do the zeros of a row whose gates are all negative (its top-k
    is every key scoring exactly 0): the top-k boundary falls inside a tie group, and the candidates are
    unordered, so the kernel searches the position cut-off (30 ties: radix path) or ranks the few
    candidates by score, then position (10 ties: at most the interpreter's ``PAIR`` of 16)."""
    force_impl("triton")
    q, k, w = _cache(2, 1, 150, 2, 16, seed=21)
    w = -w.abs() if case == "negative gates" else w.abs()
    if "copies" in case:
        k = k[:, torch.arange(150) % (150 // int(case.split()[0]))]
    lengths = torch.tensor([150, 133], dtype=torch.int32, device=DEVICE)
    want = _reference_sets(q, k, w, 23, lengths, None)
    assert torch.equal(_decode_kernels(q, k, w, 23, lengths).sort(-1).values, want)
    assert torch.equal(select_topk_decode(q, k, w, 23, lengths).sort(-1).values, want)


def test_decode_kernel_on_scores_within_one_octave(force_impl):
    """Positive scores spread over a few percent: the level-1 threshold bin holds nearly every key, so
    the output comes from the level-2 split and the exact radix over its threshold bin."""
    force_impl("triton")
    q, k, w = _cache(2, 1, 1500, 2, 16, seed=51)
    k = 3.0 + 0.02 * k
    q, w = q.abs() + 1.0, w.abs() + 1.0
    lengths = torch.tensor([1500, 1203], dtype=torch.int32, device=DEVICE)
    got = _decode_kernels(q, k, w, 301, lengths)
    assert torch.equal(got.sort(-1).values, _reference_sets(q, k, w, 301, lengths, None))


@pytest.mark.parametrize("case", ["few level-2 candidates", "thousands tied at 0", "one narrow octave"])
def test_decode_select_at_the_gpu_block_sizes(force_impl, monkeypatch, case):
    """The select launches with the GPU's block sizes (thousands of scores or candidates per program) on
    the interpreter: several programs per row append to its buffers, and the select takes the radix path,
    the one-value path or the tie cut-off. (The interpreter's small blocks split the select's candidates
    over several programs; these cover its paths at the real sizes.)"""
    force_impl("triton")
    dk = decode_kernel
    monkeypatch.setattr(dk, "INTERPRETER_LAUNCHES", (dk.COMPACT_LAUNCH, dk.REFINE_LAUNCH, dk.SELECT_LAUNCH))
    q, k, w = _cache(3, 1, 6000, 2, 16, seed=61)
    if case == "thousands tied at 0":
        w = -w.abs()
    elif case == "one narrow octave":
        k, q, w = 3.0 + 0.02 * k, q.abs() + 1.0, w.abs() + 1.0
    lengths = torch.tensor([6000, 5000, 4100], dtype=torch.int32, device=DEVICE)
    start = torch.tensor([0, 100, 4095], dtype=torch.int32, device=DEVICE)
    got = _decode_kernels(q, k, w, 700, lengths, start)
    assert torch.equal(got.sort(-1).values, _reference_sets(q, k, w, 700, lengths, start))


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_fp8_cache_selects_the_reference_top_k_of_the_dequantized_keys(force_impl, impl):
    force_impl(impl)
    q, k, w = _cache(3, 1, 173, 4, 32, seed=31, dtype=torch.bfloat16)
    k8, scale = quantize_index_keys(k)
    assert k8.dtype == torch.float8_e4m3fn and scale.shape == (3, 173)
    lengths = torch.tensor([173, 90, 131], dtype=torch.int32, device=DEVICE)
    start = torch.tensor([0, 3, 11], dtype=torch.int32, device=DEVICE)
    got = select_topk_decode(q, k8, w, 29, lengths, key_start=start, k_scale=scale)
    want = _reference_sets(q, dequantize_index_keys(k8, scale), w, 29, lengths, start)
    assert torch.equal(got.sort(-1).values, want)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_fp8_index_cache_selects_on_the_dequantized_keys(force_impl, impl):
    """``DSACache(index_dtype=fp8)``: a prefill chunk longer than ``DECODE_ROWS`` (scored dequantized)
    and decode steps (the decode kernels on the FP8 keys) all select the reference top-k of the
    dequantized cache."""
    force_impl(impl)
    torch.manual_seed(0)
    attn = DSAttention(48, 8, 2, 16, index_heads=2, index_head_dim=16, topk=6).eval().to(DEVICE)
    x = torch.randn(2, 21, 48).to(DEVICE)
    seen = []
    select = attn.sa_indexer.select

    def spy(q, k, w, **kw):
        seen.append((q, k, w, kw["k_scale"], select(q, k, w, **kw)))
        return seen[-1][-1]

    attn.sa_indexer.select = spy
    cache = DSACache(index_dtype=torch.float8_e4m3fn)
    for a, b in ((0, 18), (18, 19), (19, 21)):
        attn(x[:, a:b], cache=cache)
    state = cache.layer(0)
    assert state["k_index"].dtype == torch.float8_e4m3fn and state["k_index_scale"].shape == (2, 21)
    _, ki, _ = attn.sa_indexer(x, torch.arange(21, device=DEVICE)[None].expand(2, 21))
    err = (dequantize_index_keys(state["k_index"], state["k_index_scale"]) - ki).abs()
    assert bool((err <= ki.abs() * 2**-4 + 1e-3).all())
    for q, k, w, scale, got in seen:
        want = select_topk_reference(q, dequantize_index_keys(k, scale), w, 6)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    with pytest.raises(ValueError, match="index_dtype must be None or torch.float8_e4m3fn"):
        DSACache(index_dtype=torch.float16)


def test_fp8_keys_round_trip_within_e4m3_precision():
    k = torch.randn(4, 9, 128, generator=torch.Generator().manual_seed(0))
    k8, scale = quantize_index_keys(k)
    err = (dequantize_index_keys(k8, scale) - k).abs()
    # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal spacing 2^-9 in units of the scale
    assert bool((err <= k.abs() * 2**-4 + scale[..., None] * 2**-10).all())
    assert bool((k8.float().abs().amax(-1) == 448).all())  # each key's largest entry maps to e4m3's max


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_decode_merges_many_partials(force_impl, monkeypatch, dtype):
    """19 slot splits per token (more than one merge step of 16), -1 slots, a token without any key."""
    force_impl("triton")
    monkeypatch.setattr(sparse_kernel, "MIN_PROGRAMS", 10**6)
    monkeypatch.setitem(sparse_kernel.SPLIT_LAUNCH, "BLOCK_N", 16)
    g = torch.Generator().manual_seed(41)
    q = torch.randn(2, 1, 8, 16, generator=g, dtype=dtype).to(DEVICE)
    k, v = torch.randn(2, 2, 400, 2, 16, generator=g, dtype=dtype).to(DEVICE)
    idx = torch.randint(-1, 400, (2, 1, 300), generator=g, dtype=torch.int32).to(DEVICE)
    idx[1, 0] = -1
    o, lse = sparse_attention(q, k, v, idx, return_lse=True)
    o_ref, lse_ref = sparse_attention_reference(q, k, v, idx, 16**-0.5)
    assert rel_err(o, o_ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_err(lse[0], lse_ref[0]) < 1e-5 and bool(torch.isneginf(lse[1]).all()) and not o[1].any()


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
    with pytest.raises(TypeError, match="k_cache must be torch.float8_e4m3fn when k_scale is given"):
        select_topk_decode(q, k, w, 4, torch.tensor([20, 5]), k_scale=torch.ones(2, 20))
    k8, scale = quantize_index_keys(k)
    with pytest.raises(ValueError, match=r"k_scale.shape \(\(2, 19\)\) must equal k_cache.shape\[:2\]"):
        select_topk_decode(q, k8, w, 4, torch.tensor([20, 5]), k_scale=scale[:, :19])


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


@pytest.mark.parametrize("capacity", [80, 83])  # a multiple of the interpreter's key tile, or not
@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e25])
def test_fp8_scores_of_the_scaled_fp16_mma_equal_the_bf16_mma_bit_for_bit(force_impl, monkeypatch, capacity,
                                                                          magnitude):  # fmt: skip
    """FP8 keys against a bf16 query score by an fp16 MMA on the query times a power of two; the scores
    equal the bf16 MMA's on the widened keys bit for bit, for queries whose elements span 2**30 and sit
    near bf16's smallest normals or its largest values (a wrong shift overflows or flushes them)."""
    force_impl("triton")
    q, k, w = _cache(2, 1, capacity, 3, 32, seed=capacity, dtype=torch.bfloat16)
    span = 2.0 ** torch.randint(-10, 21, q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    q = (q.float() * span * magnitude).to(torch.bfloat16)
    k8, scale = quantize_index_keys(k)
    lengths = torch.tensor([capacity, capacity - 20], dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(decode_kernel, "HALF_MMA", False)
    want = decode_kernel.decode_scores(q, k8, w, lengths, None, scale)[0]
    monkeypatch.setattr(decode_kernel, "HALF_MMA", True)
    got = decode_kernel.decode_scores(q, k8, w, lengths, None, scale)[0]
    for r, n in enumerate(lengths.tolist()):
        assert torch.isfinite(want[r, :n]).all()
        assert torch.equal(got[r, :n], want[r, :n]), f"row {r}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cap", [6000, 6016])  # a multiple of the key tile (unmasked loads), or not
def test_a_captured_fp8_decode_step_equals_the_bf16_mma(monkeypatch, cap):
    """The scaled fp16 MMA changes no bit of a decode step: scores, index sets and the attention output
    equal those of the bf16 MMA on keys widened to bf16, eager or replayed from a CUDA graph. (The
    top-k's slot order comes from atomics, so the sets are compared sorted and attention reads them
    sorted.)"""
    b, hq, hkv, d = 3, 16, 2, 64
    q_i, ki, w = _cache(b, 1, cap, 4, 128, seed=9, dtype=torch.bfloat16)
    k8, scale = quantize_index_keys(ki)
    lengths = torch.tensor([5999, 3001, 4500], dtype=torch.int32, device=DEVICE)
    q = torch.randn(b, 1, hq, d, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(b, cap, hkv, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))

    def step():
        scores = decode_kernel.decode_scores(q_i, k8, w, lengths, None, scale)[0]
        idx = select_topk_decode(q_i, k8, w, 2048, lengths, k_scale=scale, validate=False).sort(-1).values
        return scores, idx, sparse_attention(q, k, v, idx, validate_indices=False)

    monkeypatch.setattr(decode_kernel, "HALF_MMA", False)
    scores0, idx0, out0 = step()
    monkeypatch.setattr(decode_kernel, "HALF_MMA", True)
    eager = step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    for scores, idx, out in (eager, captured):
        for r, n in enumerate(lengths.tolist()):
            assert torch.equal(scores[r, :n], scores0[r, :n])
        assert torch.equal(idx, idx0)
        assert torch.equal(out, out0)
