"""Triton top-k for decoding: a few query rows against a long, preallocated index-key cache.

A decode step has a handful of rows (batch 8, one new token each) and ~128K keys per row, so the work is
streaming the index keys once; what costs beyond that is launches and serial scans. Four launches find
the exact threshold in two histogram levels of the scores' order-preserving uint32 images:

1. ``_decode_scores``: programs (query, key segment, batch) score their segment (all index heads in one
   MMA tile), write the fp32 scores, then histogram the segment's top ``BITS`` key bits into the row's
   level-1 histogram (atomics). FP8 (e4m3) keys are widened on load, against a bf16 query to fp16 for
   an fp16 MMA on the query scaled by a power of two (``_half_query``: one conversion per pair of keys,
   where bf16 needs three or integer ops; this launch, at 3.7 warps per scheduler, is bound by latency
   and issue rather than bytes: with bf16 widening it ran no faster on the H200 than on the H100,
   BENCHMARKS.md),
   and the score is multiplied by the key's fp32 scale (exact: ``relu(s * x) = s * relu(x)``, ``s > 0``).
2. ``_decode_compact``: every program reads the finished level-1 histogram, finds the bin holding the
   row's ``topk``-th score, writes the keys of higher bins straight into the output, appends those of
   that bin to a candidate buffer and histograms their next 8 bits (level 2).
3. ``_decode_refine``: the same split of the candidates by the level-2 histogram: higher bins to the
   output, the threshold's bin to a second, small candidate buffer.
4. ``_decode_select``: the exact top of those, the lowest positions winning ties (the reference's rule).
   Up to ``PAIR`` candidates (usually a few dozen) are ranked pairwise by one program per row, by score
   then position, and each is written at its rank. More are ties in practice (a row whose gates are all
   negative scores ~1/16 of its keys at exactly 0, its maximum): 8-bit radix passes (skipped when they
   all hold one value) find the threshold, and as the candidates are unordered, the row's scores are
   scanned in position order up to the cut; when every level-1 candidate ties, the compaction blocks'
   candidate counts locate the block holding the cut, and only that block is scanned. Those candidates
   are split over ``SPLIT`` programs per row, each finding the same threshold and cut-off and writing
   its share (one program writing ~8K tied candidates was the slowest launch of a step with a tied row).

Output slots and buffer entries come from per-row atomic counters, so the order of the positions is
arbitrary (any order of a top-k set is valid, DESIGN §3). Every pass over many keys is spread over many
programs; the select's programs of one row each repeat the threshold search over the row's level-2
candidates and the cut-off scan (one 2048-score block when a whole bin ties) rather than share them.

Why histograms once per program: ``tl.histogram`` merges its warps' counts with shared-memory atomics
(``num_warps * bins`` per call), which per 64-key step cost 1.27 ms a decode step on the H200 at 2048
bins (BENCHMARKS.md); once per 2048-key segment at 512 bins they are a small fraction of the streaming.

The lengths are read on the device: no host sync, fixed launch shapes, so a CUDA graph replays a step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keye_dsa.ops._triton_utils import dot_flags, mma
from keye_dsa.ops.indexer_topk.triton_kernel import _digit_histogram, _digit_step, _ordered_key

BITS = 9  # level-1 histogram bits (sign and exponent: one bin per octave of scores); level 2 adds 8
# Launch settings of the scoring kernel (keys per program, keys per step, warps, pipeline stages): the
# fastest of the H200 runs (BENCHMARKS.md): bf16 keys from the sweep at d4434fb; FP8 keys from the A/B at
# e58ea29 (64 keys of 4 warps 71.0 us against 76.7 us for 128 of 8), confirmed after the key scales left
# the loop (68.8-69.0 us against 72.3 us, 2026-12-07).
SCORE_LAUNCH = {"SEG": 2048, "BLOCK_S": 64, "num_warps": 4, "num_stages": 3}
SCORE_LAUNCH_FP8 = {"SEG": 2048, "BLOCK_S": 64, "num_warps": 4, "num_stages": 3}
# Launch settings of the three selection launches: the fastest in the H100 A/B of 2026-12-07 (BENCHMARKS.md:
# compact 12.4 us against 13.4 for 4096 x 8 warps, refine 5.6 against 8.1). The select ranks up to PAIR
# candidates pairwise (5.6 us against 16.4 for radix passes when no row ties) and scans SCAN scores per
# step for a tie's cut-off, from the compaction block holding it when the whole level-1 bin ties (a row
# tying ~8K keys at 0: the step 123.4 us against 131.7 scanning from the row's start, fifth session). Since
# that scan covers one 2048-score block, 4096 scores per step beat 8192 in all four runs of the fifth
# session (the step with the tied row 1-6 us faster on H100s and the H200). SPLIT programs per row share the
# tied candidates: 8 programs of 1024 candidates took the select with a tied row from 14.4 to 7.8 us on an
# H100 (4 programs 8.9 us, 16 of 512 7.1-7.3 with a slower step; sixth session).
COMPACT_LAUNCH = {"BLOCK": 2048, "num_warps": 4}  # scores scanned per compaction program
REFINE_LAUNCH = {"BLOCK": 1024, "num_warps": 4}  # level-1 candidates per refining program
SELECT_LAUNCH = {"BLOCK": 1024, "SCAN": 4096, "PAIR": 128, "SPLIT": 8, "num_warps": 16}
# the three above on the CPU interpreter: small blocks, so small tests reach every path
INTERPRETER_LAUNCHES = ({"BLOCK": 16, "num_warps": 4},) * 2 + (
    {"BLOCK": 16, "SCAN": 16, "PAIR": 16, "SPLIT": 4, "num_warps": 4},
)
# Per-row counters in the scratch: output slots, level-1 and level-2 candidates, then the level-2
# candidates' key range (largest key, largest inverted key; atomic maxima from zero)
COUNTS = 5
COUNTS_JIT = tl.constexpr(COUNTS)  # the same, for @triton.jit code (which reads only constexpr globals)
HALF_MMA = True  # False: FP8 keys widened to bf16 for a bf16 MMA (the tests compare the two bit for bit)


@triton.jit
def _row_bounds(LEN, START, b, t, T, HAS_START: tl.constexpr):
    """Visible window ``[lo, hi]`` of query ``t`` of row ``b``: the new tokens are the last ``T`` keys."""
    hi = tl.load(LEN + b) - T + t
    lo = tl.load(START + b) if HAS_START else tl.zeros_like(hi)
    return lo, hi


@triton.jit
def _decode_scores(
    Q, K, KS, W, LEN, START, S, HIST,
    sqb, sqt, sqh, skb, sks, sksb, swb, swt, ssr,
    T, scale, H, D,
    SEG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    NBITS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_START: tl.constexpr, PRECISE: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_D: tl.constexpr, EVEN_S: tl.constexpr, HALF_MMA: tl.constexpr,
):  # fmt: skip
    """Scores of query ``program_id(0)`` of row ``program_id(2)`` against key segment ``program_id(1)``;
    only visible keys are written and counted in the row's level-1 histogram ``HIST [rows, 2**NBITS]``.
    ``EVEN_S``: the capacity is a multiple of ``BLOCK_S`` (and ``D`` of ``BLOCK_D``), so every key tile
    lies in the cache and loads unmasked (tiles past ``end`` are scored but not stored)."""
    t = tl.program_id(0)
    b = tl.program_id(2)
    row = (b * T + t).to(tl.int64)
    lo, hi = _row_bounds(LEN, START, b, t, T, HAS_START)
    seg0 = tl.program_id(1) * SEG
    end = tl.minimum(seg0 + SEG, hi + 1)
    begin = tl.maximum(seg0, lo // BLOCK_S * BLOCK_S)
    hh = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b.to(tl.int64) * sqb + t * sqt + hh[:, None] * sqh + d[None, :],
        mask=(hh[:, None] < H) & (d[None, :] < D),
        other=0.0,
    )
    wr = tl.load(W + b.to(tl.int64) * swb + t * swt + hh, mask=hh < H, other=0.0).to(tl.float32)
    if HALF_MMA:
        q, down = _half_query(q)
    KS += b.to(tl.int64) * sksb
    # The key pointers advance by one tile per step: recomputing them (64-bit) cost ~30 instructions a step.
    kp = K + b.to(tl.int64) * skb + (begin + tl.arange(0, BLOCK_S))[None, :].to(tl.int64) * sks + d[:, None]
    for s0 in range(begin, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        if EVEN_S:
            kt = tl.load(kp)
        else:
            # No mask on the key dim when it fills the tile: with one, Triton does not pipeline this load
            # (no cp.async), and each program then waits out one key tile's memory latency per step.
            k_ok = (s[None, :] < end) if EVEN_D else (s[None, :] < end) & (d[:, None] < D)
            kt = tl.load(kp, mask=k_ok, other=0.0)
        kp += BLOCK_S * sks
        dots = mma(q, kt.to(q.dtype), PRECISE, UPCAST)
        score = tl.sum(tl.maximum(dots, 0.0) * wr[:, None], 0)
        if HALF_MMA:
            score *= down  # exact: a power of two
        score *= scale
        tl.store(S + row * ssr + s, score, mask=(s >= lo) & (s < end))
    tl.debug_barrier()  # the segment's scores, stored by all threads, are read back once
    s = seg0 + tl.arange(0, SEG)
    visible = (s >= lo) & (s < end)
    x = tl.load(S + row * ssr + s, mask=visible, other=0.0)
    if HAS_SCALE:  # once per segment: a load per key step stalled every step on its latency
        x *= tl.load(KS + s, mask=visible, other=0.0)
        tl.store(S + row * ssr + s, x, mask=visible)
    key = _ordered_key(x)
    hist = tl.histogram((key >> (32 - NBITS)).to(tl.int32), 1 << NBITS, mask=visible)
    bins = tl.arange(0, 1 << NBITS)
    tl.atomic_add(HIST + row * (1 << NBITS) + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _half_query(q):
    """A bf16 query tile as fp16 times a power of two (its largest element in ``[2**14, 2**15)``), and
    the power of two that undoes it: FP8 keys then widen to fp16 in one conversion per pair (bf16 takes
    two more, or integer ops), and the fp16 MMA's products and fp32 sums are the bf16 MMA's times that
    power, bit for bit, as long as the tile's elements span less than 2**31 (smaller ones fall into
    fp16's subnormals and lose bits)."""
    qf = q.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(qf), 1), 0)
    shift = tl.minimum(14 - (((amax.to(tl.int32, bitcast=True) >> 23) & 255) - 127), 126)
    up = ((shift + 127) << 23).to(tl.float32, bitcast=True)
    down = ((127 - shift) << 23).to(tl.float32, bitcast=True)
    return (qf * up).to(tl.float16), down


