import pytest
import torch

from keye_dsa import indexer_scores, select_topk
from keye_dsa.ops.indexer_topk import triton_kernel
from keye_dsa.ops.indexer_topk.reference import indexer_scores_reference, sample_thresholds_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, t, s, h, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g, dtype=dtype).to(DEVICE)
    k = torch.randn(b, s, d, generator=g, dtype=dtype).to(DEVICE)
    w = torch.randn(b, t, h, generator=g, dtype=dtype).to(DEVICE)
    return q, k, w


def _selected_values(scores, idx):
    """Sorted scores of the selected keys (-inf for empty slots): equal for any exact top-k."""
    vals = torch.gather(scores, 2, idx.long().clamp_min(0))
    return torch.where(idx >= 0, vals, float("-inf")).sort(-1).values


def _assert_exact_topk(q, k, w, idx, topk, key_start=None):
    scores = indexer_scores_reference(q, k, w, key_start=key_start)
    want = scores.topk(min(topk, scores.shape[-1]), dim=-1).values
    want = torch.nn.functional.pad(want, (0, topk - want.shape[-1]), value=float("-inf")).sort(-1).values
    got = _selected_values(scores, idx)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0), atol=1e-5, rtol=1e-5)
    valid = idx[idx >= 0]
    assert valid.numel() == int(torch.isfinite(want).sum())
    srt = idx.sort(-1).values
    assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(), "a key selected twice"


