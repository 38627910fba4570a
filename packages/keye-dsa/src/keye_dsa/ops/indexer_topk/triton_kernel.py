"""Triton Lightning-Indexer scoring and exact top-k, chunked over queries (DESIGN §4).

No ``L x L`` score matrix ever exists. Prefill chunks (the candidate path) never write their scores:

1. ``_sample_keys`` scores each block of queries against ``SAMPLE`` keys spread evenly over the chunk's
   key window and writes the leading 16 bits of each score's order-preserving key; ``_sample_threshold``
   then takes, per query, the sampled key that ranks at ``CANDIDATE_FACTOR * topk`` among its visible
   keys (scaled from the sample; a bitwise search): an estimate of a threshold that a little more than
   ``topk`` keys pass. (One kernel doing both held 255 registers and ran the search after the scoring
   in each program: 2-2.6x slower on the H100, BENCHMARKS.md.)
2. ``_candidate_scores``: one program per block of queries loads its queries once and loops over all
   its key tiles (a tensor-core dot per head, ReLU, the per-head gate, the sum over heads; tiles past
   the causal edge skipped) and appends the (score, position) pairs at or above each query's
   threshold, in key order, to the query's candidate buffer of ``CANDIDATES_PER_TOPK * topk`` entries
   (the pairs past the buffer are counted, and the largest of their scores kept).
3. ``_select_candidates``: one program per query finds the exact k-th largest candidate by a bitwise
   search over the keys in registers and writes the keys above it and, in key order, as many ties as
   still fit.

Exactness: a row is settled when it has at least ``min(topk, visible keys)`` candidates and no
candidate past its buffer beats the k-th largest in the buffer: then every key scoring above the k-th
largest is in the buffer, and the ties with it there precede, in key order, any that did not fit, so
ties are cut at the lowest positions exactly as on the full path. Other rows are flagged;
``settle_fallbacks`` reruns them on the full path (one host sync per ``select_topk`` call).

Full path (short chunks and the flagged rows; no host sync): ``_index_scores`` writes the
chunk's fp32 scores, one key tile per program, then an exact radix select over the order-preserving
uint32 image of the scores, 8 bits a pass. Each row is split into segments handled by separate
programs so a handful of long rows (decoding) still fills the GPU: ``_radix_hist`` (4 launches) adds
each segment's digit histogram into the row's with atomics; every program replays the finished passes
(``_replay``); ``_radix_count`` counts each segment's keys above and at the threshold, an exclusive
prefix sum gives each segment its output offsets, and ``_radix_write`` writes them.

Among equal scores (e.g. exact zeros after ReLU) the lowest key positions win, the rule of the
reference (a stable sort), so every path returns the same index sets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keye_dsa.ops._triton_utils import dot_flags, interpreting, mma, popcount

SCORE_BYTES_PER_CHUNK = 1 << 30  # full path: fp32 scores of one chunk
CANDIDATE_BYTES_PER_CHUNK = 1 << 30  # candidate path: (score, position) buffers of one chunk
CANDIDATE_MIN_ROWS = 512  # chunks with fewer rows take the full path
CANDIDATES_PER_TOPK = 4  # candidate buffer per row, in units of topk
CANDIDATE_FACTOR = 1.75  # the sampled threshold aims at this many times topk candidates: H100 sweep
SAMPLE = 2048  # keys sampled per chunk to place the thresholds
THRESHOLD_BITS = tl.constexpr(16)  # leading bits of the sampled thresholds that are searched
# The sample scoring kernel's launch (BLOCK_T queries x BLOCK_S samples a step, the samples split over
# SPLIT programs) and the threshold search's rows per program: H100 sweep, BENCHMARKS.md.
SAMPLE_LAUNCH = {"BLOCK_T": 64, "BLOCK_S": 64, "SPLIT": 4, "num_warps": 4, "num_stages": 2}
SAMPLE_SEARCH_ROWS = 2
SELECT_WARPS = 4  # warps of the exact select (one row, candidates in registers): H200 sweep, BENCHMARKS.md
# Launch settings of the candidate scoring kernel for 16-bit inputs (BLOCK_T queries x BLOCK_S keys a
# step), the fastest at 32K and 128K of the H200 sweeps in BENCHMARKS.md; 32-bit inputs take smaller tiles.
CANDIDATE_LAUNCH = {"BLOCK_T": 64, "BLOCK_S": 64, "num_warps": 4, "num_stages": 3}
CANDIDATE_LAUNCH_FP32 = {"BLOCK_T": 32, "BLOCK_S": 64, "num_warps": 4, "num_stages": 1}


@triton.jit
def _gated_scores(q, wr, kt, scale, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                  PER_HEAD: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """``[BLOCK_T, BLOCK_S]`` scores of a block of queries against the key tile ``kt [BLOCK_D, BLOCK_S]``.

    ``PER_HEAD``: ``q``/``wr`` are tuples of each head's queries and gates (``_head_queries``), one dot
    per head summed in place: the candidate kernel's way, 2x faster there than stacking on the H200.
    Otherwise ``q [BLOCK_T * BLOCK_H, BLOCK_D]`` stacks every head's rows (``_stacked_queries``) into one
    dot, for blocks of few queries (decoding, the sample), and the heads are summed after a reshape."""
    if PER_HEAD:
        acc = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
        for h in tl.static_range(BLOCK_H):
            acc += tl.maximum(mma(q[h], kt, PRECISE, UPCAST), 0.0) * wr[h][:, None]
    else:
        gated = tl.maximum(mma(q, kt, PRECISE, UPCAST), 0.0) * wr[:, None]
        acc = tl.sum(tl.reshape(gated, [BLOCK_T, BLOCK_H, BLOCK_S]), 1)
    return acc * scale


@triton.jit
def _stacked_queries(Q, W, pid_t, n_rows, sqt, sqh, swt, H, D,
                     BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """The block's queries as ``[BLOCK_T * BLOCK_H, BLOCK_D]`` rows (row ``t * BLOCK_H + h``) and
    their gates."""
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    rt = pid_t * BLOCK_T + r // BLOCK_H
    rh = r % BLOCK_H
    r_ok = (rt < n_rows) & (rh < H)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + rt[:, None].to(tl.int64) * sqt + rh[:, None] * sqh + d[None, :],
        mask=r_ok[:, None] & (d[None, :] < D),
        other=0.0,
    )
    wr = tl.load(W + rt.to(tl.int64) * swt + rh, mask=r_ok, other=0.0).to(tl.float32)
    return q, wr


@triton.jit
def _head_queries(Q, W, t, t_ok, sqt, sqh, swt, H, D,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Tuples of each head's ``[BLOCK_T, BLOCK_D]`` queries and ``[BLOCK_T]`` gates of queries ``t``,
    loaded once before the key loop (reloading them per key tile tripled the loads and shared memory)."""
    d = tl.arange(0, BLOCK_D)
    qs = ()
    ws = ()
    for h in tl.static_range(BLOCK_H):  # tuples grow by concatenation: Triton has no starred unpacking
        h_ok = t_ok & (h < H)
        qh = tl.load(Q + t[:, None].to(tl.int64) * sqt + h * sqh + d[None, :],
                     mask=h_ok[:, None] & (d[None, :] < D), other=0.0)  # fmt: skip
        qs = qs + (qh,)  # noqa: RUF005
        ws = ws + (tl.load(W + t.to(tl.int64) * swt + h, mask=h_ok, other=0.0).to(tl.float32),)  # noqa: RUF005
    return qs, ws


