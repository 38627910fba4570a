"""``indexer_scores`` and ``select_topk``: validation and dispatch (DESIGN §4)."""

from __future__ import annotations

import itertools

import torch

from keye_dsa._checks import check_cu_seqlens, check_float, check_rank, check_same
from keye_dsa._dispatch import impl_for
from keye_dsa.ops.indexer_topk.reference import (
    all_visible,
    indexer_scores_reference,
    select_topk_reference,
)


def _check_index_inputs(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, packed: bool) -> None:
    lead = "[total_tokens, " if packed else "[batch, seq, "
    check_rank("q_index", q, 3 if packed else 4, lead + "index_heads, index_dim]")
    check_rank("k_index", k, 2 if packed else 3, lead.replace("seq", "keys") + "index_dim]")
    check_rank("weights", w, 2 if packed else 3, lead + "index_heads]")
    for name, x in (("q_index", q), ("k_index", k), ("weights", w)):
        check_float(name, x)
    check_same("k_index.shape[-1] (index_dim)", k.shape[-1], "q_index.shape[-1]", q.shape[-1])
    check_same("weights.shape", tuple(w.shape), "q_index.shape[:-1]", tuple(q.shape[:-1]))  # type: ignore[arg-type]
    if not packed:
        check_same("k_index.shape[0] (batch)", k.shape[0], "q_index.shape[0]", q.shape[0])
        if k.shape[1] < q.shape[1]:
            raise ValueError(
                f"k_index must hold at least as many keys ({k.shape[1]}) as queries ({q.shape[1]})"
            )


def indexer_scores(
    q_index: torch.Tensor, k_index: torch.Tensor, weights: torch.Tensor, *, causal: bool = True
) -> torch.Tensor:
    """Dense indexer scores ``[B,T,S]`` (fp32), for short sequences and tests (at scale: ``select_topk``)."""
    _check_index_inputs(q_index, k_index, weights, packed=False)
    return indexer_scores_reference(q_index, k_index, weights, causal=causal)


def select_topk(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    *,
    key_start: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact top-``topk`` keys of the indexer score per query, int32, -1 padded, never a full score matrix.

    Batched: ``q_index [B,T,H,D]``, ``k_index [B,S,D]``, ``weights [B,T,H]`` -> ``[B,T,topk]`` positions in
    ``k_index`` (queries are its last ``T`` keys; ``key_start [B]`` hides left padding). Packed, with
    ``cu_seqlens``: ``[N,H,D]``, ``[N,D]``, ``[N,H]`` -> ``[N,topk]`` positions within each sequence.
    """
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int; got {topk!r}")
    packed = cu_seqlens is not None
    _check_index_inputs(q_index, k_index, weights, packed)
    if packed:
        check_same("k_index.shape[0]", k_index.shape[0], "q_index.shape[0]", q_index.shape[0])
        check_cu_seqlens(cu_seqlens, q_index.shape[0])
        return _select_packed(q_index, k_index, weights, topk, cu_seqlens)
    if key_start is not None:
        check_rank("key_start", key_start, 1, "[batch]")
        check_same("key_start.shape[0]", key_start.shape[0], "batch", q_index.shape[0])
    batch, t = q_index.shape[:2]
    s = k_index.shape[1]
    if s <= topk:  # every query sees at most topk keys: skip scoring, take them all
        return all_visible(batch, t, s, topk, key_start, q_index.device)
    if impl_for(q_index, k_index, weights) != "triton" or q_index.dtype == torch.float64:
        return select_topk_reference(q_index, k_index, weights, topk, key_start=key_start)
    dev = q_index.device
    out = torch.empty(batch, t, topk, dtype=torch.int32, device=dev)
    starts = torch.zeros(batch, dtype=torch.int32, device=dev) if key_start is None else key_start.to(dev)
    lo = starts.to(torch.int32)[:, None].expand(batch, t)
    hi = (torch.arange(t, dtype=torch.int32, device=dev) + (s - t))[None].expand(batch, t)
    base = torch.zeros_like(lo)
    _select_triton(q_index, k_index, weights, lo, hi, base, out, lambda c0, c1: (0, c1 + s - t))
    return out


def _select_triton(q, k, w, lo, hi, base, out, window) -> None:
    """Kernel top-k of every query, chunk by chunk; ``window(c0, c1)`` gives the key range ``[k0, k1)``
    the queries ``c0:c1`` may see. Rows the candidate path could not settle are redone at the end."""
    from keye_dsa.ops.indexer_topk import triton_kernel as tk

    batch, t = lo.shape
    q, k, w = (x.contiguous() for x in (q, k, w))
    rows = tk.chunk_rows(batch, k.shape[1], t, out.shape[-1])
    fail = None
    for c0 in range(0, t, rows):
        c1 = min(t, c0 + rows)
        k0, k1 = window(c0, c1)
        qc, wc, loc, hic, basec = (x[:, c0:c1] for x in (q, w, lo, hi, base))
        candidates = batch * (c1 - c0) >= tk.CANDIDATE_MIN_ROWS
        flags = tk.topk_chunk(qc, k, wc, loc, hic, basec, out[:, c0:c1], k0, k1, candidates=candidates)
        if flags is not None:
            fail = torch.zeros(batch, t, dtype=torch.int8, device=q.device) if fail is None else fail
            fail[:, c0:c1] = flags
    if fail is not None:
        tk.settle_fallbacks(q, k, w, lo, hi, base, out, fail)


def _select_packed(q, k, w, topk, cu_seqlens):
    bounds = [int(x) for x in cu_seqlens.tolist()]
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    pos = torch.arange(q.shape[0], device=q.device) - starts  # position within the sequence
    if longest <= topk:
        slots = torch.arange(topk, device=q.device)
        return torch.where(slots[None, :] <= pos[:, None], slots[None, :], -1).to(torch.int32)
    if impl_for(q, k, w) != "triton" or q.dtype == torch.float64:
        out = torch.full((q.shape[0], topk), -1, dtype=torch.int32, device=q.device)
        for a, b in itertools.pairwise(bounds):
            if b > a:
                out[a:b] = select_topk_reference(q[None, a:b], k[None, a:b], w[None, a:b], topk)[0]
        return out
    out = torch.empty(1, q.shape[0], topk, dtype=torch.int32, device=q.device)
    lo = starts.to(torch.int32)[None]
    hi = torch.arange(q.shape[0], dtype=torch.int32, device=q.device)[None]
    starts_host = starts.tolist()
    _select_triton(q[None], k[None], w[None], lo, hi, lo, out, lambda c0, c1: (starts_host[c0], c1))
    return out[0]
