"""Triton Lightning-Indexer scoring and exact top-k, chunked over queries (DESIGN §4).

No ``L x L`` score matrix ever exists: queries are processed a chunk at a time (about 1 GiB of fp32
scores per chunk whatever the length), with these launches per chunk:

1. ``_index_scores``: one tensor-core product per (query tile x key tile) with the ``H`` index heads of
   ``BLOCK_T`` queries stacked as ``BLOCK_T * H`` MMA rows, then ReLU, the per-head gate and the sum over
   heads. Tiles entirely past the causal edge are skipped (never read later).
2. Exact radix select of each row's k-th largest score over the order-preserving uint32 image of the
   fp32 scores, 8 bits a pass. Each row is split into segments handled by separate programs, so a
   handful of long rows (decoding) still fills the GPU: ``_radix_hist`` (4 launches) adds each
   segment's digit histogram into the row's histogram with atomics; every program replays the
   finished passes (``_replay``) to know the prefix so far. ``_radix_count`` counts each segment's keys
   above and equal to the threshold, an exclusive prefix sum over segments gives each segment its
   output offsets, and ``_radix_write`` writes the keys above the threshold and, in key order, as many
   ties as still fit. Rows that see at most ``topk`` keys skip the selection and take every visible key.

Selection is exact and deterministic: among equal scores (e.g. exact zeros after ReLU) the lowest key
positions win, the rule of the reference (a stable sort), so both return the same index sets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keye_dsa.ops._triton_utils import dot_flags, mma

SCORE_BYTES_PER_CHUNK = 1 << 30
SAMPLE = 2048  # scores sampled per row to place the candidate threshold
CANDIDATES_PER_TOPK = 8  # candidate buffer per row, in units of topk
CANDIDATE_MIN_ROWS = 512  # chunks with fewer rows skip the candidate stage


@triton.jit
def _index_scores(
    Q, K, W, S, LO, HI,
    sqb, sqt, sqh, skb, sks, swb, swt, ssb, sst,
    k0, n_rows, width, scale, H, D,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Q += b * sqb
    K += b * skb
    W += b * swb
    S += b * ssb
    LO += b * n_rows
    HI += b * n_rows
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n_rows
    hi = tl.load(HI + t, mask=t_ok, other=-1)
    lo = tl.load(LO + t, mask=t_ok, other=2147483647)
    s_loc = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)  # position inside the window starting at key k0
    if (pid_s * BLOCK_S > tl.max(hi)) | (pid_s * BLOCK_S + BLOCK_S <= tl.min(lo)):
        return
    s_abs = (k0 + s_loc).to(tl.int64)
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    rt = pid_t * BLOCK_T + r // BLOCK_H
    rh = r % BLOCK_H
    r_ok = (rt < n_rows) & (rh < H)
    acc = tl.zeros([BLOCK_T * BLOCK_H, BLOCK_S], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(
            Q + rt[:, None].to(tl.int64) * sqt + rh[:, None] * sqh + d[None, :],
            mask=r_ok[:, None] & (d[None, :] < D),
            other=0.0,
        )
        k = tl.load(
            K + s_abs[None, :] * sks + d[:, None], mask=(s_loc[None, :] < width) & (d[:, None] < D), other=0.0
        )
        acc += mma(q, k, PRECISE, UPCAST)
    w = tl.load(W + rt.to(tl.int64) * swt + rh, mask=r_ok, other=0.0).to(tl.float32)
    gated = tl.maximum(acc, 0.0) * w[:, None]
    score = tl.sum(tl.reshape(gated, [BLOCK_T, BLOCK_H, BLOCK_S]), 1) * scale
    visible = (s_loc[None, :] >= lo[:, None]) & (s_loc[None, :] <= hi[:, None])
    score = tl.where(visible, score, float("-inf"))
    tl.store(
        S + t[:, None].to(tl.int64) * sst + s_loc[None, :],
        score,
        mask=t_ok[:, None] & (s_loc[None, :] < width),
    )


@triton.jit
def _ordered_key(x):
    """fp32 -> uint32 with the same order (flip all bits of negatives, the sign bit of positives)."""
    bits = x.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return bits ^ flip


@triton.jit
def _replay(HIST, TOPK, PASSES: tl.constexpr):
    """Threshold prefix, its bit mask, and how many keys equal to the threshold to take, after
    ``PASSES`` finished 8-bit passes whose histograms are at ``HIST``."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros([1], tl.uint32)
    pmask = tl.zeros([1], tl.uint32)
    need = tl.full([1], TOPK, tl.int32)
    for p in tl.static_range(PASSES):
        hist = tl.load(HIST + p * 256 + bins)
        at_or_above = tl.cumsum(hist, 0, reverse=True)
        digit = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1
        need = need - tl.sum(tl.where(bins > digit, hist, 0), 0)
        prefix = prefix | (digit.to(tl.uint32) << (24 - 8 * p))
        pmask = pmask | (tl.full([1], 255, tl.uint32) << (24 - 8 * p))
    return prefix, pmask, need


