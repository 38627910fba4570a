"""Triton sparse-stage indexer KL, forward and backward (DESIGN §4), one program per query token.

For query ``t`` with selected keys ``Omega_t = indices[t]`` the target is
``p_j = (1/Hq) sum_h softmax_j(scale * q[t,h] . k[idx_j, g(h)])`` and the loss is
``KL(p || softmax_j(I[t, idx_j]))``, all over the ``topk`` slots, so nothing of size ``T x S`` exists.

Pass 1 gathers the selected K rows once per KV group to get each head's log-sum-exp (kept in a tiny
scratch row), and the selected index keys to get the indexer's log-sum-exp. Pass 2 gathers them again and
accumulates ``sum p log p - sum p I + lse_I``; in the backward it instead forms
``dI = g * (softmax(I) - p)`` and pushes it through ``I = D_I^-0.5 sum_i w_i relu(q_I[i] . k_I[j])``: dq_I
and dw are per-query, dk_I is scattered into fp32 with atomics. A GQA group (G heads) and the index heads
(H) are padded to the 16 rows ``tl.dot`` needs: this op moves ``topk * Hkv * D`` bytes per query and
does only ``2 * Hq`` FLOP per byte, so the idle MMA rows cost nothing that matters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keye_dsa.ops._triton_utils import dot_flags, mma


@triton.jit
def _indexer_logits(qi, KI, kib, idx, ok, wv, d_i, DI, scale_i, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """Indexer logits of one slot tile, ``[BLOCK_N]`` (``-inf`` on empty slots), and the pieces the
    backward needs: the gathered keys ``[BLOCK_N, BLOCK_DI]`` and ``u = q_I . k_I`` ``[16, BLOCK_N]``."""
    ki = tl.load(
        KI + kib + idx[:, None] * DI + d_i[None, :], mask=ok[:, None] & (d_i[None, :] < DI), other=0.0
    )
    u = mma(qi, tl.trans(ki), PRECISE, UPCAST)
    logits = tl.sum(tl.maximum(u, 0.0) * wv[:, None], 0) * scale_i
    return tl.where(ok, logits, float("-inf")), ki, u


@triton.jit
def _sparse_kl(
    Q, K, QI, KI, W, IDX, LSE, G, OUT, DQI, DW, DKI,
    T, S, HQ, HKV, D, H, DI, KTOP, scale, scale_i,
    GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_N: tl.constexpr,
    BACKWARD: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    row = b * T + t
    rows = tl.arange(0, 16)
    d = tl.arange(0, BLOCK_D)
    d_i = tl.arange(0, BLOCK_DI)
    kb = b * S * HKV * D
    kib = b * S * DI
    head_ok = rows < H
    qi = tl.load(
        QI + row * H * DI + rows[:, None] * DI + d_i[None, :],
        mask=head_ok[:, None] & (d_i[None, :] < DI),
        other=0.0,
    )
    wv = tl.load(W + row * H + rows, mask=head_ok, other=0.0).to(tl.float32)
    qk = scale * 1.4426950408889634
    # Pass 1: each head's log-sum-exp over the selected keys (base 2), and the indexer's.
    for g in range(0, HKV):
        q = tl.load(
            Q + (row * HQ + g * GROUP + rows[:, None]) * D + d[None, :],
            mask=(rows[:, None] < GROUP) & (d[None, :] < D),
            other=0.0,
        )
        m = tl.full([16], -1.0e30, tl.float32)
        l = tl.zeros([16], tl.float32)
        for n0 in range(0, KTOP, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            idx = tl.load(IDX + row * KTOP + offs, mask=offs < KTOP, other=-1).to(tl.int64)
            ok = idx >= 0
            kt = tl.load(
                K + kb + (idx[:, None] * HKV + g) * D + d[None, :],
                mask=ok[:, None] & (d[None, :] < D),
                other=0.0,
            )
            s = tl.where(ok[None, :], mma(q, tl.trans(kt), PRECISE, UPCAST) * qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m = m_new
        tl.store(LSE + row * HQ + g * GROUP + rows, m + tl.log2(tl.maximum(l, 1e-30)), mask=rows < GROUP)
    tl.debug_barrier()
    m_i = -1.0e30
    l_i = 0.0
    for n0 in range(0, KTOP, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        idx = tl.load(IDX + row * KTOP + offs, mask=offs < KTOP, other=-1).to(tl.int64)
        ok = idx >= 0
        logits, _, _ = _indexer_logits(qi, KI, kib, idx, ok, wv, d_i, DI, scale_i, PRECISE, UPCAST)
        m_new = tl.maximum(m_i, tl.max(logits, 0))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new), 0)
        m_i = m_new
    lse_i = m_i + tl.log(tl.maximum(l_i, 1e-30))
    # Pass 2: the target on each tile, then the loss terms or the gradient.
    p_log_p = 0.0
    p_dot_i = 0.0
    p_total = 0.0
    upstream = 0.0
    if BACKWARD:
        upstream = tl.load(G + row)
    dqi = tl.zeros([16, BLOCK_DI], tl.float32)
    dw = tl.zeros([16], tl.float32)
    for n0 in range(0, KTOP, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        idx = tl.load(IDX + row * KTOP + offs, mask=offs < KTOP, other=-1).to(tl.int64)
        ok = idx >= 0
        p = tl.zeros([BLOCK_N], tl.float32)
        for g in range(0, HKV):
            q = tl.load(
                Q + (row * HQ + g * GROUP + rows[:, None]) * D + d[None, :],
                mask=(rows[:, None] < GROUP) & (d[None, :] < D),
                other=0.0,
            )
            lse = tl.load(LSE + row * HQ + g * GROUP + rows, mask=rows < GROUP, other=float("inf"))
            kt = tl.load(
                K + kb + (idx[:, None] * HKV + g) * D + d[None, :],
                mask=ok[:, None] & (d[None, :] < D),
                other=0.0,
            )
            s = mma(q, tl.trans(kt), PRECISE, UPCAST) * qk
            p += tl.sum(tl.where(ok[None, :], tl.exp2(s - lse[:, None]), 0.0), 0)
        p = p / HQ
        logits, ki, u = _indexer_logits(qi, KI, kib, idx, ok, wv, d_i, DI, scale_i, PRECISE, UPCAST)
        if BACKWARD:
            di = tl.where(ok, (tl.exp(logits - lse_i) - p) * upstream, 0.0)
            dw += tl.sum(tl.maximum(u, 0.0) * di[None, :], 1) * scale_i
            du = tl.where(u > 0.0, di[None, :] * wv[:, None] * scale_i, 0.0)
            dqi += mma(du.to(ki.dtype), ki, PRECISE, UPCAST)
            dki = mma(tl.trans(du.to(qi.dtype)), qi, PRECISE, UPCAST)
            tl.atomic_add(
                DKI + kib + idx[:, None] * DI + d_i[None, :],
                dki,
                mask=ok[:, None] & (d_i[None, :] < DI),
                sem="relaxed",
            )
        else:
            pos = ok & (p > 0.0)
            p_log_p += tl.sum(tl.where(pos, p * tl.log(tl.where(pos, p, 1.0)), 0.0), 0)
            p_dot_i += tl.sum(tl.where(ok, p * logits, 0.0), 0)
            p_total += tl.sum(tl.where(ok, p, 0.0), 0)
    if BACKWARD:
        tl.store(
            DQI + row * H * DI + rows[:, None] * DI + d_i[None, :],
            dqi,
            mask=head_ok[:, None] & (d_i[None, :] < DI),
        )
        tl.store(DW + row * H + rows, dw, mask=head_ok)
    else:
        kl = tl.where(p_total > 0.0, p_log_p - p_dot_i + lse_i * p_total, 0.0)
        tl.store(OUT + row, kl)


def _launch(q, k, qi, ki, w, indices, scale, grad=None):
    batch, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    h, di = qi.shape[2], qi.shape[3]
    if hq // hkv > 16 or h > 16:
        raise ValueError(
            f"the sparse KL kernel takes <= 16 heads per KV group and <= 16 index heads; got {hq // hkv}, {h}"
        )
    dev = q.device
    lse = torch.empty(batch, t, hq, device=dev, dtype=torch.float32)
    out = torch.empty(batch, t, device=dev, dtype=torch.float32)
    backward = grad is not None
    dqi = torch.empty(qi.shape, device=dev, dtype=torch.float32) if backward else out
    dw = torch.empty(w.shape, device=dev, dtype=torch.float32) if backward else out
    dki = torch.zeros(ki.shape, device=dev, dtype=torch.float32) if backward else out
    if t > 0:
        _sparse_kl[(t, batch)](
            q, k, qi, ki, w, indices, lse, grad if backward else out, out, dqi, dw, dki,
            t, s, hq, hkv, d, h, di, indices.shape[2], scale, di**-0.5,
            GROUP=hq // hkv, BLOCK_D=triton.next_power_of_2(d), BLOCK_DI=triton.next_power_of_2(di),
            BLOCK_N=32 if dev.type != "cpu" else 16, BACKWARD=backward, **dot_flags(q.dtype), num_warps=4,
        )  # fmt: skip
    return (dqi, dki, dw) if backward else out


class SparseIndexerKL(torch.autograd.Function):
    """Per-query sparse-stage KL ``[B, T]``; gradients reach ``q_index``, ``k_index`` and ``weights``."""

    @staticmethod
    def forward(ctx, q_index, k_index, weights, q, k, indices, scale):
        args = [x.contiguous() for x in (q, k, q_index, k_index, weights)] + [
            indices.to(torch.int32).contiguous()
        ]
        ctx.save_for_backward(*args)
        ctx.scale = scale
        qq, kk, qi, ki, w, idx = args
        return _launch(qq, kk, qi, ki, w, idx, scale)

    @staticmethod
    def backward(ctx, grad):
        qq, kk, qi, ki, w, idx = ctx.saved_tensors
        dqi, dki, dw = _launch(qq, kk, qi, ki, w, idx, ctx.scale, grad.float().contiguous())
        return dqi.to(qi.dtype), dki.to(ki.dtype), dw.to(w.dtype), None, None, None, None
