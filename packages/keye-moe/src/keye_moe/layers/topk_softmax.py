"""The router's softmax, top-k, renormalization and Switch statistics in one Triton kernel (CUDA).

In PyTorch these are about a dozen kernels over the ``[N, E]`` logits (fp32 softmax, topk, sum,
divide, cast, then an atomic ``index_add_`` and a column sum for the statistics); the kernel reads the
logits once per block of rows and writes the top-k ids and weights plus per-block partial statistics
(summed afterwards in a fixed order by a second small kernel, so the result is deterministic).
``reference_topk_softmax`` is the PyTorch math (transformers' ``Qwen3MoeTopKRouter``); the backward
recomputes it with the kernel's chosen ids, so the gradients are exactly the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32


def reference_topk_softmax(
    logits: torch.Tensor, top_k: int, norm: bool, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits ``[N, E]`` -> (ids ``[N, K]`` int64, weights ``[N, K]`` in the logits' dtype, fp32 probs).
    A selection bias (aux-loss-free balancing) changes which experts are chosen, not their weights."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    if bias is None:
        weights, ids = torch.topk(probs, top_k, dim=-1)
    else:
        _, ids = torch.topk(probs + bias.float(), top_k, dim=-1)
        weights = probs.gather(-1, ids)
    return ids, _finish(weights, norm, logits.dtype), probs


def _finish(weights: torch.Tensor, norm: bool, dtype: torch.dtype) -> torch.Tensor:
    if norm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype)


@triton.jit
def _topk_softmax_kernel(
    logits_ptr,
    bias_ptr,
    mask_ptr,
    ids_ptr,
    weights_ptr,
    counts_ptr,
    probsum_ptr,
    N,
    E,
    stride_l,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, E_POW2)
    row_ok = rows < N
    col_ok = cols < E
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_l + cols[None, :]
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)  # padding rows: finite, never stored
    p = tl.exp(x - tl.max(x, 1)[:, None])
    probs = p / tl.sum(p, 1)[:, None]
    score = probs
    if HAS_BIAS:
        score = probs + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    score = tl.where(col_ok[None, :], score, float("-inf"))
    kcols = tl.arange(0, K_POW2)
    ids = tl.zeros((BLOCK_ROWS, K_POW2), dtype=tl.int64)
    weights = tl.zeros((BLOCK_ROWS, K_POW2), dtype=tl.float32)
    chosen = tl.zeros((BLOCK_ROWS, E_POW2), dtype=tl.float32)
    for k in tl.static_range(TOP_K):  # descending order, as torch.topk
        best_score, best = tl.max(score, 1, return_indices=True)  # ties: the lowest index, as argmax
        hit = cols[None, :] == best[:, None]
        if HAS_BIAS:  # the weight is the unbiased probability of the chosen expert
            best_score = tl.sum(tl.where(hit, probs, 0.0), 1)
        ids = tl.where(kcols[None, :] == k, best.to(tl.int64)[:, None], ids)
        weights = tl.where(kcols[None, :] == k, best_score[:, None], weights)
        chosen += hit.to(tl.float32)
        score = tl.where(hit, float("-inf"), score)
    if NORM:
        weights = weights / tl.sum(weights, 1)[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(ids_ptr + out, ids, mask=out_ok)
    tl.store(weights_ptr + out, weights.to(weights_ptr.dtype.element_ty), mask=out_ok)
    if STATS:
        m = row_ok.to(tl.float32)
        if HAS_MASK:
            m *= tl.load(mask_ptr + rows, mask=row_ok, other=0.0)
        tl.store(counts_ptr + pid * E + cols, tl.sum(chosen * m[:, None], 0), mask=col_ok)
        tl.store(probsum_ptr + pid * E + cols, tl.sum(probs * m[:, None], 0), mask=col_ok)


@triton.jit
def _sum_blocks_kernel(parts_ptr, out_ptr, BLOCKS, E, BLOCK_B: tl.constexpr, E_POW2: tl.constexpr):
    """``out[s] = sum_b parts[s, b]`` for the two ``[blocks, E]`` statistics, one program each, in a
    fixed order. (Two ``torch.sum`` calls over dim 1 took 2 x 10.6 us on the H200.)"""
    s = tl.program_id(0)
    cols = tl.arange(0, E_POW2)
    acc = tl.zeros((BLOCK_B, E_POW2), dtype=tl.float32)
    for b0 in range(0, BLOCKS, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        ptrs = parts_ptr + (s * BLOCKS + rows)[:, None] * E + cols[None, :]
        acc += tl.load(ptrs, mask=(rows < BLOCKS)[:, None] & (cols < E)[None, :], other=0.0)
    tl.store(out_ptr + s * E + cols, tl.sum(acc, 0), mask=cols < E)


class TopkSoftmax(torch.autograd.Function):
    """logits -> (ids, weights, tokens per expert, summed probabilities); the last two only with stats
    (fp32 ``[E]``, rows weighted by the token mask)."""

    @staticmethod
    def forward(ctx, logits, bias, mask, top_k: int, norm: bool, stats: bool):  # type: ignore[override]
        n, e = logits.shape
        blocks = triton.cdiv(n, BLOCK_ROWS)
        ids = torch.empty(n, top_k, dtype=torch.long, device=logits.device)
        weights = torch.empty(n, top_k, dtype=logits.dtype, device=logits.device)
        parts = torch.empty(2, blocks if stats else 1, e, dtype=torch.float, device=logits.device)
        if n:
            _topk_softmax_kernel[(blocks,)](
                logits, bias if bias is not None else logits, mask if mask is not None else logits,
                ids, weights, parts[0], parts[1], n, e, logits.stride(0),
                TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k), E_POW2=triton.next_power_of_2(e),
                BLOCK_ROWS=BLOCK_ROWS, NORM=norm, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                STATS=stats, num_warps=4,
            )  # fmt: skip
        if stats and n:
            sums = parts.new_empty(2, e)
            e_pow2 = triton.next_power_of_2(e)
            block_b = max(1, min(64, 8192 // e_pow2))
            _sum_blocks_kernel[(2,)](parts, sums, blocks, e, BLOCK_B=block_b, E_POW2=e_pow2, num_warps=4)
            counts, prob_sum = sums[0], sums[1]
        else:
            counts, prob_sum = (parts.new_zeros(e),) * 2
        ctx.save_for_backward(logits, ids, mask)
        ctx.norm = norm
        ctx.mark_non_differentiable(ids, counts)
        return ids, weights, counts, prob_sum

    @staticmethod
    def backward(ctx, _d_ids, d_weights, _d_counts, d_prob_sum):  # type: ignore[override]
        logits, ids, mask = ctx.saved_tensors
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            probs = torch.softmax(leaf, dim=-1, dtype=torch.float)
            outs, grads = [], []
            if d_weights is not None:
                outs.append(_finish(probs.gather(-1, ids), ctx.norm, logits.dtype))
                grads.append(d_weights)
            if d_prob_sum is not None:
                outs.append((probs if mask is None else probs * mask[:, None]).sum(0))
                grads.append(d_prob_sum)
            torch.autograd.backward(outs, grads)
        return leaf.grad, None, None, None, None, None


def topk_softmax(
    logits: torch.Tensor,
    top_k: int,
    norm: bool,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    stats: bool = True,
):
    """The fused router math; ``mask`` is a float ``[N]`` row weight for the statistics."""
    if logits.dim() != 2 or not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"logits must be [N, E] with E >= top_k={top_k}; got {tuple(logits.shape)}")
    bias = bias.float().contiguous() if bias is not None else None
    mask = mask.float().contiguous() if mask is not None else None
    return TopkSoftmax.apply(logits.contiguous(), bias, mask, top_k, norm, stats)
