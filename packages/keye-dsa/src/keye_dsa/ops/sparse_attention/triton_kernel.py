"""Triton sparse GQA attention, forward and backward (DESIGN §4).

One program handles one query token and a pack of ``P`` KV groups, gathering each selected K/V row
once and sharing it among all query heads of those groups.

Why pack heads of several KV groups: ``tl.dot`` needs at least 16 rows, and a GQA group has fewer
(Qwen3: G = 8). Padding the 8 heads to 16 rows would leave half of every MMA idle *and* spend a whole
program on one 256-byte gather per index. Instead, the program takes ``P = 16 // G`` neighbouring KV
groups (their ``P * G`` query heads are contiguous) and lays their queries out block-diagonally,
``Q_bd[r, p*D + d] = q[h0 + r, d]`` if head ``r`` belongs to group ``p`` else 0, against the gathered
tile ``K[idx, g0:g0+P, :]`` flattened to ``P*D`` columns. ``Q_bd @ K^T`` then gives every real head its
own scores, the gathered row is one contiguous ``P*D*2``-byte read, and every MMA row is a real head.
The zeros cost tensor-core cycles, which this op has to spare: at 2 * G FLOP per gathered byte it is
bound by the gather, not the MMA. We do not pack several query *tokens*: each token gathers its own
rows, so tokens cannot share an MMA operand unless their index sets coincide.

Backward recomputes the probabilities from the saved log-sum-exp, writes dQ directly, and scatters dK
and dV into fp32 buffers with atomic adds (an index may be selected by many queries).

Given a ``UnionPlan`` (``union.py``), the tokens of blocks that the union kernel computes
(``union_kernel.py``: overlapping selections, each shared row loaded once per block) are skipped here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keye_dsa.ops._triton_utils import dot_flags, mma, softmax_finish, softmax_step
from keye_dsa.ops.sparse_attention.union import QB, QB_JIT, UnionPlan
from keye_dsa.ops.sparse_attention.union_kernel import union_attention_bwd, union_attention_fwd


def pack_size(groups: int, num_kv_heads: int, head_dim: int) -> int:
    """Largest P dividing Hkv with P * G <= 16 rows and P * D <= 256 gathered columns."""
    block_d = triton.next_power_of_2(head_dim)
    best = 1
    for p in range(1, num_kv_heads + 1):
        if num_kv_heads % p == 0 and p * groups <= 16 and p * block_d <= 256:
            best = p
    return best


@triton.jit
def _tile_layout(G: tl.constexpr, P: tl.constexpr, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, P * BLOCK_D)
    col_group = cols // BLOCK_D
    col_dim = cols % BLOCK_D
    row_ok = rows < P * G
    col_ok = col_dim < D
    diag = (rows[:, None] // G == col_group[None, :]) & row_ok[:, None] & col_ok[None, :]
    return rows, row_ok, col_group, col_dim, col_ok, diag


@triton.jit
def _gather_kv(
    K, V, IDX, b, t, n0, KTOP, sib, sit, skb, sks, skh, svb, svs, svh, kv_col, col_dim, col_ok,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One step's BLOCK_N selected indices of token t and their K/V rows for the pack (-1 slots masked)."""
    offs = n0 + tl.arange(0, BLOCK_N)
    idx = tl.load(IDX + b * sib + t * sit + offs, mask=offs < KTOP, other=-1).to(tl.int64)
    ok = idx >= 0
    kmask = ok[:, None] & col_ok[None, :]
    kt = tl.load(
        K + b * skb + idx[:, None] * sks + kv_col[None, :] * skh + col_dim[None, :], mask=kmask, other=0.0
    )
    vt = tl.load(
        V + b * svb + idx[:, None] * svs + kv_col[None, :] * svh + col_dim[None, :], mask=kmask, other=0.0
    )
    return idx, ok, kmask, kt, vt