def test_scores_match_the_formula():
    q, k, w = _inputs(1, 4, 6, 3, 8, torch.float64, seed=0)
    got = indexer_scores(q, k, w)
    for t in range(4):
        for s in range(6):
            want = sum(w[0, t, j] * torch.relu(q[0, t, j] @ k[0, s]) for j in range(3)) * 8**-0.5
            want = want if s <= t + 2 else float("-inf")  # 4 queries are the last 4 of 6 keys
            assert torch.allclose(got[0, t, s], torch.as_tensor(want, dtype=torch.float64))
    assert torch.isfinite(indexer_scores(q, k, w, causal=False)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("b", "t", "s", "h", "d", "topk"), [(2, 29, 29, 4, 16, 8), (1, 20, 45, 3, 24, 5), (1, 40, 40, 2, 16, 39)]
)
def test_kernel_selects_the_exact_topk(force_impl, monkeypatch, b, t, s, h, d, topk, dtype):
    monkeypatch.setattr(triton_kernel, "SCORE_BYTES_PER_CHUNK", 4 * 16 * s)  # several query chunks
    cand_row = 8 * triton_kernel.CANDIDATES_PER_TOPK * topk
    monkeypatch.setattr(triton_kernel, "CANDIDATE_BYTES_PER_CHUNK", b * 16 * cand_row)
    monkeypatch.setattr(triton_kernel, "CANDIDATE_MIN_ROWS", 16 if t > 30 else 10**6)  # both paths
    q, k, w = _inputs(b, t, s, h, d, dtype, seed=t * s)
    force_impl("triton")
    got = select_topk(q, k, w, topk)
    assert got.dtype == torch.int32 and got.shape == (b, t, topk)
    _assert_exact_topk(q, k, w, got, topk)
    force_impl("reference")
    ref = select_topk(q, k, w, topk)
    _assert_exact_topk(q, k, w, ref, topk)
    if dtype == torch.float32:  # same tie rule (lowest position first): the very same sets
        assert torch.equal(got.sort(-1).values, ref.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_candidate_buffers_hold_the_keys_at_or_above_the_threshold(dtype):
    """The candidate scoring kernel against the reference scores filtered by the same thresholds."""
    b, t, s, h, d, topk = 2, 21, 37, 3, 24, 3
    q, k, w = _inputs(b, t, s, h, d, dtype, seed=5)
    lo = torch.tensor([[0], [4]], dtype=torch.int32, device=DEVICE).expand(b, t).contiguous()
    hi = (torch.arange(t, dtype=torch.int32, device=DEVICE) + s - t)[None].expand(b, t).contiguous()
    ref = indexer_scores_reference(q, k, w, key_start=lo[:, 0])
    g = torch.Generator().manual_seed(1)
    # midway between a row's i-th and (i+1)-th largest reference scores: a threshold equal to a score
    # would make that key's fate hang on the last bit of the kernel's fp32 sum (exact zeros stay exact)
    ranked = ref.clamp_min(-1e30).sort(-1, descending=True).values
    i = torch.randint(0, 15, (b, t, 1), generator=g).to(DEVICE)
    thr = ((ranked.gather(2, i) + ranked.gather(2, i + 1)) / 2)[..., 0]
    thr[0, :3] = float("-inf")  # every visible key
    pairs, count, _ = triton_kernel.score_candidates(q, k, w, lo, hi, 0, s, thr.contiguous(), topk)
    cs, cp = pairs[..., 0].view(torch.float32), pairs[..., 1]
    cap = cs.shape[-1]
    for bi in range(b):
        for ti in range(t):
            keep = (ref[bi, ti] >= thr[bi, ti]) & torch.isfinite(ref[bi, ti])
            pos = keep.nonzero()[:, 0]
            n = int(count[bi, ti])
            assert n == pos.numel(), (bi, ti)
            m = min(n, cap)
            assert torch.equal(cp[bi, ti, :m].long(), pos[:m])  # key order
            torch.testing.assert_close(cs[bi, ti, :m], ref[bi, ti, pos[:m]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("b", "t", "s", "k0", "topk"), [(2, 21, 37, 0, 12), (1, 40, 300, 5, 8), (2, 30, 60, 0, 20)]
)
def test_sampled_thresholds_equal_the_reference(b, t, s, k0, topk):
    """The sample scoring and threshold-search kernels against the same estimate from PyTorch ops:
    ragged windows (a left edge per row), rows that see few keys (threshold -inf), and a key offset."""
    q, k, w = _inputs(b, t, s, 3, 24, torch.float32, seed=s)
    width = s - k0
    hi = (torch.arange(t, dtype=torch.int32, device=DEVICE) + width - t)[None].expand(b, t).contiguous()
    lo = torch.zeros(b, t, dtype=torch.int32, device=DEVICE)
    lo[-1] = 3  # the last row hides its first keys (left padding)
    got = triton_kernel.sample_thresholds(q, k, w, lo, hi, k0, width, topk)
    rank = max(1, int(triton_kernel.CANDIDATE_FACTOR * topk))
    want = sample_thresholds_reference(q, k, w, lo, hi, k0, width, 16, rank)
    assert torch.isfinite(want).any()
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["sampled", "exact zeros", "tiny buffer", "too few"])
def test_candidate_path_and_its_fallbacks(force_impl, monkeypatch, case):
    """Rows the sampled threshold misjudges are flagged and redone on the full path: still exact."""
    force_impl("triton")
    monkeypatch.setattr(triton_kernel, "CANDIDATE_MIN_ROWS", 1)
    if case == "tiny buffer":
        monkeypatch.setattr(triton_kernel, "CANDIDATES_PER_TOPK", 1)
    if case == "too few":
        monkeypatch.setattr(triton_kernel, "CANDIDATE_FACTOR", 0.5)
    flagged = []
    settle = triton_kernel.settle_fallbacks

    def spy(*args):
        flagged.append(int(args[-1].sum()))
        return settle(*args)

    monkeypatch.setattr(triton_kernel, "settle_fallbacks", spy)
    q, k, w = _inputs(1, 60, 60, 4, 16, torch.float32, seed=0)
    if case == "exact zeros":  # negative gates: most scores are exactly 0, more ties than the buffer
        w = -w.abs()
    idx = select_topk(q, k, w, 5)
    _assert_exact_topk(q, k, w, idx, 5)
    force_impl("reference")
    assert torch.equal(idx.sort(-1).values, select_topk(q, k, w, 5).sort(-1).values)
    assert len(flagged) == 1
    if case == "sampled":
        assert flagged[0] < 60 // 2  # most rows settled by the candidates
    else:
        assert flagged[0] > 0


def test_a_buffer_full_of_ties_settles_without_the_full_path(force_impl, monkeypatch):
    """All scores equal: far more candidates than the buffer holds, all tied with the k-th largest.
    Those that did not fit come later in key order, so the buffer alone decides: no row is redone."""
    force_impl("triton")
    monkeypatch.setattr(triton_kernel, "CANDIDATE_MIN_ROWS", 1)
    flagged = []
    settle = triton_kernel.settle_fallbacks
    monkeypatch.setattr(
        triton_kernel, "settle_fallbacks", lambda *a: flagged.append(int(a[-1].sum())) or settle(*a)
    )
    q, k, w = _inputs(1, 70, 70, 4, 16, torch.float32, seed=4)
    idx = select_topk(q, torch.zeros_like(k), w, 5)  # every score is exactly 0
    assert flagged == [0]
    want = torch.arange(5, device=DEVICE).expand(70, 5).clone()
    want[:4] = torch.where(want[:4] <= torch.arange(4, device=DEVICE)[:, None], want[:4], -1)
    assert torch.equal(idx[0].long(), want)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_ties_are_resolved_exactly(force_impl, impl):
    """Negative gates make most scores exactly 0 after ReLU: many ties at the threshold."""
    force_impl(impl)
    q, k, w = _inputs(1, 30, 30, 2, 16, torch.float32, seed=2)
    w = -w.abs()
    idx = select_topk(q, k, w, 6)
    _assert_exact_topk(q, k, w, idx, 6)
    scores = indexer_scores_reference(q, k, w)
    kth = _selected_values(scores, idx)[..., 0]  # the threshold of each row
    pos = torch.arange(30, device=DEVICE)
    tied = (scores == kth[..., None]) & (pos <= torch.arange(30, device=DEVICE)[:, None])
    chosen = torch.zeros_like(tied).scatter_(2, idx.long().clamp_min(0), idx >= 0)
    # among ties at the threshold, the lowest positions are kept
    for t in range(6, 30):
        ties = pos[tied[0, t]]
        kept = ties[chosen[0, t, ties]]
        assert torch.equal(kept, ties[: kept.numel()])


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_packed_matches_per_sequence(force_impl, impl):
    force_impl(impl)
    lengths = [12, 3, 20]
    cu = torch.tensor([0, 12, 15, 35], dtype=torch.int32, device=DEVICE)
    q, k, w = _inputs(1, 35, 35, 4, 16, torch.float32, seed=9)
    got = select_topk(q[0], k[0], w[0], 5, cu_seqlens=cu)
    for a, n in zip(cu[:-1].tolist(), lengths):
        part = got[None, a : a + n]
        _assert_exact_topk(q[:, a : a + n], k[:, a : a + n], w[:, a : a + n], part, 5)


def test_short_sequences_skip_scoring(force_impl, monkeypatch):
    force_impl("triton")
    monkeypatch.setattr(triton_kernel, "topk_chunk", None)  # scoring would crash
    q, k, w = _inputs(2, 6, 6, 4, 16, torch.float32, seed=1)
    idx = select_topk(q, k, w, 8)
    pos = torch.arange(8, device=DEVICE)
    want = torch.where(pos[None, :] <= torch.arange(6, device=DEVICE)[:, None], pos[None, :], -1)
    assert torch.equal(idx, want[None].expand(2, 6, 8).to(torch.int32))


def test_clear_errors():
    q, k, w = _inputs(1, 4, 6, 3, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="topk must be a positive int"):
        select_topk(q, k, w, 0)
    with pytest.raises(ValueError, match="q_index must have rank 4"):
        select_topk(q[0], k, w, 2)
    with pytest.raises(ValueError, match="index_dim"):
        select_topk(q, k[..., :4], w, 2)
    with pytest.raises(ValueError, match="weights.shape"):
        select_topk(q, k, w[..., :2], 2)
    with pytest.raises(ValueError, match="at least as many keys"):
        select_topk(q, k[:, :2], w, 2)
    with pytest.raises(TypeError, match="weights must be a floating tensor"):
        select_topk(q, k, w.long(), 2)