@triton.jit
def _threshold_bin(HIST, row, TOPK, NBITS: tl.constexpr):
    """The histogram bin holding the row's ``TOPK``-th largest score (-1 when fewer keys are visible),
    the number of keys in higher bins, and in that bin."""
    bins = tl.arange(0, 1 << NBITS)
    hist = tl.load(HIST + row * (1 << NBITS) + bins)
    at_or_above = tl.cumsum(hist, 0, reverse=True)
    digit = tl.sum((at_or_above >= TOPK).to(tl.int32), 0) - 1
    n_above = tl.sum(tl.where(bins > digit, hist, 0), 0)
    n_bin = tl.sum(tl.where(bins == digit, hist, 0), 0)
    return digit, n_above, n_bin


@triton.jit
def _append(counter, keep, dst, value, dst2, value2, PAIR: tl.constexpr):
    """Appends ``value`` (with ``PAIR``, ``value2`` at ``dst2`` too) where ``keep`` to the list at ``dst``
    whose length is ``counter``: one atomic reservation per program, so programs append in any order.
    (Reserving unconditionally, so that a program's two lists' atomics overlap, made the compaction slower:
    14.2 us against 12.1 on an H100, sixth session.)"""
    n = tl.sum(keep.to(tl.int32), 0)
    if n > 0:
        at = tl.atomic_add(counter, n, sem="relaxed") + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(dst + at, value, mask=keep)
        if PAIR:
            tl.store(dst2 + at, value2, mask=keep)


