"""Triton sparse GQA attention over a block's key union, forward and backward (DESIGN §4).

Used for the query blocks whose ``UnionPlan`` says so (``union.py``); the per-query kernel
(``triton_kernel.py``) computes the others. One program takes one block of 64 queries, one KV group and
a slice of ``QS`` of the block's queries: its MMA rows are those queries' ``G`` heads, query-major
(``QS * G`` about the launch table's ``ROWS``: 64 forward, 128 backward). It walks the block's union
``U_b`` in tiles of ``BLOCK_U`` rows, gathers each K/V row once (one contiguous ``D``-element read),
computes ``S = Q K^T`` for all its rows at once and masks each score by the membership bit of the row's
query. Shared rows are thus loaded once per block and slice instead of once per query, and the work
becomes dense tensor-core tiles: queries that did not select a row only cost masked MMA lanes.

Backward recomputes the probabilities from the saved log-sum-exp, accumulates dQ in the program and
adds each union row's dK/dV for all the program's rows with one fp32 atomic per element (the per-query
kernel adds one per query and row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keye_dsa.ops._triton_utils import dot_flags, mma, softmax_finish, softmax_step
from keye_dsa.ops.sparse_attention.union import QB, QB_JIT, UnionPlan


def slice_queries(groups: int, rows: int = 128) -> int:
    """Queries per program: a power of two dividing the 64-query block, about ``rows / G`` of them."""
    qs = 1
    while qs < QB and 2 * qs * groups <= rows:
        qs *= 2
    return qs


@triton.jit
def _rows(blk, sl, NB, T, G: tl.constexpr, QS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The program's rows: query ``t`` of the batch row, head within the group, membership bit, valid."""
    rows = tl.arange(0, BLOCK_M)
    local = sl * QS + rows // G
    t = (blk % NB) * QB_JIT + local
    return t, rows % G, tl.minimum(local, QB_JIT - 1).to(tl.int64), (rows < QS * G) & (t < T)


