"""Grouped-GEMM kernels over the padded dispatch of ``plan.py``.

Three kernels cover the forward and backward passes:
- ``gate_up_swiglu_kernel``: gathers token rows of ``x`` by slot, multiplies by the expert's gate and up
  rows (two accumulators) and writes ``silu(gate) * up`` (and, for backward, the pre-activations).
- ``grouped_gemm_kernel``: ``C = A @ B_e`` per row block, where A rows are read either in padded order
  or gathered by slot, C rows are written in padded order or scattered to their slot, and an optional
  epilogue turns dAct into d(gate, up) (the SwiGLU backward).
- ``grouped_wgrad_kernel``: per expert, ``dW_e = L_e^T @ R_e`` reducing over that expert's rows, with L
  and R each read in padded order, by slot, or by token.
Accumulation is fp32. Grids put the N tiles of one row block next to each other so the gathered A rows
and the expert's weights stay in L2.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

PADDED, BY_SLOT, BY_TOKEN = 0, 1, 2


def _configs(shapes: list[tuple[int, ...]], block_names: tuple[str, ...]) -> list[triton.Config]:
    """Autotuning candidates; the first is also the fixed choice for small problems (no tuning cost)."""
    if INTERPRET:
        return [triton.Config(dict.fromkeys(block_names, 16), num_warps=4, num_stages=1)]
    return [
        triton.Config(dict(zip(block_names, blocks)), num_warps=warps, num_stages=stages)
        for *blocks, warps, stages in shapes
    ]


def launch(kernel, grid, *args, tune: bool, **meta) -> None:
    """Launch an autotuned kernel, or (small problems, decoding) its first config without tuning."""
    if tune and not INTERPRET:
        kernel[grid](*args, **meta)
        return
    config = kernel.configs[0]
    kernel.fn[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.autotune(
    configs=_configs(
        [(64, 64, 4, 4), (64, 64, 8, 4), (128, 64, 8, 3), (64, 32, 4, 5)], ("BLOCK_N", "BLOCK_K")
    ),
    key=["H", "I", "BLOCK_M"],
)
@triton.jit
def gate_up_swiglu_kernel(
    x_ptr,
    w_ptr,
    act_ptr,
    gu_ptr,
    row_slot_ptr,
    block_expert_ptr,
    H,
    I,
    E,
    TOP_K,
    stride_x,
    stride_we,
    stride_wr,
    stride_act,
    stride_gu,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(row_slot_ptr + rows)
    valid = slot >= 0
    tok = tl.where(valid, slot // TOP_K, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_x + offs_k[None, :]
    wg_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wr + offs_k[:, None]
    wu_ptrs = wg_ptrs + I * stride_wr
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = offs_k + k0 < H
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        acc_g = _mma(a, tl.load(wg_ptrs, mask=w_mask, other=0.0), acc_g, IEEE)
        acc_u = _mma(a, tl.load(wu_ptrs, mask=w_mask, other=0.0), acc_u, IEEE)
        a_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    rows64 = rows.to(tl.int64)[:, None]
    tl.store(
        act_ptr + rows64 * stride_act + offs_n[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=n_mask[None, :],
    )
    if STORE_PREACT:
        gu = gu_ptr + rows64 * stride_gu + offs_n[None, :]
        tl.store(gu, acc_g.to(gu_ptr.dtype.element_ty), mask=n_mask[None, :])
        tl.store(gu + I, acc_u.to(gu_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.autotune(
    configs=_configs([(128, 64, 8, 3), (128, 64, 4, 4), (256, 64, 8, 3)], ("BLOCK_N", "BLOCK_K")),
    key=["N_OUT", "K_RED", "BLOCK_M", "SWIGLU_BWD"],
)
@triton.jit
def grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    gu_ptr,
    row_slot_ptr,
    block_expert_ptr,
    N_OUT,
    K_RED,
    E,
    stride_a,
    stride_be,
    stride_bk,
    stride_bn,
    stride_c,
    stride_gu,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_BY_SLOT: tl.constexpr,
    C_BY_SLOT: tl.constexpr,
    SWIGLU_BWD: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(row_slot_ptr + rows)
    valid = slot >= 0
    slot64 = tl.where(valid, slot, 0).to(tl.int64)
    rows64 = rows.to(tl.int64)
    if A_BY_SLOT:
        a_rows = slot64
    else:
        a_rows = rows64
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_RED, BLOCK_K):
        k_mask = offs_k + k0 < K_RED
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, IEEE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if SWIGLU_BWD:
        # acc is dAct for columns n < I (= N_OUT); write d(gate) to column n and d(up) to column I + n.
        gu = gu_ptr + rows64[:, None] * stride_gu + offs_n[None, :]
        g = tl.load(gu, mask=n_mask[None, :], other=0.0).to(tl.float32)
        u = tl.load(gu + N_OUT, mask=n_mask[None, :], other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        d_gate = acc * u * sig * (1.0 + g * (1.0 - sig))
        d_up = acc * g * sig
        c = c_ptr + rows64[:, None] * stride_c + offs_n[None, :]
        tl.store(c, d_gate.to(c_ptr.dtype.element_ty), mask=n_mask[None, :])
        tl.store(c + N_OUT, d_up.to(c_ptr.dtype.element_ty), mask=n_mask[None, :])
    else:
        if C_BY_SLOT:
            c = c_ptr + slot64[:, None] * stride_c + offs_n[None, :]
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])
        else:
            c = c_ptr + rows64[:, None] * stride_c + offs_n[None, :]
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def _row_index(rows, slot, MODE: tl.constexpr, TOP_K):
    if MODE == 1:
        return slot.to(tl.int64)
    elif MODE == 2:
        return (slot // TOP_K).to(tl.int64)
    else:
        return rows.to(tl.int64)


@triton.autotune(
    configs=_configs(
        [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4)],
        ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    ),
    key=["M", "N", "L_MODE", "R_MODE"],
)
@triton.jit
def grouped_wgrad_kernel(
    l_ptr,
    r_ptr,
    dw_ptr,
    row_slot_ptr,
    expert_start_ptr,
    counts_ptr,
    M,
    N,
    TOP_K,
    stride_l,
    stride_r,
    stride_de,
    stride_dm,
    L_MODE: tl.constexpr,
    R_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.program_id(2)
    start = tl.load(expert_start_ptr + e)
    count = tl.load(counts_ptr + e)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, count, BLOCK_K):
        local = r0 + tl.arange(0, BLOCK_K)
        r_mask = local < count
        rows = start + local
        slot = tl.load(row_slot_ptr + rows, mask=r_mask, other=0)
        l_rows = _row_index(rows, slot, L_MODE, TOP_K)
        r_rows = _row_index(rows, slot, R_MODE, TOP_K)
        lt = tl.load(
            l_ptr + l_rows[None, :] * stride_l + offs_m[:, None],
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        rt = tl.load(
            r_ptr + r_rows[:, None] * stride_r + offs_n[None, :],
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = _mma(lt, rt, acc, IEEE)
    dw = dw_ptr + e.to(tl.int64) * stride_de + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :]
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
