"""Plain PyTorch sparse GQA attention: the ground truth for the Triton kernel (DESIGN §4).

Queries are processed in chunks so memory stays bounded by ``chunk * topk`` gathered rows.
Autograd flows through ordinary ops, so this is also the CPU training path and the gradcheck subject.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 1024


def sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B,T,Hq,D]``, ``k/v [B,S,Hkv,D]``, ``indices [B,T,K]`` -> ``(o [B,T,Hq,D], lse [B,T,Hq] fp32)``.

    A query whose slots are all -1 gets a zero output and ``lse = -inf``.
    """
    outs, lses = [], []
    for start in range(0, q.shape[1], QUERY_CHUNK):
        sl = slice(start, start + QUERY_CHUNK)
        o, lse = _chunk(q[:, sl], k, v, indices[:, sl], scale)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=torch.float32)
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _chunk(q, k, v, indices, scale):
    batch, t, hq, d = q.shape
    hkv = k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    valid = indices >= 0  # [B,T,K]
    safe = indices.long().clamp_min(0)
    rows = torch.arange(batch, device=q.device)[:, None, None]
    # Upcast before gathering, so the backward accumulates each key's many contributions in fp32.
    kk = k.to(compute)[rows, safe]  # [B,T,K,Hkv,D]
    vv = v.to(compute)[rows, safe]
    qg = q.to(compute).view(batch, t, hkv, hq // hkv, d)
    scores = torch.einsum("btgjd,btkgd->btgjk", qg, kk) * scale
    scores = scores.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row has no valid slot
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - finite[..., None])
    out = torch.einsum("btgjk,btkgd->btgjd", probs, vv)
    return out.reshape(batch, t, hq, d).to(q.dtype), lse.reshape(batch, t, hq).float()