@triton.jit
def _decode_compact(
    S, LEN, START, HIST, HIST2, COUNT, BCOUNT, OUT, CS, CP, ssr, sor, scr, T, TOPK, NBLK,
    NBITS: tl.constexpr, BLOCK: tl.constexpr, HAS_START: tl.constexpr,
):  # fmt: skip
    """Block ``program_id(1)`` of row ``program_id(0)``: keys of level-1 bins above the threshold bin go
    to the output, keys of that bin to the candidate buffers ``CS``/``CP`` and their next 8 bits to the
    level-2 histogram ``HIST2 [rows, 256]``; slots from ``COUNT [rows, COUNTS]``.
    The block's count of candidates goes to ``BCOUNT [rows, NBLK]`` (in position order: a tie's cut-off
    skips whole blocks by it)."""
    row = tl.program_id(0)
    lo, hi = _row_bounds(LEN, START, row // T, row % T, T, HAS_START)
    row = row.to(tl.int64)
    digit, _, _ = _threshold_bin(HIST, row, TOPK, NBITS)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (s >= lo) & (s <= hi)
    x = tl.load(S + row * ssr + s, mask=ok, other=0.0)
    key = _ordered_key(x)
    bin_ = (key >> (32 - NBITS)).to(tl.int32)
    above = ok & (bin_ > digit)
    cand = ok & (bin_ == digit)
    _append(COUNT + row * COUNTS_JIT, above, OUT + row * sor, s, OUT, s, False)
    _append(COUNT + row * COUNTS_JIT + 1, cand, CS + row * scr, x, CP + row * scr, s, True)
    n_cand = tl.sum(cand.to(tl.int32), 0)
    tl.store(BCOUNT + row * NBLK + tl.program_id(1), n_cand)
    if n_cand > 0:
        hist = tl.histogram(((key >> (24 - NBITS)) & 255).to(tl.int32), 256, mask=cand)
        tl.atomic_add(HIST2 + row * 256 + tl.arange(0, 256), hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _decode_refine(
    HIST, HIST2, COUNT, OUT, CS, CP, CS2, CP2, sor, scr, TOPK, NBITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Block ``program_id(1)`` of row ``program_id(0)``'s level-1 candidates: keys of level-2 bins above
    the threshold's go to the output, those of its bin to ``CS2``/``CP2`` (slots from ``COUNT``), and the
    range of their keys to ``COUNT[row, 3:5]`` (the max of the keys and of the inverted keys: zeroed
    scratch starts both), so the select learns whether they all tie without a pass over them."""
    row = tl.program_id(0).to(tl.int64)
    digit, n_above, n_bin = _threshold_bin(HIST, row, TOPK, NBITS)
    j0 = tl.program_id(1) * BLOCK
    if (digit >= 0) & (j0 < n_bin):
        digit2, _, _ = _threshold_bin(HIST2, row, TOPK - n_above, 8)
        j = j0 + tl.arange(0, BLOCK)
        x = tl.load(CS + row * scr + j, mask=j < n_bin, other=0.0)
        p_j = tl.load(CP + row * scr + j, mask=j < n_bin, other=0)
        key = _ordered_key(x)
        bin2 = ((key >> (24 - NBITS)) & 255).to(tl.int32)
        gt = (j < n_bin) & (bin2 > digit2)
        eq = (j < n_bin) & (bin2 == digit2)
        _append(COUNT + row * COUNTS_JIT, gt, OUT + row * sor, p_j, OUT, p_j, False)
        _append(COUNT + row * COUNTS_JIT + 2, eq, CS2 + row * scr, x, CP2 + row * scr, p_j, True)
        if tl.sum(eq.to(tl.int32), 0) > 0:
            keys = _key_range_slots(COUNT, row)
            tl.atomic_max(keys, tl.max(tl.where(eq, key, 0), 0), sem="relaxed")
            tl.atomic_max(keys + 1, tl.max(tl.where(eq, key ^ 0xFFFFFFFF, 0), 0), sem="relaxed")


@triton.jit
def _key_range_slots(COUNT, row):
    """``COUNT[row, 3:5]`` as uint32: the level-2 candidates' largest key and largest inverted key."""
    return (COUNT + row * COUNTS_JIT + 3).to(tl.pointer_type(tl.uint32))


@triton.jit
def _decode_select(
    S, LEN, START, HIST, HIST2, COUNT, BCOUNT, OUT, CS2, CP2, ssr, sor, scr, T, TOPK, NBLK,
    NBITS: tl.constexpr, BLOCK: tl.constexpr, SCAN: tl.constexpr, PAIR: tl.constexpr, SPLIT: tl.constexpr,
    CBLOCK: tl.constexpr, HAS_START: tl.constexpr,
):  # fmt: skip
    """Program ``program_id(1)`` of the ``SPLIT`` of row ``program_id(0)``: the exact top of the level-2
    candidates after the keys already written (or the -1 padding when the row sees fewer than ``TOPK``
    keys). Program 0 pads and ranks up to ``PAIR`` candidates; more are split over the programs by
    blocks of ``BLOCK`` (each finds the same threshold and tie cut-off, then writes its blocks')."""
    r = tl.program_id(0)
    row = r.to(tl.int64)
    part = tl.program_id(1)
    n_cand = tl.load(COUNT + row * COUNTS_JIT + 2)  # level-2 candidates: the idle programs exit early
    if (part == 0) | ((n_cand > PAIR) & (part * BLOCK < n_cand)):
        lo, hi = _row_bounds(LEN, START, r // T, r % T, T, HAS_START)
        digit, n_above, n_bin = _threshold_bin(HIST, row, TOPK, NBITS)
        out = OUT + row * sor
        if digit < 0:  # every visible key is written: pad
            n = tl.maximum(hi - lo + 1, 0)
            for j0 in range(n, TOPK, BLOCK):
                j = j0 + tl.arange(0, BLOCK)
                tl.store(out + j, tl.full([BLOCK], -1, tl.int32), mask=j < TOPK)
        else:
            digit2, n_above2, n_bin2 = _threshold_bin(HIST2, row, TOPK - n_above, 8)
            scores = CS2 + row * scr
            pos = CP2 + row * scr
            if n_bin2 <= PAIR:  # the usual few dozen candidates
                _take_ranked(scores, pos, n_bin2, out + n_above + n_above2, TOPK - n_above - n_above2, PAIR)
            else:
                keys = _key_range_slots(COUNT, row)
                low, high = tl.load(keys + 1) ^ 0xFFFFFFFF, tl.load(keys)
                _take_by_radix(S + row * ssr, lo, hi, scores, pos, n_bin2, out, COUNT + row * COUNTS_JIT,
                               digit, digit2, n_above + n_above2, TOPK, BCOUNT + row * NBLK, NBLK, n_bin, low,
                               high, part, NBITS, BLOCK, SCAN, SPLIT, CBLOCK)  # fmt: skip


@triton.jit
def _take_ranked(scores, pos, n, out, need, PAIR: tl.constexpr):
    """Writes the ``need`` best of ``n <= PAIR`` candidates (higher score first, then lower position: the
    reference's tie rule) to ``out``, each at its rank: one pairwise comparison instead of radix passes."""
    j = tl.arange(0, PAIR)
    ok = j < n
    key = _ordered_key(tl.load(scores + j, mask=ok, other=0.0))
    p_j = tl.load(pos + j, mask=ok, other=0)
    ahead = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (p_j[None, :] < p_j[:, None]))
    rank = tl.sum((ahead & ok[None, :]).to(tl.int32), 1)
    tl.store(out + rank, p_j, mask=ok & (rank < need))


@triton.jit
def _take_by_radix(row_scores, lo, hi, scores, pos, n_bin2, out, n_out, digit, digit2, taken, TOPK,
                   block_counts, nblk, n_bin, low, high, part, NBITS: tl.constexpr, BLOCK: tl.constexpr,
                   SCAN: tl.constexpr, SPLIT: tl.constexpr, CBLOCK: tl.constexpr):  # fmt: skip
    """Writes part ``part`` of ``SPLIT`` of the best of the ``n_bin2`` level-2 candidates
    ``scores``/``pos`` (those in its blocks of ``BLOCK``) after the ``taken`` keys already in ``out``
    (slots from the counter ``n_out``): the exact threshold by two 8-bit radix passes (none when the
    candidates' smallest and largest keys, ``low`` and ``high``, are equal), then the ties' position
    cut-off from the row's scores ``row_scores`` (window ``[lo, hi]``). When all ``n_bin`` level-1
    candidates tie, their per-block counts ``block_counts`` locate the compaction block of ``CBLOCK``
    positions holding the cut, and only that block is scanned."""
    need = tl.zeros([1], tl.int32) + (TOPK - taken)  # candidates still to take
    if low == high:  # one value (a row whose gates are all negative ties thousands of keys at 0)
        prefix = tl.zeros([1], tl.uint32) + high
        n_eq = tl.zeros([1], tl.int32) + n_bin2
    else:
        # The candidates share the threshold's top NBITS + 8 (>= 16) key bits: two 8-bit passes.
        prefix = tl.zeros([1], tl.uint32) + (
            (digit.to(tl.uint32) << (32 - NBITS)) | (digit2.to(tl.uint32) << (24 - NBITS))
        )
        pmask = ((tl.full([1], 1, tl.uint32) << (NBITS + 8)) - 1) << (24 - NBITS)
        for p in tl.static_range(2, 4):
            hist = _digit_histogram(scores, 0, n_bin2, prefix, pmask, p, BLOCK)
            prefix, pmask, need = _digit_step(hist, prefix, pmask, need, p)
        # the last pass's count of the threshold's digit: the candidates equal to it
        n_eq = tl.zeros([1], tl.int32) + tl.sum(tl.where(tl.arange(0, 256) == (prefix & 255).to(tl.int32),
                                                         hist, 0), 0)  # fmt: skip
    # ``prefix`` is the exact threshold, held by ``n_eq`` candidates, ``need`` of which are taken.
    start = lo
    skipped = tl.zeros([1], tl.int32)
    if (tl.sum(n_eq, 0) == n_bin) & (tl.sum((n_eq > need).to(tl.int32), 0) > 0):
        first, before = _cut_block(block_counts, nblk, tl.sum(need, 0))
        start = tl.maximum(lo, first * CBLOCK)
        skipped += before
    cut = _tie_cutoff(row_scores, start, hi, prefix, need - skipped, n_eq - skipped, SCAN)
    for j0 in range(part * BLOCK, n_bin2, SPLIT * BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        key = _ordered_key(tl.load(scores + j, mask=j < n_bin2, other=0.0))
        p_j = tl.load(pos + j, mask=j < n_bin2, other=0)
        keep = (j < n_bin2) & ((key > prefix) | ((key == prefix) & (p_j <= cut)))
        _append(n_out, keep, out, p_j, out, p_j, False)


@triton.jit
def _cut_block(block_counts, nblk, need, STEP: tl.constexpr = 256):
    """First block at which the running sum of ``block_counts[:nblk]`` reaches ``need``, and the sum
    before it."""
    first = nblk * 0 - 1
    skipped = nblk * 0
    before = nblk * 0
    b0 = nblk * 0
    while (b0 < nblk) & (first < 0):
        b = b0 + tl.arange(0, STEP)
        cnt = tl.load(block_counts + b, mask=b < nblk, other=0)
        cum = before + tl.cumsum(cnt, 0)
        at = tl.min(tl.where((b < nblk) & (cum >= need), b, 2147483647), 0)
        hit = at < 2147483647
        first = tl.where(hit, at, first)
        skipped = tl.where(hit, before + tl.sum(tl.where(b < at, cnt, 0), 0), skipped)
        before += tl.sum(cnt, 0)
        b0 += STEP
    return first, skipped


@triton.jit
def _tie_cutoff(row_scores, lo, hi, threshold, need, n_eq, BLOCK: tl.constexpr):
    """Largest position to take among the ``n_eq`` keys equal to ``threshold`` so that exactly ``need``
    of them (the lowest positions, the reference's tie rule) are taken: the row's scores are scanned in
    position order from ``lo`` until the ``need``-th such key, so only the first ties are read."""
    cut = tl.full([1], 2147483647, tl.int32)
    wanted = tl.sum(need, 0)
    if tl.sum(n_eq > need, 0) > 0:  # ties straddle the cut
        found = tl.zeros_like(lo)
        j0 = lo
        while (j0 <= hi) & (found < wanted):
            j = j0 + tl.arange(0, BLOCK)
            key = _ordered_key(tl.load(row_scores + j, mask=j <= hi, other=0.0))
            eq = (j <= hi) & (key == threshold)
            rank = found + tl.cumsum(eq.to(tl.int32), 0)
            cut = tl.minimum(cut, tl.min(tl.where(eq & (rank == wanted), j, 2147483647), 0))
            found += tl.sum(eq.to(tl.int32), 0)
            j0 += BLOCK
    return cut


def decode_topk(q, k, w, lengths, key_start, topk, k_scale=None) -> torch.Tensor:
    """``[B, T, topk]`` int32 positions for the ``T`` newest tokens of each row (see ``select_topk_decode``).

    ``q [B,T,H,D]``, ``k [B,C,D]`` (16/32-bit, or FP8 with ``k_scale [B,C]`` fp32), ``w [B,T,H]``,
    ``lengths [B]`` int32 filled entries, ``key_start [B]`` int32 or None."""
    scores, scratch = decode_scores(q, k, w, lengths, key_start, k_scale)
    return decode_select(scores, scratch, lengths, key_start, q.shape[1], topk)


def decode_scores(q, k, w, lengths, key_start, k_scale):
    """Launch 1: fp32 scores ``[B*T, C]`` (visible keys only) and the zeroed scratch of the later
    launches: level-1 histograms ``[B*T, 2**BITS]`` (filled here), level-2 ``[B*T, 256]``, slot counters
    and the level-2 candidates' key range ``[B*T, COUNTS]``."""
    batch, t, heads, dim = q.shape
    capacity = k.shape[1]
    rows = batch * t
    launch = SCORE_LAUNCH if k_scale is None else SCORE_LAUNCH_FP8
    if q.device.type == "cpu":
        launch = dict(launch, SEG=32, BLOCK_S=16, num_warps=4)
    sizes = (1 << BITS, 256, COUNTS)
    scratch = torch.zeros(rows * sum(sizes), dtype=torch.int32, device=q.device)  # one memset for all
    hist, hist2, count = (x.view(rows, n) for x, n in zip(scratch.split([rows * n for n in sizes]), sizes))
    scores = torch.empty(rows, capacity, dtype=torch.float32, device=q.device)
    start = lengths if key_start is None else key_start  # a placeholder pointer when there is no start
    ks = k_scale if k_scale is not None else lengths
    even_d = dim == triton.next_power_of_2(dim)
    _decode_scores[(t, triton.cdiv(capacity, launch["SEG"]), batch)](
        q, k, ks, w, lengths, start, scores, hist,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), ks.stride(0),
        w.stride(0), w.stride(1), scores.stride(0), t, dim**-0.5, heads, dim,
        SEG=launch["SEG"], BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_S=launch["BLOCK_S"],
        BLOCK_D=triton.next_power_of_2(dim), NBITS=BITS, HAS_SCALE=k_scale is not None,
        HAS_START=key_start is not None, **dot_flags(q.dtype), EVEN_D=even_d,
        EVEN_S=even_d and capacity % launch["BLOCK_S"] == 0,
        HALF_MMA=HALF_MMA and k_scale is not None and q.dtype == torch.bfloat16,
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )  # fmt: skip
    return scores, (hist, hist2, count)


def decode_select(scores, scratch, lengths, key_start, t, topk) -> torch.Tensor:
    """Launches 2-4: the ``[B, T, topk]`` positions from ``decode_scores``' results."""
    hist, hist2, count = scratch
    rows, capacity = scores.shape
    if capacity >= 1 << 24 or not 8 <= BITS <= 16:
        raise ValueError(f"decode top-k needs capacity < 2**24 and 8 <= BITS <= 16; got {capacity}, {BITS}")
    gpu = scores.device.type != "cpu"
    compact, refine, select = (COMPACT_LAUNCH, REFINE_LAUNCH, SELECT_LAUNCH) if gpu else INTERPRETER_LAUNCHES
    cs, cs2 = torch.empty(2, rows, capacity, dtype=torch.float32, device=scores.device)
    cp, cp2 = torch.empty(2, rows, capacity, dtype=torch.int32, device=scores.device)
    out = torch.empty(rows // t, t, topk, dtype=torch.int32, device=scores.device)
    start = lengths if key_start is None else key_start
    nblk = triton.cdiv(capacity, compact["BLOCK"])
    block_counts = torch.empty(rows, nblk, dtype=torch.int32, device=scores.device)  # every block writes
    _decode_compact[(rows, nblk)](
        scores, lengths, start, hist, hist2, count, block_counts, out, cs, cp, scores.stride(0), topk,
        cs.stride(0), t, topk, nblk, NBITS=BITS, HAS_START=key_start is not None, **compact,
    )  # fmt: skip
    _decode_refine[(rows, triton.cdiv(capacity, refine["BLOCK"]))](
        hist, hist2, count, out, cs, cp, cs2, cp2, topk, cs.stride(0), topk,
        NBITS=BITS, **refine,
    )  # fmt: skip
    _decode_select[(rows, select["SPLIT"])](
        scores, lengths, start, hist, hist2, count, block_counts, out, cs2, cp2, scores.stride(0), topk,
        cs.stride(0), t, topk, nblk, NBITS=BITS, CBLOCK=compact["BLOCK"], HAS_START=key_start is not None,
        **select,
    )  # fmt: skip
    return out