@triton.jit
def _program(
    Q, COUNT, USE, sqb, sqt, sqh, T, NB, D,
    G: tl.constexpr, QS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """What program (group g, query slice, block) works on: its union size ``n`` (0 when the block is
    not the union kernel's), its rows (query ``t``, head ``h``, membership ``bit``) and their queries."""
    g = tl.program_id(0)
    blk = tl.program_id(2).to(tl.int64)
    b = blk // NB
    use = tl.load(USE + blk) != 0
    n = tl.where(use, tl.load(COUNT + blk), 0)
    t, head, bit, row_ok = _rows(blk, tl.program_id(1), NB, T, G, QS, BLOCK_M)
    row_ok = row_ok & use
    h = g * G + head
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    tile = row_ok[:, None] & col_ok[None, :]
    q = tl.load(Q + b * sqb + t[:, None] * sqt + h[:, None] * sqh + cols[None, :], mask=tile, other=0.0)
    return g, blk, b, n, t, h, bit, row_ok, cols, col_ok, tile, q


@triton.jit
def _gather_union(
    K, V, KEYS, MEMBERS, b, blk, u0, n, CAP, skb, sks, skh, svb, svs, svh, g, cols, col_ok,
    BLOCK_U: tl.constexpr,
):  # fmt: skip
    """One tile of the union: its K/V rows and membership masks (rows past ``n`` masked)."""
    offs = u0 + tl.arange(0, BLOCK_U)
    ok = offs < n
    pos = tl.load(KEYS + blk * CAP + offs, mask=ok, other=0).to(tl.int64)
    members = tl.load(MEMBERS + blk * CAP + offs, mask=ok, other=0)
    kmask = ok[:, None] & col_ok[None, :]
    kt = tl.load(K + b * skb + pos[:, None] * sks + g * skh + cols[None, :], mask=kmask, other=0.0)
    vt = tl.load(V + b * svb + pos[:, None] * svs + g * svh + cols[None, :], mask=kmask, other=0.0)
    return pos, members, kmask, kt, vt


@triton.jit
def _union_fwd(
    Q, K, V, KEYS, MEMBERS, COUNT, USE, O, LSE,
    sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sob, sot, soh, slb, slt,
    scale, T, NB, CAP, D,
    G: tl.constexpr, QS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_U: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    g, blk, b, n, t, h, bit, row_ok, cols, col_ok, tile, q = _program(
        Q, COUNT, USE, sqb, sqt, sqh, T, NB, D, G, QS, BLOCK_M, BLOCK_D
    )
    qk_scale = scale * 1.4426950408889634
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for u0 in range(0, n, BLOCK_U):
        _, members, _, kt, vt = _gather_union(
            K, V, KEYS, MEMBERS, b, blk, u0, n, CAP, skb, sks, skh, svb, svs, svh, g, cols, col_ok, BLOCK_U
        )  # fmt: skip
        selected = ((members[None, :] >> bit[:, None]) & 1) != 0
        m, l, acc = softmax_step(q, kt, vt, selected, m, l, acc, qk_scale, PRECISE, UPCAST)
    out, lse = softmax_finish(acc, m, l)
    tl.store(O + b * sob + t[:, None] * sot + h[:, None] * soh + cols[None, :], out.to(O.dtype.element_ty),
             mask=tile)  # fmt: skip
    tl.store(LSE + b * slb + t * slt + h, lse, mask=row_ok)


@triton.jit
def _union_bwd(
    Q, K, V, KEYS, MEMBERS, COUNT, USE, DO, LSE, DELTA, DQ, DK, DV,
    sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sdob, sdot, sdoh, slb, slt,
    sdqb, sdqt, sdqh, sdkb, sdks, sdkh,
    scale, T, NB, CAP, D,
    G: tl.constexpr, QS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_U: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    g, blk, b, n, t, h, bit, row_ok, cols, col_ok, tile, q = _program(
        Q, COUNT, USE, sqb, sqt, sqh, T, NB, D, G, QS, BLOCK_M, BLOCK_D
    )
    do = tl.load(DO + b * sdob + t[:, None] * sdot + h[:, None] * sdoh + cols[None, :], mask=tile, other=0.0)
    lse = tl.load(LSE + b * slb + t * slt + h, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows without keys: every p is 0
    delta = tl.load(DELTA + b * slb + t * slt + h, mask=row_ok, other=0.0)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for u0 in range(0, n, BLOCK_U):
        pos, members, kmask, kt, vt = _gather_union(
            K, V, KEYS, MEMBERS, b, blk, u0, n, CAP, skb, sks, skh, svb, svs, svh, g, cols, col_ok, BLOCK_U
        )  # fmt: skip
        selected = ((members[None, :] >> bit[:, None]) & 1) != 0
        s = mma(q, tl.trans(kt), PRECISE, UPCAST)
        dp = mma(do, tl.trans(vt), PRECISE, UPCAST)
        p = tl.where(selected, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dsc = ds.to(kt.dtype)
        dv = mma(tl.trans(p.to(vt.dtype)), do, PRECISE, UPCAST)
        dk = mma(tl.trans(dsc), q, PRECISE, UPCAST)
        dq += mma(dsc, kt, PRECISE, UPCAST)
        dst = b * sdkb + pos[:, None] * sdks + g * sdkh + cols[None, :]
        tl.atomic_add(DV + dst, dv, mask=kmask, sem="relaxed")
        tl.atomic_add(DK + dst, dk * scale, mask=kmask, sem="relaxed")
    tl.store(DQ + b * sdqb + t[:, None] * sdqt + h[:, None] * sdqh + cols[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=tile)  # fmt: skip


# Launch settings (bench_union.py --sweep): ROWS, the target MMA rows per program (queries of the slice x
# heads of the group); BLOCK_U, the union rows per step. Defaults: the sweep's fastest at 32K on an H200
# (BENCHMARKS.md).
FWD_LAUNCH = {"ROWS": 64, "BLOCK_U": 64, "num_warps": 4, "num_stages": 2}
BWD_LAUNCH = {"ROWS": 128, "BLOCK_U": 64, "num_warps": 8, "num_stages": 1}


def _config(q: torch.Tensor, k: torch.Tensor, launch: dict):
    groups = q.shape[2] // k.shape[2]
    qs = slice_queries(groups, launch["ROWS"])
    block_m = max(16, triton.next_power_of_2(qs * groups))
    block_u = launch["BLOCK_U"] if q.dtype != torch.float32 else min(32, launch["BLOCK_U"])
    return groups, qs, block_m, triton.next_power_of_2(q.shape[3]), block_u


def union_attention_fwd(q, k, v, plan: UnionPlan, o, lse, scale) -> None:
    """Writes ``o`` and ``lse`` of the queries in blocks with ``plan.use`` (the others are left alone)."""
    batch, t, _, d = q.shape
    groups, qs, block_m, block_d, block_u = _config(q, k, FWD_LAUNCH)
    grid = (k.shape[2], QB // qs, batch * plan.blocks)
    _union_fwd[grid](
        q, k, v, plan.keys, plan.members, plan.count, plan.use, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1),
        scale, t, plan.blocks, plan.cap, d,
        G=groups, QS=qs, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_U=block_u,
        **dot_flags(q.dtype), num_warps=FWD_LAUNCH["num_warps"], num_stages=FWD_LAUNCH["num_stages"],
    )  # fmt: skip


def union_attention_bwd(q, k, v, plan: UnionPlan, do, lse, delta, dq, dk, dv, scale) -> None:
    """Writes ``dq`` and adds into the fp32 ``dk``/``dv`` for the queries in blocks with ``plan.use``."""
    batch, t, _, d = q.shape
    groups, qs, block_m, block_d, block_u = _config(q, k, BWD_LAUNCH)
    grid = (k.shape[2], QB // qs, batch * plan.blocks)
    _union_bwd[grid](
        q, k, v, plan.keys, plan.members, plan.count, plan.use, do, lse, delta, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        scale, t, plan.blocks, plan.cap, d,
        G=groups, QS=qs, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_U=block_u,
        **dot_flags(q.dtype), num_warps=BWD_LAUNCH["num_warps"], num_stages=BWD_LAUNCH["num_stages"],
    )  # fmt: skip
