"""``sparse_attention`` and ``sparse_attention_varlen``: validation, dispatch and autograd."""

from __future__ import annotations

import torch

from keye_dsa._checks import check_cu_seqlens, check_float, check_indices, check_rank, check_same
from keye_dsa._dispatch import impl_for
from keye_dsa.ops.sparse_attention.reference import sparse_attention_reference


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale):
        from keye_dsa.ops.sparse_attention.triton_kernel import sparse_attention_fwd
        from keye_dsa.ops.sparse_attention.union import plan_for

        plan = plan_for(indices, k.shape[1])
        o, lse = sparse_attention_fwd(q, k, v, indices, scale, plan)
        ctx.save_for_backward(q, k, v, indices, o, lse)
        ctx.scale, ctx.plan = scale, plan
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        from keye_dsa.ops.sparse_attention.triton_kernel import sparse_attention_bwd

        q, k, v, indices, o, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd(q, k, v, indices, o, lse, do.contiguous(), ctx.scale, ctx.plan)
        return dq, dk, dv, None, None


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    validate_indices: bool = True,
):
    """Sparse GQA attention: query ``t`` attends only to the keys ``indices[b, t, :]`` (-1 = empty slot).

    ``q [B,T,Hq,D]``, ``k, v [B,S,Hkv,D]``, ``indices`` int32 ``[B,T,K]``; returns ``o [B,T,Hq,D]`` and,
    with ``return_lse``, the fp32 log-sum-exp ``[B,T,Hq]`` (``-inf`` for a query with no valid slot).
    ``validate_indices=False`` skips the range check (one device sync) in hot loops.
    On the Triton path, blocks of 64 queries whose selections overlap run on the union kernel (each shared
    key row loaded once per block; ``union.py``), the others on the per-query kernel.
    """
    check_rank("q", q, 4, "[batch, seq, q_heads, head_dim]")
    check_rank("k", k, 4, "[batch, keys, kv_heads, head_dim]")
    check_rank("v", v, 4, "[batch, keys, kv_heads, head_dim]")
    check_rank("indices", indices, 3, "[batch, seq, topk]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    check_same("k.shape[0] (batch)", k.shape[0], "q.shape[0]", q.shape[0])
    check_same("k.shape[3] (head_dim)", k.shape[3], "q.shape[3]", q.shape[3])
    check_same("indices.shape[:2]", tuple(indices.shape[:2]), "q.shape[:2]", tuple(q.shape[:2]))  # type: ignore[arg-type]
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    check_indices(indices, k.shape[1], validate_indices)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl_for(q, k, v, indices) == "triton" and q.dtype != torch.float64:
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        o, lse = _SparseAttention.apply(q, k, v, indices.to(torch.int32).contiguous(), scale)
    else:
        o, lse = sparse_attention_reference(q, k, v, indices, scale)
    return (o, lse) if return_lse else o


def varlen_to_absolute(indices: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sequence-relative indices ``[total, K]`` -> positions in the packed batch (-1 stays -1)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.where(indices >= 0, indices + starts[:, None].to(indices.dtype), indices)


def sparse_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Packed form: ``q [N,Hq,D]``, ``k, v [N,Hkv,D]``, ``indices [N,K]`` relative to each token's sequence
    (``cu_seqlens`` int32 ``[num_seqs + 1]``)."""
    check_rank("q", q, 3, "[total_tokens, q_heads, head_dim]")
    check_rank("k", k, 3, "[total_tokens, kv_heads, head_dim]")
    check_rank("v", v, 3, "[total_tokens, kv_heads, head_dim]")
    check_rank("indices", indices, 2, "[total_tokens, topk]")
    check_cu_seqlens(cu_seqlens, q.shape[0])
    check_same("indices.shape[0]", indices.shape[0], "q.shape[0]", q.shape[0])
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    per_token_len = torch.repeat_interleave(lengths, lengths)
    check_indices(indices, q.shape[0])
    if indices.numel() and bool((indices >= per_token_len[:, None]).any()):
        raise IndexError("sparse_attention_varlen: an index points past the end of its own sequence")
    absolute = varlen_to_absolute(indices, cu_seqlens)
    out = sparse_attention(
        q[None], k[None], v[None], absolute[None], scale=scale, return_lse=return_lse, validate_indices=False
    )
    if return_lse:
        return out[0][0], out[1][0]
    return out[0]