@triton.jit
def _radix_hist(S, LO, HI, HIST, sst, TOPK, SEG, PASS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    lo = tl.load(LO + row)
    hi = tl.load(HI + row)
    begin = lo + tl.program_id(1) * SEG
    if (hi - lo + 1 > TOPK) & (begin <= hi):
        hist_row = HIST + row.to(tl.int64) * 1024
        prefix, pmask, _ = _replay(hist_row, TOPK, PASS)
        scores = S + row.to(tl.int64) * sst
        end = tl.minimum(begin + SEG, hi + 1)
        hist = tl.zeros([256], tl.int32)
        for s0 in range(begin, end, BLOCK):
            s = s0 + tl.arange(0, BLOCK)
            key = _ordered_key(tl.load(scores + s, mask=s < end, other=0.0))
            match = (s < end) & ((key & pmask) == prefix)
            hist += tl.histogram(((key >> (24 - 8 * PASS)) & 255).to(tl.int32), 256, mask=match)
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
    S, POS, ACTIVE, LO, HI, BASE, HIST, OFFSETS, OUT, sst, sob, sot, NR, k0, TOPK, SEG, NSEG,
    HAS_POS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Writes the selection of the rows flagged in ``ACTIVE``; with ``HAS_POS`` the entries of ``S`` are
    candidates whose key positions are in ``POS`` (same layout)."""
    row = tl.program_id(0)
    seg = tl.program_id(1)
    if tl.load(ACTIVE + row) == 0:
        return
    lo = tl.load(LO + row)
    hi = tl.load(HI + row)
    shift_out = k0 - tl.load(BASE + row)
    out = OUT + (row // NR).to(tl.int64) * sob + (row % NR).to(tl.int64) * sot
    n = hi - lo + 1
    offs = tl.arange(0, BLOCK)
    if n <= TOPK:  # every visible key, then -1 padding; segment ``seg`` covers output slots of its range
        for j0 in range(seg * SEG, tl.minimum(seg * SEG + SEG, TOPK), BLOCK):
            j = j0 + offs
            src = lo + j
            if HAS_POS:
                src = tl.load(POS + row.to(tl.int64) * sst + src, mask=j < n, other=0)
            tl.store(out + j, tl.where(j < n, src + shift_out, -1), mask=(j < TOPK) & (j < seg * SEG + SEG))
    else:
        begin = lo + seg * SEG
        if begin <= hi:
            threshold, _, need = _replay(HIST + row.to(tl.int64) * 1024, TOPK, 4)
            n_above = TOPK - need  # keys strictly above the threshold go first, ties after them
            base = OFFSETS + (row.to(tl.int64) * NSEG + seg) * 2
            taken_gt = tl.load(base + tl.arange(0, 1))
            taken_eq = tl.load(base + 1 + tl.arange(0, 1))
            scores = S + row.to(tl.int64) * sst
            end = tl.minimum(begin + SEG, hi + 1)
            for s0 in range(begin, end, BLOCK):
                s = s0 + offs
                key = _ordered_key(tl.load(scores + s, mask=s < end, other=0.0))
                gt = (s < end) & (key > threshold)
                eq = (s < end) & (key == threshold)
                pos_gt = taken_gt + tl.cumsum(gt.to(tl.int32), 0) - 1
                pos_eq = taken_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
                src = s
                if HAS_POS:
                    src = tl.load(POS + row.to(tl.int64) * sst + s, mask=s < end, other=0)
                tl.store(out + pos_gt, src + shift_out, mask=gt)
                tl.store(out + n_above + pos_eq, src + shift_out, mask=eq & (pos_eq < need))
                taken_gt += tl.sum(gt.to(tl.int32), 0)
                taken_eq += tl.sum(eq.to(tl.int32), 0)


@triton.jit
def _sample_threshold(S, LO, HI, THR, sst, TOPK, M: tl.constexpr):
    """A threshold from ``M`` evenly spaced scores of the row, ranked to keep about ``2 * TOPK`` keys."""
    row = tl.program_id(0)
    lo = tl.load(LO + row)
    n = tl.load(HI + row) - lo + 1
    i = tl.arange(0, M)
    pos = lo + (i.to(tl.int64) * tl.maximum(n, 1).to(tl.int64)) // M
    x = tl.load(S + row.to(tl.int64) * sst + pos, mask=n > TOPK, other=float("-inf"))
    ranked = tl.sort(x, descending=True)
    rank = tl.minimum(tl.maximum((2 * TOPK * M) // tl.maximum(n, 1), 1), M)
    tl.store(THR + row, tl.sum(tl.where(i == rank - 1, ranked, 0.0), 0))


@triton.jit
def _candidates(S, LO, HI, THR, COUNTS, OFFSETS, CS, CP, sst, CAP, TOPK, SEG, NSEG, WRITE: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    """Per segment: count the keys scoring at least the sampled threshold, or (``WRITE``) copy them,
    in key order, to the row's candidate buffer at the segment's offset."""
    row = tl.program_id(0)
    seg = tl.program_id(1)
    lo = tl.load(LO + row)
    hi = tl.load(HI + row)
    begin = lo + seg * SEG
    if (hi - lo + 1 > TOPK) & (begin <= hi):
        thr = tl.load(THR + row)
        scores = S + row.to(tl.int64) * sst
        end = tl.minimum(begin + SEG, hi + 1)
        slot = OFFSETS + row.to(tl.int64) * NSEG + seg
        if WRITE:
            taken = tl.load(slot + tl.arange(0, 1))
        else:
            taken = tl.zeros([1], tl.int32)
        for s0 in range(begin, end, BLOCK):
            s = s0 + tl.arange(0, BLOCK)
            x = tl.load(scores + s, mask=s < end, other=float("-inf"))
            keep = (s < end) & (x >= thr)
            if WRITE:
                at = taken + tl.cumsum(keep.to(tl.int32), 0) - 1
                dst = row.to(tl.int64) * CAP + at
                tl.store(CS + dst, x, mask=keep & (at < CAP))
                tl.store(CP + dst, s, mask=keep & (at < CAP))
            taken += tl.sum(keep.to(tl.int32), 0)
        if not WRITE:
            tl.store(COUNTS + row.to(tl.int64) * NSEG + seg + tl.arange(0, 1), taken)


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
    select: bool = True,  # False: scores only (the benchmark times the two stages apart)
) -> None:
    batch, rows, heads, dim = q.shape
    topk = out.shape[2]
    width = k1 - k0
    gpu = q.device.type != "cpu"
    scores = torch.empty(batch, rows, width, device=q.device, dtype=torch.float32)
    lo_w, hi_w = (lo - k0).to(torch.int32).contiguous(), (hi - k0).to(torch.int32).contiguous()
    block_h = triton.next_power_of_2(heads)
    block_t, block_s = (32, 128) if gpu else (max(4, 16 // block_h), 16)
    block_d = min(64, triton.next_power_of_2(dim)) if gpu else triton.next_power_of_2(dim)
    _index_scores[(triton.cdiv(rows, block_t), triton.cdiv(width, block_s), batch)](
        q, k, w, scores, lo_w, hi_w,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        scores.stride(0), scores.stride(1),
        k0, rows, width, dim**-0.5, heads, dim,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d,
        **dot_flags(q.dtype), num_warps=8 if gpu else 4, num_stages=3,
    )  # fmt: skip
    if not select:
        return
    flat = batch * rows
    dev = q.device
    lo_f, hi_f, base_f = lo_w.view(-1), hi_w.view(-1), base.to(torch.int32).contiguous().view(-1)
    scores2d = scores.view(flat, width)
    visible = hi_f - lo_f + 1
    if flat < CANDIDATE_MIN_ROWS:  # a few rows (decoding): fewer launches beat fewer passes
        _radix_select(scores2d, None, lo_f, hi_f, base_f, torch.ones_like(visible), out, rows, k0, topk, gpu)
        return
    _radix_select(scores2d, None, lo_f, hi_f, base_f, visible <= topk, out, rows, k0, topk, gpu, search=False)
    # Candidates: keys at or above a threshold sampled from the row (about 2 * topk of them), compacted
    # in key order; the exact radix select then runs on them alone. Rows whose sample misjudged the
    # threshold (fewer than topk or more than cap candidates) take the full radix select instead.
    cap = CANDIDATES_PER_TOPK * topk
    seg = 4096 if gpu else 32
    nseg = triton.cdiv(width, seg)
    block = 1024 if gpu else 16
    thr = torch.empty(flat, device=dev, dtype=torch.float32)
    _sample_threshold[(flat,)](scores2d, lo_f, hi_f, thr, width, topk, M=SAMPLE if gpu else 16, num_warps=4)
    counts = torch.zeros(flat, nseg, device=dev, dtype=torch.int32)
    cs = torch.empty(flat, cap, device=dev, dtype=torch.float32)
    cp = torch.empty(flat, cap, device=dev, dtype=torch.int32)
    args = (scores2d, lo_f, hi_f, thr, counts)
    _candidates[(flat, nseg)](*args, counts, cs, cp, width, cap, topk, seg, nseg, WRITE=False, BLOCK=block)
    offsets = (counts.cumsum(1, dtype=torch.int32) - counts).contiguous()
    total = counts.sum(1, dtype=torch.int32)
    ok = (visible > topk) & (total >= topk) & (total <= cap)
    _candidates[(flat, nseg)](*args, offsets, cs, cp, width, cap, topk, seg, nseg, WRITE=True, BLOCK=block)
    zero = torch.zeros_like(lo_f)
    _radix_select(cs, cp, zero, torch.where(ok, total - 1, -1), base_f, ok, out, rows, k0, topk, gpu)
    fallback = (visible > topk) & ~ok
    if bool(fallback.any()):
        hi_fb = torch.where(fallback, hi_f, lo_f - 1)
        _radix_select(scores2d, None, lo_f, hi_fb, base_f, fallback, out, rows, k0, topk, gpu)


def _radix_select(scores, pos, lo, hi, base, active, out, rows, k0, topk, gpu, search=True) -> None:
    """Exact radix top-k of each ``active`` row of ``scores [N, W]`` over ``[lo, hi]`` into ``out``;
    ``pos`` (same shape) maps candidate entries to key positions. ``search=False``: the active rows all
    see at most ``topk`` keys, so only the write runs."""
    flat, width = scores.shape
    block = 1024 if gpu else 16
    seg = (4096 if flat >= 512 else 1024) if gpu else 32  # few rows: more, shorter segments
    nseg = max(triton.cdiv(width, seg), triton.cdiv(topk, seg))
    hist = torch.zeros(flat, 4, 256, device=scores.device, dtype=torch.int32)
    counts = torch.zeros(flat, nseg, 2, device=scores.device, dtype=torch.int32)
    grid = (flat, nseg)
    for p in range(4 if search else 0):
        _radix_hist[grid](scores, lo, hi, hist, width, topk, seg, PASS=p, BLOCK=block, num_warps=4)
    if search:
        _radix_count[grid](scores, lo, hi, hist, counts, width, topk, seg, nseg, BLOCK=block, num_warps=4)
    offsets = (counts.cumsum(1, dtype=torch.int32) - counts).contiguous()
    _radix_write[grid](
        scores, scores if pos is None else pos, active.to(torch.int8).contiguous(), lo, hi, base, hist,
        offsets, out, width, out.stride(0), out.stride(1), rows, k0, topk, seg, nseg, HAS_POS=pos is not None,
        BLOCK=block, num_warps=4,
    )  # fmt: skip


def chunk_rows(batch: int, width: int) -> int:
    """Queries per chunk so that one chunk's fp32 scores stay near ``SCORE_BYTES_PER_CHUNK``."""
    return max(16, min(4096, SCORE_BYTES_PER_CHUNK // (4 * batch * max(width, 1))))
