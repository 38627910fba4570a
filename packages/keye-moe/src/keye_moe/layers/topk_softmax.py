"""The whole Qwen3-MoE router in one Triton kernel (CUDA): logits GEMM, softmax, top-k, renormalization
and the Switch statistics.

In PyTorch the router is a GEMM and about a dozen kernels over the ``[N, E]`` logits (fp32 softmax,
topk, sum, divide, cast, then an atomic ``index_add_`` and a column sum for the statistics). Here each
program computes a block of rows' logits on the tensor cores, stores them in the inputs' dtype, and
routes them while they are still in registers (``_route``): top-k ids and weights, plus per-block partial
statistics that a second small kernel sums in a fixed order (deterministic). The hidden states are read
once and the logits never read back: 43 us against 53 for cuBLAS's GEMM and the separate routing kernel
on an H100 at 16K x 2048 -> 128 experts (BENCHMARKS.md). ``reference_topk_softmax`` is the PyTorch math
(transformers' ``Qwen3MoeTopKRouter``); the backward recomputes it with the kernel's ids, so the logits'
gradient is exactly the reference's, then goes through the GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The fused router's launch (k step, warps, pipeline stages) and its logits tile (rows x experts, fp32).
ROUTER_LAUNCH = {"BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
ROUTER_TILE = 64 * 128


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
def _route(x, rows, row_ok, cols, col_ok, bias_ptr, mask_ptr, ids_ptr, weights_ptr, counts_ptr,
           probsum_ptr, E, TOP_K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_ROWS: tl.constexpr,
           E_POW2: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
           STATS: tl.constexpr):  # fmt: skip
    """Softmax, top-k, renormalization and this block's partial statistics of the fp32 logits ``x
    [BLOCK_ROWS, E_POW2]`` (``-inf`` in the padding columns), in whatever layout ``x`` arrives."""
    x = tl.where(row_ok[:, None], x, 0.0)  # padding rows: finite, never stored
    p = tl.exp(x - tl.max(x, 1)[:, None])
    probs = p / tl.sum(p, 1)[:, None]
    if STATS:  # summed before the top-k rounds, so that (without a bias) ``probs`` dies here
        m = row_ok.to(tl.float32)
        if HAS_MASK:
            m *= tl.load(mask_ptr + rows, mask=row_ok, other=0.0)
        block = tl.program_id(0)
        tl.store(probsum_ptr + block * E + cols, tl.sum(probs * m[:, None], 0), mask=col_ok)
    score = probs
    if HAS_BIAS:
        score = probs + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    score = tl.where(col_ok[None, :], score, float("-inf"))
    kcols = tl.arange(0, K_POW2)
    ids = tl.zeros((BLOCK_ROWS, K_POW2), dtype=tl.int64)
    weights = tl.zeros((BLOCK_ROWS, K_POW2), dtype=tl.float32)
    for k in tl.static_range(TOP_K):  # descending order, as torch.topk
        best_score, best = tl.max(score, 1, return_indices=True)  # ties: the lowest index, as argmax
        hit = cols[None, :] == best[:, None]
        if HAS_BIAS:  # the weight is the unbiased probability of the chosen expert
            best_score = tl.sum(tl.where(hit, probs, 0.0), 1)
        ids = tl.where(kcols[None, :] == k, best.to(tl.int64)[:, None], ids)
        weights = tl.where(kcols[None, :] == k, best_score[:, None], weights)
        score = tl.where(hit, float("-inf"), score)
    if NORM:
        weights = weights / tl.sum(weights, 1)[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(ids_ptr + out, ids, mask=out_ok)
    tl.store(weights_ptr + out, weights.to(weights_ptr.dtype.element_ty), mask=out_ok)
    if STATS:  # the chosen experts are the real columns knocked out to -inf (no probability is -inf)
        chosen = (score == float("-inf")) & col_ok[None, :]
        tl.store(counts_ptr + block * E + cols, tl.sum(chosen.to(tl.float32) * m[:, None], 0), mask=col_ok)


@triton.jit
def _router_kernel(x_ptr, w_ptr, logits_ptr, bias_ptr, mask_ptr, ids_ptr, weights_ptr, counts_ptr,
                   probsum_ptr, N, E, H, stride_x, stride_w, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
                   E_POW2: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, STATS: tl.constexpr, IEEE: tl.constexpr,
                   EVEN_K: tl.constexpr):  # fmt: skip
    """The logits GEMM of a block of rows (``x [N, H] @ w [E, H]^T``, fp32 accumulation, stored in the
    inputs' dtype) and ``_route`` on them while they are in registers: the hidden states are read once
    and the logits never read back."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, E_POW2)
    row_ok = rows < N
    col_ok = cols < E
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros((BLOCK_ROWS, E_POW2), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a_ok = row_ok[:, None]
        b_ok = col_ok[None, :]
        if not EVEN_K:  # a mask constant along k keeps the loads vectorized and pipelined
            a_ok = a_ok & (kk[None, :] < H)
            b_ok = b_ok & (kk[:, None] < H)
        a = tl.load(x_rows + kk[None, :], mask=a_ok, other=0.0)
        b = tl.load(w_cols + kk[:, None], mask=b_ok, other=0.0)
        if IEEE:  # fp32 inputs, and the interpreter (whose 16-bit dots are wrong): widened, exact fp32
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    logits = acc.to(logits_ptr.dtype.element_ty)
    out = rows.to(tl.int64)[:, None] * E + cols[None, :]
    tl.store(logits_ptr + out, logits, mask=row_ok[:, None] & col_ok[None, :])
    x = tl.where(col_ok[None, :], logits.to(tl.float32), float("-inf"))
    _route(x, rows, row_ok, cols, col_ok, bias_ptr, mask_ptr, ids_ptr, weights_ptr, counts_ptr, probsum_ptr,
           E, TOP_K, K_POW2, BLOCK_ROWS, E_POW2, NORM, HAS_BIAS, HAS_MASK, STATS)  # fmt: skip


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


def _statistics(parts: torch.Tensor, blocks: int, e: int, summed: bool):
    """(tokens per expert, summed probabilities) from the partials, in a fixed order; zeros otherwise."""
    if not summed:
        return (parts.new_zeros(e),) * 2
    sums = parts.new_empty(2, e)
    e_pow2 = triton.next_power_of_2(e)
    block_b = max(1, min(64, 8192 // e_pow2))
    _sum_blocks_kernel[(2,)](parts, sums, blocks, e, BLOCK_B=block_b, E_POW2=e_pow2, num_warps=4)
    return sums[0], sums[1]


def _logits_grad(logits, ids, mask, norm: bool, d_weights, d_prob_sum):
    """The gradient of the logits through the weights and the summed probabilities: the PyTorch math
    recomputed with the kernel's ids, so it is exactly the reference's."""
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_()
        probs = torch.softmax(leaf, dim=-1, dtype=torch.float)
        outs, grads = [], []
        if d_weights is not None:
            outs.append(_finish(probs.gather(-1, ids), norm, logits.dtype))
            grads.append(d_weights)
        if d_prob_sum is not None:
            outs.append((probs if mask is None else probs * mask[:, None]).sum(0))
            grads.append(d_prob_sum)
        if not outs:
            return torch.zeros_like(logits)
        torch.autograd.backward(outs, grads)
    return leaf.grad


class FusedRouter(torch.autograd.Function):
    """(hidden ``[N, H]``, router weight ``[E, H]``) -> (ids, weights, tokens per expert, summed
    probabilities, logits ``[N, E]``) by ``_router_kernel``; the backward is the logits' gradient (from
    the weights, the summed probabilities and the logits themselves) through the GEMM."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, mask, top_k: int, norm: bool, stats: bool):  # type: ignore[override]
        n, h = hidden.shape
        e = weight.shape[0]
        e_pow2 = max(16, triton.next_power_of_2(e))  # a tensor-core tile is at least 16 wide
        launch = ROUTER_LAUNCH if hidden.is_cuda else dict(BLOCK_K=16, num_warps=4, num_stages=1)
        # the fp32 logits tile stays at ROUTER_TILE elements: fewer rows per block for more experts
        block_rows = max(16, ROUTER_TILE // e_pow2) if hidden.is_cuda else 16
        blocks = triton.cdiv(n, block_rows)
        ids = torch.empty(n, top_k, dtype=torch.long, device=hidden.device)
        weights = torch.empty(n, top_k, dtype=hidden.dtype, device=hidden.device)
        parts = torch.empty(2, blocks if stats else 1, e, dtype=torch.float, device=hidden.device)
        logits = torch.empty(n, e, dtype=hidden.dtype, device=hidden.device)
        if n:
            _router_kernel[(blocks,)](
                hidden, weight, logits, bias if bias is not None else hidden,
                mask if mask is not None else hidden, ids, weights, parts[0], parts[1],
                n, e, h, hidden.stride(0), weight.stride(0),
                TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k), E_POW2=e_pow2, BLOCK_ROWS=block_rows,
                NORM=norm, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, STATS=stats,
                IEEE=hidden.dtype == torch.float32 or not hidden.is_cuda, EVEN_K=h % launch["BLOCK_K"] == 0,
                **launch,
            )  # fmt: skip
        counts, prob_sum = _statistics(parts, blocks, e, stats and n > 0)
        ctx.save_for_backward(hidden, weight, logits, ids, mask)
        ctx.norm = norm
        ctx.mark_non_differentiable(ids, counts)
        return ids, weights, counts, prob_sum, logits

    @staticmethod
    def backward(ctx, _d_ids, d_weights, _d_counts, d_prob_sum, d_logits):  # type: ignore[override]
        hidden, weight, logits, ids, mask = ctx.saved_tensors
        grad = _logits_grad(logits, ids, mask, ctx.norm, d_weights, d_prob_sum)
        if d_logits is not None:
            grad = grad + d_logits
        d_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        d_weight = grad.t() @ hidden if ctx.needs_input_grad[1] else None
        return d_hidden, d_weight, None, None, None, None, None


def route(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    top_k: int,
    norm: bool,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    stats: bool = True,
):
    """The whole router in one kernel: ``(ids, weights, tokens per expert, summed probabilities,
    logits)`` from the hidden states ``[N, H]`` and the router weight ``[E, H]``."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and the router weight [E, H]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if not 0 < top_k <= weight.shape[0]:
        raise ValueError(f"top_k={top_k} must be in [1, {weight.shape[0]}] (the number of experts)")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and the router weight ({weight.dtype}) must share a dtype")
    bias = bias.float().contiguous() if bias is not None else None
    mask = mask.float().contiguous() if mask is not None else None
    return FusedRouter.apply(hidden.contiguous(), weight.contiguous(), bias, mask, top_k, norm, stats)
