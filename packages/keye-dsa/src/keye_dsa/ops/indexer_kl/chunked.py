"""Memory-bounded indexer KL for both stages: no full attention or score map ever exists.

Queries are processed in chunks. The forward pass keeps nothing but the inputs; the backward pass
recomputes each chunk and uses the closed form ``dKL/dI[t, s] = softmax(I[t])[s] - p[t, s]`` (for a
normalized target), so the decoder's attention is recomputed once more but never stored, and the
indexer's graph exists for one chunk at a time. The math is that of ``reference.py``.
"""

from __future__ import annotations

import torch

from keye_dsa.ops.indexer_kl.reference import _kl_rows, attention_target
from keye_dsa.ops.indexer_topk.reference import indexer_scores_reference

CHUNK_BYTES = 1 << 28


def _chunk_rows(q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor | None) -> int:
    batch, _, hq, d = q.shape
    per_row = batch * 4 * (hq * k.shape[1] if indices is None else indices.shape[-1] * k.shape[2] * d * 2)
    return max(1, CHUNK_BYTES // max(per_row, 1))


def _chunk_logits(qi, ki, w, indices, key_start, q_offset):
    """Indexer logits of one query chunk: ``[B,Tc,S]`` (dense) or ``[B,Tc,K]`` (over ``indices``)."""
    if indices is None:
        return indexer_scores_reference(qi, ki, w, key_start=key_start, q_offset=q_offset)
    compute = torch.promote_types(qi.dtype, torch.float32)
    ok = indices >= 0
    rows = torch.arange(qi.shape[0], device=qi.device)[:, None, None]
    ki_sel = ki.to(compute)[rows, indices.long().clamp_min(0)]  # [B,Tc,K,DI], fp32 accumulation
    dots = torch.einsum("bthd,btkd->bthk", qi.to(compute), ki_sel).relu()
    logits = torch.einsum("bthk,bth->btk", dots, w.to(compute)) * qi.shape[-1] ** -0.5
    return logits.masked_fill(~ok, float("-inf"))


def _chunk_target(q, k, indices, scale, visible):
    """Attention target of one chunk on the same support as ``_chunk_logits``."""
    if indices is None:
        return attention_target(q, k, scale, visible)
    batch, t, hq, d = q.shape
    hkv = k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    ok = indices >= 0
    rows = torch.arange(batch, device=q.device)[:, None, None]
    k_sel = k[rows, indices.long().clamp_min(0)].to(compute)  # [B,Tc,K,Hkv,D]
    logits = torch.einsum("btgjd,btkgd->btgjk", q.to(compute).view(batch, t, hkv, hq // hkv, d), k_sel)
    logits = (logits * scale).reshape(batch, t, hq, -1).masked_fill(~ok[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2)
    return probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(compute).tiny)


class _ChunkedIndexerKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qi, ki, w, q, k, indices, key_start, scale):
        batch, t = qi.shape[:2]
        offset = ki.shape[1] - t
        rows = _chunk_rows(q, k, indices)
        out = torch.zeros(batch, t, dtype=torch.promote_types(qi.dtype, torch.float32), device=qi.device)
        for c0 in range(0, t, rows):
            c1 = min(t, c0 + rows)
            idx = None if indices is None else indices[:, c0:c1]
            logits = _chunk_logits(qi[:, c0:c1], ki, w[:, c0:c1], idx, key_start, c0 + offset)
            target = _chunk_target(q[:, c0:c1], k, idx, scale, torch.isfinite(logits))
            out[:, c0:c1] = _kl_rows(target, logits)
        ctx.save_for_backward(qi, ki, w, q, k, indices, key_start)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        qi, ki, w, q, k, indices, key_start = ctx.saved_tensors
        t = qi.shape[1]
        offset = ki.shape[1] - t
        rows = _chunk_rows(q, k, indices)
        dqi, dw = torch.zeros_like(qi), torch.zeros_like(w)
        dki = torch.zeros_like(ki)
        for c0 in range(0, t, rows):
            c1 = min(t, c0 + rows)
            idx = None if indices is None else indices[:, c0:c1]
            with torch.enable_grad():
                qi_c = qi[:, c0:c1].detach().requires_grad_()
                w_c = w[:, c0:c1].detach().requires_grad_()
                ki_d = ki.detach().requires_grad_()
                logits = _chunk_logits(qi_c, ki_d, w_c, idx, key_start, c0 + offset)
                with torch.no_grad():
                    visible = torch.isfinite(logits)
                    target = _chunk_target(q[:, c0:c1], k, idx, ctx.scale, visible)
                    has_key = visible.any(-1, keepdim=True)
                    soft = torch.softmax(torch.where(has_key, logits, 0.0), dim=-1)
                    dlogits = torch.where(visible, soft - target, 0.0) * grad[:, c0:c1, None]
                g_qi, g_ki, g_w = torch.autograd.grad(logits, (qi_c, ki_d, w_c), dlogits)
            dqi[:, c0:c1] = g_qi
            dw[:, c0:c1] = g_w
            dki += g_ki
        return dqi, dki, dw, None, None, None, None, None


def indexer_kl_chunked(q, k, q_index, k_index, weights, *, indices=None, scale, key_start=None):
    """Per-query KL ``[B,T]`` with gradients into ``q_index``, ``k_index`` and ``weights`` only."""
    return _ChunkedIndexerKL.apply(
        q_index, k_index, weights, q.detach(), k.detach(), indices, key_start, scale
    )
