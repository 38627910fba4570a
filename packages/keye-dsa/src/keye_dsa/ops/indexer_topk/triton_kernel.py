"""Triton Lightning-Indexer scoring and exact top-k, chunked over queries (DESIGN §4).

No ``L x L`` score matrix ever exists: queries are processed ``chunk`` rows at a time (about 1 GiB of
fp32 scores per chunk whatever the length), in two kernels per chunk:

1. ``_index_scores``: one tensor-core product per (query tile x key tile) with the ``H`` index heads of
   ``BLOCK_T`` queries stacked as ``BLOCK_T * H`` MMA rows, then ReLU, the per-head gate and the sum over
   heads. Tiles entirely past the causal edge are skipped (never read later).
2. ``_radix_topk``: one program per query row finds the exact k-th largest score by a 4-pass radix
   select over the order-preserving uint32 image of the fp32 scores (8 bits a pass, ``tl.histogram``),
   then writes every key above the threshold and, in key order, as many ties as still fit. Rows that
   see at most ``topk`` keys skip the selection and take every visible key.

Selection is exact: the kernel and ``torch.topk`` agree on the selected score values; among equal
scores (e.g. several exact zeros after ReLU) the kernel keeps the lowest key positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keye_dsa.ops._triton_utils import dot_flags, mma

SCORE_BYTES_PER_CHUNK = 1 << 30


@triton.jit
def _index_scores(
    Q, K, W, S, LO, HI,
    sqt, sqh, sks, swt, sst,
    k0, n_rows, width, scale, H, D,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
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
def _radix_topk(
    S, LO, HI, BASE, OUT, sst, sot, k0, TOPK, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    scores = S + row.to(tl.int64) * sst
    out = OUT + row.to(tl.int64) * sot
    lo = tl.load(LO + row)
    hi = tl.load(HI + row)
    shift_out = k0 - tl.load(BASE + row)
    n = hi - lo + 1
    offs = tl.arange(0, BLOCK)
    if n <= TOPK:
        for j0 in range(0, TOPK, BLOCK):
            j = j0 + offs
            tl.store(out + j, tl.where(j < n, lo + j + shift_out, -1), mask=j < TOPK)
    else:
        prefix = tl.zeros([1], tl.uint32)
        pmask = tl.zeros([1], tl.uint32)
        need = tl.full([1], TOPK, tl.int32)  # how many still to take among keys matching the prefix
        bins = tl.arange(0, 256)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros([256], tl.int32)
            for s0 in range(lo, hi + 1, BLOCK):
                s = s0 + offs
                key = _ordered_key(tl.load(scores + s, mask=s <= hi, other=0.0))
                match = (s <= hi) & ((key & pmask) == prefix)
                hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
            at_or_above = tl.cumsum(hist, 0, reverse=True)
            digit = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1
            above = tl.sum(tl.where(bins > digit, hist, 0), 0)
            need = need - above
            prefix = prefix | (digit.to(tl.uint32) << shift)
            pmask = pmask | (tl.full([1], 255, tl.uint32) << shift)
        n_above = TOPK - need  # keys strictly above the threshold go first, ties after them
        taken_gt = tl.zeros([1], tl.int32)
        taken_eq = tl.zeros([1], tl.int32)
        for s0 in range(lo, hi + 1, BLOCK):
            s = s0 + offs
            key = _ordered_key(tl.load(scores + s, mask=s <= hi, other=0.0))
            gt = (s <= hi) & (key > prefix)
            eq = (s <= hi) & (key == prefix)
            pos_gt = taken_gt + tl.cumsum(gt.to(tl.int32), 0) - 1
            pos_eq = taken_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
            tl.store(out + pos_gt, s + shift_out, mask=gt)
            tl.store(out + n_above + pos_eq, s + shift_out, mask=eq & (pos_eq < need))
            taken_gt += tl.sum(gt.to(tl.int32), 0)
            taken_eq += tl.sum(eq.to(tl.int32), 0)


def topk_chunk(
    q: torch.Tensor,  # [T, H, D] queries of one chunk (one batch row, or a packed chunk)
    k: torch.Tensor,  # [S, D]
    w: torch.Tensor,  # [T, H]
    lo: torch.Tensor,  # [T] int32: first visible key of each query (absolute in k)
    hi: torch.Tensor,  # [T] int32: last visible key of each query (absolute in k)
    base: torch.Tensor,  # [T] int32: subtracted from the written positions (sequence start, or 0)
    out: torch.Tensor,  # [T, topk] int32 view to fill
    k0: int,  # first key of the window this chunk may see
    k1: int,  # one past its last key
) -> None:
    rows, heads, dim = q.shape
    topk = out.shape[1]
    width = k1 - k0
    scores = torch.empty(rows, width, device=q.device, dtype=torch.float32)
    lo_w, hi_w = (lo - k0).contiguous(), (hi - k0).contiguous()
    block_t, block_s = (16, 16) if q.device.type == "cpu" else (32, 128)
    block_h = triton.next_power_of_2(heads)
    block_t = max(block_t, 16 // block_h if block_h < 16 else 1)
    block_d = min(64, triton.next_power_of_2(dim)) if q.device.type != "cpu" else triton.next_power_of_2(dim)
    grid = (triton.cdiv(rows, block_t), triton.cdiv(width, block_s))
    _index_scores[grid](
        q, k, w, scores, lo_w, hi_w,
        q.stride(0), q.stride(1), k.stride(0), w.stride(0), scores.stride(0),
        k0, rows, width, dim**-0.5, heads, dim,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d,
        **dot_flags(q.dtype), num_warps=8 if q.device.type != "cpu" else 4, num_stages=3,
    )  # fmt: skip
    block = 1024 if q.device.type != "cpu" else 64
    _radix_topk[(rows,)](
        scores, lo_w, hi_w, base.contiguous(), out, scores.stride(0), out.stride(0), k0, topk,
        BLOCK=block, num_warps=8 if q.device.type != "cpu" else 4,
    )  # fmt: skip


def chunk_rows(width: int) -> int:
    return max(16, min(4096, SCORE_BYTES_PER_CHUNK // (4 * max(width, 1))))