@triton.jit
def _key_tile(K, s, s_ok, sks, D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Keys ``s`` as a ``[BLOCK_D, len(s)]`` tile (zeros where not ``s_ok``). With ``EVEN_D``
    (``D == BLOCK_D``) the mask is constant along each key row, so the load vectorizes and the loop
    pipelines it (asynchronous copies); a per-element ``d < D`` mask kept both from happening."""
    d = tl.arange(0, BLOCK_D)
    ok = s_ok[None, :]
    if not EVEN_D:
        ok = ok & (d[:, None] < D)
    return tl.load(K + s[None, :].to(tl.int64) * sks + d[:, None], mask=ok, other=0.0)


@triton.jit
def _query_block(Q, K, W, LO, HI, sqb, skb, swb, n_rows, BLOCK_T: tl.constexpr):
    """This program's batch row ``b`` (its ``Q``/``K``/``W``) and block of queries ``t`` (``t_ok``: those
    that exist), with their visible key windows ``[lo, hi]`` (empty for the missing ones)."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n_rows
    hi = tl.load(HI + b * n_rows + t, mask=t_ok, other=-1)
    lo = tl.load(LO + b * n_rows + t, mask=t_ok, other=2147483647)
    return Q + b * sqb, K + b * skb, W + b * swb, b, t, t_ok, lo, hi


