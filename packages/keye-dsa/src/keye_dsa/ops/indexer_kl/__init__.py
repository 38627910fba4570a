"""``indexer_kl_loss``: the Lightning Indexer's training loss for the dense warm-up and sparse stages."""

from __future__ import annotations

import itertools

import torch

from keye_dsa._checks import check_cu_seqlens, check_float, check_rank, check_same
from keye_dsa._dispatch import impl_for
from keye_dsa.ops.indexer_kl.chunked import indexer_kl_chunked

REDUCTIONS = ("sum", "mean", "none")


def indexer_kl_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    weights: torch.Tensor,
    *,
    indices: torch.Tensor | None = None,
    scale: float | None = None,
    key_start: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """``sum_t KL(p[t] || softmax(I[t]))`` (DESIGN §4); gradients reach only the indexer inputs.

    ``q [B,T,Hq,D]`` and ``k [B,S,Hkv,D]`` are the decoder's post-RoPE queries and keys (the target,
    never differentiated); ``q_index [B,T,H,DI]``, ``k_index [B,S,DI]`` and ``weights [B,T,H]`` come from
    the indexer. ``indices=None`` is the dense warm-up; ``indices [B,T,K]`` (the selected keys) is the
    sparse stage. Packed batches drop the batch dim and pass ``cu_seqlens`` (indices sequence-relative).
    ``reduction`` is ``"sum"`` (DESIGN), ``"mean"`` over queries, or ``"none"`` (per-query ``[B,T]``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    packed = cu_seqlens is not None
    if packed:
        check_rank("q", q, 3, "[total_tokens, q_heads, head_dim] with cu_seqlens")
        check_cu_seqlens(cu_seqlens, q.shape[0])
        if key_start is not None:
            raise ValueError("pass key_start (left padding) or cu_seqlens (packed sequences), not both")
        q, k, q_index, k_index, weights = (x[None] for x in (q, k, q_index, k_index, weights))
        indices = None if indices is None else indices[None]
    check_rank("q", q, 4, "[batch, seq, q_heads, head_dim]")
    check_rank("k", k, 4, "[batch, keys, kv_heads, head_dim]")
    check_rank("q_index", q_index, 4, "[batch, seq, index_heads, index_dim]")
    check_rank("k_index", k_index, 3, "[batch, keys, index_dim]")
    check_rank("weights", weights, 3, "[batch, seq, index_heads]")
    for name, x in (("q", q), ("k", k), ("q_index", q_index), ("k_index", k_index), ("weights", weights)):
        check_float(name, x)
    check_same("q_index.shape[:2]", tuple(q_index.shape[:2]), "q.shape[:2]", tuple(q.shape[:2]))  # type: ignore[arg-type]
    check_same("k_index.shape[:2]", tuple(k_index.shape[:2]), "k.shape[:2]", tuple(k.shape[:2]))  # type: ignore[arg-type]
    check_same("weights.shape", tuple(weights.shape), "q_index.shape[:3]", tuple(q_index.shape[:3]))  # type: ignore[arg-type]
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if indices is not None:
        check_rank("indices", indices, 3, "[batch, seq, topk]")
        check_same("indices.shape[:2]", tuple(indices.shape[:2]), "q.shape[:2]", tuple(q.shape[:2]))  # type: ignore[arg-type]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    target = (q.detach(), k.detach())
    if _triton_ok(q, k, q_index, k_index, weights, indices):
        query_start, key_end = _kernel_bounds(cu_seqlens, key_start, q, k)
        if indices is None:
            from keye_dsa.ops.indexer_kl.dense_kernel import DenseIndexerKL

            per_query = DenseIndexerKL.apply(q_index, k_index, weights, *target, query_start, key_end, scale)
        else:
            from keye_dsa.ops.indexer_kl.sparse_kernel import SparseIndexerKL

            if packed:  # sequence-relative -> positions in the packed row
                indices = torch.where(indices >= 0, indices + query_start[..., None], -1)
            per_query = SparseIndexerKL.apply(q_index, k_index, weights, *target, indices, scale)
    elif packed:
        parts = [
            indexer_kl_chunked(
                q[:, a:b], k[:, a:b], q_index[:, a:b], k_index[:, a:b], weights[:, a:b],
                indices=None if indices is None else indices[:, a:b], scale=scale,
            )
            for a, b in itertools.pairwise(int(x) for x in cu_seqlens.tolist())
        ]  # fmt: skip
        per_query = torch.cat(parts, 1)
    else:
        per_query = indexer_kl_chunked(
            q, k, q_index, k_index, weights, indices=indices, scale=scale, key_start=key_start
        )
    return _reduce(per_query[0] if packed else per_query, reduction)


def _kernel_bounds(cu_seqlens, key_start, q, k):
    """The dense kernel's visibility beyond causality, int32: the first key each query sees ``[B, T]`` and
    one past the last query that sees each key ``[B, S]`` (None, None for plain causal rows)."""
    (batch, t), s, device = q.shape[:2], k.shape[1], q.device
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu.diff(), output_size=t)
        return cu[seq].to(torch.int32)[None], cu[seq + 1].to(torch.int32)[None]
    if key_start is not None:
        start = key_start.to(device=device, dtype=torch.int32).view(batch, 1)
        keys = torch.arange(s, device=device, dtype=torch.int32)[None]
        return start.expand(batch, t).contiguous(), torch.where(keys >= start, t, 0).to(torch.int32)
    return None, None


def _triton_ok(q, k, q_index, k_index, weights, indices) -> bool:
    """Both stages run their Triton kernel for GQA groups and index heads of at most 16, without fp64."""
    tensors = (q, k, q_index, k_index, weights) + (() if indices is None else (indices,))
    small = q.shape[2] // k.shape[2] <= 16 and q_index.shape[2] <= 16
    return (
        impl_for(*tensors) == "triton"
        and small
        and q.dtype != torch.float64
        and q_index.dtype != torch.float64
    )


def _reduce(per_query: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_query.sum()
    if reduction == "mean":
        return per_query.mean() if per_query.numel() else per_query.sum()
    return per_query
