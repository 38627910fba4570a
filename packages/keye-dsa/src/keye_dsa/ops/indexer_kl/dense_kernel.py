"""Triton dense warm-up indexer KL, forward and backward (DESIGN §4), flash-style: no ``T x S`` map exists.

For query ``t`` the target is ``p[t,s] = (1/Hq) sum_h softmax_s(scale * q[t,h] . k[s,g(h)])`` over its
visible keys and the loss is ``KL(p[t] || softmax_s I[t,s]) = sum_s p log p - sum_s p I + lse_I``.

A program owns ``BLOCK_T`` queries. The MMA rows of a KV group are its (query, head) pairs, ``BLOCK_T x
GROUP`` of them (query-major, so a row's heads are contiguous in ``q``): 16 queries of an 8-head group fill
a 128-row tile, and summing the heads is a reshape and a sum, not a loop. The index heads are packed the
same way (``BLOCK_T x H`` rows). Forward: pass 1 streams the keys of each KV group for every head's
log-sum-exp (saved for the backward, log2 domain); pass 2 streams them again and, tile by tile, forms ``p``
and the indexer logits and accumulates the three sums and the indexer's online log-sum-exp (saved too).
Backward: ``dI = g * (softmax(I) - p)`` is rebuilt per tile from the saved statistics, then pushed through
``I = D_I^-0.5 sum_j w_j relu(q_I[j] . k_I)``. A query-major launch accumulates ``dq_I`` and ``dw`` per
query block and a key-major launch ``dk_I`` per key block, each rebuilding the target: no atomics, at the
price of one more ``q k^T`` pass (the target's ``Hq * D`` MACs a pair dominate the indexer's ``H * D_I``).
Left padding and packed sequences come as each query's first visible key and each key's last query: they
mask the tiles and bound the loops (a packed row is one launch, whatever its number of sequences).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keye_dsa.ops._triton_utils import dot_flags, mma

LOG2E = tl.constexpr(1.4426950408889634)
# GPU launches: (query, head) rows of the target's MMA tile, keys per tile, warps, pipeline stages. fp32
# inputs (IEEE dots, twice the bytes a tile) take small tiles: the 16-bit ones would need 160+ KiB of
# shared memory on sm_90 (offline compile).
LAUNCH = {"ROWS": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
LAUNCH_FP32 = {"ROWS": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


@triton.jit
def _visible(qpos, s, lo, T, S, OFFSET):
    """Keys ``s`` that query ``qpos`` may see: ``lo <= s <= qpos + OFFSET`` (any broadcastable shapes)."""
    return (qpos < T) & (s < S) & (s >= lo) & (s <= qpos + OFFSET)


@triton.jit
def _query_starts(QLO, b, tq, T, HAS_BOUNDS: tl.constexpr):
    """First key each query ``tq`` may see: ``QLO [B, T]`` (left padding, or its packed sequence's start)."""
    if HAS_BOUNDS:
        return tl.load(QLO + b * T + tq, mask=tq < T, other=0)
    else:
        return tl.zeros_like(tq)


@triton.jit
def _first_tile(QLO, b, tq, T, S, BLOCK_N: tl.constexpr, HAS_BOUNDS: tl.constexpr):
    """Start of the first key tile any query ``tq`` of a block sees."""
    if HAS_BOUNDS:
        return tl.min(tl.where(tq < T, _query_starts(QLO, b, tq, T, HAS_BOUNDS), S), 0) // BLOCK_N * BLOCK_N
    else:
        return 0


@triton.jit
def _key_ends(KEND, b, s, S, T, HAS_BOUNDS: tl.constexpr):
    """One past the last query that sees key ``s``: ``KEND [B, S]`` (0 for a padding key, its packed
    sequence's end), else ``T``."""
    if HAS_BOUNDS:
        return tl.load(KEND + b * S + s, mask=s < S, other=0)
    else:
        return tl.zeros_like(s) + T


@triton.jit
def _target_rows(t0, T, GROUP, GP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Query and head-in-group of each (query, head) row of a target tile, and which rows are real."""
    r = tl.arange(0, BLOCK_T * GP)
    rt = t0 + r // GP
    rj = r % GP
    return rt, rj, (rt < T) & (rj < GROUP)


@triton.jit
def _group_queries(Q, b, T, HQ, D, g, GROUP, rt, rj, row_ok, d):
    """KV group ``g``'s query rows ``[BLOCK_T*GP, BLOCK_D]`` (zero on padding rows) and their flat heads."""
    head = (b * T + rt) * HQ + g * GROUP + rj
    q = tl.load(Q + head[:, None] * D + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    return q, head


@triton.jit
def _group_keys(K, b, S, HKV, D, g, s, d):
    """KV group ``g``'s keys ``s``, ``[BLOCK_N, BLOCK_D]`` (zero past the end)."""
    mask = (s[:, None] < S) & (d[None, :] < D)
    return tl.load(K + ((b * S + s[:, None]) * HKV + g) * D + d[None, :], mask=mask, other=0.0)


@triton.jit
def _target_probs(
    Q, K, LSE, QLO, b, t0, s, T, S, OFFSET, HQ, HKV, D, qk,
    GROUP, GP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BOUNDS: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``p [BLOCK_T, BLOCK_N]`` of queries ``t0 + arange(BLOCK_T)`` over keys ``s``, from the heads'
    saved log-sum-exps (0 where a key is hidden)."""
    rt, rj, row_ok = _target_rows(t0, T, GROUP, GP, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    lo = _query_starts(QLO, b, rt, T, HAS_BOUNDS)
    vis = _visible(rt[:, None], s[None, :], lo[:, None], T, S, OFFSET) & row_ok[:, None]
    p = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for g in range(0, HKV):
        q, head = _group_queries(Q, b, T, HQ, D, g, GROUP, rt, rj, row_ok, d)
        lse = tl.load(LSE + head, mask=row_ok, other=float("inf"))
        kt = _group_keys(K, b, S, HKV, D, g, s, d)
        sc = mma(q, tl.trans(kt), PRECISE, UPCAST) * qk
        pr = tl.where(vis, tl.exp2(sc - lse[:, None]), 0.0)
        p += tl.sum(tl.reshape(pr, [BLOCK_T, GP, BLOCK_N]), 1)
    return p / HQ


@triton.jit
def _index_heads(b, t0, T, H, HP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Flat (query, index head) offsets of a query block's ``BLOCK_T * HP`` rows, and which are real."""
    r = tl.arange(0, BLOCK_T * HP)
    rt = t0 + r // HP
    rj = r % HP
    return (b * T + rt) * H + rj, (rt < T) & (rj < H)


@triton.jit
def _index_rows(QI, W, b, t0, T, H, DI, HP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DI: tl.constexpr):
    """``q_I [BLOCK_T*HP, BLOCK_DI]`` and ``w`` (fp32) of a query block's rows, zero on padding rows."""
    head, ok = _index_heads(b, t0, T, H, HP, BLOCK_T)
    di = tl.arange(0, BLOCK_DI)
    qi = tl.load(QI + head[:, None] * DI + di[None, :], mask=ok[:, None] & (di[None, :] < DI), other=0.0)
    w = tl.load(W + head, mask=ok, other=0.0).to(tl.float32)
    return qi, w


@triton.jit
def _index_logits(u, w, vis, scale_i, HP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Indexer logits ``[BLOCK_T, BLOCK_N]`` (``-inf`` where hidden) from ``u = q_I . k_I`` per row."""
    per_head = tl.maximum(u, 0.0) * w[:, None]
    logits = tl.sum(tl.reshape(per_head, [BLOCK_T, HP, BLOCK_N]), 1) * scale_i
    return tl.where(vis, logits, float("-inf"))


@triton.jit
def _index_grads(u, w, dlogits, scale_i, HP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dI [BLOCK_T, BLOCK_N]`` pushed back to each (query, index head) row: ``du`` and the row's ``dw``."""
    rows = tl.reshape(tl.broadcast_to(dlogits[:, None, :], [BLOCK_T, HP, BLOCK_N]), [BLOCK_T * HP, BLOCK_N])
    dw = tl.sum(tl.maximum(u, 0.0) * rows, 1) * scale_i
    du = tl.where(u > 0.0, rows * w[:, None] * scale_i, 0.0)
    return du, dw


@triton.jit
def _load_index_keys(KI, b, s, S, DI, BLOCK_DI: tl.constexpr):
    """Index keys ``s`` of row ``b``, ``[BLOCK_N, BLOCK_DI]`` (zero past the end)."""
    di = tl.arange(0, BLOCK_DI)
    mask = (s[:, None] < S) & (di[None, :] < DI)
    return tl.load(KI + (b * S + s[:, None]) * DI + di[None, :], mask=mask, other=0.0)


@triton.jit
def _dense_kl_forward(
    Q, K, QI, KI, W, QLO, LSE, LSE_I, OUT,
    T, S, OFFSET, HQ, HKV, D, H, DI, scale, scale_i,
    GROUP, GP: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, HAS_BOUNDS: tl.constexpr,
    PRECISE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    t0 = tl.program_id(0) * BLOCK_T
    b = tl.program_id(1).to(tl.int64)
    tq = t0 + tl.arange(0, BLOCK_T)
    lo_t = _query_starts(QLO, b, tq, T, HAS_BOUNDS)
    first = _first_tile(QLO, b, tq, T, S, BLOCK_N, HAS_BOUNDS)
    end = tl.minimum(S, t0 + BLOCK_T + OFFSET)
    qk = scale * LOG2E
    d = tl.arange(0, BLOCK_D)
    # Pass 1: every head's log-sum-exp over its visible keys (log2 domain; -inf for a query without one).
    rt, rj, row_ok = _target_rows(t0, T, GROUP, GP, BLOCK_T)
    lo_rows = _query_starts(QLO, b, rt, T, HAS_BOUNDS)
    for g in range(0, HKV):
        q, head = _group_queries(Q, b, T, HQ, D, g, GROUP, rt, rj, row_ok, d)
        m = tl.full([BLOCK_T * GP], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_T * GP], tl.float32)
        for s0 in range(first, end, BLOCK_N):
            s = s0 + tl.arange(0, BLOCK_N)
            kt = _group_keys(K, b, S, HKV, D, g, s, d)
            vis = _visible(rt[:, None], s[None, :], lo_rows[:, None], T, S, OFFSET)
            sc = tl.where(vis, mma(q, tl.trans(kt), PRECISE, UPCAST) * qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(sc - m_new[:, None]), 1)
            m = m_new
        tl.store(LSE + head, tl.where(l > 0.0, m + tl.log2(tl.maximum(l, 1e-30)), float("-inf")), mask=row_ok)
    tl.debug_barrier()  # pass 2 reads the log-sum-exps back in another layout
    # Pass 2: the target and the indexer logits tile by tile; the loss's three sums and the indexer's LSE.
    qi, w = _index_rows(QI, W, b, t0, T, H, DI, HP, BLOCK_T, BLOCK_DI)
    m_i = tl.full([BLOCK_T], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    p_log_p = tl.zeros([BLOCK_T], tl.float32)
    p_dot_i = tl.zeros([BLOCK_T], tl.float32)
    p_total = tl.zeros([BLOCK_T], tl.float32)
    for s0 in range(first, end, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        p = _target_probs(
            Q, K, LSE, QLO, b, t0, s, T, S, OFFSET, HQ, HKV, D, qk,
            GROUP, GP, BLOCK_T, BLOCK_D, BLOCK_N, HAS_BOUNDS, PRECISE, UPCAST,
        )  # fmt: skip
        vis = _visible(tq[:, None], s[None, :], lo_t[:, None], T, S, OFFSET)
        ki = _load_index_keys(KI, b, s, S, DI, BLOCK_DI)
        logits = _index_logits(mma(qi, tl.trans(ki), PRECISE, UPCAST), w, vis, scale_i, HP, BLOCK_T, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_i = m_new
        pos = p > 0.0
        p_log_p += tl.sum(tl.where(pos, p * tl.log(tl.where(pos, p, 1.0)), 0.0), 1)
        p_dot_i += tl.sum(p * tl.where(vis, logits, 0.0), 1)
        p_total += tl.sum(p, 1)
    lse_i = m_i + tl.log(tl.maximum(l_i, 1e-30))
    kl = tl.where(p_total > 0.0, p_log_p - p_dot_i + lse_i * p_total, 0.0)
    tl.store(OUT + b * T + tq, kl, mask=tq < T)
    tl.store(LSE_I + b * T + tq, lse_i, mask=tq < T)


@triton.jit
def _dense_kl_backward(
    Q, K, QI, KI, W, QLO, KEND, LSE, LSE_I, G, DQI, DW, DKI,
    T, S, OFFSET, HQ, HKV, D, H, DI, scale, scale_i,
    GROUP, GP: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, HAS_BOUNDS: tl.constexpr, KEY_MAJOR: tl.constexpr,
    PRECISE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``KEY_MAJOR=False``: program ``i`` writes ``dq_I``/``dw`` of query block ``i``, looping over its
    keys; ``True``: ``dk_I`` of key block ``i``, looping over the queries that see it."""
    b = tl.program_id(1).to(tl.int64)
    qk = scale * LOG2E
    di = tl.arange(0, BLOCK_DI)
    if KEY_MAJOR:
        s = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ki = _load_index_keys(KI, b, s, S, DI, BLOCK_DI)
        dki = tl.zeros([BLOCK_N, BLOCK_DI], tl.float32)
        first_t = tl.maximum(tl.program_id(0) * BLOCK_N - OFFSET, 0) // BLOCK_T * BLOCK_T
        last_t = tl.max(_key_ends(KEND, b, s, S, T, HAS_BOUNDS), 0)  # 0 when no query sees the block
        for t0 in range(first_t, last_t, BLOCK_T):
            qi, w = _index_rows(QI, W, b, t0, T, H, DI, HP, BLOCK_T, BLOCK_DI)
            du, _dw_rows = _pair_grads(  # dw is the query-major launch's
                Q, K, LSE, LSE_I, G, QLO, qi, w, b, t0, s, ki, T, S, OFFSET, HQ, HKV, D, qk, scale_i,
                GROUP, GP, HP, BLOCK_T, BLOCK_N, BLOCK_D, HAS_BOUNDS, PRECISE, UPCAST,
            )  # fmt: skip
            dki += mma(tl.trans(du).to(qi.dtype), qi, PRECISE, UPCAST)
        mask = (s[:, None] < S) & (di[None, :] < DI)
        tl.store(DKI + (b * S + s[:, None]) * DI + di[None, :], dki, mask=mask)
    else:
        t0 = tl.program_id(0) * BLOCK_T
        tq = t0 + tl.arange(0, BLOCK_T)
        first = _first_tile(QLO, b, tq, T, S, BLOCK_N, HAS_BOUNDS)
        end = tl.minimum(S, t0 + BLOCK_T + OFFSET)
        qi, w = _index_rows(QI, W, b, t0, T, H, DI, HP, BLOCK_T, BLOCK_DI)
        dqi = tl.zeros([BLOCK_T * HP, BLOCK_DI], tl.float32)
        dw = tl.zeros([BLOCK_T * HP], tl.float32)
        for s0 in range(first, end, BLOCK_N):
            s = s0 + tl.arange(0, BLOCK_N)
            ki = _load_index_keys(KI, b, s, S, DI, BLOCK_DI)
            du, dw_tile = _pair_grads(
                Q, K, LSE, LSE_I, G, QLO, qi, w, b, t0, s, ki, T, S, OFFSET, HQ, HKV, D, qk, scale_i,
                GROUP, GP, HP, BLOCK_T, BLOCK_N, BLOCK_D, HAS_BOUNDS, PRECISE, UPCAST,
            )  # fmt: skip
            dqi += mma(du.to(ki.dtype), ki, PRECISE, UPCAST)
            dw += dw_tile
        head, ok = _index_heads(b, t0, T, H, HP, BLOCK_T)
        tl.store(DQI + head[:, None] * DI + di[None, :], dqi, mask=ok[:, None] & (di[None, :] < DI))
        tl.store(DW + head, dw, mask=ok)


@triton.jit
def _pair_grads(
    Q, K, LSE, LSE_I, G, QLO, qi, w, b, t0, s, ki, T, S, OFFSET, HQ, HKV, D, qk, scale_i,
    GROUP, GP: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_BOUNDS: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One (query block, key tile) pair of the backward: ``du = dL/d(q_I . k_I)`` per (query, index head)
    row and key (``dq_I += du k_I``, ``dk_I += du^T q_I``) and the rows' ``dw``."""
    tq = t0 + tl.arange(0, BLOCK_T)
    vis = _visible(tq[:, None], s[None, :], _query_starts(QLO, b, tq, T, HAS_BOUNDS)[:, None], T, S, OFFSET)
    p = _target_probs(
        Q, K, LSE, QLO, b, t0, s, T, S, OFFSET, HQ, HKV, D, qk,
        GROUP, GP, BLOCK_T, BLOCK_D, BLOCK_N, HAS_BOUNDS, PRECISE, UPCAST,
    )  # fmt: skip
    u = mma(qi, tl.trans(ki), PRECISE, UPCAST)
    logits = _index_logits(u, w, vis, scale_i, HP, BLOCK_T, BLOCK_N)
    lse_i = tl.load(LSE_I + b * T + tq, mask=tq < T, other=0.0)
    upstream = tl.load(G + b * T + tq, mask=tq < T, other=0.0)
    dlogits = tl.where(vis, (tl.exp(logits - lse_i[:, None]) - p) * upstream[:, None], 0.0)
    return _index_grads(u, w, dlogits, scale_i, HP, BLOCK_T, BLOCK_N)


def _launch_args(q, k, qi, has_bounds, scale):
    """Shapes, tile sizes and flags shared by the forward and the backward launches."""
    t, hq, d = q.shape[1:]
    s, hkv = k.shape[1], k.shape[2]
    h, di = qi.shape[2], qi.shape[3]
    group = hq // hkv
    gp, hp = triton.next_power_of_2(group), triton.next_power_of_2(h)
    fp32 = torch.float32 in (q.dtype, qi.dtype)
    launch = LAUNCH_FP32 if fp32 else LAUNCH
    if q.device.type == "cpu":  # the interpreter: the smallest tiles tl.dot takes
        launch = {"ROWS": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    block_t = max(launch["ROWS"] // max(gp, hp), 16 // min(gp, hp), 1)
    flags = dot_flags(torch.float32 if fp32 else q.dtype)
    sizes = (t, s, s - t, hq, hkv, d, h, di, scale, di**-0.5)
    meta = dict(
        GROUP=group, GP=gp, HP=hp, BLOCK_T=block_t, BLOCK_N=launch["BLOCK_N"],
        BLOCK_D=triton.next_power_of_2(d), BLOCK_DI=triton.next_power_of_2(di), HAS_BOUNDS=has_bounds,
        **flags,
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )  # fmt: skip
    return sizes, meta


class DenseIndexerKL(torch.autograd.Function):
    """Per-query dense warm-up KL ``[B, T]``; gradients reach ``q_index``, ``k_index`` and ``weights``.

    ``query_start [B, T]`` (first key each query sees) and ``key_end [B, S]`` (one past the last query
    that sees each key), int32, describe left padding or packed sequences; both None: plain causal rows.
    """

    @staticmethod
    def forward(ctx, q_index, k_index, weights, q, k, query_start, key_end, scale):
        qq, kk, qi, ki, w = (x.contiguous() for x in (q, k, q_index, k_index, weights))
        batch, t = qq.shape[:2]
        has_bounds = query_start is not None
        sizes, meta = _launch_args(qq, kk, qi, has_bounds, scale)
        lse = torch.empty(batch, t, qq.shape[2], device=qq.device, dtype=torch.float32)
        lse_i = torch.empty(batch, t, device=qq.device, dtype=torch.float32)
        out = torch.zeros(batch, t, device=qq.device, dtype=torch.float32)
        # without bounds, any int32 tensor stands in for the pointers the kernels then never read
        qlo, kend = (query_start, key_end) if has_bounds else (lse_i.view(torch.int32),) * 2
        if t > 0 and kk.shape[1] > 0:
            grid = (triton.cdiv(t, meta["BLOCK_T"]), batch)
            _dense_kl_forward[grid](qq, kk, qi, ki, w, qlo, lse, lse_i, out, *sizes, **meta)
        ctx.save_for_backward(qq, kk, qi, ki, w, qlo, kend, lse, lse_i)
        ctx.sizes, ctx.meta = sizes, meta
        return out

    @staticmethod
    def backward(ctx, grad):
        qq, kk, qi, ki, w, qlo, kend, lse, lse_i = ctx.saved_tensors
        batch, t = qq.shape[:2]
        g = grad.float().contiguous()
        dqi = torch.zeros(qi.shape, device=qi.device, dtype=torch.float32)
        dw = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
        dki = torch.zeros(ki.shape, device=ki.device, dtype=torch.float32)
        if t > 0 and kk.shape[1] > 0:
            meta = ctx.meta
            args = (qq, kk, qi, ki, w, qlo, kend, lse, lse_i, g, dqi, dw, dki)
            grid_q = (triton.cdiv(t, meta["BLOCK_T"]), batch)
            _dense_kl_backward[grid_q](*args, *ctx.sizes, KEY_MAJOR=False, **meta)
            grid_k = (triton.cdiv(kk.shape[1], meta["BLOCK_N"]), batch)
            _dense_kl_backward[grid_k](*args, *ctx.sizes, KEY_MAJOR=True, **meta)
        return dqi.to(qi.dtype), dki.to(ki.dtype), dw.to(w.dtype), None, None, None, None, None
