"""Naive indexer KL losses (DESIGN §4), materializing every map: the ground truth for ``chunked.py``.

Dense warm-up: ``p[t] = L1-normalize(sum_h softmax_s(scale * q[t,h] . k[s,g(h)]))`` over visible keys,
``loss = sum_t KL(p[t] || softmax(I[t]))``. Sparse stage: both distributions live on
``Omega_t = indices[t]``: the target sums the heads' softmax over ``Omega_t`` (the distributions the
sparse attention actually uses, so no dense pass is needed) and the indexer's softmax is taken over
``Omega_t`` too. The target never carries gradient. Index sets are assumed free of duplicates.
"""

from __future__ import annotations

import torch

from keye_dsa.ops.indexer_topk.reference import indexer_scores_reference


def _kl_rows(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``sum_s p (log p - log_softmax(logits))`` per row; rows without a visible key give 0."""
    has_key = torch.isfinite(logits).any(-1, keepdim=True)
    logits = torch.where(has_key, logits, torch.zeros_like(logits))
    log_q = torch.log_softmax(logits, dim=-1)
    pos = target > 0
    terms = torch.where(pos, target * (torch.log(torch.where(pos, target, 1.0)) - log_q), 0.0)
    return torch.where(has_key, terms, 0.0).sum(-1)


def attention_target(q: torch.Tensor, k: torch.Tensor, scale: float, visible: torch.Tensor) -> torch.Tensor:
    """``q [B,T,Hq,D]``, ``k [B,S,Hkv,D]``, ``visible [B,T,S]`` -> head-summed, L1-normalized ``[B,T,S]``."""
    batch, t, hq, d = q.shape
    hkv = k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum(
        "btgjd,bsgd->btgjs", q.to(compute).view(batch, t, hkv, hq // hkv, d), k.to(compute)
    ).reshape(batch, t, hq, k.shape[1])
    logits = logits * scale
    logits = logits.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2)
    return probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(compute).tiny)


def indexer_kl_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    *,
    indices: torch.Tensor | None = None,
    scale: float,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query KL ``[B,T]``; ``indices`` (``[B,T,K]``) selects the sparse stage."""
    scores = indexer_scores_reference(q_index, k_index, weights, key_start=key_start)
    visible = torch.isfinite(scores)
    if indices is None:
        with torch.no_grad():
            target = attention_target(q.detach(), k.detach(), scale, visible)
        return _kl_rows(target, scores)
    ok = indices >= 0
    safe = indices.long().clamp_min(0)
    spill = torch.where(ok, safe, visible.shape[-1])  # empty slots land in an extra, dropped column
    selected = torch.zeros(*visible.shape[:2], visible.shape[-1] + 1, dtype=torch.bool, device=q.device)
    selected = selected.scatter_(2, spill, True)[..., :-1]
    with torch.no_grad():
        target = attention_target(q.detach(), k.detach(), scale, selected)
    sel_scores = torch.gather(scores, 2, safe).masked_fill(~ok, float("-inf"))
    return _kl_rows(torch.gather(target, 2, safe).masked_fill(~ok, 0.0), sel_scores)