@triton.jit
def _skipped(SKIP, b, t, NB, KTOP, row_ok, diag):
    """For a token whose 64-query block the union kernel computes: no slots, nothing stored."""
    skip = tl.load(SKIP + b * NB + t // QB_JIT) != 0
    return tl.where(skip, 0, KTOP), row_ok & ~skip, diag & ~skip


@triton.jit
def _sparse_fwd(
    Q, K, V, IDX, O, LSE, SKIP,
    sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sib, sit, sob, sot, soh, slb, slt,
    scale, KTOP, CHUNK, D, NB,
    G: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr, HAS_SKIP: tl.constexpr,
    SPLITS: tl.constexpr,
):  # fmt: skip
    """Program (t * SPLITS + split, pack, b) attends to slots [split * CHUNK, split * CHUNK + CHUNK) of
    token t; its O and LSE go to row ``t * SPLITS + split`` of ``O``/``LSE`` (with SPLITS > 1, fp32
    partials that ``_merge_splits`` combines)."""
    t_out = tl.program_id(0)
    t = t_out // SPLITS
    g0 = tl.program_id(1) * P
    b = tl.program_id(2).to(tl.int64)
    rows, row_ok, col_group, col_dim, col_ok, diag = _tile_layout(G, P, D, BLOCK_M, BLOCK_D)
    if HAS_SKIP:
        KTOP, row_ok, diag = _skipped(SKIP, b, t, NB, KTOP, row_ok, diag)
    h = g0 * G + rows
    q = tl.load(Q + b * sqb + t * sqt + h[:, None] * sqh + col_dim[None, :], mask=diag, other=0.0)
    kv_col = g0 + col_group
    qk_scale = scale * 1.4426950408889634
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, P * BLOCK_D], tl.float32)
    first = (t_out % SPLITS) * CHUNK
    for n0 in range(first, tl.minimum(first + CHUNK, KTOP), BLOCK_N):
        _, ok, _, kt, vt = _gather_kv(
            K, V, IDX, b, t, n0, KTOP, sib, sit, skb, sks, skh, svb, svs, svh,
            kv_col, col_dim, col_ok, BLOCK_N,
        )  # fmt: skip
        m, l, acc = softmax_step(q, kt, vt, ok[None, :], m, l, acc, qk_scale, PRECISE, UPCAST)
    out, lse = softmax_finish(acc, m, l)
    tl.store(
        O + b * sob + t_out * sot + h[:, None] * soh + col_dim[None, :], out.to(O.dtype.element_ty), mask=diag
    )
    tl.store(LSE + b * slb + t_out * slt + h, lse, mask=row_ok)