@triton.jit
def _index_scores(
    Q, K, W, LO, HI, S,
    sqb, sqt, sqh, skb, sks, swb, swt, ssb, sst,
    k0, n_rows, width, scale, H, D,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISE: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Key tile ``program_id(1)`` of the fp32 score rows ``S`` of a block of queries (window positions
    ``[lo, hi]`` visible, key ``k0 + position``; ``-inf`` where not visible): the full path."""
    Q, K, W, b, t, t_ok, lo, hi = _query_block(Q, K, W, LO, HI, sqb, skb, swb, n_rows, BLOCK_T)
    S += b * ssb
    s0 = tl.program_id(1) * BLOCK_S
    if (tl.min(lo, 0) < s0 + BLOCK_S) & (s0 <= tl.max(hi, 0)):  # tiles no query sees are never read
        s_loc = s0 + tl.arange(0, BLOCK_S)
        q, wr = _stacked_queries(
            Q, W, tl.program_id(0), n_rows, sqt, sqh, swt, H, D, BLOCK_T, BLOCK_H, BLOCK_D
        )
        kt = _key_tile(K, k0 + s_loc, s_loc < width, sks, D, BLOCK_D, EVEN_D)
        score = _gated_scores(q, wr, kt, scale, BLOCK_T, BLOCK_H, BLOCK_S, False, PRECISE, UPCAST)
        visible = (s_loc[None, :] >= lo[:, None]) & (s_loc[None, :] <= hi[:, None])
        tl.store(S + t[:, None].to(tl.int64) * sst + s_loc[None, :], tl.where(visible, score, float("-inf")),
                 mask=t_ok[:, None] & (s_loc[None, :] < width))  # fmt: skip


@triton.jit
def _candidate_scores(
    Q, K, W, LO, HI, THR, C, COUNT, DROPPED,
    sqb, sqt, sqh, skb, sks, swb, swt, scb, sct,
    k0, n_rows, scale, H, D, CAP,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISE: tl.constexpr, UPCAST: tl.constexpr, STORE_ASM: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """One program per block of queries loads its queries once, loops over all its key tiles and
    appends the (score bits, window position) pairs at or above ``THR`` to the rows of the int32 pair
    buffer ``C`` (``CAP`` pairs each); counts in ``COUNT``, an upper bound of the scores that did not fit
    in ``DROPPED``. Tiles every row sees whole (most of them) run in a loop of their own without the
    visibility mask."""
    Q, K, W, b, t, t_ok, lo, hi = _query_block(Q, K, W, LO, HI, sqb, skb, swb, n_rows, BLOCK_T)
    rows = C + b * scb + t.to(tl.int64) * sct  # each row's first pair
    thr = tl.load(THR + b * n_rows + t, mask=t_ok, other=float("inf"))
    start = tl.min(lo, 0) // BLOCK_S * BLOCK_S
    stop = tl.max(hi, 0) + 1
    # [inner_start, inner_stop): tiles inside every valid row's visible range
    inner_start = tl.maximum(start, tl.cdiv(tl.max(tl.where(t_ok, lo, 0), 0), BLOCK_S) * BLOCK_S)
    inner_stop = tl.maximum(inner_start, (tl.min(tl.where(t_ok, hi, stop), 0) + 1) // BLOCK_S * BLOCK_S)
    q, wr = _head_queries(Q, W, t, t_ok, sqt, sqh, swt, H, D, BLOCK_H, BLOCK_D)
    state = (tl.zeros([BLOCK_T], tl.int32), tl.full([BLOCK_T], float("-inf"), tl.float32))
    state = _candidate_tiles(q, wr, K, rows, thr, lo, hi, state, start, inner_start, stop, k0, sks, CAP,
                             scale, D, BLOCK_T, BLOCK_H, BLOCK_S, BLOCK_D, True, PRECISE, UPCAST, STORE_ASM,
                             EVEN_D)  # fmt: skip
    state = _candidate_tiles(q, wr, K, rows, thr, lo, hi, state, inner_start, inner_stop, stop, k0, sks,
                             CAP, scale, D, BLOCK_T, BLOCK_H, BLOCK_S, BLOCK_D, False, PRECISE, UPCAST,
                             STORE_ASM, EVEN_D)  # fmt: skip
    state = _candidate_tiles(q, wr, K, rows, thr, lo, hi, state, inner_stop, stop, stop, k0, sks, CAP,
                             scale, D, BLOCK_T, BLOCK_H, BLOCK_S, BLOCK_D, True, PRECISE, UPCAST, STORE_ASM,
                             EVEN_D)  # fmt: skip
    tl.store(COUNT + b * n_rows + t, state[0], mask=t_ok)
    tl.store(DROPPED + b * n_rows + t, state[1], mask=t_ok)


@triton.jit
def _candidate_tiles(q, wr, K, rows, thr, lo, hi, state, begin, end, stop, k0, sks, cap, scale, D,
                     BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_D: tl.constexpr, MASKED: tl.constexpr, PRECISE: tl.constexpr,
                     UPCAST: tl.constexpr, STORE_ASM: tl.constexpr, EVEN_D: tl.constexpr):  # fmt: skip
    """The key tiles ``[begin, end)`` of ``_candidate_scores``; ``state`` = (counts, dropped maximum)."""
    taken, dropped = state
    for s0 in range(begin, end, BLOCK_S):
        s_loc = s0 + tl.arange(0, BLOCK_S)
        kt = _key_tile(K, k0 + s_loc, s_loc < stop, sks, D, BLOCK_D, EVEN_D)
        score = _gated_scores(q, wr, kt, scale, BLOCK_T, BLOCK_H, BLOCK_S, True, PRECISE, UPCAST)
        keep = score >= thr[:, None]
        if MASKED:
            keep = keep & (s_loc[None, :] >= lo[:, None]) & (s_loc[None, :] <= hi[:, None])
        taken, dropped = _compact(rows, score, keep, taken, dropped, s_loc, cap, BLOCK_S, STORE_ASM)
    return taken, dropped


@triton.jit
def _store_pairs(ptr, first, second, keep, STORE_ASM: tl.constexpr):
    """Stores the 32-bit pairs ``(first, second)`` at ``ptr`` (int32, 8-byte aligned) where ``keep``.
    ``STORE_ASM`` (CUDA) issues one predicated 64-bit PTX store per pair in the operands' own register
    layout: ``tl.store`` first moves pointer, values and mask of the whole tile into a coalescing layout
    through shared memory, which for a tile where few entries are kept cost more than the tile's
    tensor-core work."""
    if STORE_ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $4, 0; @p st.global.v2.b32 [$1], {$2, $3}; mov.b32 $0, 0; }",
            "=r,l,r,r,r", [ptr, first, second, keep.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    else:
        tl.store(ptr, first, mask=keep)
        tl.store(ptr + 1, second, mask=keep)


@triton.jit
def _compact(rows, score, keep, taken, dropped, s_loc, cap, BLOCK_S: tl.constexpr, STORE_ASM: tl.constexpr):
    """Appends the kept (score bits, position) pairs of a tile to the pair rows starting at ``rows``, in
    key order. Returns the rows' new counts (entries past ``cap`` are counted, not written) and an upper
    bound of the scores past ``cap``: the largest score of every tile in which a row may overflow. A
    kept entry's slot is the number of kept entries before it in its row: each row's keep bits are
    gathered into 32-bit words by a reduction and counted with popcounts, all in the tile's own layout
    (a ``tl.cumsum`` along the keys moved the tile through shared memory twice)."""
    may_drop = taken + BLOCK_S > cap
    j = tl.arange(0, BLOCK_S)
    bit = tl.full([BLOCK_S], 1, tl.uint32) << (j % 32).to(tl.uint32)
    word = tl.zeros(keep.shape, tl.uint32)  # the keep bits of each entry's own word
    before = taken[:, None] + tl.zeros(keep.shape, tl.int32)  # kept entries in earlier words
    for w in tl.static_range((BLOCK_S + 31) // 32):
        in_w = (j // 32) == w
        bits_w = tl.sum(tl.where(keep & in_w[None, :], bit[None, :], 0), 1)
        word = tl.where(in_w[None, :], bits_w[:, None], word)
        before += tl.where((j // 32 > w)[None, :], popcount(bits_w)[:, None], 0)
        taken += popcount(bits_w)
    at = before + popcount(word & (bit - 1)[None, :])
    fits = keep & (at < cap)
    position = s_loc[None, :] + tl.zeros_like(at)
    _store_pairs(rows[:, None] + 2 * at, score.to(tl.int32, bitcast=True), position, fits, STORE_ASM)
    # a row reduction of the raw scores (no select of the dropped ones, no block-wide test: a barrier per
    # tile, tried, cost 15%)
    dropped = tl.where(may_drop, tl.maximum(dropped, tl.max(score, 1)), dropped)
    return taken, dropped


@triton.jit
def _ordered_key(x):
    """fp32 -> uint32 with the same order (flip all bits of negatives, the sign bit of positives)."""
    bits = x.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return bits ^ flip


@triton.jit
def _from_ordered_key(key):
    """The inverse of ``_ordered_key``."""
    key = key.to(tl.uint32)
    flip = tl.where((key >> 31) == 1, 0x80000000, 0xFFFFFFFF).to(tl.uint32)
    return (key ^ flip).to(tl.float32, bitcast=True)


@triton.jit
def _sample_keys(
    Q, K, W, LO, HI, KEYS,
    sqb, sqt, sqh, skb, sks, swb, swt,
    k0, n_rows, width, scale, H, D,
    M: tl.constexpr, PER_SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    """Stage 1a: the leading ``THRESHOLD_BITS`` (16) bits of the order-preserving keys of a block of
    queries' scores against samples ``[program_id(1) * PER_SPLIT, +PER_SPLIT)`` (sample ``j``: window
    position ``j * width // M``), int16 rows of ``M`` in ``KEYS``; 0 where the sample is not visible (no
    fp32 score but NaN has a key below 2^16). Scored a head at a time, like the candidate kernel; the
    samples are split over programs so that short chunks still fill the GPU."""
    Q, K, W, b, t, t_ok, lo, hi = _query_block(Q, K, W, LO, HI, sqb, skb, swb, n_rows, BLOCK_T)
    q, wr = _head_queries(Q, W, t, t_ok, sqt, sqh, swt, H, D, BLOCK_H, BLOCK_D)
    rows = KEYS + (b * n_rows + t[:, None]) * M
    j_begin = tl.program_id(1) * PER_SPLIT
    for j0 in range(j_begin, j_begin + PER_SPLIT, BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)
        p = ((j.to(tl.int64) * width) // M).to(tl.int32)
        kt = _key_tile(K, k0 + p, p == p, sks, D, BLOCK_D, EVEN_D)
        score = _gated_scores(q, wr, kt, scale, BLOCK_T, BLOCK_H, BLOCK_S, True, PRECISE, UPCAST)
        visible = (p[None, :] >= lo[:, None]) & (p[None, :] <= hi[:, None])
        key = tl.where(visible, _ordered_key(score) >> (32 - THRESHOLD_BITS), 0)
        tl.store(rows + j[None, :], key.to(tl.int16), mask=t_ok[:, None])


@triton.jit
def _sample_threshold(KEYS, LO, HI, THR, n_rows, RANK, M: tl.constexpr, ROWS: tl.constexpr):
    """Stage 1b, ``ROWS`` queries a program: the sampled key ranking ``ceil(RANK * m / n)`` among the
    query's ``m`` visible samples (``n`` visible keys), i.e. about ``RANK`` of its keys pass it, searched
    bit by bit; its float (low 16 bits of the key zero: a slightly lower threshold, within 2^-7 of the
    score) is the threshold. ``-inf`` (every key passes) when the query sees at most ``RANK`` keys or no
    sample. Every trial is nonzero, so the absent samples (0) never count."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = r < n_rows
    j = tl.arange(0, M)
    key = tl.load(KEYS + r[:, None].to(tl.int64) * M + j[None, :], mask=r_ok[:, None], other=0)
    key = key.to(tl.int32) & 0xFFFF  # the int16 bits as unsigned
    m = tl.sum((key != 0).to(tl.int32), 1)
    n = tl.load(HI + r, mask=r_ok, other=0) - tl.load(LO + r, mask=r_ok, other=0) + 1
    rank = ((RANK * m.to(tl.int64) + n - 1) // tl.maximum(n, 1)).to(tl.int32)
    found = tl.zeros([ROWS], tl.int32)
    for bit in tl.static_range(THRESHOLD_BITS):
        trial = found | (tl.full([ROWS], 1, tl.int32) << (THRESHOLD_BITS - 1 - bit))
        at_least = tl.sum((key >= trial[:, None]).to(tl.int32), 1)
        found = tl.where(at_least >= rank, trial, found)
    thr = _from_ordered_key(found.to(tl.uint32) << (32 - THRESHOLD_BITS))
    tl.store(THR + r, tl.where((n > RANK) & (m > 0), thr, float("-inf")), mask=r_ok)


@triton.jit
def _digit_step(hist, prefix, pmask, need, PASS: tl.constexpr):
    """Fixes the threshold's digit of pass ``PASS`` from its histogram: the largest digit with at least
    ``need`` keys at or above it; ``need`` drops by the keys strictly above."""
    bins = tl.arange(0, 256)
    at_or_above = tl.cumsum(hist, 0, reverse=True)
    digit = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1
    need = need - tl.sum(tl.where(bins > digit, hist, 0), 0)
    prefix = prefix | (digit.to(tl.uint32) << (24 - 8 * PASS))
    pmask = pmask | (tl.full([1], 255, tl.uint32) << (24 - 8 * PASS))
    return prefix, pmask, need


@triton.jit
def _replay(HIST, TOPK, PASSES: tl.constexpr):
    """Threshold prefix, its bit mask, and how many keys equal to the threshold to take, after
    ``PASSES`` finished 8-bit passes whose histograms are at ``HIST``."""
    prefix = tl.zeros([1], tl.uint32)
    pmask = tl.zeros([1], tl.uint32)
    need = tl.full([1], TOPK, tl.int32)
    for p in tl.static_range(PASSES):
        prefix, pmask, need = _digit_step(tl.load(HIST + p * 256 + tl.arange(0, 256)), prefix, pmask, need, p)
    return prefix, pmask, need


@triton.jit
def _digit_histogram(scores, begin, end, prefix, pmask, PASS: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of pass ``PASS``'s digit over the keys in ``[begin, end)`` that match ``prefix``."""
    hist = tl.zeros([256], tl.int32)
    for s0 in range(begin, end, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        key = _ordered_key(tl.load(scores + s, mask=s < end, other=0.0))
        match = (s < end) & ((key & pmask) == prefix)
        hist += tl.histogram(((key >> (24 - 8 * PASS)) & 255).to(tl.int32), 256, mask=match)
    return hist


@triton.jit
def _write_selected(scores, begin, end, threshold, need, n_above, taken_gt, taken_eq, out, shift,
                    BLOCK: tl.constexpr):  # fmt: skip
    """Writes the keys of ``[begin, end)`` above ``threshold`` from slot ``taken_gt`` on, and those equal
    to it, in key order, from slot ``n_above + taken_eq`` on while fewer than ``need`` ties are taken;
    ``shift`` is added to the positions written."""
    for s0 in range(begin, end, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        key = _ordered_key(tl.load(scores + s, mask=s < end, other=0.0))
        gt = (s < end) & (key > threshold)
        eq = (s < end) & (key == threshold)
        pos_gt = taken_gt + tl.cumsum(gt.to(tl.int32), 0) - 1
        pos_eq = taken_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
        tl.store(out + pos_gt, s + shift, mask=gt)
        tl.store(out + n_above + pos_eq, s + shift, mask=eq & (pos_eq < need))
        taken_gt += tl.sum(gt.to(tl.int32), 0)
        taken_eq += tl.sum(eq.to(tl.int32), 0)


@triton.jit
def _radix_hist(S, LO, HI, HIST, sst, TOPK, SEG, PASS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    lo = tl.load(LO + row)
    hi = tl.load(HI + row)
    begin = lo + tl.program_id(1) * SEG
    if (hi - lo + 1 > TOPK) & (begin <= hi):
        hist_row = HIST + row.to(tl.int64) * 1024
        prefix, pmask, _ = _replay(hist_row, TOPK, PASS)
        end = tl.minimum(begin + SEG, hi + 1)
        hist = _digit_histogram(S + row.to(tl.int64) * sst, begin, end, prefix, pmask, PASS, BLOCK)
        tl.atomic_add(hist_row + PASS * 256 + tl.arange(0, 256), hist, sem="relaxed")


@triton.jit
def _radix_count(S, LO, HI, HIST, COUNTS, sst, TOPK, SEG, NSEG, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    seg = tl.program_id(1)
    lo = tl.load(LO + row)
    hi = tl.load(HI + row)
    begin = lo + seg * SEG
    if (hi - lo + 1 > TOPK) & (begin <= hi):
        threshold, _, _ = _replay(HIST + row.to(tl.int64) * 1024, TOPK, 4)
        scores = S + row.to(tl.int64) * sst
        end = tl.minimum(begin + SEG, hi + 1)
        n_gt = tl.zeros([1], tl.int32)
        n_eq = tl.zeros([1], tl.int32)
        for s0 in range(begin, end, BLOCK):
            s = s0 + tl.arange(0, BLOCK)
            key = _ordered_key(tl.load(scores + s, mask=s < end, other=0.0))
            n_gt += tl.sum(((s < end) & (key > threshold)).to(tl.int32), 0)
            n_eq += tl.sum(((s < end) & (key == threshold)).to(tl.int32), 0)
        out = COUNTS + (row.to(tl.int64) * NSEG + seg) * 2
        tl.store(out + tl.arange(0, 1), n_gt)
        tl.store(out + 1 + tl.arange(0, 1), n_eq)


@triton.jit
def _radix_write(
    S, LO, HI, BASE, HIST, OFFSETS, OUT, sst, sob, sot, NR, k0, TOPK, SEG, NSEG, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seg = tl.program_id(1)
    lo = tl.load(LO + row)
    hi = tl.load(HI + row)
    shift = k0 - tl.load(BASE + row)
    out = OUT + (row // NR).to(tl.int64) * sob + (row % NR).to(tl.int64) * sot
    n = hi - lo + 1
    if n <= TOPK:  # every visible key, then -1 padding; segment ``seg`` covers output slots of its range
        for j0 in range(seg * SEG, tl.minimum(seg * SEG + SEG, TOPK), BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            tl.store(out + j, tl.where(j < n, lo + j + shift, -1), mask=(j < TOPK) & (j < seg * SEG + SEG))
    else:
        begin = lo + seg * SEG
        if begin <= hi:
            threshold, _, need = _replay(HIST + row.to(tl.int64) * 1024, TOPK, 4)
            base = OFFSETS + (row.to(tl.int64) * NSEG + seg) * 2
            end = tl.minimum(begin + SEG, hi + 1)
            taken_gt = tl.load(base + tl.arange(0, 1))
            taken_eq = tl.load(base + 1 + tl.arange(0, 1))
            scores = S + row.to(tl.int64) * sst
            n_above = TOPK - need  # keys strictly above the threshold go first, ties after them
            _write_selected(
                scores, begin, end, threshold, need, n_above, taken_gt, taken_eq, out, shift, BLOCK
            )


@triton.jit
def _kth_largest_key(key, k):
    """The ``k``-th largest of the uint32 keys (0 marks an absent key: no fp32 score maps to it) and how
    many keys lie above it, bit by bit from the top: the largest value with at least ``k`` keys at or
    above it. Bits shared by the smallest and largest key are skipped, and the search stops once exactly
    ``k`` keys are at or above the prefix found (then no key ties with the k-th: the prefix selects the
    same keys). Every trial is nonzero, so absent keys never count, without a mask per key and bit."""
    present = key != 0
    lo = tl.min(tl.where(present, key, 0xFFFFFFFF), 0)
    hi = tl.max(key, 0)
    differ = lo ^ hi
    free_bits = tl.zeros([], tl.int32)
    for b in tl.static_range(32):  # bit length of ``differ`` (Triton has no count-leading-zeros)
        free_bits += ((differ >> b) != 0).to(tl.int32)
    found = tl.where(free_bits == 32, 0, lo & (0xFFFFFFFF << free_bits.to(tl.uint32))).to(tl.uint32)
    at_found = tl.sum(present.to(tl.int32), 0)
    bit = free_bits
    while (bit > 0) & (at_found != k):
        bit -= 1
        trial = found | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
        at_least = tl.sum((key >= trial).to(tl.int32), 0)
        found = tl.where(at_least >= k, trial, found)
        at_found = tl.where(at_least >= k, at_least, at_found)
    return found, tl.sum((key > found).to(tl.int32), 0)


@triton.jit
def _select_kept(scores, pos, kept, count, dropped, out, shift, TOPK, CAP, BLOCK: tl.constexpr):
    """The top-``TOPK`` of the first ``kept`` (``<= BLOCK``) pairs, searched in registers; False (nothing
    written) when the bound ``dropped`` of the ``count - CAP`` pairs that did not fit beats the k-th
    largest. Slots: keys above the threshold in key order, then ties in key order while they fit."""
    j = tl.arange(0, BLOCK)
    bits = tl.load(scores + 2 * j, mask=j < kept, other=0)
    key = tl.where(j < kept, _ordered_key(bits.to(tl.float32, bitcast=True)), 0)
    threshold, n_above = _kth_largest_key(key, TOPK)
    ok = (count <= CAP) | (_ordered_key(dropped) <= threshold)
    if ok:
        gt = key > threshold
        eq = key == threshold
        # one scan counts both kinds: keys above in the low 16 bits, ties above them (BLOCK <= 2^15)
        before = tl.cumsum(gt.to(tl.int32) + (eq.to(tl.int32) << 16), 0)
        slot = tl.where(gt, (before & 0xFFFF) - 1, n_above + (before >> 16) - 1)
        take = gt | (eq & (slot < TOPK))
        tl.store(out + slot, tl.load(pos + 2 * j, mask=take, other=0) + shift, mask=take)
    return ok


@triton.jit
def _select_candidates(C, COUNT, DROPPED, LO, HI, BASE, OUT, FAIL, sob, sot, NR, TOPK, CAP,
                       BLOCK: tl.constexpr):  # fmt: skip
    """Exact top-``TOPK`` of one row's candidates (``CAP`` (score bits, position) pairs of ``C``, key
    order), or a flag in ``FAIL`` when they cannot contain it: fewer than ``min(TOPK, visible keys)``,
    or more than ``CAP`` with a bound of the scores that did not fit (``DROPPED``) above the k-th largest
    of those that did. Dropped candidates come after the kept ones in key order, so ties with the k-th
    largest among them never win a slot: a buffer full of ties (e.g. exact zeros) still settles its
    row. The keys (``BLOCK >= CAP``) are searched in registers, in a tile half as long when they fit
    there (most rows: the sampled threshold aims below half the buffer), since each searched bit reads
    every key of the tile."""
    row = tl.program_id(0)
    count = tl.load(COUNT + row)
    n = tl.load(HI + row) - tl.load(LO + row) + 1
    ok = count >= tl.minimum(n, TOPK)
    out = OUT + (row // NR).to(tl.int64) * sob + (row % NR).to(tl.int64) * sot
    scores = C + row.to(tl.int64) * (2 * CAP)
    pos = scores + 1
    shift = -tl.load(BASE + row)
    if ok & (count <= TOPK):  # every visible key is a candidate: all of them, then -1 padding
        for j0 in range(0, TOPK, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            src = tl.load(pos + 2 * j, mask=j < count, other=0)
            tl.store(out + j, tl.where(j < count, src + shift, -1), mask=j < TOPK)
    elif ok:
        kept = tl.minimum(count, CAP)
        dropped = tl.load(DROPPED + row)
        if kept <= BLOCK // 2:
            ok = _select_kept(scores, pos, kept, count, dropped, out, shift, TOPK, CAP, BLOCK // 2)
        else:
            ok = _select_kept(scores, pos, kept, count, dropped, out, shift, TOPK, CAP, BLOCK)
    tl.store(FAIL + row, (~ok).to(tl.int8))


def _launch_scores(q, k, w, lo, hi, k0, width, scores) -> None:
    """``_index_scores`` over the queries of ``q``: dense fp32 rows ``scores [B, Tc, width]``."""
    batch, rows, heads, dim = q.shape
    gpu = q.device.type != "cpu"
    block_h = triton.next_power_of_2(heads)
    block_d = triton.next_power_of_2(dim)
    wide = q.element_size() > 2  # 32-bit tiles: half the tile in the same shared memory
    block_t, block_s = ((16, 64) if wide else (32, 128)) if gpu else (max(4, 16 // block_h), 16)
    # Decoding scores one query per row: a tile of 16 MMA rows (the minimum) instead of 32 queries'
    # worth keeps registers and shared memory small, so more key tiles are in flight.
    block_t = min(block_t, max(16 // block_h, triton.next_power_of_2(rows)))
    _index_scores[(triton.cdiv(rows, block_t), triton.cdiv(width, block_s), batch)](
        q, k, w, lo, hi, scores,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        scores.stride(0), scores.stride(1),
        k0, rows, width, dim**-0.5, heads, dim,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d, EVEN_D=dim == block_d,
        **dot_flags(q.dtype), num_warps=8 if gpu else 4, num_stages=1 if wide else 2,
    )  # fmt: skip


def sample_thresholds(q, k, w, lo, hi, k0, width, topk) -> torch.Tensor:
    """Stage 1 of the candidate path: ``[B, Tc]`` fp32 thresholds (window positions ``lo``/``hi``)."""
    batch, rows, heads, dim = q.shape
    gpu = q.device.type != "cpu"
    launch = SAMPLE_LAUNCH if gpu else dict(BLOCK_T=16, BLOCK_S=16, SPLIT=1, num_warps=4, num_stages=1)
    m = SAMPLE if gpu else 16
    split = launch["SPLIT"]
    if m % (split * launch["BLOCK_S"]):
        raise ValueError(f"SAMPLE_LAUNCH: SPLIT * BLOCK_S must divide the {m} samples, got {launch}")
    keys = torch.empty(batch, rows, m, device=q.device, dtype=torch.int16)
    block_d = triton.next_power_of_2(dim)
    _sample_keys[(triton.cdiv(rows, launch["BLOCK_T"]), split, batch)](
        q, k, w, lo, hi, keys,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        k0, rows, width, dim**-0.5, heads, dim,
        M=m, PER_SPLIT=m // split, BLOCK_T=launch["BLOCK_T"], BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_S=launch["BLOCK_S"], BLOCK_D=block_d, EVEN_D=dim == block_d, **dot_flags(q.dtype),
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )  # fmt: skip
    thr = torch.empty(batch, rows, device=q.device, dtype=torch.float32)
    search_rows = SAMPLE_SEARCH_ROWS if gpu else 4
    _sample_threshold[(triton.cdiv(batch * rows, search_rows),)](
        keys, lo, hi, thr, batch * rows, max(1, int(CANDIDATE_FACTOR * topk)), M=m, ROWS=search_rows,
        num_warps=4,
    )  # fmt: skip
    return thr


def score_candidates(q, k, w, lo, hi, k0, width, thr, topk):
    """Stage 2: ``(pairs, counts, dropped)``: int32 ``[B, Tc, cap, 2]`` (score bits, window position)
    buffers, and ``[B, Tc]`` counts and largest scores of the candidates that did not fit."""
    batch, rows, heads, dim = q.shape
    cap = CANDIDATES_PER_TOPK * topk
    pairs = torch.empty(batch, rows, cap, 2, device=q.device, dtype=torch.int32)
    count = torch.empty(batch, rows, device=q.device, dtype=torch.int32)
    dropped = torch.empty(batch, rows, device=q.device, dtype=torch.float32)
    gpu = q.device.type != "cpu"
    launch = CANDIDATE_LAUNCH_FP32 if q.element_size() > 2 else CANDIDATE_LAUNCH
    if not gpu:
        launch = dict(launch, BLOCK_T=16, BLOCK_S=16, num_warps=4)
    block_d = triton.next_power_of_2(dim)
    _candidate_scores[(triton.cdiv(rows, launch["BLOCK_T"]), 1, batch)](
        q, k, w, lo, hi, thr, pairs, count, dropped,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        pairs.stride(0), pairs.stride(1),
        k0, rows, dim**-0.5, heads, dim, cap,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=block_d, STORE_ASM=gpu and not interpreting(),
        EVEN_D=dim == block_d, **dot_flags(q.dtype), **launch,
    )  # fmt: skip
    return pairs, count, dropped


def select_candidates(pairs, count, dropped, lo, hi, base, out) -> torch.Tensor:
    """Stage 3: writes the settled rows into ``out``; returns the ``[B, Tc]`` flags of the others."""
    batch, rows, cap, _ = pairs.shape
    fail = torch.empty(batch, rows, device=pairs.device, dtype=torch.int8)
    _select_candidates[(batch * rows,)](
        pairs, count, dropped, lo, hi, base, out, fail, out.stride(0), out.stride(1), rows, out.shape[2],
        cap, BLOCK=triton.next_power_of_2(cap), num_warps=SELECT_WARPS if cap > 2048 else 4,
    )  # fmt: skip
    return fail


def topk_chunk(
    q: torch.Tensor,  # [B, Tc, H, D]: the queries of one chunk
    k: torch.Tensor,  # [B, S, D]
    w: torch.Tensor,  # [B, Tc, H]
    lo: torch.Tensor,  # [B, Tc] int32: first visible key of each query (position in k)
    hi: torch.Tensor,  # [B, Tc] int32: last visible key of each query
    base: torch.Tensor,  # [B, Tc] int32: subtracted from the written positions (sequence start, or 0)
    out: torch.Tensor,  # [B, Tc, topk] int32 (may be a slice of a longer output)
    k0: int,  # first key any query of the chunk may see
    k1: int,  # one past the last
    candidates: bool = False,  # the candidate path (the caller then settles the flagged rows)
) -> torch.Tensor | None:
    """Top-k of one chunk of queries. Full path by default (no host sync); with ``candidates``, returns
    the ``[B, Tc]`` int8 flags of rows left for ``settle_fallbacks``."""
    lo_w, hi_w = (lo - k0).to(torch.int32).contiguous(), (hi - k0).to(torch.int32).contiguous()
    base = base.to(torch.int32).contiguous()
    topk = out.shape[2]
    if candidates:
        thr = sample_thresholds(q, k, w, lo_w, hi_w, k0, k1 - k0, topk)
        candidates = score_candidates(q, k, w, lo_w, hi_w, k0, k1 - k0, thr, topk)
        return select_candidates(*candidates, lo_w, hi_w, base - k0, out)
    scores = torch.empty(q.shape[0], q.shape[1], k1 - k0, device=q.device, dtype=torch.float32)
    _launch_scores(q, k, w, lo_w, hi_w, k0, k1 - k0, scores)
    _radix_select(scores.view(-1, k1 - k0), lo_w.view(-1), hi_w.view(-1), base.view(-1), out, q.shape[1], k0)
    return None


def settle_fallbacks(q, k, w, lo, hi, base, out, fail) -> None:
    """Reruns the rows flagged by the candidate path (``fail [B, T]``) on the full path (host sync)."""
    flagged = fail.nonzero()
    if flagged.numel() == 0:
        return
    for b in flagged[:, 0].unique().tolist():
        rows = flagged[flagged[:, 0] == b, 1]
        step = chunk_rows(1, k.shape[1], len(rows), out.shape[2], full=True)
        for r0 in range(0, rows.numel(), step):
            r = rows[r0 : r0 + step]
            lo_r, hi_r = lo[b, r][None], hi[b, r][None]
            k0, k1 = int(lo_r.min()), int(hi_r.max()) + 1
            got = torch.empty(1, r.numel(), out.shape[2], dtype=torch.int32, device=out.device)
            qr, kr, wr = q[b : b + 1, r], k[b : b + 1], w[b : b + 1, r]
            topk_chunk(qr, kr, wr, lo_r, hi_r, base[b, r][None], got, k0, k1)
            out[b, r] = got[0]


def _radix_select(scores, lo, hi, base, out, rows, k0) -> None:
    """Exact radix top-k of each row of ``scores [N, W]`` over ``[lo, hi]`` into ``out``."""
    flat, width = scores.shape
    topk = out.shape[2]
    gpu = scores.device.type != "cpu"
    block = 1024 if gpu else 16
    seg = (4096 if flat >= 512 else 1024) if gpu else 32  # few rows: more, shorter segments
    nseg = max(triton.cdiv(width, seg), triton.cdiv(topk, seg))
    hist = torch.zeros(flat, 4, 256, device=scores.device, dtype=torch.int32)
    counts = torch.zeros(flat, nseg, 2, device=scores.device, dtype=torch.int32)
    grid = (flat, nseg)
    for p in range(4):
        _radix_hist[grid](scores, lo, hi, hist, width, topk, seg, PASS=p, BLOCK=block, num_warps=4)
    _radix_count[grid](scores, lo, hi, hist, counts, width, topk, seg, nseg, BLOCK=block, num_warps=4)
    offsets = (counts.cumsum(1, dtype=torch.int32) - counts).contiguous()
    _radix_write[grid](
        scores, lo, hi, base, hist, offsets, out, width, out.stride(0), out.stride(1), rows, k0, topk, seg,
        nseg, BLOCK=block, num_warps=4,
    )  # fmt: skip


def chunk_rows(batch: int, width: int, q_len: int, topk: int, full: bool = False) -> int:
    """Queries per chunk: the candidate path's buffers stay near ``CANDIDATE_BYTES_PER_CHUNK`` when a
    chunk can have ``CANDIDATE_MIN_ROWS`` rows (and not ``full``), else the full path's fp32 scores near
    ``SCORE_BYTES_PER_CHUNK``."""
    cand = max(16, CANDIDATE_BYTES_PER_CHUNK // (8 * batch * CANDIDATES_PER_TOPK * topk))
    if not full and batch * min(cand, q_len) >= CANDIDATE_MIN_ROWS:
        return cand
    return max(16, min(4096, SCORE_BYTES_PER_CHUNK // (4 * batch * max(width, 1))))
