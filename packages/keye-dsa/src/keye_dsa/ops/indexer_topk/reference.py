"""Plain PyTorch Lightning-Indexer scores and chunked top-k: the ground truth for the fused kernel.

Score (DESIGN §4): ``I[t, s] = D^-0.5 * sum_j w[t, j] * relu(q[t, j] . k[s])``, ``-inf`` outside the
keys query ``t`` may see. Query ``t`` of ``T`` sits at absolute position ``t + S - T`` (queries are the
last ``T`` keys), so a decode step scores its whole cache. ``key_start[b]`` hides left padding.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 512


def key_bounds(
    batch: int, q_len: int, k_len: int | torch.Tensor, key_start: torch.Tensor | None, device
) -> tuple:
    """Inclusive visible key range ``[lo, hi]`` per (batch, query): ``lo [B,1]``, ``hi [1,T]`` (``[B,T]``
    when ``k_len`` is a per-row ``[B]`` tensor of filled cache lengths)."""
    offset = k_len - q_len
    if isinstance(offset, torch.Tensor):
        offset = offset.to(device=device, dtype=torch.long).view(batch, 1)
    hi = torch.arange(q_len, device=device)[None, :] + offset
    lo = torch.zeros(batch, 1, dtype=torch.long, device=device)
    if key_start is not None:
        lo = key_start.to(device=device, dtype=torch.long).view(batch, 1)
    return lo, hi


def indexer_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    *,
    causal: bool = True,
    key_start: torch.Tensor | None = None,
    q_offset: int | None = None,
) -> torch.Tensor:
    """``q [B,T,H,D]``, ``k [B,S,D]``, ``w [B,T,H]`` -> scores ``[B,T,S]`` (fp32, fp64 for fp64 inputs).

    ``q_offset`` is the absolute position of the first query (default ``S - T``).
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    dots = torch.einsum("bthd,bsd->bths", q.to(compute), k.to(compute)).relu()
    scores = torch.einsum("bths,bth->bts", dots, w.to(compute)) * q.shape[-1] ** -0.5
    if causal or key_start is not None:
        batch, t, s = scores.shape
        offset = s - t if q_offset is None else q_offset
        pos = torch.arange(s, device=q.device)
        hi = torch.arange(t, device=q.device)[:, None] + offset
        visible = (pos[None, :] <= hi) if causal else torch.ones(t, s, dtype=torch.bool, device=q.device)
        visible = visible[None].expand(batch, t, s)
        if key_start is not None:
            visible = visible & (pos[None, None, :] >= key_start.to(q.device).view(batch, 1, 1))
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def sample_thresholds_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    k0: int,
    width: int,
    samples: int,
    rank_target: int,
) -> torch.Tensor:
    """The candidate path's sampled thresholds ``[B, T]`` from PyTorch ops (the kernels' ground truth).

    Sample j is the key at window position ``j * width // samples`` (key ``k0 +`` that). Per query: the
    sampled score ranking ``ceil(rank_target * m / n)`` among its ``m`` visible samples (``n`` visible
    keys, window positions ``[lo, hi]``), cut to the leading 16 bits of its order-preserving key;
    ``-inf`` when ``n <= rank_target`` or no sample is visible.
    """
    pos = torch.arange(samples, device=k.device) * width // samples
    scores = indexer_scores_reference(q, k[:, k0 + pos], w, causal=False).float()
    lo, hi = lo.long()[..., None], hi.long()[..., None]
    visible = (pos >= lo) & (pos <= hi)
    m = visible.sum(-1)
    n = (hi - lo + 1)[..., 0]
    rank = (rank_target * m + n - 1) // n.clamp_min(1)
    ranked = scores.masked_fill(~visible, float("-inf")).sort(-1, descending=True).values
    picked = ranked.gather(-1, (rank - 1).clamp_min(0)[..., None])[..., 0]
    # clearing the low 16 bits of the order-preserving key clears them in a positive float's bits and
    # sets them in a negative one's (its key is the bits inverted)
    bits = picked.view(torch.int32)
    cut = torch.where(bits < 0, bits | 0xFFFF, bits & -0x10000).view(torch.float32)
    return torch.where((n > rank_target) & (m > 0), cut, float("-inf"))


def all_visible(
    batch: int, q_len: int, k_len: int | torch.Tensor, topk: int, key_start, device
) -> torch.Tensor:
    """Every visible key, in order, padded with -1: top-k when no query sees more than ``topk`` keys."""
    lo, hi = key_bounds(batch, q_len, k_len, key_start, device)
    idx = lo[:, :, None] + torch.arange(topk, device=device)[None, None, :]  # [B,1,K]
    return torch.where(idx <= hi[:, :, None], idx, -1).expand(batch, q_len, topk).to(torch.int32).contiguous()


def select_topk_reference(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, topk: int, *, key_start: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-``topk`` visible keys per query, int32 ``[B,T,topk]`` (-1 pads), chunk by chunk of queries."""
    batch, t, _, _ = q.shape
    s = k.shape[1]
    if s <= topk:
        return all_visible(batch, t, s, topk, key_start, q.device)
    out = torch.full((batch, t, topk), -1, dtype=torch.int32, device=q.device)
    for c0 in range(0, t, QUERY_CHUNK):
        c1 = min(t, c0 + QUERY_CHUNK)
        scores = indexer_scores_reference(
            q[:, c0:c1], k, w[:, c0:c1], key_start=key_start, q_offset=c0 + s - t
        )
        # A stable sort keeps the lowest positions among equal scores, the kernel's rule, so both
        # paths select the same set even when ReLU leaves many exact zeros.
        values, idx = scores.sort(dim=-1, descending=True, stable=True)
        values, idx = values[..., :topk], idx[..., :topk]
        out[:, c0:c1] = torch.where(torch.isinf(values), -1, idx).to(torch.int32)
    return out