@triton.jit
def _sparse_bwd(
    Q, K, V, IDX, DO, LSE, DELTA, DQ, DK, DV, SKIP,
    sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sib, sit, sdob, sdot, sdoh, slb, slt,
    sdqb, sdqt, sdqh, sdkb, sdks, sdkh,
    scale, KTOP, D, NB,
    G: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr, HAS_SKIP: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    g0 = tl.program_id(1) * P
    b = tl.program_id(2).to(tl.int64)
    rows, row_ok, col_group, col_dim, col_ok, diag = _tile_layout(G, P, D, BLOCK_M, BLOCK_D)
    if HAS_SKIP:
        KTOP, row_ok, diag = _skipped(SKIP, b, t, NB, KTOP, row_ok, diag)
    h = g0 * G + rows
    q = tl.load(Q + b * sqb + t * sqt + h[:, None] * sqh + col_dim[None, :], mask=diag, other=0.0)
    do = tl.load(DO + b * sdob + t * sdot + h[:, None] * sdoh + col_dim[None, :], mask=diag, other=0.0)
    lse = tl.load(LSE + b * slb + t * slt + h, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows without keys: every p is 0
    delta = tl.load(DELTA + b * slb + t * slt + h, mask=row_ok, other=0.0)
    kv_col = g0 + col_group
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, P * BLOCK_D], tl.float32)
    for n0 in range(0, KTOP, BLOCK_N):
        idx, ok, kmask, kt, vt = _gather_kv(
            K, V, IDX, b, t, n0, KTOP, sib, sit, skb, sks, skh, svb, svs, svh,
            kv_col, col_dim, col_ok, BLOCK_N,
        )  # fmt: skip
        s = mma(q, tl.trans(kt), PRECISE, UPCAST)
        dp = mma(do, tl.trans(vt), PRECISE, UPCAST)
        p = tl.where(ok[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        pc = p.to(vt.dtype)
        dsc = ds.to(kt.dtype)
        dv = mma(tl.trans(pc), do, PRECISE, UPCAST)
        dk = mma(tl.trans(dsc), q, PRECISE, UPCAST)
        dq += mma(dsc, kt, PRECISE, UPCAST)
        dst = b * sdkb + idx[:, None] * sdks + kv_col[None, :] * sdkh + col_dim[None, :]
        tl.atomic_add(DV + dst, dv, mask=kmask, sem="relaxed")
        tl.atomic_add(DK + dst, dk * scale, mask=kmask, sem="relaxed")
    tl.store(
        DQ + b * sdqb + t * sdqt + h[:, None] * sdqh + col_dim[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=diag,
    )


# Launch settings (the benchmark sweeps them); BLOCK_N is the number of gathered rows per step.
# Defaults: the fastest of a sweep at 32K on an H200 (see BENCHMARKS.md).
FWD_LAUNCH = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
BWD_LAUNCH = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def _config(q: torch.Tensor, k: torch.Tensor, launch: dict):
    hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    groups = hq // hkv
    p = pack_size(groups, hkv, d)
    block_d = triton.next_power_of_2(d)
    block_m = max(16, triton.next_power_of_2(p * groups))
    block_n = launch["BLOCK_N"] if q.dtype != torch.float32 else min(32, launch["BLOCK_N"])
    return groups, p, block_d, block_m, block_n


# Fewer programs than this (decoding: a few tokens) split each token's slots over several programs,
# launched with ``SPLIT_LAUNCH`` (the H200 sweep's fastest for one token per row at batch 8, BENCHMARKS.md).
MIN_PROGRAMS = 264  # two waves of an H100/H200's 132 SMs
SPLIT_LAUNCH = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def split_count(programs: int, ktop: int, block_n: int) -> int:
    """Programs per token: enough to reach ``MIN_PROGRAMS``, each keeping at least one BLOCK_N step."""
    if programs >= MIN_PROGRAMS:
        return 1
    return max(1, min(triton.cdiv(ktop, block_n), MIN_PROGRAMS // programs))


@triton.jit
def _merge_splits(OP, LP, O, LSE, SPLITS, HQ, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                  STEP: tl.constexpr):  # fmt: skip
    """Program (token row, head): combines the ``SPLITS`` partial outputs ``OP`` and log-sum-exps ``LP``
    (flash-decoding style) into ``O`` and ``LSE``, ``STEP`` partials at a time; a token without any key
    gets 0 and ``-inf``."""
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    part = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(LP + (r * SPLITS + part) * HQ + h, mask=part < SPLITS, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(lse - top), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, SPLITS, STEP):
        step = p0 + tl.arange(0, STEP)
        weight = tl.exp(
            tl.load(LP + (r * SPLITS + step) * HQ + h, mask=step < SPLITS, other=float("-inf")) - top
        )
        o = tl.load(
            OP + ((r * SPLITS + step[:, None]) * HQ + h) * D + d[None, :],
            mask=(step[:, None] < SPLITS) & (d[None, :] < D),
            other=0.0,
        )
        acc += tl.sum(o * weight[:, None], 0)
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(O + (r * HQ + h) * D + d, out.to(O.dtype.element_ty), mask=d < D)
    tl.store(LSE + r * HQ + h, tl.where(total == 0.0, float("-inf"), top + tl.log(total)))


def sparse_attention_fwd(q, k, v, indices, scale, plan: UnionPlan | None = None):
    """With a union ``plan``, its blocks go to the union kernel and the rest to this one."""
    batch, t, hq, d = q.shape
    hkv = k.shape[2]
    groups, p, block_d, block_m, _ = _config(q, k, FWD_LAUNCH)
    if t == 0:
        return torch.empty_like(q), torch.empty(batch, t, hq, device=q.device, dtype=torch.float32)
    ktop = indices.shape[2]
    splits = (
        1 if plan is not None else split_count(t * (hkv // p) * batch, ktop, _config(q, k, SPLIT_LAUNCH)[4])
    )
    launch = FWD_LAUNCH if splits == 1 else SPLIT_LAUNCH
    block_n = _config(q, k, launch)[4]
    chunk = triton.cdiv(triton.cdiv(ktop, splits), block_n) * block_n
    rows = t * splits
    o = torch.empty_like(q) if splits == 1 else q.new_empty(batch, rows, hq, d, dtype=torch.float32)
    lse = torch.empty(batch, rows, hq, device=q.device, dtype=torch.float32)
    grid = (rows, hkv // p, batch)
    _sparse_fwd[grid](
        q, k, v, indices, o, lse, None if plan is None else plan.use,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), indices.stride(0), indices.stride(1),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        scale, ktop, chunk, d, triton.cdiv(t, QB),
        G=groups, P=p, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=block_n, HAS_SKIP=plan is not None,
        SPLITS=splits, **dot_flags(q.dtype), num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )  # fmt: skip
    if splits > 1:
        out = q.new_empty(batch, t, hq, d)
        merged = torch.empty(batch, t, hq, device=q.device, dtype=torch.float32)
        _merge_splits[(batch * t, hq)](
            o, lse, out, merged, splits, hq, d, BLOCK_P=triton.next_power_of_2(splits), BLOCK_D=block_d,
            STEP=min(16, triton.next_power_of_2(splits)),
        )  # fmt: skip
        return out, merged
    if plan is not None:
        union_attention_fwd(q, k, v, plan, o, lse, scale)
    return o, lse


def sparse_attention_bwd(q, k, v, indices, o, lse, do, scale, plan: UnionPlan | None = None):
    """With a union ``plan``, its blocks go to the union kernel and the rest to this one."""
    batch, t, _, d = q.shape
    hkv = k.shape[2]
    groups, p, block_d, block_m, block_n = _config(q, k, BWD_LAUNCH)
    delta = (o.float() * do.float()).sum(-1).contiguous()
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    if t > 0:
        grid = (t, hkv // p, batch)
        _sparse_bwd[grid](
            q, k, v, indices, do, lse, delta, dq, dk, dv, None if plan is None else plan.use,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), indices.stride(0), indices.stride(1),
            do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1),
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            scale, indices.shape[2], d, triton.cdiv(t, QB),
            G=groups, P=p, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=block_n, HAS_SKIP=plan is not None,
            **dot_flags(q.dtype), num_warps=BWD_LAUNCH["num_warps"], num_stages=BWD_LAUNCH["num_stages"],
        )  # fmt: skip
        if plan is not None:
            union_attention_bwd(q, k, v, plan, do, lse, delta, dq, dk, dv, scale)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
